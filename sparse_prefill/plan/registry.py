"""Every pattern by name. A new pattern is one module defining its :class:`~.pattern.Pattern` and one line here
(plus a kernel in :mod:`sparse_prefill.kernels` if it needs one)."""

from __future__ import annotations

from . import a_shape, adaptive, block_sparse, dense, vertical_slash
from .pattern import Pattern

PATTERNS: dict[str, Pattern] = {
    p.name: p
    for p in (
        dense.PATTERN,
        a_shape.PATTERN,
        vertical_slash.PATTERN,
        block_sparse.PATTERN,
        adaptive.PATTERN,
    )
}
