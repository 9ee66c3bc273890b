"""Dense fallback vs stock dense, interleaved: does a patched model cost anything below ``min_seq_len``?

A benchmark, not a test. ``bench_e2e.py`` times its configs one after the other, so a drift of the GPU's speed over a
run (clocks, temperature) shows up as a difference of a few per cent between configs that run the same kernels. Here
the two run in alternation (dense, patched, patched, dense, ...) on one model, patched once with every head
vertical-slash and ``min_seq_len="auto"``, so at 8K every layer takes the dense fallback; the paired difference of
their times is what the patch costs. A CUDA profile of one forward each lists the kernels, to show they are the same.

    python benchmarks/bench_fallback.py --models llama3-8b,qwen2-7b --length 8192 --pairs 16
    python benchmarks/bench_fallback.py --smoke      # tiny models on the CPU: checks the script, measures nothing
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import MODELS, Clock, build_model, dense_sdpa, prefill, random_ids, run_device
from torch.profiler import ProfilerActivity, profile

from sparse_prefill import SparseConfig, last_report, patch_model
from sparse_prefill.dispatch import ATTN_NAME
from sparse_prefill.patches import adapter_for


def timed(model, ids, impl: str) -> float:
    """ms of one prefill with ``impl`` as the attention implementation (SDPA backends: cuDNN first, as both use)."""
    model.set_attn_implementation(impl)

    def run():
        with dense_sdpa():
            return prefill(model, ids)

    return Clock(ids.device.type).once(run)


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
    device, dtype = run_device(p, args.smoke)
    if args.smoke:
        args.length, args.pairs = 128, 2
    print(f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}, torch {torch.__version__}")
    for name in args.models.split(","):
        model = build_model(name, args.smoke, device, dtype)
        ids = random_ids(model, args.length, device)
        patch_model(model, SparseConfig.uniform(adapter_for(model).model_info(model), "vertical_slash"))
        for impl in ["sdpa", ATTN_NAME] * 3:  # warm-up
            timed(model, ids, impl)
        print(f"  patched path: {last_report(model)[0].reason or last_report(model)[0].path}")
        logits = {}
        for impl in ["sdpa", ATTN_NAME]:  # under the same backend order: stock SDPA would take flash first
            model.set_attn_implementation(impl)
            with dense_sdpa():
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
