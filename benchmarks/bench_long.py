"""Long prompts on one GPU: time to first token up to 1M tokens with chunked prefill, sparse vs dense.

    python benchmarks/bench_long.py --slash-select block --out benchmarks/results/bench_long_h200  # H200: ~4 min
    python benchmarks/bench_long.py --slash-select token --out benchmarks/results/bench_long_h200_token
    python benchmarks/bench_long.py --smoke --out /tmp/long/bench_long_smoke     # CPU, tiny model, seconds

A random-init model of a real shape (``qwen2.5-7b-1m``: Qwen2.5-7B-Instruct-1M; ``llama3-8b``: Meta-Llama-3-8B, whose
1M-token KV cache, 137 GB in bf16, does not fit next to its weights) is built directly on the GPU in bf16. Each TTFT is
``generate(max_new_tokens=1, prefill_chunk_size=--chunk)`` of a random prompt, batch 1, CUDA-synchronised wall time:
the prompt goes through the model chunk by chunk into one DynamicCache on the GPU, each chunk attending to the whole
cache so far. One warm-up of two chunks per config, then one timed run per (config, length) (``--reps`` for more; at
these lengths run-to-run spread is small next to the differences). Configs, all chunked alike:

* ``sparse``: ``patch_model`` with the shipped converted config of the model (``configs/<name>.json``) if there is one,
  else vertical-slash on every head at MInference's budgets; ``min_seq_len=0``, so every chunk runs sparse;
* ``dense``: SDPA with the same lower-right causal bias for the chunks (no ``chunk x keys`` mask tensor): SDPA runs
  the first chunk on cuDNN and the later ones on its flash kernel (cuDNN takes no bottom-right causal), up to
  ``--dense-max`` tokens; longer ones are extrapolated: ``ceiling(S) + c * S^2`` with ``c`` a least-squares fit of
  the measured ``dense - ceiling`` (causal attention is quadratic), and labelled so;
* ``ceiling``: attention skipped (zeros): everything else, the floor of any attention speed-up.

Per row: TTFT, speed-up over dense, peak GPU memory (``torch.cuda.max_memory_allocated``, weights and KV cache
included), the host's peak RSS so far and, for sparse, the mean tile density of the final chunk's calls (the density of
its queries over every key). A row that runs out of GPU memory is written as ``OOM``. Output: ``--out`` + ``.md`` and
``.csv``, rewritten after every row; ``--budget-s`` skips rows that would end later than it.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch
from common import (
    Clock,
    M,
    build_model,
    dense_sdpa,
    device_name,
    length_label,
    md_table,
    ms_text,
    path_summary,
    random_ids,
    run_device,
    skip_attention,
    suffixed,
    versions,
    write_csv,
)

from sparse_prefill import SparseConfig, load_config, patch_model, unpatch_model
from sparse_prefill.config import CHOICES
from sparse_prefill.dense import dense_attention
from sparse_prefill.layout import lower_right_mask
from sparse_prefill.patch import register_attention
from sparse_prefill.patches import adapter_for

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# The models this benchmark builds (shapes in common.MODELS), their positions past 1M, and the shipped sparse config
# of each, if there is one. Llama-3-8B's 1M-token KV cache (137 GB in bf16) does not fit next to its weights.
LONG = {"qwen2.5-7b-1m": "qwen2.5-7b-instruct-1m.json", "llama3-8b": None}
DENSE, SKIP = "sp_long_dense", "sp_long_skip"
COLUMNS = ["model", "S", "config", "ttft_ms", "speedup", "extrapolated", "peak_gb", "host_rss_gb", "path", "density"]
META = ["device", "dtype", "chunk", "torch", "transformers", "sparse_prefill"]


def register() -> None:
    """Dense SDPA and skipped attention, each with the lower-right bias the patched model's chunks get."""
    for name, fn in ((DENSE, dense_attention), (SKIP, skip_attention)):
        register_attention(name, fn, lower_right_mask)


def sparse_config(model, config_file: str | None, smoke: bool) -> tuple[SparseConfig, str]:
    """The shipped config of the model if ``configs/`` has it (not for the smoke run's tiny shape), else uniform
    vertical-slash; and its description."""
    info = adapter_for(model).model_info(model)
    if smoke:
        return SparseConfig.uniform(info, "vertical_slash"), "uniform vertical-slash (smoke shape)"
    if config_file and (CONFIGS / config_file).exists():
        return load_config(CONFIGS / config_file), f"shipped {config_file}"
    return SparseConfig.uniform(info, "vertical_slash"), "uniform vertical-slash at MInference's budgets"


def ttft(model, ids, chunk: int, clock: Clock, reps: int) -> tuple[float, float | None]:
    """(median ms of ``reps`` chunked generate(max_new_tokens=1), peak GB over them)."""

    def run():
        with torch.no_grad(), dense_sdpa():
            return model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False, pad_token_id=0,
                prefill_chunk_size=chunk,
            )  # fmt: skip

    return clock.run(run, reps, warmup=0, free=True)


