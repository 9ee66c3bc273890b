"""Fidelity against dense where the sparse path runs: real SmolLM2 weights at 4K-32K tokens, RoPE-scaled past 8K.

A benchmark (CUDA, bf16 or fp32; ``--device cpu`` runs fp32, for short lengths), in two parts:

1. Dense alone, per RoPE scaling (none up to the native 8K; yarn, linear and dynamic at the factor the length needs):
   perplexity on held-out natural text and passkey answers. The scaling that keeps dense best (passkeys first, then
   perplexity) is used for that length in part 2.
2. Per length and setting: tile density and attention recall (the share of the true softmax mass the masks keep,
   from the dense run's q/k), top-1 agreement and KL(dense || patched) of the next-token distributions over the last
   512 positions of held-out natural text, and passkey answers, patched against dense. The settings: the shipped
   config; one calibrated at that length; adaptive at gamma 0.9 and 0.95; vertical-slash on every head at
   MInference's budgets with block and with token slashes; A-shape at its defaults; the converted Llama-3.1-8B
   config's budgets (512 columns, 2048 token diagonals) on every head; and a ladder of uniform vertical-slash
   fractions. The smallest density that keeps top-1 >= 0.99 and KL <= 0.01 is the density that length needs.

The text is the held-out split of ``sparse_prefill.tools.calibrate.natural_text``: neither calibration nor the eval
CLI's prompts read it. Writes fidelity.md, fidelity.csv and needed_density.png under --out.

    python benchmarks/bench_fidelity.py --lengths 4k,8k,16k,32k --out benchmarks/results/fidelity_smollm2_h200
"""

from __future__ import annotations

import argparse
import csv
import math
import random
import sys
from pathlib import Path

import torch
from common import device_name, md_table, versions, versions_text, write_csv, write_md

from sparse_prefill.config import SparseConfig, load_config
from sparse_prefill.patch import last_report, patch_model, resolve_config, unpatch_model
from sparse_prefill.patches import adapter_for
from sparse_prefill.plan import build_index
from sparse_prefill.report import tile_density
from sparse_prefill.tools.calibrate import calibrate, capturing, natural_text, recall, row_groups
from sparse_prefill.tools.cli import fractions, parse_lengths
from sparse_prefill.tools.divergence import kl_to_dense, next_token_logp
from sparse_prefill.tools.models import SMOLLM2, load_model
from sparse_prefill.tools.prompts import passkey_prompt

NATIVE = 8192  # SmolLM2's trained context
SCORED = 512  # next-token positions scored per text window
DEPTHS = (0.1, 0.5, 0.9)  # passkey depths per length
TOP1, KL = 0.99, 0.01  # what "keeps fidelity" means
COLUMNS = ("length", "rope", "setting", "density", "recall", "top1", "kl", "passkeys", "dense_passkeys")
DENSE_COLUMNS, DENSE_HEADER = ("length", "rope", "ppl", "passkeys"), ("length", "rope", "perplexity", "passkeys")


def windows(tokenizer, length: int, count: int, seed: int) -> list[torch.Tensor]:
    """``count`` windows of ``length`` consecutive held-out tokens from random offsets: [1, length] each."""
    ids = tokenizer(natural_text("heldout"), add_special_tokens=False).input_ids
    ids = ids * math.ceil((length + 1) / len(ids))
    rng = random.Random(f"{seed}/{length}")
    return [torch.tensor([ids[s : s + length]]) for s in (rng.randrange(len(ids) - length) for _ in range(count))]


def last_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """[SCORED, V] fp32 log-probabilities of the next token at the last SCORED positions whose next token the text
    holds."""
    return next_token_logp(model, ids.to(model.device), SCORED + 1)[:-1]


