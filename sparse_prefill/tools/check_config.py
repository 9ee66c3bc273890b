"""Fidelity of a sparse config on held-out text: next-token distributions of the patched model against dense.

    python -m sparse_prefill.tools.check_config                              # the shipped config of the model
    python -m sparse_prefill.tools.check_config --config configs/smollm2-135m-instruct.json
    python -m sparse_prefill.tools.check_config --uniform a_shape:local=0.2  # one pattern on every head, for comparison

For each of --samples windows of --length tokens of held-out English (text the calibration never reads; or --text),
compares the last --last positions: top-1 agreement and mean KL(dense || sparse). The density is the mean tile density
the patched layers report (``sparse_prefill.last_report``; a layer that ran dense counts 1).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

from .. import ConfigError, ModelInfo, SparseConfig, last_report, load_config, patch_model, unpatch_model
from ..patches import adapter_for
from .cli import device, integer, length
from .models import DTYPES, SMOLLM2, load_model
from .prompts import natural_prompt, natural_text

ANY_SHAPE = ModelInfo("any", "llama", 1, 1, 1, 1)  # to check a --uniform spec before the model is known


def uniform_config(spec: str, info) -> SparseConfig:
    """'a_shape:local=0.2,sink=64' -> that pattern on every head (budgets with a dot are fractions)."""
    pattern, _, params = spec.partition(":")
    values = {}
    for item in filter(None, params.split(",")):
        name, _, value = item.partition("=")
        values[name] = _number(value)
    return SparseConfig.uniform(info, pattern, min_seq_len=0, **values)


def _number(text: str) -> int | float | str:
    """'64' -> 64, '0.2' -> 0.2; anything else stays text, for the config's checks to name."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def next_token_logits(model, ids: list[int], last: int) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.tensor([ids], device=model.device), logits_to_keep=last)
    return out.logits[0].float()


def mean_density(model, num_heads: int) -> float:
    per_head = [d for r in last_report(model) for d in (r.density[0] if r.density else [1.0] * num_heads)]
    return sum(per_head) / len(per_head)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    which = p.add_mutually_exclusive_group()
    which.add_argument("--config", help="config JSON (default: the shipped config made for the model)")
    which.add_argument("--uniform", help="PATTERN[:name=value,...] on every head instead of a config")
    p.add_argument("--model", default=SMOLLM2, help="'smollm2' (the embedded default) or a local model folder")
    p.add_argument("--length", type=length(2), default=4096, help="prompt tokens, e.g. 4096 or 4k")
    p.add_argument("--last", type=integer(1), default=256, help="positions compared at the end of each prompt")
    p.add_argument("--samples", type=integer(1), default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", type=Path, help="held-out natural text file (default: the built-in held-out split)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", type=device, default="cpu")
    args = p.parse_args(argv)
    # Everything is checked before the model loads, the config's fit to the model right after.
    if args.last > args.length:
        p.error(f"argument --last: {args.last} exceeds --length {args.length}")
    if args.model != SMOLLM2 and not Path(args.model).is_dir():
        p.error(f"argument --model: {args.model!r} is neither {SMOLLM2!r} nor a local model folder")
    which = "--uniform" if args.uniform else "--config"
    try:
        config = uniform_config(args.uniform, ANY_SHAPE) if args.uniform else args.config and load_config(args.config)
    except (ConfigError, TypeError) as e:  # TypeError: a --uniform parameter named like uniform()'s own arguments
        p.error(f"argument {which}: {e}")
    try:
        text = args.text.read_text(encoding="utf-8") if args.text else natural_text("heldout")
    except (OSError, UnicodeDecodeError) as e:
        p.error(f"argument --text: cannot read {args.text} as UTF-8 text ({e})")

    try:
        model, tokenizer = load_model(args.model, DTYPES[args.dtype], args.device)
    except (OSError, ValueError) as e:
        p.error(f"argument --model: cannot load {args.model!r}: {e}")
    context = getattr(model.config, "max_position_embeddings", None)
    if context and args.length > context:
        p.error(f"argument --length: {args.length} exceeds the model's context of {context} tokens")
    info = adapter_for(model, force=True).model_info(model)
    if args.uniform:
        config = uniform_config(args.uniform, info)
    elif config:
        try:
            config.check_model(info)
        except ConfigError as e:
            p.error(f"argument --config: {e}")
    text_ids = tokenizer(text, add_special_tokens=False).input_ids
    prompts = [
        natural_prompt(text_ids, args.length, random.Random(f"{args.seed}/check/{i}")) for i in range(args.samples)
    ]

    dense = [next_token_logits(model, ids, args.last) for ids in prompts]
    # min_seq_len=0: measure the sparse path itself, whatever length the config would switch at.
    patch_model(model, config, min_seq_len=0)
    top1, kl, density = [], [], []
    for ids, ref in zip(prompts, dense):
        out = next_token_logits(model, ids, args.last)
        top1.append((out.argmax(-1) == ref.argmax(-1)).float().mean().item())
        kl.append(
            torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none")
            .sum(-1)
            .mean()
            .item()
        )
        density.append(mean_density(model, info.num_heads))
        print(
            f"sample {len(top1) - 1}: top-1 {top1[-1]:.4f}  KL {kl[-1]:.5f}  density {density[-1]:.3f}", file=sys.stderr
        )
    unpatch_model(model)
    n = len(prompts)
    print(
        f"top-1 agreement {sum(top1) / n:.4f}  mean KL {sum(kl) / n:.5f}  mean density {sum(density) / n:.3f}"
        f"  ({n} x {args.length} tokens, last {args.last})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
