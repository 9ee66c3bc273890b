"""Qwen2: the generic layout; layers that use sliding-window attention stay dense (their mask is not causal)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Adapter


@dataclass(frozen=True)
class Qwen2Adapter(Adapter):
    def dense_layers(self, model) -> set[int]:
        c = model.config
        if not getattr(c, "use_sliding_window", False):
            return set()
        types = getattr(c, "layer_types", None) or []
        return {i for i, t in enumerate(types) if t == "sliding_attention"}


ADAPTER = Qwen2Adapter("qwen2")
