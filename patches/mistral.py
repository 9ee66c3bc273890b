"""Mistral: the generic layout. A config with ``sliding_window`` set (Mistral-7B-v0.1's 4096) makes every layer a
sliding-window layer, so all stay dense (``patch_model`` warns); later checkpoints (``sliding_window: null``) run
sparse."""

from .base import Adapter

ADAPTER = Adapter("mistral")
