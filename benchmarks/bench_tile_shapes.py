"""What a causal attention tile can cost in Triton on this GPU, by tile shape: the ceiling a sparse kernel's tiles
can reach, against SDPA cuDNN in the same run.

    python benchmarks/bench_tile_shapes.py --out benchmarks/results/bench_tile_shapes_h200.md

A minimal dense causal flash-attention kernel written like the sparse one (K/V through TMA descriptors, GQA without
repeating K/V, fp32 online softmax, query blocks launched longest first) runs at each (BLOCK_M query rows, BLOCK_N
keys per tile, warps, pipeline stages, warp specialization of the key loop). bf16, batch 1, Llama-3-8B (32/8 heads,
head_dim 128) and SmolLM2 (9/3, 64) layers. Per row: median ms, TFLOP/s (4·D·S²/2 per head) and the ratio to cuDNN.
A configuration Triton cannot compile on this GPU is listed with its error.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from common import LAYER_SHAPES, device_name, do_bench, md_table, random_qkv, rel_err, versions, versions_text, write_md
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.tools.tensor_descriptor import TensorDescriptor

from sparse_prefill.kernels.common import LOG2E
from sparse_prefill.kernels.sparse_attention import _tile

# (BLOCK_M, BLOCK_N, num_warps): 64-row tiles take one warpgroup, 128-row tiles two.
SHAPES = [(64, 64, 4), (64, 128, 4), (128, 64, 8), (128, 128, 8)]


@triton.jit
def _dense_causal(
    Q,
    Out,
    k_desc,
    v_desc,
    stride_qh,
    stride_qs,
    stride_oh,
    stride_os,
    S,
    GROUP,
    qk_scale,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WS: tl.constexpr,
):
    m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    kv_head = h // GROUP
    rows = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + h.to(tl.int64) * stride_qh + rows[:, None].to(tl.int64) * stride_qs + offs_d[None, :])
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    n_full = (m * BLOCK_M) // BLOCK_N  # key tiles wholly before the block's first row
    # The sparse kernel's online-softmax step (_tile), so that a tile here costs what one costs there.
    for j in tl.range(0, n_full, warp_specialize=WS):
        k = k_desc.load([0, kv_head, j * BLOCK_N, 0]).reshape(BLOCK_N, D)
        v = v_desc.load([0, kv_head, j * BLOCK_N, 0]).reshape(BLOCK_N, D)
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, k, v, qk_scale, 0, False, "tf32")
    for j in range(n_full, tl.cdiv((m + 1) * BLOCK_M, BLOCK_N)):
        k = k_desc.load([0, kv_head, j * BLOCK_N, 0]).reshape(BLOCK_N, D)
        v = v_desc.load([0, kv_head, j * BLOCK_N, 0]).reshape(BLOCK_N, D)
        keep = (j * BLOCK_N + tl.arange(0, BLOCK_N))[None, :] <= rows[:, None]
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, k, v, qk_scale, keep, True, "tf32")
    out = acc / l_i[:, None]
    tl.store(
        Out + h.to(tl.int64) * stride_oh + rows[:, None].to(tl.int64) * stride_os + offs_d[None, :],
        out.to(Out.dtype.element_ty),
    )


def dense_causal(q, k, v, block_m: int, block_n: int, warps: int, stages: int, ws: bool) -> torch.Tensor:
    """q [1, H, S, D], k/v [1, Hkv, S, D] (S a multiple of 128) -> [1, S, H, D]."""
    _, H, S, D = q.shape
    out = torch.empty(1, S, H, D, dtype=q.dtype, device=q.device)
    k_desc = TensorDescriptor(k, list(k.shape), list(k.stride()), [1, 1, block_n, D])
    v_desc = TensorDescriptor(v, list(v.shape), list(v.stride()), [1, 1, block_n, D])
    _dense_causal[(S // block_m, H)](
        q, out, k_desc, v_desc, q.stride(1), q.stride(2), out.stride(2), out.stride(1), S, H // k.shape[1],
        D**-0.5 * LOG2E, D=D, BLOCK_M=block_m, BLOCK_N=block_n, WS=ws, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=lambda v: [int(s) for s in v.split(",")], default=[16384, 32768])
    p.add_argument("--stages", type=lambda v: [int(s) for s in v.split(",")], default=[2, 3])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_tile_shapes.md"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    rows = []
    for (name, (H, Hkv, D)), S in itertools.product([(n, LAYER_SHAPES[n]) for n in ("llama3-8b", "smollm2")],
                                                    args.lengths):  # fmt: skip
        q, k, v = random_qkv(H, Hkv, S, D)
        flops = 4 * D * S * S / 2 * H
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
            cudnn_ms = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        rows.append(dict(shape=name, S=S, kernel="sdpa-cudnn", ms=cudnn_ms, tflops=flops / cudnn_ms / 1e9, ratio=1.0))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            ms = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        rows.append(dict(shape=name, S=S, kernel="sdpa-flash", ms=ms, tflops=flops / ms / 1e9, ratio=cudnn_ms / ms))
        for (bm, bn, warps), stages, ws in itertools.product(SHAPES, args.stages, (False, True)):
            label = f"triton {bm}x{bn} w{warps} s{stages}" + (" ws" if ws else "")
            run = lambda: dense_causal(q, k, v, bm, bn, warps, stages, ws)  # noqa: E731
            try:
                err = rel_err(run(), ref)
                ms = do_bench(run)
            except Exception as e:  # a shape this Triton cannot compile here: say so, go on
                rows.append(dict(shape=name, S=S, kernel=label, note=str(e).splitlines()[0][:80]))
                print(rows[-1], flush=True)
                continue
            note = "" if err < 2e-2 else f"rel err {err:.3g}"
            rows.append(dict(shape=name, S=S, kernel=label, ms=ms, tflops=flops / ms / 1e9, ratio=cudnn_ms / ms,
                             note=note))  # fmt: skip
            print(rows[-1], flush=True)
    lines = [
        "# Causal attention tiles in Triton by shape, against SDPA cuDNN",
        "",
        f"`python benchmarks/bench_tile_shapes.py`; {device_name(True)}; "
        f"{versions_text(versions(), ('torch', 'triton'))}; bf16, batch 1.",
        "",
        *md_table(
            rows,
            ("shape", "S", "kernel", "ms", "tflops", "ratio", "note"),
            ("shape", "S", "kernel", "ms", "TFLOP/s", "vs cuDNN", "note"),
        ),  # fmt: skip
    ]
    write_md(args.out, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
