"""The backend of a sparse call: decided once per call by the dispatcher, then read by both halves of the call, the
plan (the estimation kernels) and the run (the attention kernel)."""

from __future__ import annotations

import enum

import torch

from . import kernels
from .blockwise import sparse_attention_torch
from .index import SparseIndex

REQUESTS = ("auto", "triton", "torch")  # what patch_model(backend=...) takes


class Backend(enum.Enum):
    TORCH = "torch"  # torch ops on any device: estimation in torch, attention by the blockwise path (autograd works)
    TRITON = "triton"  # the Triton kernels on CUDA, each where its ``supports()`` takes the input, else torch

    @classmethod
    def of(cls, requested: str, device: torch.device) -> Backend:
        """``"torch"`` / ``"triton"`` as asked; ``"auto"``: Triton on CUDA, torch elsewhere."""
        if requested not in REQUESTS:
            raise ValueError(f"backend: must be one of {REQUESTS}, got {requested!r}")
        if requested == "auto":
            return cls.TRITON if torch.device(device).type == "cuda" else cls.TORCH
        return cls(requested)

    def uses(self, kernel, *args) -> bool:
        """Whether this call runs ``kernel`` (a :mod:`sparse_prefill.kernels` module) on these inputs: on the Triton
        backend, where the kernel's ``supports(*args)`` takes them."""
        return self is Backend.TRITON and kernel.supports(*args) is None

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SparseIndex, scale: float
    ) -> torch.Tensor:
        """Sparse attention over ``index``: q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] -> [B, Sq, Hq, D], dtype of q."""
        run = kernels.sparse_attention_triton if self is Backend.TRITON else sparse_attention_torch
        return run(q, k, v, index, scale)
