"""Demo: SmolLM2 answers a passkey hidden in a ~4K-token prompt, dense and patched; prints answers, prefill latency
and the achieved density. Run with ``make demo`` or ``python -m sparse_prefill.tools.demo``."""

from __future__ import annotations

import argparse
import time

import torch

from .. import last_report, patch_model, unpatch_model
from ..config import ConfigError, load_config
from ..patches import adapter_for
from .cli import device, fraction, length
from .models import load_model
from .prompts import passkey_prompt


def prefill_seconds(model, ids: torch.Tensor) -> float:
    """Time to first token: one forward over the prompt, keeping only the last logits (after one warm-up)."""
    with torch.no_grad():
        model(ids[:, :64], logits_to_keep=1)
        if ids.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(ids, logits_to_keep=1)
        if ids.is_cuda:
            torch.cuda.synchronize()
    return time.perf_counter() - start


def answer(model, tok, ids: torch.Tensor) -> str:
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=length(256), default=4096, help="prompt length, e.g. 4096 or 4k (default)")
    parser.add_argument("--depth", type=fraction(), default=0.5, help="where the passkey sits, 0..1 (default 0.5)")
    parser.add_argument("--config", default=None, help="JSON config (default: the one shipped for SmolLM2)")
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:  # checked before the model loads; its fit to the model once it has
        config = args.config and load_config(args.config)
    except ConfigError as e:
        parser.error(f"argument --config: {e}")

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, tok = load_model(dtype=dtype, device=args.device)
    if args.tokens > (context := model.config.max_position_embeddings):
        parser.error(f"argument --tokens: {args.tokens} exceeds the model's context of {context} tokens")
    if config:
        try:
            config.check_model(adapter_for(model).model_info(model))
        except ConfigError as e:
            parser.error(f"argument --config: {e}")
    text, key = passkey_prompt(tok, args.tokens, args.depth, seed=7)
    ids = tok(text, return_tensors="pt").input_ids.to(args.device)
    print(f"prompt: {ids.shape[1]} tokens, passkey {key} at depth {args.depth}, device {args.device}")

    dense_answer, dense_s = answer(model, tok, ids), prefill_seconds(model, ids)
    config = patch_model(model, config, min_seq_len=0)
    sparse_answer, sparse_s = answer(model, tok, ids), prefill_seconds(model, ids)
    records = last_report(model)
    unpatch_model(model)

    density = [d for r in records for d in r.density[0]] if all(r.index is not None for r in records) else [1.0]
    patterns = sorted({p for r in records for p in r.patterns})
    print(f"config: {config.model.name}, {config.provenance.get('tool', '?')}; patterns {', '.join(patterns)}")
    print(f"{'':8}{'answer':24}{'correct':>8}{'prefill s':>11}{'density':>9}")
    print(f"{'dense':8}{dense_answer[:22]:24}{str(key in dense_answer):>8}{dense_s:>11.2f}{1.0:>9.3f}")
    print(
        f"{'sparse':8}{sparse_answer[:22]:24}{str(key in sparse_answer):>8}{sparse_s:>11.2f}"
        f"{sum(density) / len(density):>9.3f}"
    )
    if args.device == "cpu":
        print(
            "(on the CPU the sparse path is the torch reference backend: it shows fidelity, not speed; "
            "the Triton kernels run on CUDA)"
        )


if __name__ == "__main__":
    main()
