"""Benchmark the sparse Triton kernel against dense SDPA (cuDNN, flash) on one attention layer.

    python benchmarks/bench_kernels.py [--lengths 4096 8192 ...] [--out benchmarks/results]

Shapes: Llama-3-8B (32 query heads, 8 KV heads, head_dim 128) and SmolLM2 (9 / 3 / 64), bf16, batch 1. The kernel runs
on synthetic indices at fixed tile densities (share of the causal 64x64 tiles it computes):

* ``dense``: every block diagonal (100%): the kernel doing exactly what a causal dense kernel does;
* ``band``: the nearest block diagonals (A-shape / local attention);
* ``vs``: a few diagonals plus single columns (vertical-slash), exercising the gathered column loop;
* ``blocks``: random causal block lists with the own block (block-sparse).

Reported per row: median ms (triton.testing.do_bench_cudagraph), TFLOP/s over the tiles actually computed
(4·D·64·64 FLOPs per
tile for the kernel, 4·D·S²/2 per head for causal SDPA), speed-up over cuDNN, and per-tile efficiency = kernel
TFLOP/s / cuDNN TFLOP/s (1.0 means a computed tile costs what a cuDNN tile costs). The cuDNN baseline is the faster
of its enable_gqa call and a call on K/V repeated to all query heads.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from common import LAYER_SHAPES, device_name, do_bench, md_table, versions, write_csv, write_md

SHAPES = {name: LAYER_SHAPES[name] for name in ("llama3-8b", "smollm2")}
DENSITIES = (0.05, 0.10, 0.25)


def synthetic_index(pattern: str, density: float, H: int, S: int, device: str):
    """An index of one layer (batch 1, no padding) with about ``density`` of the causal tiles per head."""
    from sparse_prefill.index import BLOCK, make_index
    from sparse_prefill.ops import ascending, cdiv

    N = cdiv(S, BLOCK)
    kv_start = torch.zeros(1, dtype=torch.long, device=device)
    diag = torch.zeros(1, H, N, dtype=torch.bool, device=device)
    cols = torch.full((1, H, 0), -1, dtype=torch.long, device=device)
    blocks = torch.full((1, H, N, 0), -1, dtype=torch.long, device=device)
    # A band of w diagonals covers N*w - w(w-1)/2 of the N(N+1)/2 causal tiles.
    causal = N * (N + 1) / 2

    def width(share: float) -> int:
        return next(w for w in range(1, N + 1) if N * w - w * (w - 1) / 2 >= share * causal)

    if pattern == "dense":
        diag[:] = True
    elif pattern == "band":
        diag[..., : width(density)] = True
    elif pattern == "vs":
        # Half the tiles from diagonals (a band plus scattered ones), half from columns: V columns cost about
        # V / (64 N) of the causal tiles (each query block sees on average half of them, 64 per tile).
        diag[..., : width(density / 4)] = True
        g = torch.Generator(device=device).manual_seed(0)
        extra = int(density / 4 * N)
        diag[..., torch.randperm(N, generator=g, device=device)[:extra]] = True
        n_cols = int(density / 2 * BLOCK * N)
        cols = torch.rand(1, H, S, generator=g, device=device).topk(n_cols, dim=-1).indices
    elif pattern == "blocks":
        g = torch.Generator(device=device).manual_seed(0)
        j = torch.arange(N, device=device)
        keep_max = min(N, int(density * N * 1.3) + 2)
        scores = torch.rand(1, H, N, N, generator=g, device=device)
        scores = scores.masked_fill(j[None, :] > j[:, None], -1.0)  # no padding, S multiple of 64: base(m) = m
        scores = torch.where(j[None, :] == j[:, None], 2.0, scores)  # own block always
        val, idx = scores.topk(keep_max, dim=-1)
        want = (density * (j + 1)).ceil().long().clamp(min=1)  # blocks per query block
        blocks = torch.where((torch.arange(keep_max, device=device) < want[:, None]) & (val >= 0), idx, -1)
        del scores
    return make_index(S, S, kv_start, diag, ascending(cols), ascending(blocks))


def sdpa_runners(backend, q, k, v) -> dict:
    """Causal SDPA calls pinned to one backend, by label: GQA through enable_gqa, and with K/V repeated ahead of
    time (outside the timing). The ones the backend refuses are left out."""
    from torch.nn.attention import sdpa_kernel

    def make(kk, vv, gqa):
        def run():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)

        return run

    group = q.shape[1] // k.shape[1]
    tries = {"": (k, v, True)}
    if group > 1:
        tries[" (repeated K/V)"] = (k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), False)
    runners = {}
    for note, (kk, vv, gqa) in tries.items():
        try:
            make(kk, vv, gqa)()
            torch.cuda.synchronize()
            runners[note] = make(kk, vv, gqa)
        except RuntimeError:
            pass
    return runners


def pin_stages(stages: int) -> None:
    """Make the sparse kernel's autotuner try only ``stages`` (its warps kept), forgetting what it chose before."""
    from sparse_prefill.kernels import sparse_attention

    tuner = sparse_attention._sparse_attn_fwd
    tuner.configs = [triton.Config({}, num_warps=tuner.configs[0].num_warps, num_stages=stages)]
    tuner.cache.clear()


