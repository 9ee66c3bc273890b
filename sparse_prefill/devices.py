"""Measured per-device facts: the prompt length where sparse starts to pay, and the fastest dense kernel.

Both tables are keyed on (device class, head_dim). The device class is the GPU family in the name CUDA reports
(``"NVIDIA H100 80GB HBM3"`` -> ``"H100"``, ``"NVIDIA A100-SXM4-80GB"`` -> ``"A100"``; ``"cpu"`` off CUDA). A device
class or head_dim without an entry gets the conservative fallback, never a guess from a neighbour.

``MIN_SEQ_LEN``, the dense-fallback crossover: the smallest key length from which the whole sparse path (index
building + kernel, vertical-slash at the default budgets) beat dense SDPA cuDNN on one layer at every larger measured
length. ``benchmarks/bench_crossover.py`` measures it and prints the exact lines to paste here. A config's
``"min_seq_len": "auto"`` (the default) and ``patch_model(min_seq_len="auto")`` read this table per call, on the
device of that call's query, so a model moved or split across GPUs after patching still gets its devices' values.

``DENSE_BACKEND``: where flash-attn measured faster than SDPA cuDNN for dense attention (the fallback and layers whose
heads are all dense). No entry means SDPA with cuDNN first: on the H200 SDPA's own flash kernel ran 0.58-0.64x of
cuDNN (``benchmarks/results/bench_layer_h200.md``), and flash-attn 2 is that kernel's generation.
"""

from __future__ import annotations

import functools
import re

import torch

from .dense import flash_attn_error

AUTO = "auto"  # a min_seq_len read from MIN_SEQ_LEN per call

# (device class, head_dim) -> dense-fallback crossover in keys, from the lines `python benchmarks/bench_crossover.py`
# prints on that device.
MIN_SEQ_LEN: dict[tuple[str, int], int] = {
    # benchmarks/results/bench_crossover_h200.md / _hd96.md (streaming estimation, CUDA-graphed selection): sparse
    # 1.11x / 1.15x at 16384, dense 1.17x at 12288; head_dim 96 (Phi-3-mini, tiles padded to 128) sparse 1.04x at
    # 16384, dense 1.24x at 12288.
    ("H200", 128): 16384,
    ("H200", 64): 16384,
    ("H200", 96): 16384,
    # benchmarks/results/bench_crossover_h100.md: sparse 1.04x / 1.11x at 16384, dense 1.25x at 12288.
    ("H100", 128): 16384,
    ("H100", 64): 16384,
}
# Anything not in the table (other GPUs, other head_dims, the CPU, whose blockwise torch path never beats dense and
# exists for fidelity): twice the Hopper crossover. MInference's kernels only beat FlashAttention-2 above ~50K on the
# A100. Pass min_seq_len=0 to force the sparse path.
FALLBACK_MIN_SEQ_LEN = 65536

# (device class, head_dim) -> "flash_attn" where it measured faster than SDPA cuDNN (benchmarks/bench_crossover.py).
DENSE_BACKEND: dict[tuple[str, int], str] = {}
DENSE_BACKENDS = ("auto", "sdpa", "flash_attn")

_FAMILY = re.compile(r"\b([A-Z]{1,2}\d{2,3}[A-Z]{0,2})\b")


@functools.lru_cache(maxsize=64)
def _cuda_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device))


def device_class(device: torch.device | str) -> str:
    """The table key of a device: its GPU family (``"H100"``), ``"cpu"`` off CUDA, else the full CUDA name."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    name = _cuda_name(str(device))
    match = _FAMILY.search(name)
    return match.group(1) if match else name


def min_seq_len_for(dev_class: str, head_dim: int) -> tuple[int, str]:
    """The crossover for a device class and head_dim, and where it came from (for reports)."""
    if (dev_class, head_dim) in MIN_SEQ_LEN:
        return MIN_SEQ_LEN[dev_class, head_dim], f"measured for {dev_class}, head_dim {head_dim}"
    return FALLBACK_MIN_SEQ_LEN, f"fallback: no measurement for {dev_class}, head_dim {head_dim}"


def dense_backend_for(requested: str, dev_class: str, head_dim: int) -> str:
    """``"sdpa"`` or ``"flash_attn"``: forced ones as asked; ``"auto"`` takes flash-attn only where the table says it
    measured faster and it is installed."""
    if requested not in DENSE_BACKENDS:
        raise ValueError(f"dense_backend: must be one of {DENSE_BACKENDS}, got {requested!r}")
    if requested != "auto":
        return requested
    if DENSE_BACKEND.get((dev_class, head_dim)) == "flash_attn" and flash_attn_error() is None:
        return "flash_attn"
    return "sdpa"
