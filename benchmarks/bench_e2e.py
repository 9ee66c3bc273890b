"""End-to-end prefill speed: time to first token of random-init models shaped like Llama-3-8B and Qwen2-7B (and
Qwen3-8B, with ``--models``), dense vs patched, on one GPU.

    python benchmarks/bench_e2e.py --out benchmarks/results/bench_e2e_h100         # H100: ~6-7 minutes
    python benchmarks/bench_e2e.py --smoke --out /tmp/e2e/bench_e2e_smoke          # CPU, tiny models, seconds

Each model is built directly on the GPU in bf16 from its config (random init: nothing is downloaded, and timing does
not depend on the weights), one model at a time. TTFT is one forward of a random prompt with ``use_cache=True`` and
``logits_to_keep=1`` (what ``generate`` runs as its prefill), batch 1, CUDA-synchronised wall time: one warm-up, then
the median of ``--reps``. For every model and prompt length, in the same run:

* ``dense``: stock transformers SDPA with the cuDNN backend first (the baseline of every speed-up);
* ``dense_flash_attn``: transformers' ``flash_attention_2``, only when flash-attn is importable;
* ``ceiling``: the same forward with an attention function that returns zeros: everything except attention, so
  dense / ceiling is the most any attention speed-up can give;
* ``vertical_slash``: ``patch_model`` with vertical-slash on every head at MInference's default budgets;
* ``mixed``: a calibrated-style config (see :func:`mixed_config`): per layer 1/8 of the heads dense, 1/16 A-shape,
  1/32 block-sparse (at least one head each) and the rest vertical-slash with per-head budgets;
* ``adaptive``: the adaptive pattern on every head, when this version of the package has it.

Patched models keep ``min_seq_len="auto"`` (the measured crossover of ``sparse_prefill.devices``), so a prompt below it
runs the dense fallback, as a user would get. Reported per row: TTFT, speed-up over dense, the ceiling and its
speed-up, the fraction of the ceiling reached (speed-up / ceiling speed-up), attention ms per layer
((TTFT - ceiling) / layers), peak allocated memory (weights included) and its ratio to dense, which path the layers
took and their mean tile density. A decode check then runs ``generate(max_new_tokens=4)`` on the patched model at the
shortest length with the sparse prefill forced, and asserts that every decode step's attention went to the stock SDPA
function and that the prefill's per-layer report was left alone.

Output: ``--out`` + ``.md`` and ``.csv`` (device, torch / triton / transformers versions in both), rewritten after
every row so a run cut short keeps what it measured. ``--budget-s`` skips the (model, length) groups that would not
finish in time, and says so in the output.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import random
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts: less fragmentation

import torch  # noqa: E402
from common import (  # noqa: E402
    MODELS,
    Clock,
    build_model,
    dense_sdpa,
    device_name,
    length_label,
    md_cell,
    ms_text,
    path_summary,
    prefill,
    random_ids,
    run_device,
    skip_attention,
    suffixed,
    versions,
    write_csv,
)

from sparse_prefill import SparseConfig, last_report, patch_model, unpatch_model  # noqa: E402
from sparse_prefill import dispatch as sp_attention  # noqa: E402
from sparse_prefill.config import FORMAT, PATTERN_DEFAULTS, ModelInfo  # noqa: E402
from sparse_prefill.dense import flash_attn_error  # noqa: E402
from sparse_prefill.patch import register_attention  # noqa: E402
from sparse_prefill.patches import adapter_for  # noqa: E402

# Issue #8's targets for the Llama-3-8B shape, uniform vertical-slash vs dense: minimum TTFT speed-up per length.
TARGETS = {131072: 2.5, 65536: 1.5, 32768: 1.15, 8192: 1.0}
TARGET_MEMORY = 1.05
SKIP = "sp_skip_attention"
NEW_TOKENS = 4


def register_skip() -> None:
    from transformers.masking_utils import sdpa_mask

    register_attention(SKIP, skip_attention, sdpa_mask)  # the mask dense SDPA gets, so only attention is left out


def mixed_config(info: ModelInfo, seed: int = 0) -> SparseConfig:
    """A calibrated-style mixed config, built deterministically. Per layer: ``H // 8`` heads dense, ``H // 16`` A-shape
    (128 sink + 3968 local), ``H // 32`` block-sparse (top 100 blocks), at least one of each, and the rest
    vertical-slash with per-head (vertical, slash) budgets cycling through (1000, 6096) (MInference's default),
    (500, 2048), (2000, 8192), (100, 4096) and (3000, 512); which head gets which is shuffled per layer.

    The shipped SmolLM2 config (calibrated at 2K-4K) has 14 % dense, 5 % A-shape, 0.4 % block-sparse and 81 %
    vertical-slash heads; this mix keeps those proportions (for 32 heads: 4 dense, 2 A-shape, 1 block-sparse, 25
    vertical-slash) with token budgets meant for long prompts instead of its fractions of a 4K prompt.
    """
    H = info.num_heads
    budgets = [(1000, 6096), (500, 2048), (2000, 8192), (100, 4096), (3000, 512)]
    layers = []
    for layer in range(info.num_layers):
        n_dense, n_a, n_bs = max(1, H // 8), max(1, H // 16), max(1, H // 32)
        heads = [{"pattern": "dense"}] * n_dense
        heads += [{"pattern": "a_shape", "sink": 128, "local": 3968}] * n_a
        heads += [{"pattern": "block_sparse", "top_k": 100}] * n_bs
        for i in range(H - len(heads)):
            vertical, slash = budgets[(layer + i) % len(budgets)]
            heads.append({"pattern": "vertical_slash", "vertical": vertical, "slash": slash})
        random.Random(f"{seed}/mixed/{layer}").shuffle(heads)
        layers.append(heads)
    return SparseConfig.from_dict(
        {
            "format": FORMAT,
            "model": vars(info),
            "min_seq_len": "auto",
            "layers": layers,
            "provenance": {"tool": "benchmarks/bench_e2e.py mixed_config", "seed": seed},
        }
    )


def sparse_configs(info: ModelInfo) -> dict[str, SparseConfig]:
    configs = {"vertical_slash": SparseConfig.uniform(info, "vertical_slash"), "mixed": mixed_config(info)}
    if "adaptive" in PATTERN_DEFAULTS:  # the adaptive pattern, in versions that have it
        configs["adaptive"] = SparseConfig.uniform(info, "adaptive")
    return configs


@contextlib.contextmanager
def stock_calls():
    """Query lengths of the calls that reach transformers' stock SDPA function from the patched dispatcher."""
    calls: list[int] = []
    original = sp_attention.sdpa_attention_forward

    def counted(module, query, *args, **kwargs):
        calls.append(query.shape[2])
        return original(module, query, *args, **kwargs)

    sp_attention.sdpa_attention_forward = counted
    try:
        yield calls
    finally:
        sp_attention.sdpa_attention_forward = original


def decode_check(model, config: SparseConfig, ids, clock: Clock) -> str:
    """generate() with a forced sparse prefill: decode must take the stock path. Returns a line for the report."""
    S, layers = ids.shape[1], config.model.num_layers
    patch_model(model, config, min_seq_len=0)
    try:
        with stock_calls() as calls, torch.no_grad():
            clock.sync()
            start = time.perf_counter()
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                do_sample=False, pad_token_id=0,
            )  # fmt: skip
            clock.sync()
            seconds = time.perf_counter() - start
        records = last_report(model)
    finally:
        unpatch_model(model)
    decode = [q for q in calls if q == 1]
    assert out.shape[1] == S + NEW_TOKENS, f"generate made {out.shape[1] - S} tokens, expected {NEW_TOKENS}"
    assert [(r.path, r.q_len) for r in records] == [("sparse", S)] * layers, "the prefill did not run sparse"
    assert len(decode) == (NEW_TOKENS - 1) * layers == len(calls), f"stock calls {calls}"
    return (
        f"decode check: {config.model.name}, {S}-token prompt, generate(max_new_tokens={NEW_TOKENS}) in "
        f"{seconds:.2f} s: prefill sparse on {layers}/{layers} layers; {len(decode)} decode attention calls "
        f"({NEW_TOKENS - 1} steps x {layers} layers), all on transformers' stock SDPA; the prefill report untouched."
    )


