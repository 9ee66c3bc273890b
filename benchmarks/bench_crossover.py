"""Measure the dense-fallback crossover: from which prompt length the sparse path beats dense, per head_dim.

    python scripts/bench_crossover.py --out benchmarks/results/bench_crossover_h100    # on the GPU, ~2 minutes
    python scripts/bench_crossover.py --smoke --out /tmp/crossover                      # CPU, tiny shapes, seconds

One attention layer (32 query / 8 KV heads: Llama-3-8B at head_dim 128, Llama-3.2-1B at head_dim 64), bf16, batch 1,
through the package's own entry point: the times are those of the two paths ``sparse_prefill_attention`` chooses
between (median of ``triton.testing.do_bench``, the helper of ``scripts/bench_layer.py``):

* ``dense``: its dense fallback, SDPA with cuDNN first (``attention.dense_attention``);
* ``flash_attn``: flash-attn's ``flash_attn_func``, only when it is importable;
* ``sparse``: the whole sparse path at the default vertical-slash budgets, index building included
  (``attention.sparse_prefill_attention`` with ``min_seq_len=0``).

The crossover of a head_dim is the smallest measured length from which sparse beat the fastest dense kernel at every
larger measured length, on every input kind (``structured`` and ``random`` q/k, ``scripts/bench_layer.py``). The
script prints the lines to paste into ``sparse_prefill/devices.py`` (``MIN_SEQ_LEN``, and ``DENSE_BACKEND`` where
flash-attn beat SDPA at every length) and writes markdown, CSV and JSON to ``--out`` (.md/.csv/.json).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from bench_layer import bench, parse_lengths, random_qkv, structured_qkv  # noqa: E402

from sparse_prefill.attention import (  # noqa: E402
    LAYERS,
    LayerState,
    PatchState,
    dense_attention,
    flash_attention,
    sparse_prefill_attention,
)
from sparse_prefill.config import PATTERN_DEFAULTS, HeadSpec  # noqa: E402
from sparse_prefill.devices import device_class, flash_attn_error  # noqa: E402
from sparse_prefill.estimate import LayerPlan  # noqa: E402

HEADS = (32, 8)  # query heads, KV heads
LENGTHS = "4k,8k,12k,16k,24k,32k,48k,64k"


class Layer(torch.nn.Module):
    """The attributes transformers' attention functions read from an attention module."""

    def __init__(self, heads: int, kv_heads: int):
        super().__init__()
        self.layer_idx, self.is_causal, self.num_key_value_groups = 0, True, heads // kv_heads


