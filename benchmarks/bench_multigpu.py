"""Prefill of a whole model split over GPUs: dense (SDPA, cuDNN first) vs patched (vertical-slash on every head).

A benchmark, not a test. It times the time to first token (one forward over the prompt, ``logits_to_keep=1``, KV
cache built, every GPU synchronized, after a warm-up) and the peak memory of every GPU, and writes markdown + CSV
under --out. Random-init models, nothing is downloaded: a checkpoint of the shape is written once under --ckpt-root
and loaded through the public API, so the split is exactly what users get:

    # accelerate: from_pretrained(..., device_map="auto") spreads the layers over the visible GPUs
    python benchmarks/bench_multigpu.py --mode device_map --shapes llama3-8b --lengths 64k,128k,256k --out DIR
    # transformers tensor parallelism: every rank holds half of each layer's heads (tp_plan="auto")
    torchrun --nproc-per-node 2 benchmarks/bench_multigpu.py --mode tp --shapes llama3-8b --lengths 64k,128k,256k \\
        --out DIR
    # the checkpoints alone (written once, then reused: a 33B one takes minutes)
    python benchmarks/bench_multigpu.py --mode device_map --shapes llama3-8b,deep-33b --build-only
    # the same code paths on a tiny model on the CPU (device_map with disk offload; 2 gloo ranks); on a machine
    # with GPUs, hide them (CUDA_VISIBLE_DEVICES=) so that transformers' TP takes the CPU too
    python benchmarks/bench_multigpu.py --smoke --mode device_map
    torchrun --nproc-per-node 2 benchmarks/bench_multigpu.py --smoke --mode tp

Shapes: ``llama3-8b`` (32 layers, 32/8 heads, head_dim 128, hidden 4096, MLP 14336, vocab 128256; 16 GB in bf16, fits
one H200 even at 256K) and ``deep-33b`` (80 layers, 48/8 heads, head_dim 128, hidden 6144, MLP 16384; 66 GB of
weights plus 86 GB of KV cache at 256K: more than one H200 holds). A failed run (out of memory) is recorded as such
under device_map; under TP an out-of-memory rank would leave the other waiting in a collective, so it is not caught.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import MODELS, SMOKE_SHAPE, cpu_model, dense_sdpa, md_table, versions, versions_text, write_csv, write_md

from sparse_prefill import SparseConfig, patch_model, unpatch_model
from sparse_prefill.tools.cli import parse_lengths
from sparse_prefill.report import gather_report
from sparse_prefill.patches import adapter_for

SHAPES = {"llama3-8b": MODELS["llama3-8b"][1], "deep-33b": MODELS["deep-33b"][1], "smoke": SMOKE_SHAPE}
GB = 1e9


def llama_config(shape: str, max_len: int):
    from transformers import LlamaConfig

    fields = {k: v for k, v in SHAPES[shape].items() if k not in ("rope_theta", "max_position_embeddings")}
    return LlamaConfig(
        **fields,
        max_position_embeddings=max(max_len, 8192),
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=False,
    )


def ensure_checkpoint(shape: str, root: Path, max_len: int, dtype: torch.dtype, device: str, rank: int) -> Path:
    """A random-init checkpoint of the shape, written once (by rank 0; the other ranks wait for it)."""
    from transformers import AutoModelForCausalLM

    path = root / shape
    done = path / ".complete"
    if done.exists():
        return path
    if rank == 0:
        print(f"writing a random-init {shape} checkpoint to {path}", flush=True)
        torch.manual_seed(0)
        with torch.device(device):  # initialised on the GPU: seconds, not minutes
            model = AutoModelForCausalLM.from_config(llama_config(shape, max_len), dtype=dtype)
        model.save_pretrained(path, max_shard_size="10GB")
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        done.touch()
    deadline = time.time() + 3600
    while not done.exists():
        if time.time() > deadline:
            raise TimeoutError(f"rank {rank}: no checkpoint at {path} after an hour")
        time.sleep(2)
    return path


def load(path: Path, mode: str, dtype: torch.dtype, smoke: bool, offload: str):
    from transformers import AutoModelForCausalLM

    kw = dict(dtype=dtype, attn_implementation="sdpa")
    if mode == "tp":
        from transformers.distributed import DistributedConfig

        return AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(tp_plan="auto"), **kw)
    if smoke:  # CPU: one layer offloaded to disk, so accelerate's hooks move its weights in for its forward
        device_map = {
            "model.embed_tokens": "cpu",
            "model.rotary_emb": "cpu",
            "model.layers.0": "cpu",
            "model.layers.1": "disk",
            "model.norm": "cpu",
            "lm_head": "cpu",
        }
        return AutoModelForCausalLM.from_pretrained(path, device_map=device_map, offload_folder=offload, **kw)
    return AutoModelForCausalLM.from_pretrained(path, device_map="auto", **kw)


def gpus(model, mode: str) -> list[int]:
    """The CUDA devices this process measures: the ones holding layers (device_map) or its own (tp)."""
    if mode == "tp":
        return [model.device.index] if model.device.type == "cuda" else []
    found = set()
    for place in getattr(model, "hf_device_map", {}).values():  # ints are CUDA devices; "cpu" and "disk" are not
        if isinstance(place, int) or str(place).startswith("cuda"):
            found.add(torch.device("cuda", place).index if isinstance(place, int) else torch.device(place).index or 0)
    return sorted(found)


def dense_backends():
    """SDPA with cuDNN first, as the patch's own dense path runs it."""
    return dense_sdpa() if torch.cuda.is_available() else contextlib.nullcontext()


