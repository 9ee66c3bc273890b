"""Attention kept for the tiles computed: a config against adaptive mode at several gammas, on the eval CLI's prompts.

One dense prefill per prompt captures every layer's q/k. Each setting's index is built from them as at run time and
scored per head by the share of the true softmax mass inside its mask
(:func:`sparse_prefill.tools.calibrate.recall`), over
query rows spread over the whole prompt ("uniform": what the prefill keeps) and over its last 128 rows ("last": the
rows adaptive mode estimates from), and by its tile density. Means over layers and heads, per prompt. The config is
the model's shipped one unless ``--config`` names another.

    python benchmarks/bench_recall.py --tasks niah,multikey --length 4k --gammas 0.8,0.85,0.9,0.95 \\
        --out benchmarks/results/eval_adaptive/recall_frontier_4k.md
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
from common import device_name, md_table, versions, versions_text

from sparse_prefill.config import HeadSpec, SparseConfig
from sparse_prefill.patch import resolve_config, with_head_params
from sparse_prefill.plan import build_index
from sparse_prefill.report import tile_density
from sparse_prefill.tools.calibrate import capturing, recall, row_groups
from sparse_prefill.tools.cli import parse_lengths
from sparse_prefill.tools.models import SMOLLM2, load_model
from sparse_prefill.tools.tasks import TASKS, make_samples

COLUMNS = ("density", "recall, uniform rows", "recall, last rows")


def settings(config: SparseConfig, gammas: list[float]) -> dict[str, list[list[HeadSpec]]]:
    """The per-layer head specs of each setting: the config, then every head adaptive at each gamma."""
    adaptive = SparseConfig.uniform(config.model, "adaptive")
    out = {"config": config.layers}
    for gamma in gammas:
        out[f"adaptive, gamma {gamma}"] = with_head_params(adaptive, "adaptive", {"gamma": gamma}).layers
    return out


def measure(model, ids: torch.Tensor, specs: dict[str, list[list[HeadSpec]]], seed: int) -> dict[str, list[float]]:
    """Per setting: [density, recall over uniform rows, recall over the last rows] of one prompt ``ids`` [1, S],
    means over layers and heads."""
    with capturing(model) as captured, torch.no_grad():
        model(ids, logits_to_keep=1)
    rows = row_groups(ids.shape[1], random.Random(f"{seed}/rows"))
    sums = torch.zeros(len(specs), len(COLUMNS))
    for layer in sorted(captured):
        q, k, scale = captured.pop(layer)  # free each layer's q/k once scored
        indexes = [build_index(q, k, layers[layer], scale, [0]) for layers in specs.values()]
        kept = [recall(q, k, indexes, scale, r).mean(-1) for r in rows]  # [settings] each
        sums += torch.stack([torch.stack([tile_density(i)[0].mean() for i in indexes]), *kept], -1).cpu()
    return {name: (row / model.config.num_hidden_layers).tolist() for name, row in zip(specs, sums)}


def markdown(results: dict[str, dict[str, list[float]]], header: list[str]) -> str:
    lines = [*header, ""]
    for prompt, per_setting in results.items():
        table = [{"setting": n, **dict(zip(COLUMNS, (f"{x:.3f}" for x in row)))} for n, row in per_setting.items()]
        lines += [f"## {prompt}", "", *md_table(table, ("setting", *COLUMNS))]
        lines.append("")
    return "\n".join(lines)


def _tasks(value: str) -> list[str]:
    names = value.split(",")
    if unknown := [t for t in names if t not in TASKS]:
        raise argparse.ArgumentTypeError(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=SMOLLM2, help="'smollm2' (the embedded default) or a local model folder")
    p.add_argument("--config", default=None, help="config JSON (default: the model's shipped config)")
    p.add_argument("--tasks", type=_tasks, default=["niah", "multikey"])
    p.add_argument("--length", type=lambda v: parse_lengths(v)[0], default=4096, help="prompt + answer tokens")
    p.add_argument("--gammas", type=lambda v: [float(g) for g in v.split(",")], default=[0.8, 0.85, 0.9, 0.95])
    p.add_argument("--depth", type=float, default=0.5, help="needle depth of niah prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the table here as well as printing it")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, tokenizer = load_model(args.model)
    config = resolve_config(model, args.config)
    specs = settings(config, args.gammas)
    results = {}
    for sample in make_samples(tokenizer, args.tasks, [args.length], [args.depth], 1, args.seed):
        ids = tokenizer(sample.prompt, add_special_tokens=False, return_tensors="pt").input_ids  # as the eval CLI
        results[f"{sample.task}, {ids.shape[1]} tokens"] = measure(model, ids, specs, args.seed)
    header = [
        f"# Attention kept against density: {Path(model.config.name_or_path).name}",
        "",
        f"`python benchmarks/bench_recall.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
        f"config: {args.config or 'the shipped config'}; {device_name(cuda=False)}, "
        f"{versions_text(versions(), ('torch', 'transformers'))}. Density: computed 64x64 tiles over causal tiles; "
        "recall: the share of the true softmax mass inside the mask. Means over layers and heads.",
    ]
    text = markdown(results, header)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
