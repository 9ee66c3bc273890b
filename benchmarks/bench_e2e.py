"""End-to-end prefill speed: time to first token of random-init models shaped like Llama-3-8B and Qwen2-7B (and
Qwen3-8B, with ``--models``), dense vs patched, on one GPU.

    python scripts/bench_e2e.py --out benchmarks/results/bench_e2e_h100         # H100: ~6-7 minutes
    python scripts/bench_e2e.py --smoke --out /tmp/e2e/bench_e2e_smoke          # CPU, tiny models, seconds

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
import csv
import gc
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts: less fragmentation

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sparse_prefill  # noqa: E402
from sparse_prefill import SparseConfig, last_report, patch_model, unpatch_model  # noqa: E402
from sparse_prefill import attention as sp_attention  # noqa: E402
from sparse_prefill.config import FORMAT, PATTERN_DEFAULTS, ModelInfo  # noqa: E402
from sparse_prefill.devices import flash_attn_error  # noqa: E402
from sparse_prefill.patches import adapter_for  # noqa: E402

# Shapes of the real models (config.json of Meta-Llama-3-8B, Qwen2-7B and Qwen3-8B).
MODELS = {
    "llama3-8b": (
        "llama",
        dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            rope_theta=500000.0,
            max_position_embeddings=131072 + 1024,
            tie_word_embeddings=False,
        ),
    ),
    "qwen2-7b": (
        "qwen2",
        dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            head_dim=128,
            rope_theta=1000000.0,
            max_position_embeddings=131072 + 1024,
            use_sliding_window=False,
            tie_word_embeddings=False,
        ),
    ),
    "qwen3-8b": (
        "qwen3",
        dict(
            vocab_size=151936,
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            rope_theta=1000000.0,
            max_position_embeddings=131072 + 1024,
            use_sliding_window=False,
            tie_word_embeddings=False,
        ),
    ),
}
SMOKE_SHAPE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
)
# Issue #8's targets for the Llama-3-8B shape, uniform vertical-slash vs dense: minimum TTFT speed-up per length.
TARGETS = {131072: 2.5, 65536: 1.5, 32768: 1.15, 8192: 1.0}
TARGET_MEMORY = 1.05
SKIP = "sp_skip_attention"
NEW_TOKENS = 4


def skip_attention(module, query, key, value, attention_mask, **kwargs):
    """An attention function that attends to nothing: zeros of the output's shape [B, q_len, Hq, D]."""
    return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None


def register_skip() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SKIP, skip_attention)
    AttentionMaskInterface.register(SKIP, sdpa_mask)  # the mask dense SDPA gets, so only attention is left out


def build_model(name: str, smoke: bool, device: str, dtype: torch.dtype):
    """A random-init model of the named shape, created directly on ``device`` in ``dtype``."""
    model_type, shape = MODELS[name]
    return build_shape(name, model_type, shape, smoke, device, dtype)


def build_shape(name: str, model_type: str, shape: dict, smoke: bool, device: str, dtype: torch.dtype):
    """A random-init model of ``model_type`` with ``shape`` (config fields; with ``smoke`` :data:`SMOKE_SHAPE`, keeping
    its rope_theta and use_sliding_window), named ``name``, created directly on ``device`` in ``dtype``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if smoke:
        shape = {**SMOKE_SHAPE, **{k: v for k, v in shape.items() if k in ("rope_theta", "use_sliding_window")}}
    config = AutoConfig.for_model(model_type, **shape)
    config._name_or_path = name
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


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
            "provenance": {"tool": "scripts/bench_e2e.py mixed_config", "seed": seed},
        }
    )


def sparse_configs(info: ModelInfo) -> dict[str, SparseConfig]:
    configs = {"vertical_slash": SparseConfig.uniform(info, "vertical_slash"), "mixed": mixed_config(info)}
    if "adaptive" in PATTERN_DEFAULTS:  # the adaptive pattern, in versions that have it
        configs["adaptive"] = SparseConfig.uniform(info, "adaptive")
    return configs


class Clock:
    """CUDA-synchronised wall time and peak allocated memory of a callable (plain wall time on the CPU)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def run(self, fn, reps: int) -> tuple[float, float | None]:
        """(median ms over ``reps`` after one warm-up, peak GB over the timed calls)."""
        times, peak = [], None
        for i in range(1 + reps):
            self.sync()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            out = fn()
            self.sync()
            elapsed = (time.perf_counter() - start) * 1e3
            del out  # the KV cache of a 128K prompt is GBs: free it before the next call
            if i:
                times.append(elapsed)
                if self.cuda:
                    peak = max(peak or 0.0, torch.cuda.max_memory_allocated() / 2**30)
        return statistics.median(times), peak


