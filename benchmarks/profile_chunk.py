"""Where the time of a chunked sparse prefill goes: one chunk through every layer's plan, stage by stage.

    python benchmarks/profile_chunk.py --lengths 128k,512k,1024k --out benchmarks/results/profile_chunk_h200.md

Qwen2.5-7B-1M's attention shape (28 query heads, 4 KV heads, head_dim 128) on a structured bf16 input
(``common.structured_qkv``). For the last ``--chunk`` queries of a prompt of each length (the queries a chunked prefill
sends last, over every key so far), each layer of the shipped config (``--slash-select`` on its vertical-slash heads)
plans its index (``LayerPlan.index``: estimation and selection, eager as a new chunk shape is) and runs the Triton
kernel. Reported per length, summed over the layers: CUDA-event milliseconds of each stage, the tile density, and the
CUDA kernels that take most of the planning time (torch.profiler), which is what a faster chunk has to cut.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import device_name, md_table, structured_qkv, versions, versions_text, write_md

from sparse_prefill.backend import Backend
from sparse_prefill.config import load_config
from sparse_prefill.kernels import sparse_attention_triton
from sparse_prefill.patch import with_head_params
from sparse_prefill.plan import LayerPlan
from sparse_prefill.report import tile_density
from sparse_prefill.tools.cli import parse_lengths

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "qwen2.5-7b-instruct-1m.json"
H, HKV, D = 28, 4, 128
TOP_KERNELS = 8


def timed(fn):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    torch.cuda.synchronize()
    return out, start.elapsed_time(end)


def chunk_once(plans: list[LayerPlan], q, k, v, scale: float) -> tuple[float, float, float]:
    """(plan ms, kernel ms, mean tile density) of one chunk through every layer; each layer's plan is new to the
    chunk's shape, as in a chunked prefill."""
    plan_ms = kernel_ms = density = 0.0
    for plan in plans:
        plan.release()
        index, ms = timed(lambda: plan.index(q, k, scale, [0], Backend.TRITON))
        plan_ms += ms
        _, ms = timed(lambda: sparse_attention_triton(q, k, v, index, scale))
        kernel_ms += ms
        density += float(tile_density(index).mean()) / len(plans)
    return plan_ms, kernel_ms, density


def top_planning_kernels(plans: list[LayerPlan], q, k, scale: float) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    for plan in plans:
        plan.release()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for plan in plans:
            plan.index(q, k, scale, [0], Backend.TRITON)
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)[:TOP_KERNELS]
    return [
        {"kernel": e.key[:70].replace("|", "/"), "calls": e.count, "ms": round(e.device_time_total / 1e3, 2)}
        for e in events
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=parse_lengths, default=parse_lengths("128k,512k,1024k"))
    p.add_argument("--chunk", type=int, default=32768)
    p.add_argument("--slash-select", choices=("token", "block"), default="block")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/profile_chunk.md"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    config = with_head_params(load_config(CONFIG), "vertical_slash", {"slash_select": args.slash_select})
    plans = [LayerPlan(heads) for heads in config.layers]
    scale = D**-0.5
    rows, tables = [], []
    for S in args.lengths:
        q, k, v = structured_qkv(H, HKV, S, D)
        q = q[:, :, -args.chunk :].contiguous()
        chunk_once(plans, q, k, v, scale)  # warm-up: compilation, autotuning, constant caches
        plan_ms, kernel_ms, density = chunk_once(plans, q, k, v, scale)
        rows.append(
            {"keys": S, "plan_ms": round(plan_ms, 1), "kernel_ms": round(kernel_ms, 1),
             "plan_share": round(plan_ms / (plan_ms + kernel_ms), 3), "density": round(density, 4)}
        )  # fmt: skip
        print(rows[-1], flush=True)
        tables += [f"### planning kernels, {S} keys", "", *md_table(top_planning_kernels(plans, q, k, scale),
                                                                  ("kernel", "calls", "ms")), ""]  # fmt: skip
        del q, k, v
        torch.cuda.empty_cache()
    lines = [
        "# One chunk of a chunked prefill, every layer: planning against the attention kernel",
        "",
        f"`python benchmarks/profile_chunk.py` (chunk {args.chunk}, {args.slash_select} slashes, shipped "
        f"{CONFIG.name}, 28 layers); {device_name(True)}; {versions_text(versions(), ('torch', 'triton'))}.",
        "",
        *md_table(rows, ("keys", "plan_ms", "kernel_ms", "plan_share", "density")),
        "",
        *tables,
    ]
    write_md(args.out, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