def run_group(model, name, info, S, args, clock, rows, meta, out) -> None:
    """All configs of one (model, prompt length)."""
    device = meta["device_kind"]
    ids = random_ids(model, S, device)
    L = info.num_layers
    base = {"model": name, "S": S}

    def add(config: str, ttft: float, peak: float | None, path: str = "", density: float | None = None) -> dict:
        row = {**base, "config": config, "ttft_ms": ttft, "peak_gb": peak, "path": path, "density": density}
        rows.append(row)
        return row

    def stock(context):
        def fn():
            with context():
                return prefill(model, ids)

        return fn

    model.set_attn_implementation("sdpa")
    dense = add("dense", *clock.run(stock(dense_sdpa), args.reps), path="dense SDPA cuDNN")
    if device == "cuda" and flash_attn_error() is None:
        model.set_attn_implementation("flash_attention_2")
        add("dense_flash_attn", *clock.run(stock(contextlib.nullcontext), args.reps), path="dense flash-attn")
    model.set_attn_implementation(SKIP)
    ceiling = add("ceiling", *clock.run(stock(contextlib.nullcontext), args.reps), path="attention skipped")
    model.set_attn_implementation("sdpa")
    for config_name, config in sparse_configs(info).items():
        patch_model(model, config, min_seq_len=args.min_seq_len)
        ttft, peak = clock.run(lambda: prefill(model, ids), args.reps)
        add(config_name, ttft, peak, *path_summary(model))
        unpatch_model(model)
    for row in rows:
        if row["model"] == name and row["S"] == S:
            row["speedup"] = dense["ttft_ms"] / row["ttft_ms"]
            row["ceiling_ms"] = ceiling["ttft_ms"]
            row["ceiling_speedup"] = dense["ttft_ms"] / ceiling["ttft_ms"]
            row["of_ceiling"] = row["speedup"] / row["ceiling_speedup"]
            row["attn_ms_per_layer"] = (row["ttft_ms"] - ceiling["ttft_ms"]) / L
            row["mem_vs_dense"] = row["peak_gb"] / dense["peak_gb"] if row["peak_gb"] and dense["peak_gb"] else None
            print(line(row), flush=True)
    write(out, rows, meta)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="llama3-8b,qwen2-7b", help=f"comma-separated, of {sorted(MODELS)}")
    p.add_argument("--lengths", default="8192,32768,65536,131072")
    p.add_argument("--reps", type=int, default=2, help="timed forwards per row, after one warm-up (median)")
    p.add_argument("--min-seq-len", default="auto", help="passed to patch_model: 'auto' (the measured table) or int")
    p.add_argument("--budget-s", type=float, default=480, help="skip (model, length) groups that would end later")
    p.add_argument("--out", default="benchmarks/results/bench_e2e", help="output path prefix (.md and .csv)")
    p.add_argument(
        "--smoke", action="store_true", help="tiny models on the CPU: exercises every path, measures nothing"
    )
    args = p.parse_args(argv)
    args.min_seq_len = args.min_seq_len if args.min_seq_len == "auto" else int(args.min_seq_len)
    names = args.models.split(",")
    if unknown := set(names) - set(MODELS):
        p.error(f"--models: unknown {sorted(unknown)}; known: {sorted(MODELS)}")
    lengths = sorted(int(s) for s in args.lengths.split(","))
    device, dtype = run_device(p, args.smoke)
    if args.smoke:  # 128 keys stay under min_seq_len (dense fallback), 256 go sparse.
        lengths, args.reps, args.min_seq_len = [128, 256], 1, 200
    meta = {
        "device": device_name(device == "cuda"),
        "device_kind": device,
        "dtype": str(dtype).removeprefix("torch."),
        **versions(),
        "smoke": args.smoke,
        "notes": [],
        "skipped": [],
        "flash_attn": flash_attn_error() or "importable",
    }
    out = Path(args.out)
    register_skip()
    clock = Clock(device)
    rows: list[dict] = []
    start = time.perf_counter()
    spent: dict[tuple[str, int], float] = {}
    print(f"{meta['device']}; {versions()}; flash-attn: {meta['flash_attn']}", flush=True)
    for name in names:
        t0 = time.perf_counter()
        model = build_model(name, args.smoke, device, dtype)
        info = adapter_for(model).model_info(model)
        params = sum(t.numel() for t in model.parameters()) / 1e9
        print(f"{name}: {params:.2f}B parameters, built in {time.perf_counter() - t0:.1f} s", flush=True)
        first = random_ids(model, lengths[0], device)
        meta["notes"].append(decode_check(model, SparseConfig.uniform(info, "vertical_slash"), first, clock))
        print(meta["notes"][-1], flush=True)
        for i, S in enumerate(lengths):
            estimate = estimate_s(spent, name, S, lengths[i - 1] if i else None)
            elapsed = time.perf_counter() - start
            if elapsed + estimate > args.budget_s:
                meta["skipped"].append(
                    f"{name} at {S}: {elapsed:.0f} s spent + ~{estimate:.0f} s > --budget-s {args.budget_s:.0f}"
                )
                print(f"skip {meta['skipped'][-1]}", flush=True)
                continue
            g0 = time.perf_counter()
            run_group(model, name, info, S, args, clock, rows, meta, out)
            spent[name, S] = time.perf_counter() - g0
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    write(out, rows, meta)
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