def host_rss_gb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def extrapolate(rows: list[dict], name: str) -> None:
    """Dense rows for the lengths not measured: ceiling + c * S^2, ``c`` fitted to the measured dense - ceiling."""
    mine = {(r["S"], r["config"]): r for r in rows if r["model"] == name and r["ttft_ms"] is not None}
    pairs = [(S, r["ttft_ms"] - mine[S, "ceiling"]["ttft_ms"]) for (S, c), r in mine.items() if c == "dense"]
    pairs = [(S, a) for S, a in pairs if (S, "ceiling") in mine]
    if not pairs:
        return
    c = sum(a * S**2 for S, a in pairs) / sum(S**4 for S, _ in pairs)
    fit = f"ceiling + {c * 2**20:.4g} ms x (S/1K)^2, fit on {', '.join(length_label(S) for S, _ in pairs)}"
    for (S, config), ceiling in sorted(mine.items()):
        if config == "ceiling" and (S, "dense") not in mine:
            rows.append(
                {"model": name, "S": S, "config": "dense", "ttft_ms": ceiling["ttft_ms"] + c * S**2,
                 "extrapolated": fit, "path": "extrapolated"}
            )  # fmt: skip


def finish(rows: list[dict]) -> None:
    """Speed-ups over dense (measured or extrapolated) of the same model and length."""
    dense = {(r["model"], r["S"]): r["ttft_ms"] for r in rows if r["config"] == "dense" and r["ttft_ms"]}
    for r in rows:
        base = dense.get((r["model"], r["S"]))
        r["speedup"] = base / r["ttft_ms"] if base and r["ttft_ms"] else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="qwen2.5-7b-1m", help=f"comma-separated, of {sorted(LONG)}")
    p.add_argument("--lengths", default="131072,262144,524288,1048576")
    p.add_argument("--chunk", type=int, default=32768, help="prefill_chunk_size (a multiple of 64)")
    p.add_argument("--dense-max", type=int, default=262144, help="dense is measured up to this length, then fitted")
    p.add_argument("--reps", type=int, default=1, help="timed runs per row (median), after one warm-up per config")
    p.add_argument("--budget-s", type=float, default=480, help="skip rows that would end later than this")
    p.add_argument("--out", default="benchmarks/results/bench_long", help="output path prefix (.md and .csv)")
    p.add_argument(
        "--slash-select",
        type=lambda v: v.split(","),
        default=[],
        help="token, block or token,block: one sparse run per slash selection on the config's vertical-slash heads "
        "(converted MInference configs are token); default: the config as it is",
    )
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU: exercises every path, measures nothing")
    args = p.parse_args(argv)
    names = args.models.split(",")
    if unknown := set(names) - set(LONG):
        p.error(f"--models: unknown {sorted(unknown)}; known: {sorted(LONG)}")
    lengths = sorted(int(s) for s in args.lengths.split(","))
    if bad := set(args.slash_select) - set(CHOICES["slash_select"]):
        p.error(f"--slash-select: each must be one of {CHOICES['slash_select']}, got {sorted(bad)}")
    if args.chunk <= 0 or args.chunk % 64:
        p.error(f"--chunk: must be a positive multiple of 64 (the index's block), got {args.chunk}")
    device, dtype = run_device(p, args.smoke)
    if args.smoke:
        lengths, args.chunk, args.dense_max = [256, 512], 128, 256
    meta = {
        "device": device_name(device == "cuda"),
        "dtype": str(dtype).removeprefix("torch."),
        "chunk": args.chunk,
        **versions(),
        "smoke": args.smoke,
        "notes": [],
        "skipped": [],
    }
    out, clock, rows, start = Path(args.out), Clock(device), [], time.perf_counter()
    register()
    print(f"{meta['device']}; {versions()}; chunk {args.chunk}", flush=True)
    for name in names:
        t0 = time.perf_counter()
        model = build_model(name, args.smoke, device, dtype, max_position_embeddings=M + 1024)
        config, source = sparse_config(model, LONG[name], args.smoke)
        meta["notes"].append(f"{name}: sparse config {source}; built in {time.perf_counter() - t0:.1f} s")
        print(meta["notes"][-1], flush=True)
        sparse_runs = {  # one run per slash selection asked for, else the config as it is
            f"sparse:{select}": lambda m, select=select: patch_model(m, config, min_seq_len=0, slash_select=select)
            for select in args.slash_select
        } or {"sparse": lambda m: patch_model(m, config, min_seq_len=0)}
        runs = {
            **sparse_runs,
            "ceiling": lambda m: m.set_attn_implementation(SKIP),  # before dense: its extrapolation needs every length
            "dense": lambda m: m.set_attn_implementation(DENSE),
        }
        spent: dict[str, tuple[int, float]] = {}
        for config_name, setup in runs.items():
            setup(model)
            # Warm-up (kernels, autotuning): two chunks run the first-chunk and later-chunk paths alike.
            ttft(model, random_ids(model, min(lengths[0], 2 * args.chunk), device), args.chunk, clock, 1)
            for S in lengths:
                if config_name == "dense" and S > args.dense_max:
                    continue
                if config_name in spent:  # attention ~S^2, the rest ~S: 2^1.6 per doubling is about right
                    prev_S, prev_s = spent[config_name]
                    estimate = prev_s * (S / prev_S) ** 1.6
                    if time.perf_counter() - start + estimate > args.budget_s:
                        where = f"{name} {config_name} at {length_label(S)}"
                        meta["skipped"].append(f"{where}: ~{estimate:.0f} s over budget")
                        print(f"skip {meta['skipped'][-1]}", flush=True)
                        continue
                row = {"model": name, "S": S, "config": config_name, "ttft_ms": None, "peak_gb": None}
                try:
                    ids = random_ids(model, S, device)
                    row["ttft_ms"], row["peak_gb"] = ttft(model, ids, args.chunk, clock, args.reps)
                    spent[config_name] = (S, row["ttft_ms"] / 1e3 * args.reps)
                    if config_name in sparse_runs:
                        row["path"], row["density"] = path_summary(model)
                except torch.OutOfMemoryError:
                    row["path"] = "OOM"
                row["host_rss_gb"] = host_rss_gb()
                rows.append(row)
                print(line(row), flush=True)
                write(out, rows, meta, names)
            if config_name in sparse_runs:
                unpatch_model(model)
        extrapolate(rows, name)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    write(out, rows, meta, names)
    print("\n".join(table(rows, names)))
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


