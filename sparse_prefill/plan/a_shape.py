"""A-shape heads: the first ``sink`` key columns and the ``local`` nearest diagonals. Static."""

from __future__ import annotations

from ..index import slash_diagonals
from .common import per_sample_budgets, prefix
from .pattern import Pattern, Sets


class AShape(Pattern):
    def static(self, specs, shape, ctx) -> Sets:
        dev = shape.starts.device
        sink, local = (per_sample_budgets(specs, name, shape.lengths) for name in ("sink", "local"))
        diag = slash_diagonals(prefix(local, dev, ctx), shape.Sq, shape.Sk, shape.starts)
        return Sets(cols=prefix(sink, dev, ctx), diag=diag)


PATTERN = AShape(
    name="a_shape",
    abbrev="A",
    alias="a",
    defaults={"sink": 128, "local": 3968},  # sink keys + a local window of keys (MInference's)
    budgets=frozenset({"sink", "local"}),
)
