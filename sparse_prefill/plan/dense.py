"""Dense heads: every block diagonal, so every causal key. Static."""

from __future__ import annotations

import torch

from ..ops import cdiv
from ..index import BLOCK
from .pattern import Pattern, Sets


class Dense(Pattern):
    def static(self, specs, shape, ctx) -> Sets:
        return Sets(
            diag=torch.ones(shape.B, len(specs), cdiv(shape.Sk, BLOCK), dtype=torch.bool, device=shape.starts.device)
        )


PATTERN = Dense(name="dense", abbrev="D", alias="dense")