def prefill(model, ids: torch.Tensor, devices: list[int], tp: bool) -> tuple[float, list[float]]:
    """Seconds for one prefill forward (first token's logits only) and the peak memory of each device, in GB."""
    for d in devices:
        torch.cuda.synchronize(d)
        torch.cuda.reset_peak_memory_stats(d)
    if tp:
        torch.distributed.barrier()
    start = time.perf_counter()
    with torch.inference_mode(), dense_backends():
        out = model(ids, logits_to_keep=1, use_cache=True)
    for d in devices:
        torch.cuda.synchronize(d)
    seconds = time.perf_counter() - start
    if not out.logits.isfinite().all():
        raise RuntimeError("non-finite logits")
    del out
    peaks = [torch.cuda.max_memory_allocated(d) / GB for d in devices]
    for d in devices:
        with torch.cuda.device(d):
            torch.cuda.empty_cache()
    return seconds, peaks


def measure(model, shape: str, lengths, impl: str, args, devices, tp: bool, vocab: int, input_device) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    warm = torch.randint(0, vocab, (1, args.warmup_len), generator=gen).to(input_device)
    prefill(model, warm, devices, tp)
    rows = []
    for S in lengths:
        ids = torch.randint(0, vocab, (1, S), generator=gen).to(input_device)
        row = {"shape": shape, "S": S, "impl": impl}
        try:  # the first call at a new length compiles kernels and captures CUDA graphs: kept apart, as first_s
            runs = [prefill(model, ids, devices, tp) for _ in range(args.warmups + args.repeats)]
        except torch.cuda.OutOfMemoryError:
            if tp:
                raise
            row["status"] = "OOM"
            for d in devices:
                with torch.cuda.device(d):
                    torch.cuda.empty_cache()
            rows.append(row)
            continue
        row["status"] = "ok"
        row["first_s"] = runs[0][0]
        runs = runs[args.warmups :]
        row["ttft_s"] = statistics.median(s for s, _ in runs)
        row["peak_gb"] = [max(p[i] for _, p in runs) for i in range(len(devices))]
        peaks = " / ".join(f"{x:.1f}" for x in row["peak_gb"])
        rank = os.environ.get("RANK", 0)
        print(f"[rank {rank}] {shape} {S} {impl}: {row['ttft_s']:.3f} s, peak GB {peaks}", flush=True)
        if impl == "patched":
            report = gather_report(model)  # every head of every layer (a collective under TP)
            density = [x for r in report for x in (r["density"] or [[1.0]])[0]]
            row["density"] = sum(density) / len(density)
            row["sparse_layers"] = sum(r["path"] == "sparse" for r in report)
        rows.append(row)
    return rows