COLUMNS = ["shape", "S", "provider", "density", "ms", "tflops", "speedup", "efficiency"]
HEADER = ["shape", "S", "provider", "density", "ms", "TFLOP/s", "speed-up vs cuDNN", "per-tile efficiency"]


def write_results(rows: list[dict], meta: dict, out: Path) -> None:
    """Markdown table and CSV of all rows so far (rewritten after each length, so a cut-short run keeps its rows)."""
    write_csv(out / "bench_kernels.csv", rows, COLUMNS, meta)
    lines = [
        f"# Sparse attention kernel vs dense SDPA ({meta['device']}, torch {meta['torch']}, triton {meta['triton']})",
        "",
        (
            "bf16, batch 1, one layer. density = computed / causal 64x64 tiles; efficiency = kernel TFLOP/s over "
            "computed tiles / cuDNN causal TFLOP/s."
        ),
        "",
        *md_table(rows, COLUMNS, HEADER),
    ]
    write_md(out / "bench_kernels.md", lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--flash-max", type=int, default=131072, help="longest S timed on the flash backend")
    parser.add_argument(
        "--stages",
        type=lambda v: [int(s) for s in v.split(",")],
        default=[],
        help="pin the kernel to each of these pipeline depths in turn (rows 'triton-<pattern> s<n>'); default: the "
        "kernel's own autotuned choice",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device, nothing to benchmark")
        return 0

    from torch.nn.attention import SDPBackend

    from sparse_prefill.report import tile_density
    from sparse_prefill.kernels import sparse_attention_triton

    device, env = "cuda", versions()
    meta = {"device": device_name(cuda=True), "torch": env["torch"], "triton": env["triton"]}
    rows = []
    for shape in args.shapes:
        Hq, Hkv, D = SHAPES[shape]
        for S in args.lengths:
            g = torch.Generator(device=device).manual_seed(0)
            q = torch.randn(1, Hq, S, D, generator=g, device=device, dtype=torch.bfloat16)
            k = torch.randn(1, Hkv, S, D, generator=g, device=device, dtype=torch.bfloat16)
            v = torch.randn(1, Hkv, S, D, generator=g, device=device, dtype=torch.bfloat16)
            dense_flops = 4 * D * S * S / 2 * Hq
            base_ms = float("inf")  # cuDNN, the faster of its GQA and repeated-K/V calls
            for name, backend in (
                ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
                ("sdpa-flash", SDPBackend.FLASH_ATTENTION),
            ):
                if name == "sdpa-flash" and S > args.flash_max:
                    continue
                runners = list(sdpa_runners(backend, q, k, v).items())
                for note, run in runners if name == "sdpa-cudnn" else runners[:1]:
                    ms = do_bench(run, rep=100, graph=True)
                    if name == "sdpa-cudnn":
                        base_ms = min(ms, base_ms)
                    rows.append(
                        {
                            "shape": shape,
                            "S": S,
                            "provider": name + note,
                            "density": 1.0,
                            "ms": ms,
                            "tflops": dense_flops / ms / 1e9,
                        }
                    )
                torch.cuda.empty_cache()
            base_ms = base_ms if base_ms < float("inf") else float("nan")  # no cuDNN: NaN speed-ups
            cudnn_tflops = dense_flops / base_ms / 1e9
            out = torch.empty(1, S, Hq, D, device=device, dtype=torch.bfloat16)
            cases = [("dense", 1.0)] + [(p, d) for d in DENSITIES for p in ("band", "vs", "blocks")]
            for stages, (pattern, target) in itertools.product(args.stages or [None], cases):
                if stages is not None:
                    pin_stages(stages)
                index = synthetic_index(pattern, target, Hq, S, device)
                density = tile_density(index)[0]  # [H]
                N = index.num_k_blocks
                flops = float(density.sum()) * N * (N + 1) / 2 * 4 * D * 64 * 64
                ms = do_bench(partial(sparse_attention_triton, q, k, v, index, D**-0.5, out=out), rep=100, graph=True)
                rows.append(
                    {
                        "shape": shape,
                        "S": S,
                        "provider": f"triton-{pattern}" + ("" if stages is None else f" s{stages}"),
                        "density": float(density.mean()),
                        "ms": ms,
                        "tflops": flops / ms / 1e9,
                    }
                )
            for r in rows:
                if r["shape"] == shape and r["S"] == S:
                    r["speedup"] = base_ms / r["ms"]
                    r["efficiency"] = r["tflops"] / cudnn_tflops
            for r in [r for r in rows if r["shape"] == shape and r["S"] == S]:
                print(
                    f"{shape:10s} S={S:6d} {r['provider']:28s} density {r['density']:.3f} {r['ms']:9.3f} ms "
                    f"{r['tflops']:6.1f} TFLOP/s  x{r['speedup']:.2f}  eff {r['efficiency']:.2f}",
                    flush=True,
                )
            torch.cuda.empty_cache()
            write_results(rows, meta, args.out)

    print(f"wrote {args.out / 'bench_kernels.md'} and {args.out / 'bench_kernels.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