def estimate_s(spent: dict, name: str, S: int, prev_S: int | None) -> float:
    """Seconds a (model, length) group should take: the same length of an earlier model, else this model's previous
    length scaled by (S / prev)^1.7 (attention grows as S^2, the rest as S)."""
    same_length = [t for (m, s), t in spent.items() if s == S]
    if same_length:
        return max(same_length)
    if prev_S is not None and (name, prev_S) in spent:
        return spent[name, prev_S] * (S / prev_S) ** 1.7
    return 0.0


COLUMNS = [
    "model", "S", "config", "ttft_ms", "speedup", "ceiling_ms", "ceiling_speedup", "of_ceiling", "attn_ms_per_layer",
    "peak_gb", "mem_vs_dense", "path", "density",
]  # fmt: skip
META = ["device", "dtype", "torch", "triton", "transformers", "sparse_prefill"]


def line(r: dict) -> str:
    mem = f"{r['peak_gb']:.1f} GB x{r['mem_vs_dense']:.3f}" if r.get("mem_vs_dense") else "mem n/a"
    return (
        f"{r['model']:>10} {r['S']:>7} {r['config']:>16} {r['ttft_ms']:10.1f} ms x{r['speedup']:5.2f} "
        f"(ceiling x{r['ceiling_speedup']:.2f}, {r['of_ceiling']:.0%} of it) "
        f"attn/layer {r['attn_ms_per_layer']:7.2f} ms "
        f"{mem} {r['path']}"
    )


