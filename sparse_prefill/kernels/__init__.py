"""GPU kernels. Importable without Triton: ``supports`` then gives the reason and the dispatcher runs dense."""

from __future__ import annotations

try:
    from .sparse_attention import sparse_attention_triton, supports
except ImportError as err:  # no triton on this platform
    _reason = f"triton unavailable: {err}"

    def supports(q, k) -> str | None:
        return _reason

    def sparse_attention_triton(*args, **kwargs):
        raise RuntimeError(_reason)


__all__ = ["sparse_attention_triton", "supports"]
