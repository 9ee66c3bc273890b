"""Benchmark the CPU path: one SmolLM2-shaped attention layer, the sparse torch path against dense SDPA on the CPU.

A benchmark, not a test: it prints a table and writes markdown + CSV under --out. Each row is one pattern at one
budget on every head (9 query / 3 KV heads, head_dim 64, fp32), with budgets from the shipped SmolLM2 config's head
shapes (vertical-slash at four budgets, A-shape at two); dense SDPA (``is_causal``) runs in the same process, before
the sparse rows of each length, so both see the same machine load.

    python benchmarks/bench_cpu.py --lengths 4k,8k
    python benchmarks/bench_cpu.py --smoke   # tiny shapes: checks the script, measures nothing

Columns: ``density`` (computed tiles over causal tiles, :func:`~sparse_prefill.report.tile_density`, mean over heads),
``index_ms`` (estimating the index), ``sparse_ms`` (``sparse_attention_torch`` on it), ``dense_ms``, ``speedup``
(dense over sparse attention, the index left out; ``speedup_total`` counts it in) and ``err_vs_dense`` (relative L2
error of the sparse output against dense attention: what the pattern leaves out, not arithmetic error). Times are the
minimum of --reps runs, in wall-clock ms. Inputs: bench_layer's ``structured`` q/k/v (a local band, sinks, vertical
keys and slashes, the shapes long-context heads show), in fp32.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from common import LAYER_SHAPES, cpu_model, md_cell, md_table, rel_err, structured_qkv, wall_times, write_csv, write_md

from sparse_prefill.tools.cli import lengths as lengths_type
from sparse_prefill.config import PATTERN_DEFAULTS, HeadSpec
from sparse_prefill.plan import LayerPlan
from sparse_prefill.report import tile_density
from sparse_prefill.blockwise import sparse_attention_torch

SHAPE = LAYER_SHAPES["smollm2"]  # SmolLM2-135M: query heads, KV heads, head_dim
VS = PATTERN_DEFAULTS["vertical_slash"]
# The shipped SmolLM2 config's head shapes (fractions of the key length), sparsest to densest.
PROVIDERS = {
    "a_shape:64+0.01": HeadSpec("a_shape", {"sink": 64, "local": 0.01}),
    "a_shape:64+0.02": HeadSpec("a_shape", {"sink": 64, "local": 0.02}),
    "vs:0.05/0.02": HeadSpec("vertical_slash", {**VS, "vertical": 0.05, "slash": 0.02}),
    "vs:0.1/0.05": HeadSpec("vertical_slash", {**VS, "vertical": 0.1, "slash": 0.05}),
    "vs:0.3/0.1": HeadSpec("vertical_slash", {**VS, "vertical": 0.3, "slash": 0.1}),
    "vs:0.5/0.2": HeadSpec("vertical_slash", {**VS, "vertical": 0.5, "slash": 0.2}),
}
COLUMNS = ["S", "provider", "density", "index_ms", "sparse_ms", "dense_ms", "speedup", "speedup_total", "err_vs_dense"]


def best_of(fn, reps: int):
    """(minimum wall-clock ms over reps runs, the last result)."""
    times, out = wall_times(fn, reps)
    return min(times), out


def run(S: int, shape: tuple[int, int, int], reps: int) -> list[dict]:
    H, Hkv, D = shape
    q, k, v = (t.float() for t in structured_qkv(H, Hkv, S, D, dev="cpu"))
    scale = D**-0.5
    dense_ms, dense = best_of(
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True), reps
    )
    dense = dense.transpose(1, 2)  # [1, S, H, D], as the sparse path returns it
    rows = []
    for name, spec in PROVIDERS.items():
        plan = LayerPlan([spec] * H)
        index_ms, index = best_of(lambda: plan.index(q, k, scale, [0]), reps)
        sparse_ms, out = best_of(lambda: sparse_attention_torch(q, k, v, index, scale), reps)
        err = rel_err(out, dense)
        row = dict(S=S, provider=name, density=float(tile_density(index).mean()), index_ms=index_ms)
        row.update(sparse_ms=sparse_ms, dense_ms=dense_ms, speedup=dense_ms / sparse_ms)
        row.update(speedup_total=dense_ms / (index_ms + sparse_ms), err_vs_dense=err)
        rows.append(row)
        print(" ".join(f"{c}={md_cell(row[c])}" for c in COLUMNS), flush=True)
    return rows


def write(rows: list[dict], out: Path, stem: str, description: str) -> None:
    write_csv(out / f"{stem}.csv", rows, COLUMNS)
    lines = [
        f"# One SmolLM2-shaped layer on the CPU: sparse torch path vs dense SDPA\n\n{description}\n",
        *md_table(rows, COLUMNS),
    ]
    write_md(out / f"{stem}.md", lines)
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=lengths_type(64), default=[4096, 8192], help="key lengths (default 4k,8k)")
    p.add_argument("--reps", type=int, default=2, help="runs per measurement; the minimum is reported (default 2)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for bench_cpu_<tag>.md/.csv")
    p.add_argument("--tag", default="smollm2", help="file name suffix (default smollm2)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one run each: checks the script")
    args = p.parse_args(argv)
    shape, lengths, reps = ((3, 1, 16), [256], 1) if args.smoke else (SHAPE, args.lengths, args.reps)
    description = (
        f"{cpu_model()}, {torch.get_num_threads()} threads; torch {torch.__version__}; "
        f"{shape[0]} query / {shape[1]} KV heads, head_dim {shape[2]}, fp32, batch 1"
    )
    print(description)
    rows = [row for S in lengths for row in run(S, shape, reps)]
    write(rows, args.out, f"bench_cpu_{args.tag}", description)


if __name__ == "__main__":
    main()
