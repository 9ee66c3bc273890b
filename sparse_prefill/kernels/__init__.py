"""GPU kernels. Importable without Triton: ``supports`` then gives the reason and the dispatcher runs dense."""

from __future__ import annotations

try:
    from .cover_columns import cover_columns_triton
    from .cover_rows import cover_rows_triton
    from .pooled import mean_pool_triton, pooled_scores_triton, pooled_supported
    from .query_aware_js import query_aware_js_triton
    from .sparse_attention import sparse_attention_triton, supports
    from .vs_scores import scores_supported, vertical_slash_scores_triton
except ImportError as err:  # no triton on this platform
    _reason = f"triton unavailable: {err}"
    # callers fall back to torch
    cover_columns_triton = cover_rows_triton = mean_pool_triton = pooled_scores_triton = query_aware_js_triton = None

    def pooled_supported(x) -> bool:
        return False

    def supports(q, k) -> str | None:
        return _reason

    def scores_supported(q, last_q) -> bool:
        return False

    def sparse_attention_triton(*args, **kwargs):
        raise RuntimeError(_reason)

    vertical_slash_scores_triton = sparse_attention_triton


__all__ = [
    "cover_columns_triton",
    "cover_rows_triton",
    "mean_pool_triton",
    "pooled_scores_triton",
    "pooled_supported",
    "query_aware_js_triton",
    "scores_supported",
    "sparse_attention_triton",
    "supports",
    "vertical_slash_scores_triton",
]