def prefill(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=True, logits_to_keep=1)


def dense_context():
    """SDPA with cuDNN first (as the package's dense fallback does). A fresh context manager per call: they are
    single-use."""
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def path_summary(model) -> tuple[str, float | None]:
    """('sparse 32/32', mean tile density of the sparse layers) from the last prefill's per-layer report."""
    records = last_report(model)
    sparse = [r for r in records if r.path == "sparse"]
    if not sparse:
        return f"dense fallback: {records[0].reason}", None
    summary = f"sparse {len(sparse)}/{len(records)}"
    if len(sparse) < len(records):
        summary += f" ({next(r.reason for r in records if r.path != 'sparse')})"
    per_head = [d for r in sparse for d in r.density[0]]
    return summary, sum(per_head) / len(per_head)


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


def versions() -> dict[str, str]:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "sparse_prefill": sparse_prefill.__version__,
        "python": platform.python_version(),
    }


def run_group(model, name, info, S, args, clock, rows, meta, out) -> None:
    """All configs of one (model, prompt length)."""
    device = meta["device_kind"]
    ids = ids_for(model, S, device)
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
    dense = add("dense", *clock.run(stock(dense_context), args.reps), path="dense SDPA cuDNN")
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
    if args.smoke:
        # 128 keys stay under min_seq_len (dense fallback), 256 go sparse.
        lengths, args.reps, args.min_seq_len = [128, 256], 1, 200
        device, dtype = "cpu", torch.float32
    elif not torch.cuda.is_available():
        p.error("needs a CUDA device (or --smoke)")
    else:
        device, dtype = "cuda", torch.bfloat16
    meta = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.machine()})",
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
        meta["notes"].append(
            decode_check(model, SparseConfig.uniform(info, "vertical_slash"), ids_for(model, lengths[0], device), clock)
        )
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


def ids_for(model, S: int, device: str) -> torch.Tensor:
    """A random prompt of S token ids (seeded by S, so every config of a length reads the same prompt)."""
    g = torch.Generator(device=device).manual_seed(S)
    return torch.randint(100, model.config.vocab_size, (1, S), generator=g, device=device)


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


def _fmt(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.4g}"
    return str(x)


def write(out: Path, rows: list[dict], meta: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    done = [r for r in rows if "speedup" in r]
    with open(out.with_name(out.name + ".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS + META)
        w.writeheader()
        for r in done:
            w.writerow({**{c: _fmt(r.get(c)) for c in COLUMNS}, **{m: meta[m] for m in META}})
    versions_line = ", ".join(f"{k} {meta[k]}" for k in META[2:])
    md = [
        "# End-to-end prefill: time to first token, dense vs sparse_prefill",
        "",
        f"{meta['device']}, {meta['dtype']}; {versions_line}; flash-attn: {meta['flash_attn']}. Written by "
        "`scripts/bench_e2e.py`.",
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
    md += ["| " + " | ".join(_md(r.get(c)) for c in COLUMNS) + " |" for r in done]
    md += ["", *[f"- {n}" for n in meta["notes"]], *[f"- skipped: {s}" for s in meta["skipped"]], ""]
    out.with_name(out.name + ".md").write_text("\n".join(md))


def _md(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if x < 1000 else f"{x:.0f}"
    return "" if x is None else str(x).replace("|", "/")


def summary_tables(rows: list[dict]) -> list[str]:
    """Per model: TTFT and speed-up of each config by length (the table the README shows)."""
    md = []
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        lengths = sorted({r["S"] for r in mine})
        md += [f"## {name}: TTFT (speed-up over dense SDPA cuDNN)", ""]
        md += ["| config | " + " | ".join(map(label, lengths)) + " |", "|---" * (len(lengths) + 1) + "|"]
        for config in dict.fromkeys(r["config"] for r in mine):
            cells = []
            for S in lengths:
                r = next((r for r in mine if r["S"] == S and r["config"] == config), None)
                cells.append(f"{_ms(r['ttft_ms'])} ({r['speedup']:.2f}x)" if r else "")
            md.append(f"| {config} | " + " | ".join(cells) + " |")
        md.append("")
    return md


def label(S: int) -> str:
    return f"{S // 1024}K" if S % 1024 == 0 else str(S)


def _ms(ms: float) -> str:
    return f"{ms / 1e3:.2f} s" if ms >= 1000 else f"{ms:.0f} ms"


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
            md.append(f"| TTFT >= {want}x at {label(S)} | {got:.3f}x | {'yes' if got >= want else 'NO'} |")
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
