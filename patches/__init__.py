"""Per-architecture adapters, keyed on ``config.model_type``.

An adapter only says where a model keeps its attention modules and what shape they have; no forward is
rewritten. The attention itself goes through transformers' ``AttentionInterface``.
"""

from __future__ import annotations

from .base import Adapter, UnsupportedModelError
from .glm import ADAPTER as GLM
from .llama import ADAPTER as LLAMA
from .mistral import ADAPTER as MISTRAL
from .phi3 import ADAPTER as PHI3
from .qwen2 import ADAPTER as QWEN2
from .qwen3 import ADAPTER as QWEN3

ADAPTERS: dict[str, Adapter] = {a.model_type: a for a in (LLAMA, MISTRAL, PHI3, QWEN2, QWEN3, GLM)}


def adapter_for(model, force: bool = False) -> Adapter:
    """The adapter for ``model``; with ``force=True`` an unknown decoder gets the generic Llama-style adapter."""
    model_type = getattr(model.config, "model_type", None)
    if model_type in ADAPTERS:
        return ADAPTERS[model_type]
    if force:
        return Adapter(model_type)
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported (supported: {sorted(ADAPTERS)}); "
        "pass force=True to patch a Llama-style decoder anyway"
    )


__all__ = ["ADAPTERS", "Adapter", "UnsupportedModelError", "adapter_for"]
