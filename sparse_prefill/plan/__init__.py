"""The plan half of a sparse call: from a layer's head specs and q/k to the :class:`~sparse_prefill.index.SparseIndex`
the backends run.

* :mod:`.layer`: :class:`LayerPlan` (per-layer grouping, static parts, the measure/select stages) and
  :func:`build_index`;
* :mod:`.graphs`: the select stage as a CUDA graph;
* :mod:`.pattern`, :mod:`.registry`: what a pattern provides, and every pattern by name;
* one module per pattern: :mod:`.dense`, :mod:`.a_shape`, :mod:`.vertical_slash`, :mod:`.block_sparse`,
  :mod:`.adaptive`; :mod:`.common` holds what their estimators share.
"""

from __future__ import annotations

from .layer import LayerPlan, PlannedIndex, build_index
from .registry import PATTERNS

__all__ = ["PATTERNS", "LayerPlan", "PlannedIndex", "build_index"]
