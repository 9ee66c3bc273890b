"""GPU kernels, one module per kernel. Each module has a launcher (``*_triton``) and ``supports(...)``, which
returns None when the launcher takes the inputs, else a short reason (the callers then use torch, or run dense).

Importable without Triton: every module is then a stand-in whose ``supports`` gives the reason and whose launchers
raise.
"""

from __future__ import annotations


class _Unavailable:
    """A kernel module when Triton does not import."""

    def __init__(self, reason: str):
        self.reason = reason

    def supports(self, *args, **kwargs) -> str:
        return self.reason

    def __getattr__(self, name: str):
        def launcher(*args, **kwargs):
            raise RuntimeError(self.reason)

        return launcher


try:
    from . import cover_columns, cover_rows, pooled, query_aware_js, sparse_attention, vs_scores
except ImportError as err:  # no triton on this platform
    cover_columns = cover_rows = pooled = query_aware_js = sparse_attention = vs_scores = _Unavailable(
        f"triton unavailable: {err}"
    )

# The launchers by name, and the attention kernel's check as ``supports``.
cover_columns_triton = cover_columns.cover_columns_triton
cover_rows_triton = cover_rows.cover_rows_triton
mean_pool_triton = pooled.mean_pool_triton
pooled_scores_triton = pooled.pooled_scores_triton
query_aware_js_triton = query_aware_js.query_aware_js_triton
sparse_attention_triton = sparse_attention.sparse_attention_triton
vertical_slash_scores_triton = vs_scores.vertical_slash_scores_triton
supports = sparse_attention.supports

__all__ = [
    "cover_columns",
    "cover_columns_triton",
    "cover_rows",
    "cover_rows_triton",
    "mean_pool_triton",
    "pooled",
    "pooled_scores_triton",
    "query_aware_js",
    "query_aware_js_triton",
    "sparse_attention",
    "sparse_attention_triton",
    "supports",
    "vertical_slash_scores_triton",
    "vs_scores",
]