def write(out: Path, rows: list[dict], meta: dict) -> None:
    done = [r for r in rows if "speedup" in r]
    write_csv(suffixed(out, ".csv"), done, COLUMNS, {m: meta[m] for m in META})
    versions_line = ", ".join(f"{k} {meta[k]}" for k in META[2:])
    md = [
        "# End-to-end prefill: time to first token, dense vs sparse_prefill",
        "",
        f"{meta['device']}, {meta['dtype']}; {versions_line}; flash-attn: {meta['flash_attn']}. Written by "
        "`benchmarks/bench_e2e.py`.",
    ]
    if meta["smoke"]:
        md += ["", "**SMOKE RUN** (CPU, tiny random models, torch path): exercises the script, measures nothing."]
    md += [
        "",
        "Random-init models of the real shapes, batch 1, one forward with `use_cache=True, logits_to_keep=1`; median "
        "of the timed runs after one warm-up. `speedup` over dense SDPA cuDNN in the same run; `ceiling`: attention "
        "skipped (zeros), so `ceiling_speedup` is the most any attention speed-up can give and `of_ceiling` the share "
        "of it reached; `attn_ms_per_layer` = (TTFT - ceiling) / layers; `peak_gb` = peak allocated memory, weights "
        'included. Patched rows use `min_seq_len="auto"`: below the crossover they run the dense fallback.',
        "",
        "Configs: `dense` stock SDPA, cuDNN first; `dense_flash_attn` transformers' flash_attention_2 (only when "
        "flash-attn is importable); `ceiling` attention skipped; `vertical_slash` every head at MInference's budgets "
        "(1000 columns, 6096 diagonals); `mixed` calibrated-style, per layer 1/8 of the heads dense, 1/16 A-shape "
        "(128 + 3968), 1/32 block-sparse (top 100), at least one each, the rest vertical-slash with per-head budgets "
        "from (1000, 6096), (500, 2048), (2000, 8192), (100, 4096), (3000, 512); `adaptive` every head adaptive (when "
        "the package has it).",
        "",
    ]
    md += summary_tables(done) + targets(done)
    md += ["## All rows", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(md_cell(r.get(c)) for c in COLUMNS) + " |" for r in done]
    md += ["", *[f"- {n}" for n in meta["notes"]], *[f"- skipped: {s}" for s in meta["skipped"]], ""]
    suffixed(out, ".md").write_text("\n".join(md))


