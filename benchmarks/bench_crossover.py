"""Measure the dense-fallback crossover: from which prompt length the sparse path beats dense, per head_dim.

    python benchmarks/bench_crossover.py --out benchmarks/results/bench_crossover_h100    # on the GPU, ~2 minutes
    python benchmarks/bench_crossover.py --smoke --out /tmp/crossover                      # CPU, tiny shapes, seconds

One attention layer (32 query / 8 KV heads: Llama-3-8B at head_dim 128, Llama-3.2-1B at head_dim 64), bf16, batch 1,
through the package's own entry point: the times are those of the two paths ``sparse_prefill_attention`` chooses
between (median of ``triton.testing.do_bench``, ``common.do_bench``):

* ``dense``: its dense fallback, SDPA with cuDNN first (``dense.dense_attention``);
* ``flash_attn``: flash-attn's ``flash_attn_func``, only when it is importable;
* ``sparse``: the whole sparse path at the default vertical-slash budgets, index building included
  (``attention.sparse_prefill_attention`` with ``min_seq_len=0``).

The crossover of a head_dim is the smallest measured length from which sparse beat the fastest dense kernel at every
larger measured length, on every input kind (``structured`` and ``random`` q/k, from ``common``). The
script prints the lines to paste into ``sparse_prefill/devices.py`` (``MIN_SEQ_LEN``, and ``DENSE_BACKEND`` where
flash-attn beat SDPA at every length) and writes markdown, CSV and JSON to ``--out`` (.md/.csv/.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
from common import (
    LAYER_SHAPES,
    device_name,
    do_bench,
    md_table,
    random_qkv,
    run_device,
    structured_qkv,
    suffixed,
    versions,
    versions_text,
    write_csv,
)

from sparse_prefill.config import PATTERN_DEFAULTS, HeadSpec
from sparse_prefill.dense import dense_attention, flash_attention, flash_attn_error
from sparse_prefill.devices import device_class
from sparse_prefill.dispatch import sparse_prefill_attention
from sparse_prefill.patch import patch_module
from sparse_prefill.tools.cli import parse_lengths

HEADS = LAYER_SHAPES["llama3-8b"][:2]  # query heads, KV heads
LENGTHS = "4k,8k,12k,16k,24k,32k,48k,64k"


class Layer(torch.nn.Module):
    """The attributes transformers' attention functions read from an attention module."""

    def __init__(self, heads: int, kv_heads: int):
        super().__init__()
        self.layer_idx, self.is_causal, self.num_key_value_groups = 0, True, heads // kv_heads


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
            f'    ("{dev_class}", {D}): {res["crossover"]},  # benchmarks/bench_crossover.py {date}: '
            f"sparse {res['speedup_at']:.2f}x at {res['crossover']}"
            + (f", dense {1 / res['speedup_below']:.2f}x at {res['below']}" if res["below"] else "")
        )
    for D, res in sorted(results.items(), reverse=True):
        if res["flash_wins"]:
            lines.append(f'    ("{dev_class}", {D}): "flash_attn",  # DENSE_BACKEND: faster than SDPA cuDNN at every S')
    return lines


def measure(module, patch, q, k, v, scale: float, timer, flash: bool) -> dict:
    """Times (ms) of the dense fallback, flash-attn (if ``flash``) and the whole sparse path on one input."""
    row = {"dense_ms": timer(lambda: dense_attention(module, q, k, v, None, scaling=scale))}
    if flash:
        row["flash_attn_ms"] = timer(lambda: flash_attention(q, k, v, 0.0, scale))
    row["sparse_ms"] = timer(lambda: sparse_prefill_attention(module, q, k, v, None, scaling=scale))
    record = patch.records[0]
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
    dev, dtype = run_device(p, smoke)
    heads = (4, 2) if smoke else HEADS
    lengths = [256, 512, 1024] if smoke else parse_lengths(args.lengths)

    def timer(fn):
        return do_bench(fn, cuda=not smoke)

    flash_missing = flash_attn_error()
    env = versions()
    device = device_name(cuda=not smoke)
    dev_class = device_class(dev)
    date = datetime.date.today().isoformat()
    print(f"{device} ({dev_class}); {versions_text(env)}; flash-attn: {flash_missing or 'importable'}", flush=True)

    H, Hkv = heads
    module = Layer(H, Hkv)
    spec = HeadSpec("vertical_slash", dict(PATTERN_DEFAULTS["vertical_slash"]))
    patch = patch_module(module, [spec] * H, min_seq_len=0, backend="auto")
    rows, results = [], {}
    for D in (int(d) for d in args.head_dims.split(",")):
        scale = D**-0.5
        for S in lengths:
            for kind in args.inputs.split(","):
                make = structured_qkv if kind == "structured" else random_qkv
                q, k, v = make(H, Hkv, S, D, dev=dev)
                q, k, v = (t.to(dtype) for t in (q, k, v))
                row = {"head_dim": D, "S": S, "input": kind, "heads": f"{H}/{Hkv}"}
                row.update(measure(module, patch, q, k, v, scale, timer, flash=flash_missing is None and not smoke))
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
    write(Path(args.out), rows, results, lines, {"device": device, "device_class": dev_class, **env}, smoke)
    print("\nPaste into sparse_prefill/devices.py (MIN_SEQ_LEN, and DENSE_BACKEND for flash_attn lines):")
    print("\n".join(lines))
    return 0


COLUMNS = ["head_dim", "S", "input", "heads", "dense_ms", "flash_attn_ms", "sparse_ms", "speedup", "density"]


def write(out: Path, rows: list[dict], results: dict, lines: list[str], meta: dict, smoke: bool) -> None:
    write_csv(suffixed(out, ".csv"), rows, COLUMNS, meta)
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
    md += ["", *md_table(rows, COLUMNS)]
    md += ["", "Table lines for `sparse_prefill/devices.py`:", "", "```python", *lines, "```", ""]
    suffixed(out, ".md").write_text("\n".join(md))
    print(f"wrote {out}.md / .csv / .json")


if __name__ == "__main__":
    raise SystemExit(main())
