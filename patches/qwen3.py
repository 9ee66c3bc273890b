"""Qwen3: the generic layout. Its per-head q/k RMSNorm runs before RoPE, so the attention function sees normed queries
and keys like any other; sliding-window layers (``use_sliding_window``) run dense on prompts longer than the window, as
in Qwen2."""

from .base import Adapter

ADAPTER = Adapter("qwen3")
