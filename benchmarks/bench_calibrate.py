"""Benchmark calibration time on a random-init model of a real shape (issue: Llama-3-8B shape at 32K on the H100).

A benchmark, not a test: random weights give near-uniform attention, so the config it writes means nothing, but the
search does the same work as on a trained model of that shape (every layer captured, every head's candidates scored).
The tokenizer only builds the prompts; any local tokenizer folder does (``tokenizer.save_pretrained`` of SmolLM2's):

    python benchmarks/bench_calibrate.py --tokenizer DIR --shape llama3-8b --lengths 32k --out benchmarks/results
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from common import MODELS, build_model, device_name, versions, versions_text, write_md

from sparse_prefill.patches import adapter_for
from sparse_prefill.tools.calibrate import calibrate, summary
from sparse_prefill.tools.cli import parse_lengths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", type=Path, required=True, help="a local tokenizer folder")
    p.add_argument("--shape", default="llama3-8b", choices=sorted(MODELS))
    p.add_argument("--lengths", type=parse_lengths, default=[32768])
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, to check the script runs")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    t0 = time.perf_counter()
    model = build_model(args.shape, args.smoke, device, dtype)
    if model.config.vocab_size < len(tokenizer):  # the smoke shape's vocabulary is tiny
        model.resize_token_embeddings(len(tokenizer))
    built = time.perf_counter() - t0
    info = adapter_for(model).model_info(model)
    t0 = time.perf_counter()
    config = calibrate(model, tokenizer, info, args.lengths, args.samples, 0, 0.9, 0.5, None, "auto")
    seconds = time.perf_counter() - t0
    name = device_name(device == "cuda")
    lines = [
        f"# Calibration time, random-init {args.shape} shape{' (smoke: tiny shape)' if args.smoke else ''}",
        "",
        f"{name}; {versions_text(versions(), ('torch', 'python'))}",
        "",
        "| shape | lengths | samples | layers x heads | calibration s | model build s |",
        "|---|---|---|---|---|---|",
        f"| {args.shape} | {','.join(map(str, args.lengths))} | {args.samples} | {info.num_layers} x {info.num_heads} "
        f"| {seconds:.1f} | {built:.1f} |",
        "",
        "```",
        summary(config),
        "```",
    ]
    write_md(args.out / f"bench_calibrate_{args.shape}{'_smoke' if args.smoke else ''}.md", lines)
    print("\n".join(lines[:8]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
