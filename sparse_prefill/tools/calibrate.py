"""Offline per-head pattern calibration: give each head the sparse pattern that keeps its attention, cheaply.

    sparse-prefill-calibrate --model smollm2 --lengths 2k,4k --samples 4 --recall 0.9 --budget 0.5

1. Prompts are built in code (deterministic under ``--seed``): the eval's passkey, key-value and magic-number needle
   content (:mod:`~sparse_prefill.tools.tasks`, cut to exact token counts) and raw windows of natural English
   (CPython's own reference manual, ``pydoc_data.topics``; no download).
2. One dense prefill per prompt captures every layer's post-RoPE q/k through transformers' attention interface.
3. For every layer, each candidate (A-shape, vertical-slash and block-sparse at several budgets, adaptive at several
   ``gamma``, and dense) is built for all heads at once with :func:`~sparse_prefill.plan.build_index`, as at run
   time (so an adaptive candidate's sets are the ones it picks for that prompt), and scored per head by
   * attention recall: the share of the true softmax mass inside the candidate's mask (the kernels' exact key set,
     as :func:`~sparse_prefill.index.sample_mask` gives it), averaged over query rows sampled uniformly over the
     prompt and, separately, over its last rows (where the next tokens are read); the worse of the two counts;
   * kernel cost: :func:`~sparse_prefill.report.tile_density` (computed 64×64 tiles over causal tiles).
4. A candidate is eligible for a head if its recall reaches ``--recall`` on every sample (dense always is). With
   ``--budget none`` each head takes its cheapest eligible candidate. With a budget, the recall lost over all heads
   (mean over samples) is minimised under that mean density: density goes where it buys the most recall, so heads
   and layers that need it get more than a single threshold would give them (a Lagrangian over each head's
   candidates). On SmolLM2 this cuts the held-out KL about 3x against the threshold alone at the same density.
5. With ``--sensitivity N``, lost recall is weighed per layer by the output error it causes: on N natural-text
   prompts, each layer alone is patched with its step-4 choice and the KL of the next-token distributions against
   dense, over the recall that layer lost, is its weight; step 4 then runs again with the weighted loss.

Budgets are fractions of the key length, so a config calibrated at 2K-4K scales with the prompt.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from ..config import AUTO, DEFAULT_MIN_SEQ_LEN, FORMAT, PATTERN_DEFAULTS, HeadSpec, ModelInfo, SparseConfig
from ..index import BLOCK, SparseIndex
from ..masks import block_mask
from ..ops import cdiv
from ..patch import is_patched, patch_model, register_attention, unpatch_model
from ..plan import build_index, registry
from ..report import tile_density
from .cli import add_rope_scaling, device, fraction, integer, lengths, output_problem
from .divergence import kl_to_dense, next_token_logp
from .models import DTYPES
from .prompts import encode, natural_prompt, natural_text, passkey_prompt
from .tasks import kv_prompt, multi_needle_prompt

KINDS = ("natural", "multi_needle", "passkey", "kv_retrieval")
CAPTURE = "sp_capture"
UNIFORM_ROWS = 256  # query rows sampled over the whole prompt
LAST_ROWS = 128  # the prompt's last rows, the ones the next tokens are read from
MIN_LENGTH = 256  # --lengths: room for the chat template, a question and several row blocks
SENSITIVITY_ROWS = 256  # next-token positions that measure a layer's output error


def _spec(pattern: str, **params) -> HeadSpec:
    return HeadSpec(pattern, {**PATTERN_DEFAULTS[pattern], **params})


# Cheap, static patterns first: on equal density the first candidate wins. Vertical-slash heads pick their slash
# blocks by mass ("block", the default), so small slash budgets stay cheap; verticals are single columns and cheap too.
# Adaptive heads set their budget per input, so a head whose need varies between prompts pays for each prompt's
# need instead of a static budget sized for the worst one; they come last because their estimate costs more than a
# static pattern's (so an adaptive head that would always run dense loses the tie to dense).
CANDIDATES: list[HeadSpec] = (
    [_spec("a_shape", sink=64, local=f) for f in (0.01, 0.02, 0.04, 0.07, 0.1, 0.15, 0.2, 0.3)]
    + [_spec("block_sparse", top_k=f) for f in (0.1, 0.2, 0.3)]
    + [
        _spec("vertical_slash", vertical=v, slash=s)
        for v, s in [(0.05, 0.02), (0.1, 0.05), (0.2, 0.05), (0.3, 0.05), (0.2, 0.1), (0.3, 0.1), (0.4, 0.1)]
        + [(0.3, 0.2), (0.5, 0.2)]
    ]
    + [_spec("dense")]
    + [_spec("adaptive", gamma=g) for g in (0.8, 0.85, 0.9, 0.95)]
)
PATTERNS = tuple(dict.fromkeys(c.pattern for c in CANDIDATES if c.pattern != "dense"))


# --- calibration prompts -----------------------------------------------------------------------------------------


@dataclass
class Prompt:
    kind: str
    ids: list[int]


def _text_ids(tokenizer, text: str | None) -> list[int]:
    """The tokens of ``text``, or of the built-in calibration split when it is None."""
    return encode(tokenizer, text if text is not None else natural_text("calibration"))


def calibration_prompts(
    tokenizer, lengths: list[int], samples: int, seed: int, text_ids: list[int] | None = None
) -> list[Prompt]:
    """``samples`` :class:`Prompt` per length; the kinds (:data:`KINDS`) take turns across all prompts. ``text_ids``:
    the natural text they draw from, tokenized (default: the built-in calibration split)."""
    text_ids = text_ids if text_ids is not None else _text_ids(tokenizer, None)
    out = []
    for n in lengths:
        for i in range(samples):
            kind = KINDS[len(out) % len(KINDS)]
            rng = random.Random(f"{seed}/{n}/{i}")
            if kind == "natural":
                ids = natural_prompt(text_ids, n, rng)
            elif kind == "passkey":
                prompt, _ = passkey_prompt(tokenizer, n, depth=rng.random(), seed=rng.randrange(1 << 30))
                ids = encode(tokenizer, prompt)
            elif kind == "kv_retrieval":
                ids = kv_prompt(tokenizer, n, rng)
            else:
                ids = multi_needle_prompt(tokenizer, text_ids, n, rng)
            out.append(Prompt(kind, ids))
    return out


# --- q/k capture ------------------------------------------------------------------------------------------------

_captured: dict[int, tuple[torch.Tensor, torch.Tensor, float]] | None = None


def _capture_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """transformers attention function: record (q, k, scale) of the layer, then run stock SDPA."""
    if _captured is not None:
        _captured[module.layer_idx] = (query.detach(), key.detach(), scaling or query.shape[-1] ** -0.5)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


@contextlib.contextmanager
def capturing(model):
    """Within the block, every dense forward of ``model`` fills the yielded dict: layer -> (q, k, scale), with
    q [B, Hq, S, D] and k [B, Hkv, S, D] post-RoPE. The model's previous attention implementation is restored after."""
    global _captured
    register_attention(CAPTURE, _capture_attention, sdpa_mask)
    previous = model.config._attn_implementation
    _captured = {}
    model.set_attn_implementation(CAPTURE)
    try:
        yield _captured
    finally:
        _captured = None
        model.set_attn_implementation(previous)


