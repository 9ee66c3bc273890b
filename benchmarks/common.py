"""What the benchmarks share: model shapes, synthetic inputs, timers, the environment line and the CSV / markdown
writers.

Every benchmark runs as a script (``python benchmarks/bench_layer.py ...``), so this folder is on ``sys.path`` and
``from common import ...`` finds this module; ``sparse_prefill`` comes from the install (``make install``).
"""

from __future__ import annotations

import csv
import gc
import importlib
import math
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------------------
# Model shapes

M = 1 << 20  # a 1M-token prompt
# name -> (model_type, fields of the real model's config.json). Random-init models of these shapes are what the
# whole-model benchmarks time; their attention-layer shapes are LAYER_SHAPES.
MODELS = {
    "llama3-8b": (  # Meta-Llama-3-8B
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
    "qwen2-7b": (  # Qwen2-7B
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
    "qwen3-8b": (  # Qwen3-8B (q/k norms)
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
    "qwen2.5-7b-1m": (  # Qwen2.5-7B-Instruct-1M
        "qwen2",
        dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            head_dim=128,
            rope_theta=10000000.0,
            max_position_embeddings=M + 1024,  # the real model's is 1010000: a 1M-token (2^20) prompt is past it
            use_sliding_window=False,
            tie_word_embeddings=False,
        ),
    ),
    "deep-33b": (  # not a released model: 80 Llama layers whose weights and 256K KV cache need two H200s
        "llama",
        dict(
            vocab_size=128256,
            hidden_size=6144,
            intermediate_size=16384,
            num_hidden_layers=80,
            num_attention_heads=48,
            num_key_value_heads=8,
            head_dim=128,
            rope_theta=500000.0,
            max_position_embeddings=131072 + 1024,
            tie_word_embeddings=False,
        ),
    ),
    "smollm2": (  # SmolLM2-135M(-Instruct), the embedded demo model
        "llama",
        dict(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            rope_theta=100000.0,
            max_position_embeddings=8192,
            tie_word_embeddings=True,
        ),
    ),
}
# --smoke runs: a tiny model of any type (seconds on a CPU; it measures nothing).
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


def layer_shape(name: str) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of one attention layer of ``MODELS[name]``."""
    fields = MODELS[name][1]
    return fields["num_attention_heads"], fields["num_key_value_heads"], fields["head_dim"]


# One attention layer: (query heads, KV heads, head_dim). ``tiny`` is the layer benchmarks' --smoke shape.
LAYER_SHAPES = {"llama3-8b": layer_shape("llama3-8b"), "smollm2": layer_shape("smollm2"), "tiny": (4, 2, 64)}


def run_device(parser, smoke: bool) -> tuple[str, torch.dtype]:
    """Where a whole-model benchmark runs: ("cpu", fp32) for --smoke, else ("cuda", bf16); without a CUDA device a
    parser error says so."""
    if smoke:
        return "cpu", torch.float32
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (or --smoke)")
    return "cuda", torch.bfloat16


def build_model(name: str, smoke: bool, device: str, dtype: torch.dtype, **fields):
    """A random-init model of ``MODELS[name]`` (its fields updated by ``fields``), created directly on ``device`` in
    ``dtype`` with SDPA attention: seconds on a GPU, and nothing is downloaded. With ``smoke`` the shape is
    :data:`SMOKE_SHAPE`, keeping the model's rope_theta and use_sliding_window."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, shape = MODELS[name]
    shape = {**shape, **fields}
    if smoke:
        shape = {**SMOKE_SHAPE, **{k: v for k, v in shape.items() if k in ("rope_theta", "use_sliding_window")}}
    config = AutoConfig.for_model(model_type, **shape)
    config._name_or_path = name
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def random_ids(model, S: int, device: str) -> torch.Tensor:
    """A random prompt of S token ids [1, S] (seeded by S, so every config of a length reads the same prompt)."""
    g = torch.Generator(device=device).manual_seed(S)
    return torch.randint(100, model.config.vocab_size, (1, S), generator=g, device=device)


def prefill(model, ids):
    """The prefill ``generate`` runs: one forward with the KV cache built and the last position's logits."""
    with torch.no_grad():
        return model(ids, use_cache=True, logits_to_keep=1)


def dense_sdpa():
    """SDPA with cuDNN first, as the package's dense path runs it. A fresh context manager per call: they are
    single-use."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def skip_attention(module, query, key, value, attention_mask, **kwargs):
    """An attention function that attends to nothing: zeros of the output's shape [B, q_len, Hq, D]. A model run
    with it times everything but attention: the ceiling of any attention speed-up."""
    return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None


def path_summary(model) -> tuple[str, float | None]:
    """('sparse 32/32', mean tile density of the sparse layers) from the last prefill's per-layer report."""
    from sparse_prefill import last_report

    records = last_report(model)
    sparse = [r for r in records if r.path == "sparse"]
    if not sparse:
        return f"dense fallback: {records[0].reason}", None
    summary = f"sparse {len(sparse)}/{len(records)}"
    if len(sparse) < len(records):
        summary += f" ({next(r.reason for r in records if r.path != 'sparse')})"
    per_head = [d for r in sparse for d in r.density[0]]
    return summary, sum(per_head) / len(per_head)


# ---------------------------------------------------------------------------------------------------------------
# Synthetic q/k/v of one layer


def rope(x: torch.Tensor, base: float = 500000.0) -> torch.Tensor:
    """Rotate [..., S, D] by position, Llama style (half-split)."""
    S, D = x.shape[-2:]
    inv = base ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    ang = torch.arange(S, device=x.device, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x.float().chunk(2, -1)
    return x.float() * cos + torch.cat([-x2, x1], -1) * sin


def structured_qkv(H: int, Hkv: int, S: int, D: int, seed: int = 0, dev: str = "cuda"):
    """q [1, H, S, D], k/v [1, Hkv, S, D] in bf16 whose causal attention has the long-context shapes: a
    rotary-induced local band, attention-sink keys, a few strong vertical keys and repeated-offset slashes."""
    g = torch.Generator(device=dev).manual_seed(seed)
    G = H // Hkv

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=dev)

    # Shared content on the low rotary frequencies: after RoPE, q_i . k_j decays smoothly with |i - j| over a few
    # thousand tokens (the local band), as long-context heads' attention does.
    low = (torch.arange(D, device=dev) % (D // 2) >= D // 4).float()
    content = randn(Hkv, 1, D) * low * 2**0.5
    k = rope(content.expand(Hkv, S, D) * 1.2 + randn(Hkv, S, D) * 0.3)
    q = rope(content.repeat_interleave(G, 0).expand(H, S, D) * 1.2 + randn(H, S, D) * 0.3)
    sink_dir = F.normalize(randn(Hkv, 1, D), dim=-1)  # a position-free direction every query carries
    q = q + sink_dir.repeat_interleave(G, 0) * 4.0
    strong = torch.zeros(S, device=dev)
    strong[:4] = 24.0  # attention sinks
    strong[torch.randint(4, S, (max(1, S // 2048),), generator=g, device=dev)] = 18.0  # vertical keys
    k = k + strong[None, :, None] * sink_dir
    tokens = randn(S + 256, D) * 0.8  # repeated-offset slashes: key j carries the token of query j + o
    for o in (17, 64, 200):
        k = k + tokens[o : o + S][None]
    q = q + tokens[:S][None]
    v = randn(Hkv, S, D)
    return q[None].bfloat16(), k[None].bfloat16(), v[None].bfloat16()


def random_qkv(H: int, Hkv: int, S: int, D: int, seed: int = 0, dev: str = "cuda"):
    """q [1, H, S, D], k/v [1, Hkv, S, D] in bf16, standard normal: near-uniform attention, the worst case."""
    g = torch.Generator(device=dev).manual_seed(seed)
    return tuple(torch.randn(1, h, S, D, generator=g, device=dev).bfloat16() for h in (H, Hkv, Hkv))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against ``b``."""
    return float((a.float() - b.float()).norm() / b.float().norm())


# ---------------------------------------------------------------------------------------------------------------
# Timers


def wall_times(fn, reps: int, warmup: int = 0) -> tuple[list[float], object]:
    """Wall-clock ms of ``reps`` calls of ``fn`` after ``warmup`` untimed ones, and the last result (for CPU work:
    nothing is synchronised)."""
    for _ in range(warmup):
        fn()
    times, out = [], None
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times, out


def do_bench(fn, *, cuda: bool | None = None, rep: int = 200, graph: bool = False) -> float:
    """Median ms of ``fn``: ``triton.testing.do_bench`` (25 ms warm-up, ``rep`` ms of calls) on CUDA, or replayed
    from a CUDA graph with ``graph`` (host launch overhead left out; plain do_bench if ``fn`` cannot be captured).
    Without CUDA (``cuda`` defaults to whether there is a device): one warm-up, then the median of three wall-clock
    calls, for --smoke runs that measure nothing."""
    if not (torch.cuda.is_available() if cuda is None else cuda):
        return statistics.median(wall_times(fn, 3, warmup=1)[0])
    import triton.testing

    if graph:
        fn()  # compile / autotune outside the capture
        torch.cuda.synchronize()
        try:
            return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")
        except Exception as err:  # noqa: BLE001
            print(f"  (no CUDA graph: {type(err).__name__}; timing launches)")
            torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


class Clock:
    """CUDA-synchronised wall time and peak allocated memory of whole-model calls (plain wall time on the CPU)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def once(self, fn) -> float:
        """ms of one call, the device synchronised before and after; the result is dropped."""
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        del out  # the KV cache of a 128K prompt is GBs: free it before the next call
        return (time.perf_counter() - start) * 1e3

    def run(self, fn, reps: int, warmup: int = 1, free: bool = False) -> tuple[float, float | None]:
        """(median ms over ``reps`` calls after ``warmup`` untimed ones, peak GB over the timed calls). ``free``
        collects garbage and empties the CUDA cache before each call (long prompts: the previous call's cache)."""
        times, peak = [], None
        for i in range(warmup + reps):
            if free:
                gc.collect()
                self.sync()
                if self.cuda:
                    torch.cuda.empty_cache()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
            elapsed = self.once(fn)
            if i >= warmup:
                times.append(elapsed)
                if self.cuda:
                    peak = max(peak or 0.0, torch.cuda.max_memory_allocated() / 2**30)
        return statistics.median(times), peak


# ---------------------------------------------------------------------------------------------------------------
# The environment line


def versions(*extra: str) -> dict[str, str]:
    """Versions of torch, triton, transformers, sparse_prefill and python, then of the ``extra`` modules."""
    out = {"torch": torch.__version__}
    for name in ("triton", "transformers", "sparse_prefill", *extra):
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            out[name] = "not installed"
    out["python"] = platform.python_version()
    return out


def versions_text(found: dict[str, str], keys=None) -> str:
    """``torch 2.11.0, triton 3.6.0, ...`` of ``keys`` (default: all of them)."""
    return ", ".join(f"{k} {found[k]}" for k in (keys or found))


def cpu_model() -> str:
    """lscpu's model name, from /proc/cpuinfo (the processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(cuda: bool) -> str:
    """The GPU's name, or ``CPU (<model name>)``."""
    return torch.cuda.get_device_name() if cuda else f"CPU ({cpu_model()})"


# ---------------------------------------------------------------------------------------------------------------
# Writers


def suffixed(prefix: Path, suffix: str) -> Path:
    """``out/bench_e2e`` + ``.md``: output paths given as a prefix."""
    prefix = Path(prefix)
    return prefix.with_name(prefix.name + suffix)


def csv_cell(x) -> str:
    """Floats to 4 significant digits, None to empty."""
    if x is None:
        return ""
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def md_cell(x) -> str:
    """Floats to 3 significant digits (whole numbers from 1000), lists as ``a / b``, None empty, no ``|``."""
    if x is None:
        return ""
    if isinstance(x, (list, tuple)):
        return " / ".join(md_cell(v) for v in x)
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.3g}"
    return str(x).replace("|", "/")


def write_csv(path: Path, rows: list[dict], columns, meta: dict | None = None, cell=csv_cell) -> None:
    """One CSV row per dict (missing columns empty), the ``meta`` fields appended to every row."""
    meta = meta or {}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, [*columns, *meta])
        w.writeheader()
        for r in rows:
            w.writerow({**{c: cell(r.get(c)) for c in columns}, **meta})


def md_table(rows: list[dict], columns, header=None, cell=md_cell) -> list[str]:
    """A markdown table of ``rows`` over ``columns`` (headed by ``header``, default the column names)."""
    lines = ["| " + " | ".join(header or columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]


def write_md(path: Path, lines: list[str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def length_label(S: int) -> str:
    """131072 -> ``128K``."""
    return f"{S // 1024}K" if S % 1024 == 0 else str(S)


def ms_text(ms: float) -> str:
    """``4.92 s`` from a second on, else ``265 ms``."""
    return f"{ms / 1e3:.2f} s" if ms >= 1000 else f"{ms:.0f} ms"
