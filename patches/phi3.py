"""Phi-3 / Phi-3.5 / Phi-4-mini: the generic layout. The fused ``qkv_proj`` does not matter (the attention function
gets q and k after RoPE), except that tensor parallelism cannot be read from it: the patch takes such a model as
unsharded. Phi-3-mini's head_dim 96 runs on kernel tiles padded to 128. Its ``sliding_window`` (262144 on the 128K
checkpoints) is longer than any prompt, so it never bites."""

from .base import Adapter

ADAPTER = Adapter("phi3")