# --- scoring ----------------------------------------------------------------------------------------------------


def recall(q: torch.Tensor, k: torch.Tensor, indexes: list[SparseIndex], scale: float, rows: slice, chunk: int = 256):
    """Mean softmax mass each index keeps over the given query rows, per head: [len(indexes), Hq] fp32.

    Args:
        q: [1, Hq, S, D]; k: [1, Hkv, S, D] (one unpadded sample, queries at the keys' positions).
        indexes: indexes of this q/k, e.g. one per candidate pattern.
        rows: the query rows to average over (any slice of range(S)).
        chunk: rows per step; buffers are Hq × chunk × S, never S × S.

    The kernels' key set (:func:`~sparse_prefill.index.sample_mask`) is causal & (whole blocks | single columns). The
    softmax is already causal, so the kept mass is the key-block sums of the blocks that are on plus the columns
    outside them: exact, and O(chunk × (blocks + columns)) per index and head once the softmax rows are known.
    """
    H, S = q.shape[1], q.shape[2]
    n = cdiv(S, BLOCK)
    kk = k[0].float().repeat_interleave(H // k.shape[1], dim=0)  # [Hq, S, D]
    picked = range(S)[rows]
    keys = torch.arange(S, device=q.device)
    total = torch.zeros(len(indexes), H, device=q.device)
    blocks = [block_mask(index, 0) for index in indexes]  # [Hq, M, N] each
    for i in range(0, len(picked), chunk):
        part = picked[i : i + chunk]
        r = keys[part.start : part.stop : part.step]
        logits = (q[0, :, r].float() @ kk.transpose(-1, -2)) * scale  # [Hq, R, S]
        p = torch.softmax(logits.masked_fill_(keys[None, :] > r[:, None], float("-inf")), dim=-1)
        pooled = F.pad(p, (0, n * BLOCK - S)).unflatten(-1, (n, BLOCK)).sum(-1)  # [Hq, R, N]
        for c, index in enumerate(indexes):
            on = blocks[c][:, r // BLOCK]  # [Hq, R, N]
            total[c] += (pooled * on).sum((-1, -2))
            cols = index.col_idx[0].long()  # [Hq, V], valid ones first
            if cols.shape[-1]:
                valid = torch.arange(cols.shape[-1], device=q.device) < index.col_cnt[0][:, None]
                outside = ~on.gather(-1, (cols // BLOCK)[:, None, :].expand(-1, len(r), -1)) & valid[:, None, :]
                total[c] += (p.gather(-1, cols[:, None, :].expand(-1, len(r), -1)) * outside).sum((-1, -2))
    return total / len(picked)


def score_layer(q, k, scale: float, candidates: list[HeadSpec], rows: list[slice]):
    """Recall and density of every candidate on every head of one layer: one index per candidate, all heads at once.

    Returns:
        recall [C, Hq]: the worst, over the row groups ``rows``, of the mean recall; density [C, Hq].
    """
    indexes = [build_index(q, k, [spec] * q.shape[1], scale, [0]) for spec in candidates]
    rec = torch.stack([recall(q, k, indexes, scale, r) for r in rows]).amin(0)
    return rec, torch.stack([tile_density(index)[0] for index in indexes])


def row_groups(seq_len: int, rng: random.Random) -> list[slice]:
    """Uniform rows (odd stride, random phase, so every in-block offset is seen) and the last rows."""
    stride = max(1, seq_len // UNIFORM_ROWS) | 1
    return [slice(rng.randrange(stride), seq_len, stride), slice(max(0, seq_len - LAST_ROWS), seq_len)]


def select(
    recall: torch.Tensor,
    density: torch.Tensor,
    candidates: list[HeadSpec],
    target: float,
    budget=None,
    layer_weight: torch.Tensor | None = None,
):
    """Pick one candidate per head.

    Args:
        recall, density: [N samples, L, C, H] per sample, layer, candidate and head.
        target: recall a head must reach on every sample to use a candidate (dense reaches 1).
        budget: mean density to spend. Without it each head takes its cheapest candidate that reaches the target;
            with it, density left under the budget goes where it removes the most lost recall (mean over samples).
        layer_weight: [L], what a unit of lost recall costs in each layer (default 1 everywhere): with a budget,
            layers whose lost recall moves the output more get more of it (:func:`layer_sensitivity`).
    Returns:
        [L, H] candidate indices.
    """
    cost = density.mean(0)  # [L, C, H]
    ok = recall.amin(0) >= target
    ok[:, [c.pattern for c in candidates].index("dense")] = True
    floor = cost.masked_fill(~ok, math.inf).argmin(1)  # the first of equally cheap ones
    if budget is None or _mean_cost(cost, floor) >= budget:
        return floor
    # Minimise lost recall + lam * density per head: a smaller lam buys more recall. Bisect lam onto the budget.
    lost = (1 - recall.mean(0)).masked_fill(~ok, math.inf)
    if layer_weight is not None:
        lost = lost * layer_weight[:, None, None]

    def pick(lam: float) -> torch.Tensor:
        return (lost + (lam + 1e-9) * cost).argmin(1)  # the 1e-9 breaks ties to the cheapest

    lo, hi = 0.0, 1.0
    while _mean_cost(cost, pick(hi)) > budget:
        hi *= 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if _mean_cost(cost, pick(mid)) <= budget else (mid, hi)
    return pick(hi)


def _mean_cost(cost: torch.Tensor, choice: torch.Tensor) -> float:
    return float(cost.gather(1, choice[:, None]).mean())


# --- layer sensitivity ------------------------------------------------------------------------------------------


def _config(info: ModelInfo, layers: list[list[HeadSpec]], min_seq_len: int | str, provenance: dict) -> SparseConfig:
    return SparseConfig.from_dict(
        {
            "format": FORMAT,
            "model": vars(info),
            "min_seq_len": min_seq_len,
            "layers": [[spec.to_dict() for spec in heads] for heads in layers],
            "provenance": provenance,
        }
    )


def layer_sensitivity(model, info: ModelInfo, prompts: list[Prompt], layers: list[list[HeadSpec]]) -> torch.Tensor:
    """Output error of each layer's patterns alone: [L] KL(dense || patched) of the next-token distributions over the
    last SENSITIVITY_ROWS positions, mean over ``prompts``, with layer l patched as ``layers[l]`` and every other
    layer dense. L patched forwards per prompt."""
    weight = next(model.parameters())
    # The Triton kernel takes fp16/bf16: an fp32 model runs the torch path, which computes the same keys.
    backend = "torch" if weight.dtype == torch.float32 else "auto"
    ids = [torch.tensor([p.ids], device=weight.device) for p in prompts]
    dense = [next_token_logp(model, x, SENSITIVITY_ROWS) for x in ids]
    all_dense = [_spec("dense")] * info.num_heads
    kl = torch.zeros(len(layers))
    for li, heads in enumerate(layers):
        if all(h.pattern == "dense" for h in heads):
            continue
        only = [heads if i == li else all_dense for i in range(len(layers))]
        patch_model(model, _config(info, only, 0, {}), min_seq_len=0, backend=backend)
        try:
            for want, x in zip(dense, ids):
                kl[li] += kl_to_dense(want, next_token_logp(model, x, SENSITIVITY_ROWS)) / len(ids)
        finally:
            unpatch_model(model)
    return kl


def sensitivity_weights(kl: torch.Tensor, lost: torch.Tensor) -> torch.Tensor:
    """[L] output error per unit of lost recall (``kl`` [L] over ``lost`` [L], the recall each layer's choice loses,
    summed over heads), scaled to mean 1. A layer that loses no recall has no measured rate: it gets the mean."""
    measured = lost > 1e-6
    if not measured.any():
        return torch.ones_like(kl)
    rate = torch.where(measured, kl / lost.clamp_min(1e-6), 0.0)
    rate = torch.where(measured, rate, rate[measured].mean())
    return rate / rate.mean() if rate.mean() > 0 else torch.ones_like(kl)


# --- calibration ------------------------------------------------------------------------------------------------


def measure(model, prompts: list[Prompt], candidates: list[HeadSpec], seed: int, progress: bool = True):
    """Dense prefill of each prompt, then every candidate on every head. Returns recall, density [N, L, C, H]."""
    rec, dens = [], []
    device = next(model.parameters()).device
    bar = tqdm(total=len(prompts) * model.config.num_hidden_layers, desc="calibrating", disable=not progress)
    for i, prompt in enumerate(prompts):
        bar.set_postfix(sample=f"{prompt.kind}/{len(prompt.ids)}")
        with capturing(model) as layers, torch.no_grad():
            model(torch.tensor([prompt.ids], device=device), logits_to_keep=1)
        rows = row_groups(len(prompt.ids), random.Random(f"{seed}/rows/{i}"))
        per_layer = []
        for layer in sorted(layers):
            q, k, scale = layers.pop(layer)  # free each layer's q/k once scored
            per_layer.append(score_layer(q, k, scale, candidates, rows))
            bar.update()
        rec.append(torch.stack([r for r, _ in per_layer]))
        dens.append(torch.stack([d for _, d in per_layer]))
    bar.close()
    return torch.stack(rec).cpu(), torch.stack(dens).cpu()


def build_config(info: ModelInfo, choice, recall, density, candidates, min_seq_len: int | str, provenance: dict):
    """The SparseConfig of the chosen candidates, with per-head achieved recall (worst sample) and density (mean)."""

    def pick(t: torch.Tensor) -> torch.Tensor:  # [N, L, C, H] -> [N, L, H] at the chosen candidates
        return t.gather(2, choice[None, :, None, :].expand(t.shape[0], -1, 1, -1))[:, :, 0]

    provenance = {
        **provenance,
        "recall": [[round(x, 4) for x in row] for row in pick(recall).amin(0).tolist()],
        "density": [[round(x, 4) for x in row] for row in pick(density).mean(0).tolist()],
    }
    return _config(info, _chosen(choice, candidates), min_seq_len, provenance)


def _chosen(choice: torch.Tensor, candidates: list[HeadSpec]) -> list[list[HeadSpec]]:
    return [[candidates[c] for c in row] for row in choice.tolist()]


def summary(config: SparseConfig) -> str:
    """Per layer: pattern counts, mean density, min recall; then the totals."""
    short = {name: p.abbrev for name, p in registry.PATTERNS.items()}
    rec, dens = config.provenance["recall"], config.provenance["density"]
    lines = [f"{'layer':>5}  {'patterns':<29} {'density':>7} {'min recall':>10}"]
    for li, heads in enumerate(config.layers):
        counts = " ".join(f"{short[p]}:{sum(h.pattern == p for h in heads)}" for p in short)
        lines.append(f"{li:>5}  {counts:<29} {sum(dens[li]) / len(heads):>7.3f} {min(rec[li]):>10.4f}")
    flat = [d for row in dens for d in row]
    mix = ", ".join(f"{p} {sum(h.pattern == p for row in config.layers for h in row)}" for p in short)
    lines.append(f"total  {mix}; mean density {sum(flat) / len(flat):.3f}; min recall {min(map(min, rec)):.4f}")
    return "\n".join(lines)


def calibrate(
    model,
    tokenizer,
    info: ModelInfo,
    lengths: list[int],
    samples: int = 4,
    seed: int = 0,
    target: float = 0.9,
    budget: float | None = 0.5,
    text: str | None = None,
    min_seq_len: int | str = DEFAULT_MIN_SEQ_LEN,
    candidates: list[HeadSpec] = CANDIDATES,
    progress: bool = True,
    sensitivity: int = 0,
) -> SparseConfig:
    """Calibrate a per-head config for ``model`` (see the module docstring)."""
    from .. import __version__

    if sensitivity and budget is None:  # weights re-spend a budget: with none, they would be silently ignored
        raise ValueError("sensitivity: needs a budget (budget=None picks each head's cheapest pattern)")
    if sensitivity and is_patched(model):  # measuring patches and unpatches the model: the caller's patch would go
        raise ValueError("sensitivity: the model is patched; unpatch_model(model) before calibrating with it")
    start = time.time()
    text_ids = _text_ids(tokenizer, text)
    prompts = calibration_prompts(tokenizer, lengths, samples, seed, text_ids)
    rec, dens = measure(model, prompts, candidates, seed, progress)
    choice = select(rec, dens, candidates, target, budget)
    weights = None
    if sensitivity:
        rng = random.Random(f"{seed}/sensitivity")
        texts = [Prompt("natural", natural_prompt(text_ids, max(lengths), rng)) for _ in range(sensitivity)]
        kl = layer_sensitivity(model, info, texts, _chosen(choice, candidates))
        lost = (1 - rec.mean(0)).gather(1, choice[:, None]).squeeze(1).sum(-1)  # [L]
        weights = sensitivity_weights(kl, lost)
        choice = select(rec, dens, candidates, target, budget, weights)
    provenance = {
        "tool": "sparse_prefill.calibrate",  # the name shipped configs carry: kept across the move to tools/
        "version": __version__,
        "date": datetime.date.today().isoformat(),
        "model": info.name,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "lengths": lengths,
        "samples": [{"kind": p.kind, "tokens": len(p.ids)} for p in prompts],
        "seed": seed,
        "text": "pydoc_data.topics (calibration split)" if text is None else "user text",
        "patterns": list(dict.fromkeys(c.pattern for c in candidates)),
        "recall_target": target,
        "budget": budget,
        "rows": {"uniform": UNIFORM_ROWS, "last": LAST_ROWS},
        "budget_rule": "fractions of the key length",
        "sensitivity": None
        if weights is None
        else {"texts": sensitivity, "tokens": max(lengths), "layer_weights": [round(w, 3) for w in weights.tolist()]},
        "seconds": round(time.time() - start),
    }
    return build_config(info, choice, rec, dens, candidates, min_seq_len, provenance)


# --- command line -----------------------------------------------------------------------------------------------


def _budget(value: str) -> float | None:
    return None if value.lower() == "none" else fraction(low_open=True)(value)


def _patterns(value: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in value.split(","))
    if unknown := [name for name in names if name not in PATTERNS]:
        expected = ", ".join(PATTERNS)
        raise argparse.ArgumentTypeError(f"unknown pattern {unknown[0]!r}: expected a comma list of {expected}")
    return names


def _min_seq_len(value: str) -> int | str:
    return value if value == AUTO else integer(0)(value)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparse-prefill-calibrate", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="'smollm2' (the embedded default) or a local model folder")
    p.add_argument("--out", help="config to write (default: configs/<model name>.json)")
    p.add_argument(
        "--lengths",
        type=lengths(MIN_LENGTH),
        default=[2048, 4096],
        help=f"prompt lengths of at least {MIN_LENGTH} tokens and at most the model's context, e.g. 2k,4k",
    )
    p.add_argument("--samples", type=integer(1), default=4, help="prompts per length (kinds in turn)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--patterns",
        type=_patterns,
        default=PATTERNS,
        help=f"candidate patterns, a comma list of {', '.join(PATTERNS)} (default all); dense is always one",
    )
    p.add_argument(
        "--recall",
        type=fraction(low_open=True),
        default=0.9,
        help="recall a head must reach on every sample, in (0, 1]",
    )
    p.add_argument(
        "--budget",
        type=_budget,
        default=0.5,
        help="mean tile density to spend where it buys the most recall, in (0, 1]; 'none': each head's cheapest",
    )
    p.add_argument(
        "--sensitivity",
        type=integer(0),
        default=0,
        help="natural-text prompts (at the longest --lengths) on which each layer's output error is measured, so that "
        "the budget goes first to the layers whose lost recall moves the output most; one forward per prompt and "
        "layer; needs a --budget (default 0: every layer's lost recall counts alike)",
    )
    p.add_argument(
        "--min-seq-len",
        type=_min_seq_len,
        default=DEFAULT_MIN_SEQ_LEN,
        help="prompts shorter than this stay dense (default 'auto': the crossover measured for the device and "
        "head_dim the model runs on, sparse_prefill.devices)",
    )
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--text", type=Path, help="a long natural-text file (default: built-in English text)")
    # Scoring is many small ops: on a machine shared with other jobs, one thread each avoids oversubscription.
    p.add_argument(
        "--threads", type=integer(1, os.cpu_count() or 1), help="torch CPU threads (default: torch's choice)"
    )
    add_rope_scaling(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from ..config import save_config
    from .models import SMOLLM2, SMOLLM2_GGUF, context_length, load_model
    from ..patches import adapter_for

    p = parser()
    args = p.parse_args(argv)
    # Everything is checked before the model loads: a bad argument must not cost the load, nor the calibration.
    name = SMOLLM2_GGUF.split(".")[0] if args.model == SMOLLM2 else Path(args.model).name  # as model_info names it
    out = Path(args.out or f"configs/{name.lower()}.json")
    if problem := output_problem(out, folder=False):
        p.error(f"argument --out: {problem}")
    if args.model != SMOLLM2 and not Path(args.model).is_dir():
        p.error(f"argument --model: {args.model!r} is neither {SMOLLM2!r} nor a local model folder")
    if args.sensitivity and args.budget is None:
        p.error("argument --sensitivity: needs a --budget (with --budget none each head takes its cheapest pattern)")
    text = None
    if args.text is not None:
        try:
            text = args.text.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            p.error(f"argument --text: cannot read {args.text} as UTF-8 text ({e})")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tokenizer = load_model(args.model, DTYPES[args.dtype], args.device, args.rope_scaling)
    except (OSError, ValueError) as e:
        p.error(f"argument --model: cannot load {args.model!r}: {e}")
    context = context_length(model.config)
    if context and max(args.lengths) > context:
        p.error(f"argument --lengths: {max(args.lengths)} exceeds the model's context of {context} tokens")
    info = adapter_for(model, force=True).model_info(model)
    if args.model == SMOLLM2:
        info = ModelInfo(**{**vars(info), "name": name})
    config = calibrate(
        model,
        tokenizer,
        info,
        args.lengths,
        args.samples,
        args.seed,
        args.recall,
        args.budget,
        text,
        args.min_seq_len,
        [c for c in CANDIDATES if c.pattern in (*args.patterns, "dense")],
        sensitivity=args.sensitivity,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    save_config(config, out)  # whole or not at all: a temporary file moved onto ``out``
    print(summary(config))
    print(f"wrote {out} ({config.provenance['seconds']} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
