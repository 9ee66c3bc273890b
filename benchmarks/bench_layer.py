"""Benchmark one attention layer end to end: index building + sparse kernel vs SDPA cuDNN and SDPA flash.

A benchmark, not a test: it prints a table and writes markdown + CSV under --out. Run on a CUDA machine:

    python benchmarks/bench_layer.py --lengths 8k,32k,64k,128k
    python benchmarks/bench_layer.py --lengths 32k,64k,128k --shapes llama3-8b --providers vertical_slash,adaptive
    python benchmarks/bench_layer.py --smoke   # CPU, tiny shapes, torch backend: checks the script, measures nothing
    python benchmarks/bench_layer.py --config llama-3.1-8b-instruct --layer 16 --slash-select token,block --lengths 32k

With ``--config`` (a JSON path, or a shipped config by file stem or hub id) one layer of that config runs, each head
on its own pattern and budgets, at the config's model shape (``--shapes`` does not apply; ``--providers`` adds the
uniform patterns at that shape). ``--slash-select token,block`` runs its vertical-slash heads once per slash selection
(converted MInference configs are ``token``; ``block`` is the block-granular variant at the same budgets), each as
provider ``config:L<layer>:<selection>``; without it the heads run as the config has them (``config:L<layer>``).

For each shape, length and input kind it times (median of triton's do_bench, ms) dense SDPA with the cuDNN and the
flash backends, and for each pattern at MInference's default budgets: index building alone, the kernel alone on
that index, and the whole path. It also reports the achieved tile density, the relative L2 error against dense
attention and against the same pattern computed in fp32 (on sampled query rows), and the peak memory above the
inputs compared with cuDNN's. ``adaptive`` (every head adaptive at its defaults; ``--gamma``/``--tau`` change them)
counts its estimation in ``index_ms`` like the others, and lists what its heads chose in ``patterns``.

Inputs: ``random`` (near-uniform attention, so any chosen indices are arbitrary: the worst case) and ``structured``
(a rotary-induced local band, attention-sink keys, a few strong vertical keys and repeated-offset slashes, the
shapes long-context heads show), and ``captured`` (q/k/v of one SmolLM2 layer on an 8K prompt, from --captured).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (
    LAYER_SHAPES,
    device_name,
    do_bench,
    md_table,
    random_qkv,
    rel_err,
    structured_qkv,
    versions,
    versions_text,
    write_csv,
    write_md,
)

from sparse_prefill.blockwise import sparse_attention_torch
from sparse_prefill.config import CHOICES as PARAM_CHOICES
from sparse_prefill.config import PATTERN_DEFAULTS, HeadSpec, SparseConfig, check_unit, load_config
from sparse_prefill.masks import block_mask, col_mask, rows_mask
from sparse_prefill.patch import shipped_configs
from sparse_prefill.plan import LayerPlan
from sparse_prefill.plan.adaptive import CHOICES
from sparse_prefill.report import tile_density
from sparse_prefill.tools.cli import fractions, parse_lengths

SHAPES = LAYER_SHAPES  # query heads, kv heads, head_dim
PATTERNS = {
    "vertical_slash": HeadSpec("vertical_slash", dict(PATTERN_DEFAULTS["vertical_slash"])),
    "vertical_slash_token": HeadSpec("vertical_slash", {**PATTERN_DEFAULTS["vertical_slash"], "slash_select": "token"}),
    "a_shape": HeadSpec("a_shape", dict(PATTERN_DEFAULTS["a_shape"])),
    "block_sparse": HeadSpec("block_sparse", dict(PATTERN_DEFAULTS["block_sparse"])),
    "adaptive": HeadSpec("adaptive", dict(PATTERN_DEFAULTS["adaptive"])),
}
SMOKE = dict(lengths="2k", shapes="tiny", inputs="random,structured")  # --smoke's defaults: seconds on a CPU


def dense(q, k, v, backend) -> torch.Tensor:
    from torch.nn.attention import sdpa_kernel

    if not q.is_cuda:  # --smoke: the CPU's SDPA stands in for every backend
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def peak_extra(fn) -> int:
    """Peak bytes allocated while fn runs, above what was allocated before (0 without CUDA)."""
    if not torch.cuda.is_available():
        fn()
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def find_config(text: str) -> SparseConfig:
    """A config from a JSON path, or a shipped one by file stem or by one of its hub ids (with or without the org)."""
    if Path(text).is_file():
        return load_config(text)
    for path in shipped_configs():
        config = load_config(path)
        names = {path.stem, *config.model.hub_ids, *(i.split("/")[-1] for i in config.model.hub_ids)}
        if text.lower() in {n.lower() for n in names}:
            return config
    known = ", ".join(p.stem for p in shipped_configs())
    raise SystemExit(f"--config: {text!r} is neither a file nor a shipped config ({known})")


def config_providers(config: SparseConfig, layer: int, slash_select: str | None) -> dict[str, list[HeadSpec]]:
    """Layer ``layer`` of ``config`` as providers: as it is, or once per ``slash_select`` choice (comma-separated)
    set on its vertical-slash heads."""
    if not 0 <= layer < config.model.num_layers:
        raise SystemExit(f"--layer: must be in [0, {config.model.num_layers}) for {config.model.name}, got {layer}")
    heads = config.layers[layer]
    if slash_select is None:
        return {f"config:L{layer}": heads}
    out = {}
    for choice in slash_select.split(","):
        if choice not in PARAM_CHOICES["slash_select"]:
            raise SystemExit(f"--slash-select: each must be one of {PARAM_CHOICES['slash_select']}, got {choice!r}")
        out[f"config:L{layer}:{choice}"] = [
            HeadSpec(h.pattern, {**h.params, "slash_select": choice}) if h.pattern == "vertical_slash" else h
            for h in heads
        ]
    return out


def first_calls(q, k, v, heads, scale, sparse_attention) -> None:
    """Three calls of a fresh plan: eager, CUDA-graph capture (with the workspace and the graph's memory) and replay,
    so the peak counts everything the index keeps, not only the steady state (a plan made alone has its own
    workspace and graph pool)."""
    plan = LayerPlan(heads)
    for _ in range(3):
        sparse_attention(q, k, v, plan.index(q, k, scale, [0]), scale)


def sampled_rows(S: int) -> torch.Tensor:
    """Query rows to check accuracy on: the last 128 and 128 spread over the prompt."""
    spread = torch.linspace(0, S - 129, 128).long()
    return torch.cat([spread, torch.arange(S - 128, S)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="8k,32k,64k,128k")
    parser.add_argument("--shapes", default="llama3-8b,smollm2")
    parser.add_argument("--inputs", default="random,structured")
    parser.add_argument("--config", help="one layer of this config (a JSON path, or a shipped config's stem or hub id)")
    parser.add_argument("--layer", type=int, default=0, help="--config: the layer to run")
    parser.add_argument(
        "--slash-select", help="--config: token, block or token,block: set on its vertical-slash heads (one run each)"
    )
    parser.add_argument("--captured", default=None, help="a .pt file with q/k/v of one layer (adds input 'captured')")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument(
        "--providers",
        help=f"uniform sparse patterns to run: {', '.join(PATTERNS)} (default: all of them; none with --config)",
    )
    parser.add_argument(
        "--fractions",
        type=fractions(low_open=True, high_open=True),  # budgets as a config takes them
        default=[],
        help="add uniform vertical-slash providers at these fractions of the keys as columns and as diagonals "
        "(block slashes), e.g. the budgets that kept fidelity in bench_fidelity.py's ladder",
    )
    parser.add_argument("--gamma", type=float, default=None, help="adaptive: attention mass of the sets")
    parser.add_argument("--tau", type=float, default=None, help="adaptive: block-sparse threshold on sqrt JS")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes on the CPU with the torch backend: checks that it runs"
    )
    args = parser.parse_args(argv)
    providers = args.providers if args.providers is not None else "" if args.config else ",".join(PATTERNS)
    patterns = {name: PATTERNS[name] for name in providers.split(",") if name}
    if "adaptive" in patterns:
        overrides = {
            n: check_unit(v, f"--{n}", n) for n, v in (("gamma", args.gamma), ("tau", args.tau)) if v is not None
        }
        patterns["adaptive"] = HeadSpec("adaptive", {**patterns["adaptive"].params, **overrides})
    for f in args.fractions:
        patterns[f"vertical_slash@{f:g}"] = HeadSpec(
            "vertical_slash", {**PATTERN_DEFAULTS["vertical_slash"], "vertical": f, "slash": f}
        )
    if args.smoke:  # tiny defaults; lengths and inputs given explicitly stay
        for name, value in SMOKE.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
        args.out = args.out if args.out != parser.get_default("out") else "benchmarks/smoke"
    elif not torch.cuda.is_available():
        print("bench_layer: no CUDA device, nothing to measure (--smoke runs tiny shapes on the CPU)")
        return
    from torch.nn.attention import SDPBackend

    if torch.cuda.is_available():
        from sparse_prefill.kernels import sparse_attention_triton as sparse_attention

        dev, device = "cuda", device_name(cuda=True)
    else:
        sparse_attention = sparse_attention_torch
        dev, device = "cpu", f"{device_name(cuda=False)} smoke run, torch backend"
    env = versions_text(versions())
    runs = []  # (shape name, (H, Hkv, D), provider -> the layer's head specs)
    if args.config:
        config = find_config(args.config)
        m = config.model
        layer = config_providers(config, args.layer, args.slash_select)
        runs.append((m.name, (m.num_heads, m.num_kv_heads, m.head_dim), {**layer, **uniform(patterns, m.num_heads)}))
    else:
        runs += [(shape, SHAPES[shape], uniform(patterns, SHAPES[shape][0])) for shape in args.shapes.split(",")]
    rows = []
    inputs = args.inputs.split(",") + (["captured"] if args.captured else [])
    for shape, (H, Hkv, D), providers in runs:
        for S in parse_lengths(args.lengths):
            for kind in inputs:
                if kind == "captured":
                    data = torch.load(args.captured)
                    if (data["q"].shape[1], data["q"].shape[-1]) != (H, D) or data["q"].shape[2] < S:
                        continue
                    q, k, v = (data[n][..., :S, :].to(dev).bfloat16() for n in "qkv")
                elif kind == "structured":
                    q, k, v = structured_qkv(H, Hkv, S, D, dev=dev)
                else:
                    q, k, v = random_qkv(H, Hkv, S, D, dev=dev)
                scale = D**-0.5
                causal_flops = 4 * D * S * S / 2 * H
                ref = dense(q, k, v, SDPBackend.CUDNN_ATTENTION).transpose(1, 2)
                t_cudnn = do_bench(lambda: dense(q, k, v, SDPBackend.CUDNN_ATTENTION))
                mem_cudnn = peak_extra(lambda: dense(q, k, v, SDPBackend.CUDNN_ATTENTION))
                t_flash = do_bench(lambda: dense(q, k, v, SDPBackend.FLASH_ATTENTION))
                base = dict(shape=shape, S=S, input=kind)
                rows.append(
                    {
                        **base,
                        "provider": "sdpa_cudnn",
                        "ms": t_cudnn,
                        "speedup": 1.0,
                        "density": 1.0,
                        "tflops": causal_flops / t_cudnn / 1e9,
                        "mem_mb": mem_cudnn / 2**20,
                    }
                )
                rows.append(
                    {
                        **base,
                        "provider": "sdpa_flash",
                        "ms": t_flash,
                        "speedup": t_cudnn / t_flash,
                        "density": 1.0,
                        "tflops": causal_flops / t_flash / 1e9,
                    }
                )
                sample = sampled_rows(S).to(dev)
                for name, heads in providers.items():
                    plan = LayerPlan(heads)  # as in a patched model: built once, called by every layer
                    index = plan.index(q, k, scale, [0])
                    out = sparse_attention(q, k, v, index, scale)
                    t_index = do_bench(lambda: plan.index(q, k, scale, [0]))
                    t_kernel = do_bench(lambda: sparse_attention(q, k, v, index, scale))
                    t_all = do_bench(lambda: sparse_attention(q, k, v, plan.index(q, k, scale, [0]), scale))
                    mem = peak_extra(lambda: first_calls(q, k, v, heads, scale, sparse_attention))
                    density = float(tile_density(index).mean())
                    exact, recall = exact_rows(q, k, v, index, sample, scale)
                    torch_bf16, _ = exact_rows(q, k, v, index, sample, scale, dtype=torch.bfloat16)
                    tiles = density * (S / 64) * (S / 64 + 1) / 2 * H
                    rows.append(
                        {
                            **base,
                            "provider": name,
                            "ms": t_all,
                            "index_ms": t_index,
                            "kernel_ms": t_kernel,
                            "speedup": t_cudnn / t_all,
                            "kernel_speedup": t_cudnn / t_kernel,
                            "density": density,
                            "tflops": tiles * 4 * D * 64 * 64 / t_kernel / 1e9,
                            "recall": recall,
                            "err_vs_dense": rel_err(out[0, sample], ref[0, sample]),
                            "err_vs_pattern": rel_err(out[0, sample], exact),
                            "torch_bf16_err_vs_pattern": rel_err(torch_bf16, exact),
                            "mem_mb": mem / 2**20,
                            "mem_vs_cudnn": mem / mem_cudnn if mem_cudnn else float("nan"),
                            "patterns": _chosen(index),
                        }
                    )
                    print(_line(rows[-1]), flush=True)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    write(rows, Path(args.out), device, env)


def uniform(patterns: dict[str, HeadSpec], H: int) -> dict[str, list[HeadSpec]]:
    return {name: [spec] * H for name, spec in patterns.items()}


def _chosen(index) -> str:
    """What adaptive heads chose, e.g. ``vs 28 / bs 2 / dense 2``; empty for fixed patterns."""
    if index.choice is None:
        return ""
    counts = Counter(CHOICES[c] for c in index.choice.flatten().tolist() if c >= 0)
    short = {"vertical_slash": "vs", "block_sparse": "bs", "dense": "dense"}
    return " / ".join(f"{short[c]} {counts[c]}" for c in CHOICES if counts[c])


def exact_rows(q, k, v, index, rows, scale, dtype=torch.float32) -> tuple[torch.Tensor, float]:
    """Attention of the given query rows under the index's exact mask, computed in ``dtype``: [R, H, D]; and the
    attention recall, the share of the rows' causal attention mass the mask keeps (mean over rows and heads)."""
    G = q.shape[1] // k.shape[1]
    blocks, cols = block_mask(index, 0), col_mask(index, 0)  # [H, M, N], [H, S]
    kk = k[0].to(dtype).repeat_interleave(G, 0)
    vv = v[0].to(dtype).repeat_interleave(G, 0)
    out, kept = [], []
    for chunk in rows.split(32):
        mask = rows_mask(blocks, cols, 0, chunk)  # [H, R, S]; one unpadded sample, q_len == kv_len
        s = (q[0, :, chunk].to(dtype) @ kk.transpose(-1, -2)).float() * scale
        causal = torch.arange(s.shape[-1], device=s.device) <= chunk[:, None]
        kept.append((torch.softmax(s.masked_fill(~causal, float("-inf")), -1) * mask).sum(-1).flatten())
        p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).to(dtype)
        out.append((p @ vv).float().transpose(0, 1))
    return torch.cat(out), float(torch.cat(kept).mean())


def _line(r: dict) -> str:
    return (
        f"{r['shape']:>10} {r['S']:>7} {r['input']:>10} {r['provider']:>15} {r['ms']:9.2f} ms "
        f"x{r['speedup']:5.2f} density {r['density']:.3f} recall {r.get('recall', 1):.4f} "
        f"err {r.get('err_vs_dense', 0):.3g}"
    )


COLUMNS = [
    "shape",
    "S",
    "input",
    "provider",
    "ms",
    "index_ms",
    "kernel_ms",
    "speedup",
    "kernel_speedup",
    "density",
    "tflops",
    "recall",
    "err_vs_dense",
    "err_vs_pattern",
    "torch_bf16_err_vs_pattern",
    "mem_mb",
    "mem_vs_cudnn",
    "patterns",
]


def write(rows: list[dict], out: Path, device: str, env: str) -> None:
    write_csv(out / "bench_layer.csv", rows, COLUMNS, {"device": device, "versions": env})
    lines = [f"# One attention layer, whole sparse path vs SDPA\n\n{device}; {env}\n", *md_table(rows, COLUMNS)]
    write_md(out / "bench_layer.md", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
