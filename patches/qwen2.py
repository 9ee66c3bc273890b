"""Qwen2: the generic layout; its sliding-window layers (``use_sliding_window``, from ``max_window_layers`` on) run
dense on prompts longer than the window."""

from .base import Adapter

ADAPTER = Adapter("qwen2")