def combine(rows: list[dict], tp: bool) -> list[dict]:
    """Under TP, one row per run from every rank's: the slowest rank's time, and each rank's GPU memory in turn."""
    if not tp:
        return rows
    parts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, rows)
    merged = []
    for per_rank in zip(*parts):
        row = dict(per_rank[0])
        row["weights_gb"] = [x for r in per_rank for x in r["weights_gb"]]
        if row["status"] == "ok":
            row["ttft_s"] = max(r["ttft_s"] for r in per_rank)
            row["peak_gb"] = [x for r in per_rank for x in r["peak_gb"]]
        merged.append(row)
    return merged


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["device_map", "tp"], required=True)
    ap.add_argument("--shapes", default="llama3-8b", help=f"comma-separated, of {sorted(SHAPES)}")
    ap.add_argument("--lengths", default="64k,128k,256k")
    ap.add_argument("--repeats", type=int, default=1, help="timed prefills per (length, impl); the median is kept")
    ap.add_argument("--warmups", type=int, default=1, help="untimed prefills at each length before the timed ones")
    ap.add_argument("--warmup-len", type=int, default=8192, help="one prefill of this length before any other")
    ap.add_argument("--ckpt-root", default="out/ckpt", help="where the random-init checkpoints are written once")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script, measures nothing")
    ap.add_argument("--build-only", action="store_true", help="write the checkpoints of --shapes and stop")
    args = ap.parse_args()
    if args.smoke:
        args.shapes, args.lengths, args.warmup_len = "smoke", "256,512", 128
        args.out = args.out if args.out != "benchmarks/results" else "out/bench_multigpu_smoke"
    elif not torch.cuda.is_available():
        ap.error("needs CUDA GPUs (or --smoke)")
    tp = args.mode == "tp"
    if tp and "RANK" not in os.environ:
        ap.error("--mode tp runs under torchrun: torchrun --nproc-per-node 2 benchmarks/bench_multigpu.py --mode tp")
    rank = int(os.environ.get("RANK", 0))
    lengths = parse_lengths(args.lengths)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    build_device = "cpu" if args.smoke else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    device, env = environment(tp, args.smoke)
    rows: list[dict] = []
    out = Path(args.out)
    name = f"bench_multigpu_{args.mode}_{args.shapes.replace(',', '_')}"
    for shape in args.shapes.split(","):
        path = ensure_checkpoint(shape, Path(args.ckpt_root), max(lengths), dtype, build_device, rank)
        if args.build_only:
            continue
        with tempfile.TemporaryDirectory() as offload:
            model = load(path, args.mode, dtype, args.smoke, offload).eval()
            devices = gpus(model, args.mode)
            info = adapter_for(model).model_info(model)
            params = sum(p.numel() for p in model.parameters())  # a TP shard (DTensor) counts its global size
            weights = [torch.cuda.memory_allocated(d) / GB for d in devices]
            world = torch.distributed.get_world_size() if tp else 1
            common = {"mode": args.mode, "params_b": params / 1e9, "gpus": len(devices) * world}
            vocab = model.config.vocab_size
            dense = measure(model, shape, lengths, "dense", args, devices, tp, vocab, model.device)
            budgets = dict(vertical=32, slash=128, last_q=16) if args.smoke else {}  # the defaults cover tiny prompts
            patch_model(model, SparseConfig.uniform(info, "vertical_slash", min_seq_len=0, **budgets))
            patched = measure(model, shape, lengths, "patched", args, devices, tp, vocab, model.device)
            unpatch_model(model)
            del model
        for row in dense + patched:
            row["weights_gb"] = weights
        dense, patched = combine(dense, tp), combine(patched, tp)
        for d_row, p_row in zip(dense, patched):
            if d_row["status"] == p_row["status"] == "ok":
                p_row["speedup"] = d_row["ttft_s"] / p_row["ttft_s"]
        rows += [{**common, **row} for row in dense + patched]
        if rank == 0:
            write(rows, out, name, device, env)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def environment(tp: bool, smoke: bool) -> tuple[str, str]:
    if torch.cuda.is_available() and not smoke:
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        device = f"{len(names)} × {names[0]}" if len(set(names)) == 1 else ", ".join(names)
        if tp:
            device = f"{os.environ.get('WORLD_SIZE')} ranks, each on one {names[0]}"
    else:
        device = f"CPU ({cpu_model()})" + (f", {os.environ.get('WORLD_SIZE')} gloo ranks" if tp else "")
    return device, versions_text(versions("accelerate"))


COLUMNS = "mode shape params_b gpus S impl status ttft_s speedup first_s density sparse_layers".split()


def write(rows: list[dict], out: Path, name: str, device: str, env: str) -> None:
    """CSV and markdown; per-GPU memory as one column per GPU (CSV) or "a / b" (markdown)."""
    n = max((len(r.get("peak_gb", [])) for r in rows), default=0)
    gpu_cols = [f"peak_gb_gpu{i}" for i in range(n)] + [f"weights_gb_gpu{i}" for i in range(n)]
    flat = [
        {
            **r,
            **{f"peak_gb_gpu{i}": x for i, x in enumerate(r.get("peak_gb", []))},
            **{f"weights_gb_gpu{i}": x for i, x in enumerate(r["weights_gb"])},
        }
        for r in rows
    ]
    write_csv(out / f"{name}.csv", flat, COLUMNS + gpu_cols, {"device": device, "versions": env})
    lines = [
        "# Whole-model prefill split over GPUs: dense (SDPA, cuDNN first) vs patched (vertical-slash)\n",
        f"{device}; {env}\n",
        "Time to first token: one forward over the prompt with `logits_to_keep=1` and the KV cache built, every GPU "
        "synchronized, after a warm-up; `speedup` = dense / patched; `first_s`: the first call at that length "
        "(kernel compilation and CUDA-graph capture included; equal to `ttft_s` when run with `--warmups 0`); "
        "memory in GB per GPU (peak during the prefill, and the weights).\n",
        *md_table(rows, COLUMNS + ["peak_gb", "weights_gb"]),
    ]
    write_md(out / f"{name}.md", lines)
    print("\n".join(lines[3:]), flush=True)


if __name__ == "__main__":
    main()
