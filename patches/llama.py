"""Llama (and SmolLM2): the generic layout, every layer full causal attention."""

from .base import Adapter

ADAPTER = Adapter("llama")
