"""Dense fallback vs stock dense, interleaved: does a patched model cost anything below ``min_seq_len``?

A benchmark, not a test. ``bench_e2e.py`` times its configs one after the other, so a drift of the GPU's speed over a
run (clocks, temperature) shows up as a difference of a few per cent between configs that run the same kernels. Here
the two run in alternation (dense, patched, patched, dense, ...) on one model, patched once with every head
vertical-slash and ``min_seq_len="auto"``, so at 8K every layer takes the dense fallback; the paired difference of
their times is what the patch costs. A CUDA profile of one forward each lists the kernels, to show they are the same.

    python scripts/bench_fallback.py --models llama3-8b,qwen2-7b --length 8192 --pairs 16
    python scripts/bench_fallback.py --smoke      # tiny models on the CPU: checks the script, measures nothing
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_e2e import MODELS, build_model, dense_context, ids_for, prefill  # noqa: E402

from sparse_prefill import SparseConfig, last_report, patch_model  # noqa: E402
from sparse_prefill.attention import ATTN_NAME  # noqa: E402
from sparse_prefill.patches import adapter_for  # noqa: E402


def sync(ids: torch.Tensor) -> None:
    if ids.is_cuda:
        torch.cuda.synchronize()


def timed(model, ids, impl: str) -> float:
    """ms of one prefill with ``impl`` as the attention implementation (SDPA backends: cuDNN first, as both use)."""
    model.set_attn_implementation(impl)
    sync(ids)
    start = time.perf_counter()
    with dense_context():
        out = prefill(model, ids)
    sync(ids)
    del out
    return (time.perf_counter() - start) * 1e3


def kernels(model, ids, impl: str, top: int) -> list[str]:
    activity = ProfilerActivity.CUDA if ids.is_cuda else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        timed(model, ids, impl)
    spent = (lambda e: e.device_time_total) if ids.is_cuda else (lambda e: e.self_cpu_time_total)
    events = sorted((e for e in prof.key_averages() if spent(e) > 0), key=lambda e: -spent(e))
    total = sum(spent(e) for e in events) / 1e3
    lines = [f"  {impl}: {activity.name} total {total:.1f} ms; top kernels:"]
    lines += [f"    {spent(e) / 1e3:8.2f} ms x{e.count:4d} {e.key[:110]}" for e in events[:top]]
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="llama3-8b,qwen2-7b", help=f"comma-separated, of {sorted(MODELS)}")
    p.add_argument("--length", type=int, default=8192, help="prompt length; below the crossover to time the fallback")
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--top", type=int, default=6, help="kernels listed per profile")
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script, measures nothing")
    args = p.parse_args(argv)
    if args.smoke:
        device, dtype, args.length, args.pairs = "cpu", torch.float32, 128, 2
    elif not torch.cuda.is_available():
        p.error("needs a CUDA device (or --smoke)")
    else:
        device, dtype = "cuda", torch.bfloat16
    print(f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}, torch {torch.__version__}")
    for name in args.models.split(","):
        model = build_model(name, args.smoke, device, dtype)
        ids = ids_for(model, args.length, device)
        patch_model(model, SparseConfig.uniform(adapter_for(model).model_info(model), "vertical_slash"))
        for impl in ["sdpa", ATTN_NAME] * 3:  # warm-up
            timed(model, ids, impl)
        print(f"  patched path: {last_report(model)[0].reason or last_report(model)[0].path}")
        logits = {}
        for impl in ["sdpa", ATTN_NAME]:  # under the same backend order: stock SDPA would take flash first
            model.set_attn_implementation(impl)
            with dense_context():
                logits[impl] = prefill(model, ids).logits.float()
        print(f"  last-token logits, max |dense - patched| = {(logits['sdpa'] - logits[ATTN_NAME]).abs().max():.3g}")
        times: dict[str, list[float]] = {"sdpa": [], ATTN_NAME: []}
        for i in range(args.pairs):
            for impl in ["sdpa", ATTN_NAME] if i % 2 == 0 else [ATTN_NAME, "sdpa"]:
                times[impl].append(timed(model, ids, impl))
        dense, patched = times["sdpa"], times[ATTN_NAME]
        diff = statistics.median(b - a for a, b in zip(dense, patched))
        print(
            f"{name} S={args.length}, interleaved x{args.pairs}: dense median {statistics.median(dense):.1f} ms "
            f"(min {min(dense):.1f}), patched median {statistics.median(patched):.1f} ms (min {min(patched):.1f}); "
            f"paired diff median {diff:+.2f} ms",
            flush=True,
        )
        for impl in ["sdpa", ATTN_NAME]:
            print("\n".join(kernels(model, ids, impl, args.top)), flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
