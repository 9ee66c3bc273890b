"""The generic adapter: a decoder whose layers sit at ``model.model.layers[i].self_attn`` (Llama and its kin)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sparse_prefill.config import ModelInfo


class UnsupportedModelError(ValueError):
    """The model cannot be patched; the message says why and what to do."""


@dataclass(frozen=True)
class Adapter:
    model_type: str

    def model_info(self, model) -> ModelInfo:
        c = model.config
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        name = Path(str(getattr(c, "_name_or_path", "") or "unnamed")).name.removesuffix(".gguf")
        return ModelInfo(
            name=name,
            model_type=str(self.model_type),
            num_layers=c.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
        )

    def attention_modules(self, model) -> list:
        """The attention module of each layer, in layer order."""
        try:
            layers = model.model.layers
        except AttributeError as e:
            raise UnsupportedModelError(f"{type(model).__name__}: expected decoder layers at model.model.layers") from e
        return [layer.self_attn for layer in layers]

    def head_projections(self, attention) -> tuple:
        """The query and key projections of one attention module (tensor parallelism shards them by head); None for
        one the module does not have (e.g. a fused projection under ``force=True``: then it is taken as unsharded)."""
        return getattr(attention, "q_proj", None), getattr(attention, "k_proj", None)

    def dense_layers(self, model) -> set[int]:
        """Layers whose attention the sparse patterns do not model (they stay dense): sliding-window layers, as
        ``config.layer_types`` names them, or every layer of a config with a ``sliding_window`` and no layer types
        (Mistral's layout). Their mask is a band, not causal."""
        c = model.config
        types = getattr(c, "layer_types", None)
        if types:
            return {i for i, t in enumerate(types) if t != "full_attention"}
        return set(range(c.num_hidden_layers)) if getattr(c, "sliding_window", None) else set()
