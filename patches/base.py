"""The generic adapter: a decoder whose layers sit at ``model.model.layers[i].self_attn`` (Llama and its kin)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sparse_prefill.config import ModelInfo


UNNAMED = "unnamed"  # the name of a model without a ``_name_or_path``


class UnsupportedModelError(ValueError):
    """The model cannot be patched; the message says why and what to do."""


@dataclass(frozen=True)
class Adapter:
    model_type: str

    def model_info(self, model) -> ModelInfo:
        """The type and attention shape of ``model``, named after the basename of its ``_name_or_path``."""
        return self.config_info(model.config)

    def config_info(self, c) -> ModelInfo:
        """:meth:`model_info` from a transformers config alone (no model needed)."""
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        name = Path(str(getattr(c, "_name_or_path", "") or UNNAMED)).name.removesuffix(".gguf")
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
        one the module does not have (e.g. Phi-3's fused ``qkv_proj``: then it is taken as unsharded)."""
        return getattr(attention, "q_proj", None), getattr(attention, "k_proj", None)
