"""Constants and input checks the Triton kernels share. Importable without Triton."""

from __future__ import annotations

import os

import torch

from ..index import BLOCK

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter: tests run the kernels on CPU
LOG2E = 1.4426950408889634  # folded into the softmax scale, so the kernels use exp2
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

__all__ = ["BLOCK", "FLOAT_DTYPES", "INTERPRET", "LOG2E", "device_reason", "head_dim_reason"]


def device_reason(x: torch.Tensor) -> str | None:
    """None when ``x`` is on CUDA, else why a kernel cannot take it."""
    return None if x.is_cuda else "not a CUDA tensor"


def head_dim_reason(head_dim: int, most: int) -> str | None:
    """None when a kernel with tiles padded to a power of two takes ``head_dim`` (a multiple of 16 in [16, most])."""
    return None if head_dim % 16 == 0 and 16 <= head_dim <= most else f"head_dim {head_dim}"