def passkeys(model, tokenizer, length: int, seed: int) -> list[bool]:
    """Whether the greedy answer holds the passkey, per depth."""
    out = []
    for i, depth in enumerate(DEPTHS):
        text, key = passkey_prompt(tokenizer, length, depth, seed + i)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(model.device)
        with torch.no_grad():
            answer = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
        out.append(key in tokenizer.decode(answer))
    return out


def perplexity(model, texts: list[torch.Tensor]) -> float:
    nll = []
    for ids in texts:
        logp = last_logits(model, ids)
        target = ids[0, -SCORED:].to(logp.device)
        nll.append(-logp.gather(-1, target[:, None]).mean())
    return float(torch.stack(nll).mean().exp())


def settings(model, tokenizer, length: int, args) -> dict[str, dict]:
    """Name -> patch_model keyword arguments of every setting measured at ``length`` (those ``--settings`` names)."""
    info = adapter_for(model).model_info(model)
    vs = dict(pattern="vertical_slash")
    out = {
        "shipped config": lambda: dict(config=resolve_config(model)),
        f"calibrated at {length}": lambda: dict(
            config=calibrate(model, tokenizer, info, [length], samples=2, seed=args.seed, progress=False)
        ),
        "adaptive gamma 0.9": lambda: dict(mode="adaptive", gamma=0.9),
        "adaptive gamma 0.95": lambda: dict(mode="adaptive", gamma=0.95),
        "vertical-slash 1000/6096 block": lambda: dict(config=SparseConfig.uniform(info, **vs)),
        "vertical-slash 1000/6096 token": lambda: dict(config=SparseConfig.uniform(info, **vs, slash_select="token")),
        "a-shape 128+3968": lambda: dict(config=SparseConfig.uniform(info, "a_shape")),
        "llama-3.1 budgets 512/2048 token": lambda: dict(
            config=SparseConfig.uniform(info, **vs, vertical=512, slash=2048, slash_select="token")
        ),
        **{f"config {path.stem}": lambda path=path: dict(config=load_config(path)) for path in args.configs},
        **{
            f"ladder {f}": lambda f=f: dict(config=SparseConfig.uniform(info, **vs, vertical=f, slash=f))
            for f in args.ladder
        },
    }
    wanted = [name for name in out if not args.settings or any(name.startswith(s) for s in args.settings)]
    return {name: out[name]() for name in wanted}  # made only when wanted: calibrating costs minutes


def density_and_recall(model, ids: torch.Tensor, layers: list, seed: int) -> tuple[float, float]:
    """Mean tile density and attention recall over layers and heads of one prompt, from the dense run's q/k."""
    with capturing(model) as captured, torch.no_grad():
        model(ids.to(model.device), logits_to_keep=1)
    rows = row_groups(ids.shape[1], random.Random(f"{seed}/rows"))
    density, kept = [], []
    for layer in sorted(captured):
        q, k, scale = captured.pop(layer)
        index = build_index(q, k, layers[layer], scale, [0])
        density.append(float(tile_density(index)[0].mean()))
        kept.append(float(torch.stack([recall(q, k, [index], scale, r)[0] for r in rows]).mean()))
    return sum(density) / len(density), sum(kept) / len(kept)


def compare(
    model, tokenizer, texts, dense_logp, dense_keys, setting: dict, length: int, seed: int, backend: str, keys: bool
) -> dict:
    """One setting against dense on ``backend``; its passkey answers if ``keys``."""
    config = patch_model(model, min_seq_len=0, backend=backend, **setting)
    try:
        agree, kl = [], []
        for ids, want in zip(texts, dense_logp):
            got = last_logits(model, ids)
            agree.append(float((got.argmax(-1) == want.argmax(-1)).float().mean()))
            kl.append(kl_to_dense(want, got))
        fell_back = [r.reason for r in last_report(model) if r.path == "dense" and "dense" not in r.reason]
        assert not fell_back, f"layers ran dense for: {fell_back}"  # all-dense layers of a config are expected
        keys = passkeys(model, tokenizer, length, seed) if keys else None
    finally:
        unpatch_model(model)
    density, kept = density_and_recall(model, texts[0], config.layers, seed)  # the same indices as the patched run
    return dict(
        density=density,
        recall=kept,
        top1=sum(agree) / len(agree),
        kl=sum(kl) / len(kl),
        passkeys="" if keys is None else f"{sum(keys)}/{len(keys)}",
        dense_passkeys=f"{sum(dense_keys)}/{len(dense_keys)}",
    )


