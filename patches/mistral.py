"""Mistral: the generic layout. With ``sliding_window`` set (Mistral-7B-v0.1's 4096) every layer is a sliding-window
layer: prompts up to the window run sparse (the band is the causal mask there), longer ones dense; later checkpoints
(``sliding_window: null``) run sparse at any length."""

from .base import Adapter

ADAPTER = Adapter("mistral")