def line(r: dict) -> str:
    ttft_s = f"{r['ttft_ms'] / 1e3:9.2f} s" if r["ttft_ms"] else "      OOM"
    peak = f"{r['peak_gb']:.1f} GB" if r.get("peak_gb") else "n/a"
    return f"{r['model']:>14} {length_label(r['S']):>6} {r['config']:>12} {ttft_s} peak {peak} {r.get('path', '')}"


def table(rows: list[dict], names: list[str]) -> list[str]:
    """Per model: TTFT (speed-up over dense) of each config by length; extrapolated dense marked with ``*``."""
    md = []
    for name in names:
        mine = [r for r in rows if r["model"] == name]
        lengths = sorted({r["S"] for r in mine})
        md += [f"## {name}: TTFT, chunked prefill (speed-up over dense)", ""]
        md += ["| config | " + " | ".join(map(length_label, lengths)) + " |", "|---" * (len(lengths) + 1) + "|"]
        configs = [c for c in dict.fromkeys(r["config"] for r in mine) if c.startswith("sparse")]
        for config in (*configs, "dense", "ceiling"):
            cells = []
            for S in lengths:
                r = next((r for r in mine if r["S"] == S and r["config"] == config), None)
                if r is None or r["ttft_ms"] is None:
                    cells.append("OOM" if r else "")
                    continue
                star = "*" if r.get("extrapolated") else ""
                speedup = f" ({r['speedup']:.2f}x)" if r.get("speedup") else ""
                peak = f", {r['peak_gb']:.0f} GB" if r.get("peak_gb") else ""
                cells.append(f"{ms_text(r['ttft_ms'])}{star}{speedup}{peak}")
            md.append(f"| {config} | " + " | ".join(cells) + " |")
        fits = {r["extrapolated"] for r in mine if r.get("extrapolated")}
        md += [""] + [f"\\* extrapolated: {f}" for f in fits] + [""]
    return md


def write(out: Path, rows: list[dict], meta: dict, names: list[str]) -> None:
    finish(rows)
    write_csv(suffixed(out, ".csv"), rows, COLUMNS, {m: meta[m] for m in META})
    md = [
        "# Long prompts: time to first token with chunked prefill, sparse vs dense",
        "",
        f"{meta['device']}, {meta['dtype']}, prefill_chunk_size {meta['chunk']}; "
        + ", ".join(f"{k} {meta[k]}" for k in META[3:])
        + ". Written by `benchmarks/bench_long.py`.",
    ]
    if meta["smoke"]:
        md += ["", "**SMOKE RUN** (CPU, tiny random model, torch path): exercises the script, measures nothing."]
    md += [
        "",
        "Random-init model of the real shape, batch 1, `generate(max_new_tokens=1, prefill_chunk_size=chunk)`; "
        "each cell: TTFT (speed-up over dense), peak GPU memory (weights and KV cache included). `dense`: SDPA "
        "(cuDNN first) with a lower-right causal bias per chunk; `ceiling`: attention skipped; `sparse`: "
        "`patch_model` on every chunk (`min_seq_len=0`); `sparse:token` / `sparse:block`: the same config with "
        "token- or block-granular slashes.",
        "",
        *table(rows, names),
        "## All rows",
        "",
        *md_table(rows, COLUMNS),
        "",
        *[f"- {n}" for n in meta["notes"]],
        *[f"- skipped: {s}" for s in meta["skipped"]],
        "",
    ]
    suffixed(out, ".md").write_text("\n".join(md))


if __name__ == "__main__":
    raise SystemExit(main())