def rope_choices(length: int, kinds: list[str]) -> list[tuple[str, float] | None]:
    """None within the native context, else each kind at the power-of-two factor that reaches ``length``."""
    if length <= NATIVE:
        return [None]
    factor = float(2 ** math.ceil(math.log2(length / NATIVE)))
    return [(kind, factor) for kind in kinds]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=SMOLLM2, help="'smollm2' (the embedded default) or a local model folder")
    p.add_argument("--lengths", type=parse_lengths, default=parse_lengths("4k,8k,16k,32k"))
    p.add_argument("--texts", type=int, default=2, help="held-out text windows per length")
    p.add_argument(
        "--rope",
        type=lambda v: v.split(","),
        default=["yarn", "linear", "dynamic"],
        help="RoPE scalings tried past 8K (the factor follows the length); dense keeps the best for part 2",
    )
    p.add_argument(
        "--dtype",
        choices=("bf16", "fp32"),
        help="default bf16 on CUDA, fp32 on the CPU; fp32 on CUDA runs the sparse path's torch backend (the Triton "
        "kernel takes fp16/bf16), so that no kernel rounding hides or adds differences",
    )
    p.add_argument(
        "--ladder",
        type=fractions(low_open=True, high_open=True),  # budgets as a config takes them
        default=[0.02, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6],
        help="uniform vertical-slash settings: fractions of the keys as columns and as diagonals",
    )
    p.add_argument(
        "--configs",
        type=lambda v: [Path(c) for c in v.split(",")],
        default=[],
        help="config files measured too, each as setting 'config <file stem>'",
    )
    p.add_argument(
        "--settings",
        type=lambda v: v.split(","),
        default=[],
        help="measure only the settings whose names start with one of these (default: all)",
    )
    p.add_argument(
        "--replot",
        type=lambda v: [Path(c) for c in v.split(",")],
        default=[],
        help="measure nothing: draw needed_density.png under --out from the rows of these fidelity.csv files",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/fidelity"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        rows = [row for path in args.replot for row in read_rows(path)]
        plot(needed(rows), rows, args.out / "needed_density.png")
        return 0
    if missing := [str(c) for c in args.configs if not c.is_file()]:
        p.error(f"--configs: no such file: {', '.join(missing)}")
    if bad := set(args.rope) - {"yarn", "linear", "dynamic"}:
        p.error(f"--rope: each must be yarn, linear or dynamic, got {sorted(bad)}")
    device = args.device
    args.dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    backend = "torch" if device == "cuda" and dtype == torch.float32 else "auto"
    rows, dense_rows = [], []
    for length in args.lengths:
        scalings = rope_choices(length, args.rope)
        dense = {}
        for rope in scalings:
            model, tokenizer = load_model(args.model, dtype, device, rope)
            texts = windows(tokenizer, length, args.texts, args.seed)
            keys = passkeys(model, tokenizer, length, args.seed)
            dense[rope] = (sum(keys), -perplexity(model, texts), keys)
            dense_rows.append(dict(length=length, rope=_rope(rope), ppl=-dense[rope][1], passkeys=f"{sum(keys)}/3"))
            print(dense_rows[-1], flush=True)
        write(rows, dense_rows, args, device)  # the dense rows stay written even if no setting is measured
        rope = max(dense, key=lambda r: dense[r][:2])
        model, tokenizer = load_model(args.model, dtype, device, rope)
        texts = windows(tokenizer, length, args.texts, args.seed)
        dense_logp = [last_logits(model, ids) for ids in texts]
        for name, setting in settings(model, tokenizer, length, args).items():
            keys = not name.startswith("ladder")  # ladder rows only locate the density frontier
            row = compare(
                model, tokenizer, texts, dense_logp, dense[rope][2], setting, length, args.seed, backend, keys
            )
            rows.append(dict(length=length, rope=_rope(rope), setting=name, **row))
            print(rows[-1], flush=True)
            write(rows, dense_rows, args, device)  # after every row: a cut run keeps what it measured
        del model
    print((args.out / "fidelity.md").read_text())
    return 0


def _rope(rope) -> str:
    return "none" if rope is None else f"{rope[0]}:{rope[1]:g}"


def read_rows(path: Path) -> list[dict]:
    """The rows of a fidelity.csv this script wrote, numbers as numbers."""
    with open(path) as f:
        return [
            {**r, "length": int(r["length"]), **{k: float(r[k]) for k in ("density", "recall", "top1", "kl")}}
            for r in csv.DictReader(f)
        ]


def needed(rows: list[dict]) -> dict[int, dict]:
    """Per length, the setting of lowest density that keeps top-1 >= TOP1 and KL <= KL (None if none does)."""
    out = {}
    for length in sorted({r["length"] for r in rows}):
        ok = [r for r in rows if r["length"] == length and r["top1"] >= TOP1 and r["kl"] <= KL]
        out[length] = min(ok, key=lambda r: r["density"]) if ok else None
    return out


def write(rows: list[dict], dense_rows: list[dict], args, device: str) -> None:
    name = device_name(device == "cuda")
    env = versions_text(versions(), ("torch", "transformers"))
    write_csv(args.out / "fidelity.csv", rows, COLUMNS, cell=str)
    lines = [
        "# Fidelity against dense: SmolLM2-135M-Instruct on held-out natural text and passkeys",
        "",
        f"`python benchmarks/bench_fidelity.py {' '.join(sys.argv[1:])}`; {name}; {env}; {args.dtype}.",
        f"top-1 and KL(dense || patched) over the last {SCORED} positions of {args.texts} held-out text windows; "
        f"passkeys at depths {', '.join(map(str, DEPTHS))} (not for ladder rows); density: computed 64x64 tiles "
        "over causal tiles; recall: "
        "share of the true softmax mass inside the masks (means over layers and heads).",
        "",
        "## Dense alone, per RoPE scaling",
        "",
        *md_table([{**r, "ppl": f"{r['ppl']:.2f}"} for r in dense_rows], DENSE_COLUMNS, DENSE_HEADER),
        "",
        "## Patched against dense",
        "",
        *md_table(rows, COLUMNS, cell=_fmt),
        "",
        f"## Density needed for top-1 >= {TOP1} and KL <= {KL}",
        "",
        "| length | lowest density that keeps it | setting |",
        "|---|---|---|",
    ]
    need = needed(rows)
    for length, r in need.items():
        lines.append(f"| {length} | {r['density']:.3f} | {r['setting']} |" if r else f"| {length} | none | |")
    write_md(args.out / "fidelity.md", lines)
    plot(need, rows, args.out / "needed_density.png")


def plot(need: dict[int, dict], rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    lengths = sorted(need)
    ladder = needed([r for r in rows if r["setting"].startswith("ladder")])
    for label, points in (("any setting", need), ("uniform vertical-slash ladder", ladder)):
        xs = [n for n in lengths if points.get(n)]
        ax.plot(xs, [points[n]["density"] for n in xs], marker="o", label=label)
    if missed := [n for n in lengths if need[n] is None]:
        ax.plot(missed, [1.0] * len(missed), "x", color="red", markersize=10, label="no setting measured kept it")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{n // 1024}K" for n in lengths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel(f"lowest density with top-1 >= {TOP1}, KL <= {KL}")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _fmt(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


if __name__ == "__main__":
    raise SystemExit(main())