def cpu_bench(fn, reps: int = 3) -> float:
    """Median ms of ``reps`` calls after one warm-up (smoke runs on the CPU, where there is no do_bench)."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def crossover(rows: list[dict], dense_key: str = "dense_ms") -> int | None:
    """The smallest length from which sparse beat dense at every larger length of every input; None if it never
    did at the longest."""
    lengths = sorted({r["S"] for r in rows})
    wins = {S: all(r["sparse_ms"] < r[dense_key] for r in rows if r["S"] == S) for S in lengths}
    found = None
    for S in reversed(lengths):
        if not wins[S]:
            break
        found = S
    return found


def table_lines(dev_class: str, results: dict, date: str) -> list[str]:
    """The lines to paste into sparse_prefill/devices.py."""
    lines = []
    for D, res in sorted(results.items(), reverse=True):
        if res["crossover"] is None:
            lines.append(
                f"# ({dev_class!r}, {D}): sparse never won up to {res['max_S']}: remove any entry for it (the fallback "
                "applies), or measure longer --lengths"
            )
            continue
        lines.append(
            f'    ("{dev_class}", {D}): {res["crossover"]},  # scripts/bench_crossover.py {date}: '
            f"sparse {res['speedup_at']:.2f}x at {res['crossover']}"
            + (f", dense {1 / res['speedup_below']:.2f}x at {res['below']}" if res["below"] else "")
        )
    for D, res in sorted(results.items(), reverse=True):
        if res["flash_wins"]:
            lines.append(f'    ("{dev_class}", {D}): "flash_attn",  # DENSE_BACKEND: faster than SDPA cuDNN at every S')
    return lines


def measure(module, q, k, v, scale: float, timer, flash: bool) -> dict:
    """Times (ms) of the dense fallback, flash-attn (if ``flash``) and the whole sparse path on one input."""
    row = {"dense_ms": timer(lambda: dense_attention(module, q, k, v, None, scaling=scale))}
    if flash:
        row["flash_attn_ms"] = timer(lambda: flash_attention(q, k, v, 0.0, scale))
    row["sparse_ms"] = timer(lambda: sparse_prefill_attention(module, q, k, v, None, scaling=scale))
    record = LAYERS[module].patch.records[0]
    if record.path != "sparse":
        raise RuntimeError(f"the sparse path did not run: {record.reason}")
    row["density"] = float(torch.tensor(record.density).mean())
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head-dims", default="128,64")
    p.add_argument("--lengths", default=LENGTHS)
    p.add_argument("--inputs", default="structured,random")
    p.add_argument("--out", default="benchmarks/results/bench_crossover", help="output path prefix (.md/.csv/.json)")
    p.add_argument(
        "--smoke", action="store_true", help="tiny shapes on the CPU: exercises the script, measures nothing"
    )
    args = p.parse_args(argv)
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        p.error("needs a CUDA device (or --smoke)")
    dev = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    heads = (4, 2) if smoke else HEADS
    lengths = [256, 512, 1024] if smoke else parse_lengths(args.lengths)
    timer = cpu_bench if smoke else bench
    flash_missing = flash_attn_error()
    import transformers

    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if not smoke:
        import triton

        versions["triton"] = triton.__version__
    device = torch.cuda.get_device_name() if dev == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    dev_class = device_class(dev)
    date = datetime.date.today().isoformat()
    print(f"{device} ({dev_class}); {versions}; flash-attn: {flash_missing or 'importable'}", flush=True)

    H, Hkv = heads
    module = Layer(H, Hkv)
    spec = HeadSpec("vertical_slash", dict(PATTERN_DEFAULTS["vertical_slash"]))
    LAYERS[module] = LayerState(0, LayerPlan([spec] * H), PatchState(min_seq_len=0, backend="auto"), tuple(range(H)))
    rows, results = [], {}
    for D in (int(d) for d in args.head_dims.split(",")):
        scale = D**-0.5
        for S in lengths:
            for kind in args.inputs.split(","):
                if kind == "structured":
                    q, k, v = structured_qkv(H, Hkv, S, D, dev=dev)
                elif smoke:
                    g = torch.Generator().manual_seed(0)
                    q, k, v = (torch.randn(1, h, S, D, generator=g) for h in (H, Hkv, Hkv))
                else:
                    q, k, v = random_qkv(H, Hkv, S, D)
                q, k, v = (t.to(dtype) for t in (q, k, v))
                row = {"head_dim": D, "S": S, "input": kind, "heads": f"{H}/{Hkv}"}
                row.update(measure(module, q, k, v, scale, timer, flash=flash_missing is None and not smoke))
                row["best_dense_ms"] = min(row["dense_ms"], row.get("flash_attn_ms", float("inf")))
                row["speedup"] = row["best_dense_ms"] / row["sparse_ms"]
                rows.append(row)
                print(
                    f"head_dim {D:>3} S {S:>6} {kind:>10}: dense {row['dense_ms']:8.3f} ms"
                    + (f"  flash-attn {row['flash_attn_ms']:8.3f} ms" if "flash_attn_ms" in row else "")
                    + f"  sparse {row['sparse_ms']:8.3f} ms  x{row['speedup']:.2f}  density {row['density']:.3f}",
                    flush=True,
                )
                del q, k, v
                if dev == "cuda":
                    torch.cuda.empty_cache()
        mine = [r for r in rows if r["head_dim"] == D]
        found = crossover(mine, "best_dense_ms")
        ordered = sorted({r["S"] for r in mine})
        below = ordered[ordered.index(found) - 1] if found is not None and found != ordered[0] else None

        def worst(S):
            return min(r["speedup"] for r in mine if r["S"] == S)

        results[D] = {
            "crossover": found,
            "speedup_at": worst(found) if found else None,
            "below": below,
            "speedup_below": worst(below) if below else None,
            "max_S": ordered[-1],
            "flash_wins": all(r.get("flash_attn_ms", float("inf")) < r["dense_ms"] for r in mine),
        }
    lines = table_lines(dev_class, results, date)
    write(Path(args.out), rows, results, lines, {"device": device, "device_class": dev_class, **versions}, smoke)
    print("\nPaste into sparse_prefill/devices.py (MIN_SEQ_LEN, and DENSE_BACKEND for flash_attn lines):")
    print("\n".join(lines))
    return 0


COLUMNS = ["head_dim", "S", "input", "heads", "dense_ms", "flash_attn_ms", "sparse_ms", "speedup", "density"]


def suffixed(prefix: Path, suffix: str) -> Path:
    return prefix.with_name(prefix.name + suffix)


def write(out: Path, rows: list[dict], results: dict, lines: list[str], meta: dict, smoke: bool) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(suffixed(out, ".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS + list(meta), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(
                {**{c: (f"{r[c]:.4g}" if isinstance(r.get(c), float) else r.get(c, "")) for c in COLUMNS}, **meta}
            )
    record = {"meta": meta, "smoke": smoke, "crossover": results, "table_lines": lines, "rows": rows}
    suffixed(out, ".json").write_text(json.dumps(record, indent=1) + "\n")
    md = [
        "# Dense-fallback crossover: one attention layer, sparse path vs dense",
        "",
        f"{meta['device']}; " + ", ".join(f"{k} {v}" for k, v in meta.items() if k not in ("device", "device_class")),
        "" if not smoke else "\nSMOKE RUN (CPU, tiny shapes, torch path): exercises the script, measures nothing.",
        "",
        "Sparse = the whole path at the default vertical-slash budgets (index building + kernel); dense = SDPA with "
        "cuDNN first (the fallback); speed-up against the fastest dense kernel measured.",
        "",
        "| head_dim | crossover (min_seq_len) | worst speed-up there | worst speed-up one length below |",
        "|---|---|---|---|",
    ]
    for D, res in sorted(results.items(), reverse=True):
        at = f"{res['speedup_at']:.2f}x" if res["speedup_at"] else ""
        below = f"{res['speedup_below']:.2f}x at {res['below']}" if res["below"] else ""
        md.append(f"| {D} | {res['crossover'] or 'none up to ' + str(res['max_S'])} | {at} | {below} |")
    md += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        md.append(
            "| "
            + " | ".join(f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in COLUMNS)
            + " |"
        )
    md += ["", "Table lines for `sparse_prefill/devices.py`:", "", "```python", *lines, "```", ""]
    suffixed(out, ".md").write_text("\n".join(md))
    print(f"wrote {out}.md / .csv / .json")


if __name__ == "__main__":
    raise SystemExit(main())
