"""One launch of the sparse attention path and one of SDPA cuDNN on the same q/k/v, for Nsight Compute.

    ncu --profile-from-start off --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats --section ComputeWorkloadAnalysis \
        python benchmarks/ncu_sparse_attn.py --pattern vs --density 0.05 --length 32768

Llama-3-8B layer shape (32/8 heads, head_dim 128), bf16, batch 1, on ``bench_kernels.py``'s synthetic index of that
pattern and density. Everything runs once outside the profiled range first (Triton's autotuning launches the kernel
once per config); the profiled range then holds exactly the kernels of one ``sparse_attention_triton`` call and
one cuDNN call.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from bench_kernels import synthetic_index
from common import LAYER_SHAPES, random_qkv
from torch.nn.attention import SDPBackend, sdpa_kernel

from sparse_prefill.kernels import sparse_attention_triton


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pattern", default="vs", choices=["dense", "band", "vs", "blocks"])
    p.add_argument("--density", type=float, default=0.05)
    p.add_argument("--length", type=int, default=32768)
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    H, Hkv, D = LAYER_SHAPES["llama3-8b"]
    q, k, v = random_qkv(H, Hkv, args.length, D)
    index = synthetic_index(args.pattern, args.density, H, args.length, "cuda")

    def sparse():
        return sparse_attention_triton(q, k, v, index, D**-0.5)

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    for run in (sparse, cudnn):
        run()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for run in (sparse, cudnn):
        run()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