def summary_tables(rows: list[dict]) -> list[str]:
    """Per model: TTFT and speed-up of each config by length (the table the README shows)."""
    md = []
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        lengths = sorted({r["S"] for r in mine})
        md += [f"## {name}: TTFT (speed-up over dense SDPA cuDNN)", ""]
        md += ["| config | " + " | ".join(map(length_label, lengths)) + " |", "|---" * (len(lengths) + 1) + "|"]
        for config in dict.fromkeys(r["config"] for r in mine):
            cells = []
            for S in lengths:
                r = next((r for r in mine if r["S"] == S and r["config"] == config), None)
                cells.append(f"{ms_text(r['ttft_ms'])} ({r['speedup']:.2f}x)" if r else "")
            md.append(f"| {config} | " + " | ".join(cells) + " |")
        md.append("")
    return md


def targets(rows: list[dict]) -> list[str]:
    """Issue #8's targets for the Llama-3-8B shape (uniform vertical-slash), met or missed."""
    mine = {r["S"]: r for r in rows if r["model"] == "llama3-8b" and r["config"] == "vertical_slash"}
    if not set(mine) & set(TARGETS):
        return []
    md = ["## Targets (issue #8: Llama-3-8B shape, vertical-slash vs dense SDPA cuDNN)", ""]
    md += ["| target | measured | met |", "|---|---|---|"]
    for S, want in sorted(TARGETS.items(), reverse=True):
        if S in mine:
            got = mine[S]["speedup"]
            md.append(f"| TTFT >= {want}x at {length_label(S)} | {got:.3f}x | {'yes' if got >= want else 'NO'} |")
    mem = [r["mem_vs_dense"] for r in mine.values() if r.get("mem_vs_dense")]
    if mem:
        worst = max(mem)
        md.append(
            f"| peak memory <= dense x{TARGET_MEMORY} | x{worst:.3f} (worst length) "
            f"| {'yes' if worst <= TARGET_MEMORY else 'NO'} |"
        )
    return md + [""]


if __name__ == "__main__":
    raise SystemExit(main())
