"""Llama (and SmolLM2, Mistral-style Llama checkpoints): the generic layout, every layer full causal attention."""

from .base import Adapter

ADAPTER = Adapter("llama")
