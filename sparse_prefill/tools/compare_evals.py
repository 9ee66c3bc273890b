"""Compare sparse-prefill-eval runs made on the same prompts: one markdown table per aspect, plus the numbers as JSON.

    python -m sparse_prefill.tools.compare_evals calibrated=out/calibrated_4k adaptive=out/adaptive_4k \
        --out out/summary.md

Runs of one name at other lengths (calibrated=out/calibrated_8k) share that name's column.

Each run folder holds the ``results.json`` of ``sparse-prefill-eval``. Every run carries its own dense baseline on
the same prompts (same seed, tasks and lengths), so the dense column comes from the first run that has the length, and
the script says whether the other runs' dense answers agree with it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cli import format_length
from .markdown import fidelity_cells, num, row, table


def load(spec: str) -> tuple[str, dict]:
    name, _, folder = spec.partition("=")
    if not folder:
        raise SystemExit(f"compare_evals: expected name=folder, got {spec!r}")
    return name, json.loads((Path(folder) / "results.json").read_text())


def _describe(results: dict) -> str:
    """The config of a run, with an adaptive config's thresholds (they are what tells adaptive runs apart)."""
    cfg = results["meta"]["config"]
    heads = [h for layer in cfg["json"]["layers"] for h in layer if h["pattern"] == "adaptive"]
    if not heads:
        return cfg["source"]
    values = {name: sorted({h[name] for h in heads}) for name in ("gamma", "tau")}
    shown = ", ".join(f"{name} {' / '.join(f'{v:g}' for v in vs)}" for name, vs in values.items())
    return f"{cfg['source']} ({len(heads)} adaptive heads: {shown})"


def compare(runs: list[tuple[str, dict]]) -> tuple[str, dict]:
    """(markdown, numbers) for runs [(name, results.json)]; runs of one name (other lengths) share a column."""
    names = list(dict.fromkeys(name for name, _ in runs))
    lengths = sorted({n for _, r in runs for n in r["meta"]["lengths"]})

    def at(name: str, n: int) -> dict | None:
        return next((r for k, r in runs if k == name and n in r["meta"]["lengths"]), None)

    first = runs[0][1]["meta"]
    lines = [
        f"# Adaptive vs calibrated vs dense: {first['model']}",
        "",
        f"`sparse-prefill-eval` runs on the same generated prompts (seed {first['seed']}); {first['device']} "
        f"{first['dtype']}, {first['threads']} torch thread(s), torch {first['versions']['torch']}, transformers "
        f"{first['versions']['transformers']}. Each run's folder has its full summary.md, results.json and figures. "
        "Dense = the same model unpatched on the same prompts.",
        "",
        "Runs:",
        "",
    ]
    for name, r in runs:
        m = r["meta"]
        lines.append(
            f"- **{name}**, {', '.join(map(format_length, m['lengths']))}: {_describe(r)}; "
            f"tasks {', '.join(m['tasks'])}; needle depths {m['depths']}"
        )
    numbers: dict = {"runs": names, "lengths": {}}
    lines += ["", "## Accuracy (score per task: dense, then each run patched)", ""]
    lines += table(["length", "task", "dense", *names], [])
    for n in lengths:
        having = {name: at(name, n) for name in names if at(name, n)}
        tasks = list(dict.fromkeys(t for r in having.values() for t in r["summary"]["accuracy"]))
        per = numbers["lengths"].setdefault(str(n), {"accuracy": {}, "fidelity": {}})
        for task in tasks:
            cells = {name: r["summary"]["accuracy"].get(task, {}).get(str(n)) for name, r in having.items()}
            dense = next(c["dense"] for c in cells.values() if c)
            agree = all(c is None or c["dense"] == dense for c in cells.values())
            per["accuracy"][task] = {"dense": dense, **{k: c and c["patched"] for k, c in cells.items()}}
            lines.append(
                row(
                    [
                        format_length(n),
                        task,
                        num(dense) + ("" if agree else " (runs differ)"),
                        *(num(cells[k]["patched"]) if cells.get(k) else "-" for k in names),
                    ]
                )
            )
    lines += [
        "",
        "## Fidelity and density",
        "",
        "Top-1 agreement and KL(dense ‖ patched) over the dense answer (teacher-forced); attention error: relative L2 "
        "of each layer's attention output against dense, mean over layers (worst layer); density: computed 64×64 "
        "tiles over causal tiles, mean over samples, layers and heads; patterns run: per sample, layer and head "
        "(adaptive heads choose per input).",
        "",
        *table(
            ["length", "run", "samples", "top-1", "KL (nats)", "attn rel. err (worst layer)", "density"]
            + ["patterns run"],
            [],
        ),
    ]
    for n in lengths:
        for name in names:
            r = at(name, n)
            if r is None:
                continue
            p = r["summary"]["per_length"][str(n)]
            numbers["lengths"][str(n)]["fidelity"][name] = {
                k: p.get(k) for k in ("samples", "top1", "kl", "attn_rel_err", "density", "patterns_run")
            }
            run = ", ".join(f"{k} {v}" for k, v in (p.get("patterns_run") or {}).items())
            lines.append(
                row(
                    [
                        format_length(n),
                        name,
                        *fidelity_cells(p),
                        num(p["density"]),
                        run,
                    ]
                )
            )
    return "\n".join(lines) + "\n", numbers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "runs", nargs="+", help="name=folder of a sparse-prefill-eval run, in column order (a name may repeat)"
    )
    parser.add_argument("--out", type=Path, required=True, help="markdown file; the numbers go next to it as .json")
    args = parser.parse_args(argv)
    markdown, numbers = compare([load(spec) for spec in args.runs])
    args.out.write_text(markdown)
    args.out.with_suffix(".json").write_text(json.dumps(numbers, indent=1) + "\n")
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
