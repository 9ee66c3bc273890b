"""sparse-prefill-eval: a patched model against itself dense, on the same long prompts.

For every prompt of :mod:`sparse_prefill.tools.tasks` the model runs twice, dense and patched:

* accuracy: greedy answer scored against the gold answers (:func:`sparse_prefill.tools.tasks.score`);
* fidelity: patched next-token top-1 agreement and KL(dense || patched) over the dense answer (teacher-forced), and
  the relative L2 error of each layer's attention output on the prompt;
* latency and density: prefill (time to first token) of each, and the tile density each layer achieved.

``--dataset FORMAT:PATH`` runs a public benchmark's examples instead (LongBench, LongBench v2, RULER, InfiniteBench
or generic JSONL: :mod:`~sparse_prefill.tools.datasets_eval`), each scored by its task's metric
(:mod:`~sparse_prefill.tools.metrics`) and reported per task.

Outputs (``--out``): results.json, summary.md, needle_grid.png, patterns.png; written to a temporary folder beside
``--out`` that replaces it at the end, so a folder never mixes two runs. Bad arguments (and an ``--out`` that holds
anything but an earlier run's outputs) exit with code 2 before the model loads or anything is written.

    sparse-prefill-eval --lengths 1k,2k,4k --depths 0,0.5,1 --samples 1 --out eval-results
    sparse-prefill-eval --dataset longbench:LongBench/data --limit 20 --max-length 8k --out longbench-results
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import shutil
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from tqdm.auto import tqdm

from .. import __version__
from ..config import PATTERN_DEFAULTS, ConfigError, SparseConfig, check_unit, load_config
from ..patch import find_shipped_config, last_report, patch_model, resolve_config, unpatch_model
from ..patches import UnsupportedModelError, adapter_for
from ..plan import PATTERNS
from .cli import add_rope_scaling, device, format_length, integer, length, lengths, output_problem
from .datasets_eval import Example, benchmark_samples, dataset_arg, read_examples
from .divergence import kl_to_dense
from .markdown import fidelity_cells, num, table
from .models import DTYPES, SMOLLM2, cache_kwarg, context_length, load_model
from .tasks import TASKS, Haystack, Sample, make_samples

ALIASES = {p.alias: name for name, p in PATTERNS.items() if p.alias != name}  # uniform-<alias>
MIN_LENGTH = 512  # room for the instructions and the answer of every task
OUTPUTS = ("results.json", "summary.md", "needle_grid.png", "patterns.png")  # all a run writes into --out


# --------------------------------------------------------------------------------------------------- model runs


@dataclass
class Prefill:
    seconds: float
    logits: torch.Tensor  # [B, V] float32: next-token logits after the prompt
    cache: object  # the prompt's KV cache
    attn: list[torch.Tensor]  # per layer [B, S, hidden]: attention output (after o_proj)


def prefill(model, modules, ids: torch.Tensor, mask: torch.Tensor) -> Prefill:
    """One timed forward of the prompt into a fresh cache, capturing each layer's attention output.

    Args:
        modules: the attention module of each layer (hooked for the call only).
        ids, mask: [B, S] left-padded prompt tokens and their attention mask (1 = token).
    """
    attn: list = [None] * len(modules)

    def keep(i):
        return lambda module, args, output: attn.__setitem__(i, output[0])

    hooks = [m.register_forward_hook(keep(i)) for i, m in enumerate(modules)]
    try:
        _sync(ids.device)
        start = time.perf_counter()
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
            logits_to_keep=1,
        )
        _sync(ids.device)
        seconds = time.perf_counter() - start
    finally:
        for hook in hooks:
            hook.remove()
    return Prefill(seconds, out.logits[:, -1].float(), out[cache_kwarg(model)], attn)


def decode(
    model,
    cache,
    mask: torch.Tensor,
    logits: torch.Tensor,
    steps: int,
    eos: torch.Tensor,
    forced: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding from a prefilled cache (extended in place), or teacher-forced on ``forced`` tokens.

    Args:
        mask: [B, S] the prompt's attention mask. logits: [B, V] next-token logits after the prompt.
        steps: most tokens. eos: 1-D token ids that end a row.
        forced: [B, >= steps] tokens to feed instead of the argmax.
    Returns:
        tokens [B, T] and logits [B, T, V] float32 (``logits[:, t]`` predicted ``tokens[:, t]``); T <= steps, cut
        once every row has ended.
    """
    pos = mask.sum(-1, keepdim=True)
    cache_name = cache_kwarg(model)  # reads the forward signature: once, not per token
    tokens, all_logits = [], [logits]
    done = torch.zeros(len(mask), dtype=torch.bool, device=mask.device)
    for t in range(steps):
        token = forced[:, t] if forced is not None else all_logits[-1].argmax(-1)
        tokens.append(token)
        done |= torch.isin(token, eos)
        if t + 1 == steps or done.all():
            break
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        step = {"input_ids": token[:, None], "attention_mask": mask, "position_ids": pos + t, cache_name: cache}
        out = model(**step, use_cache=True)
        all_logits.append(out.logits[:, -1].float())
    return torch.stack(tokens, 1), torch.stack(all_logits, 1)


def evaluate(
    model,
    tokenizer,
    config: SparseConfig,
    samples: list[Sample],
    *,
    min_seq_len: int = 0,
    batch_size: int = 1,
    progress: bool = True,
) -> list[dict]:
    """Run every sample dense and patched; one record per sample, in order.

    Args:
        model, tokenizer: a loaded causal LM (unpatched; left unpatched) and its tokenizer.
        config: the sparse config to patch with, once for the whole run (:func:`patched`).
        min_seq_len: passed to :func:`patch_model`.
        samples: prompts from :func:`~sparse_prefill.tools.tasks.make_samples` or
            :func:`~sparse_prefill.tools.datasets_eval.benchmark_samples` (a task's samples together); batches hold one
            task, length and generation length. A progress bar per task.
    Returns:
        Records with the sample fields, ``metric``, per mode ``prediction``, ``score``, ``prefill_s`` (of the sample's
        batch), ``agree`` (the two predictions are equal), ``top1``, ``kl``, ``top1_first``, ``kl_first`` (of the
        first generated token), ``attn_rel_err`` [layer], ``density`` [layer][head], ``sparse_layers``.
    """
    modules = adapter_for(model).attention_modules(model)
    eos = _eos_ids(model, tokenizer)
    batches = _batches(samples, batch_size)
    heads = len(config.layers[0])
    records = []
    with torch.inference_mode(), patched(model, config, min_seq_len) as use:
        _warm_up(model, use, tokenizer, batches[0], modules)
        for task in dict.fromkeys(b[0].task for b in batches):
            for batch in tqdm([b for b in batches if b[0].task == task], desc=task, unit="batch", disable=not progress):
                records += _run_batch(model, use, tokenizer, heads, modules, eos, batch)
    return records


@contextlib.contextmanager
def patched(model, config: SparseConfig, min_seq_len: int):
    """Patch ``model`` once for a whole run and yield ``use(mode)``, which switches it to ``"dense"`` (the attention it
    had before) or ``"patched"``; the model starts patched and is unpatched at the end.

    The switch is transformers' ``set_attn_implementation`` and leaves the patch in place, so the plans one batch
    builds (cached index parts, CUDA graphs) serve the next instead of being rebuilt per batch. Dense runs are the
    stock implementation itself, as unpatched.
    """
    stock = model.config._attn_implementation
    patch_model(model, config, min_seq_len=min_seq_len)
    implementation = {"dense": stock, "patched": model.config._attn_implementation}
    try:
        yield lambda mode: model.set_attn_implementation(implementation[mode])
    finally:
        unpatch_model(model)


def _batches(samples: list[Sample], batch_size: int) -> list[list[Sample]]:
    """Consecutive samples of one task, length and generation length, up to ``batch_size`` a batch."""
    batches: list[list[Sample]] = []
    for s in samples:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and _batch_key(last[0]) == _batch_key(s):
            last.append(s)
        else:
            batches.append([s])
    return batches


def _batch_key(sample) -> tuple:
    return sample.task, sample.length, sample.max_new_tokens


def _run_batch(model, use, tokenizer, heads: int, modules, eos, batch: list[Sample]) -> list[dict]:
    ids, mask = _encode(tokenizer, [s.prompt for s in batch], model.device)
    steps = batch[0].max_new_tokens
    use("dense")
    dense = prefill(model, modules, ids, mask)
    d_tokens, d_logits = decode(model, dense.cache, mask, dense.logits, steps, eos)
    dense.cache = None  # free it before the patched run allocates its own
    use("patched")
    sparse = prefill(model, modules, ids, mask)
    # Read before the next prefill replaces it.
    report = [(r.path, r.density, r.choices) for r in last_report(model)]
    _, f_logits = decode(model, sparse.cache, mask, sparse.logits, d_tokens.shape[1], eos, forced=d_tokens)
    # Back to the prompt: decode steps run dense either way, so this equals a fresh patched prefill.
    sparse.cache.crop(-(sparse.cache.get_seq_length() - ids.shape[1]))
    p_tokens, _ = decode(model, sparse.cache, mask, sparse.logits, steps, eos)
    records = []
    for b, sample in enumerate(batch):
        n = _answer_len(d_tokens[b], eos)
        d_log, f_log = F.log_softmax(d_logits[b, :n], -1), F.log_softmax(f_logits[b, :n], -1)
        valid = mask[b].bool()
        err = [
            float((p[b][valid] - d[b][valid]).float().norm() / d[b][valid].float().norm().clamp_min(1e-12))
            for p, d in zip(sparse.attn, dense.attn)
        ]
        predictions = {"dense": _text(tokenizer, d_tokens[b], eos), "patched": _text(tokenizer, p_tokens[b], eos)}
        records.append(
            {
                "task": sample.task,
                "length": sample.length,
                "depth": sample.depth,
                "tokens": int(valid.sum()),
                "answers": sample.answers,
                "metric": sample.metric,
                **{
                    mode: {
                        "prediction": text,
                        "score": sample.score(text),
                        "prefill_s": round((dense if mode == "dense" else sparse).seconds, 4),
                    }
                    for mode, text in predictions.items()
                },
                "top1": float((f_log.argmax(-1) == d_tokens[b, :n]).float().mean()),
                "kl": kl_to_dense(d_log, f_log),
                "agree": predictions["dense"] == predictions["patched"],
                "top1_first": float(f_log[0].argmax() == d_tokens[b, 0]),
                "kl_first": kl_to_dense(d_log[:1], f_log[:1]),
                "attn_rel_err": [round(e, 6) for e in err],
                "density": [[round(x, 4) for x in (dens[b] if dens else [1.0] * heads)] for _, dens, _ in report],
                "sparse_layers": sum(path == "sparse" for path, _, _ in report),
                # The pattern each head ran ("adaptive:<pattern>" for adaptive heads); "dense" on a dense layer.
                "patterns": [choices[b] if choices else ["dense"] * heads for _, _, choices in report],
            }
        )
    return records


def _warm_up(model, use, tokenizer, batch, modules) -> None:
    """One short prefill per mode, so first-call costs stay out of the timings."""
    ids, mask = _encode(tokenizer, [batch[0].prompt], model.device)
    ids, mask = ids[:, -1024:], mask[:, -1024:]
    for mode in ("dense", "patched"):
        use(mode)
        prefill(model, modules, ids, mask)


def _encode(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask. The pad id is 0: masked, so any id does (and the tokenizer needs no pad token)."""
    rows = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]  # the chat template has the specials
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def _eos_ids(model, tokenizer) -> torch.Tensor:
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids |= set(extra) if isinstance(extra, list) else {extra}
    return torch.tensor(sorted(i for i in ids if i is not None), device=model.device, dtype=torch.long)


def _answer_len(tokens: torch.Tensor, eos: torch.Tensor) -> int:
    """Tokens up to and including the first end token."""
    ends = torch.isin(tokens, eos).nonzero()
    return int(ends[0]) + 1 if len(ends) else len(tokens)


def _text(tokenizer, tokens: torch.Tensor, eos: torch.Tensor) -> str:
    return tokenizer.decode(tokens[: _answer_len(tokens, eos)].tolist(), skip_special_tokens=True).strip()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------- summary


def _mean(xs):
    xs = list(xs)
    return round(statistics.fmean(xs), 6) if xs else None


def _fidelity(rs: list[dict]) -> dict:
    """Fidelity, median prefill latency and density over some records."""
    dense_s = statistics.median(r["dense"]["prefill_s"] for r in rs)
    patched_s = statistics.median(r["patched"]["prefill_s"] for r in rs)
    return {
        "samples": len(rs),
        "top1": _mean(r["top1"] for r in rs),
        "kl": _mean(r["kl"] for r in rs),
        "attn_rel_err": _mean(e for r in rs for e in r["attn_rel_err"]),
        "prefill_dense_s": round(dense_s, 4),
        "prefill_patched_s": round(patched_s, 4),
        "speedup": round(dense_s / patched_s, 3),
        "density": _mean(x for r in rs for layer in r["density"] for x in layer),
    }


def summarize(records: list[dict], lengths: list[int], depths: list[float]) -> dict:
    """Aggregates: accuracy per task and length, the needle grid, per length fidelity, latency and density, and per
    task its metric, scores, answer agreement, first-token fidelity, latency and density."""

    def at(**kw):
        return [r for r in records if all(r[k] == v for k, v in kw.items())]

    tasks = list(dict.fromkeys(r["task"] for r in records))
    accuracy = {
        task: {
            str(n): {
                "dense": _mean(r["dense"]["score"] for r in at(task=task, length=n)),
                "patched": _mean(r["patched"]["score"] for r in at(task=task, length=n)),
                "n": len(at(task=task, length=n)),
            }
            for n in lengths
        }
        for task in tasks
    }
    grid = None
    if "niah" in tasks:
        grid = {"depths": depths, "lengths": lengths}
        for mode in ("dense", "patched"):
            grid[mode] = [
                [_mean(r[mode]["score"] for r in at(task="niah", length=n, depth=d)) for n in lengths] for d in depths
            ]
    per_length = {}
    for n in lengths:
        rs = at(length=n)
        layers = range(len(rs[0]["density"]))
        per_length[str(n)] = {
            **_fidelity(rs),
            "layer_density": [_mean(x for r in rs for x in r["density"][i]) for i in layers],
            "patterns_run": dict(Counter(p for r in rs for layer in r["patterns"] for p in layer).most_common()),
            "layer_attn_rel_err": [_mean(r["attn_rel_err"][i] for r in rs) for i in layers],
        }
    per_task = {
        task: {
            "metric": rs[0]["metric"],
            "dense": _mean(r["dense"]["score"] for r in rs),
            "patched": _mean(r["patched"]["score"] for r in rs),
            "agree": _mean(float(r["agree"]) for r in rs),
            "top1_first": _mean(r["top1_first"] for r in rs),
            "kl_first": _mean(r["kl_first"] for r in rs),
            **_fidelity(rs),
        }
        for task in tasks
        for rs in [at(task=task)]
    }
    longest = [r["density"] for r in at(length=max(lengths))]  # [sample][layer][head]
    head_density = [[_mean(head) for head in zip(*layer)] for layer in zip(*longest)]
    runs = [r["patterns"] for r in at(length=max(lengths))]  # [sample][layer][head]
    head_pattern = [[Counter(head).most_common(1)[0][0] for head in zip(*layer)] for layer in zip(*runs)]
    return {
        "accuracy": accuracy,
        "needle_grid": grid,
        "per_length": per_length,
        "per_task": per_task,
        "head_density": head_density,
        "head_pattern": head_pattern,
        "head_density_length": max(lengths),
    }


def summary_markdown(results: dict) -> str:
    """summary.md: the run's settings and markdown tables of :func:`summarize`'s aggregates."""
    meta, s = results["meta"], results["summary"]
    grid, per = s["needle_grid"], s["per_length"]
    sections = [
        [f"# sparse_prefill evaluation: {meta['model']}"],
        _settings(meta),
        _accuracy_table(meta, s["accuracy"]),
        _per_task_table(s["per_task"]),
        *([_needle_table(meta, grid)] if grid else []),
        _fidelity_table(meta, per),
        _per_layer_table(meta, per),
    ]
    lines = [line for section in sections for line in (*section, "")]
    if grid:
        lines += ["![needle grid](needle_grid.png)", ""]
    lines += [f"![patterns; text = density at {format_length(s['head_density_length'])}](patterns.png)", ""]
    return "\n".join(lines)


def _settings(meta: dict) -> list[str]:
    """The run's model, config (its provenance summarised), prompts and machine, one bullet each."""
    cfg, cols = meta["config"], [format_length(n) for n in meta["lengths"]]
    if meta["datasets"]:
        prompts = (
            f"- datasets: {', '.join(meta['datasets'])}; tasks: {', '.join(meta['tasks'])}; "
            f"{meta['limit'] or 'all'} examples per task; prompts cut to {cols[0]} tokens with the answer"
        )
    else:
        prompts = (
            f"- tasks: {', '.join(meta['tasks'])}; lengths: {', '.join(cols)} (prompt + answer tokens); "
            f"needle depths: {meta['depths']}; samples: {meta['samples']} per needle cell / per task and length; "
            f"seed {meta['seed']}; haystack: {meta['haystack']}"
        )
    return [
        f"- model: `{meta['model']}` ({_shape(meta['model_info'])})",
        (
            f"- config: {cfg['source']}; made for `{cfg['made_for']}`; patterns: {cfg['patterns']}; "
            f"provenance: {provenance_summary(cfg['provenance'])} (in full in results.json)"
        ),
        f"- min_seq_len: {meta['min_seq_len']} (prompts with fewer keys run dense)",
        prompts,
        (
            f"- {meta['device']} {meta['dtype']}, {meta['threads']} torch threads, batch size {meta['batch_size']}; "
            f"torch {meta['versions']['torch']}, transformers {meta['versions']['transformers']}"
        ),
    ]


def provenance_summary(provenance: dict) -> str:
    """One line for a config's provenance: per-head arrays (a calibration's recall and density, a conversion's scores)
    as count, mean and range; lists of records counted; other values as they are, up to a length (a source URL fits,
    an explanation is named only)."""
    parts = []
    for key, value in provenance.items():
        numbers = list(_flat_numbers(value))
        if isinstance(value, list) and value and isinstance(value[0], list) and numbers:
            parts.append(
                f"{key}: {len(numbers)} values, mean {statistics.fmean(numbers):.4g}, "
                f"{min(numbers):.4g} to {max(numbers):.4g}"
            )
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            parts.append(f"{key}: {len(value)}")
        elif len(text := value if isinstance(value, str) else json.dumps(value)) <= 150:
            parts.append(f"{key}: {text}")
        else:
            parts.append(key)
    return "; ".join(parts) or "none"


def _flat_numbers(value):
    """The numbers of a (nested) list, else nothing."""
    if isinstance(value, list):
        for v in value:
            yield from _flat_numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def _accuracy_table(meta: dict, accuracy: dict) -> list[str]:
    lengths = meta["lengths"]
    return [
        "## Accuracy (dense / patched)",
        "",
        *table(
            ["task", *map(format_length, lengths)],
            [[task, *(_pair(row[str(n)]) for n in lengths)] for task, row in accuracy.items()],
        ),
    ]


def _per_task_table(per_task: dict) -> list[str]:
    return [
        "## Per task",
        "",
        (
            "Score (dense / patched): the mean of the task's metric, 0 to 1; agree: the fraction of samples whose "
            "dense and patched answers are the same text; first token: top-1 agreement and KL(dense ‖ patched) of the "
            "first generated token; prefill: median seconds; density: computed tiles over causal tiles."
        ),
        "",
        *table(
            ["task", "metric", "samples", "score", "agree", "first token top-1", "first token KL", "prefill s"]
            + ["density"],
            [
                [
                    task,
                    t["metric"],
                    t["samples"],
                    _pair(t),
                    num(t["agree"]),
                    num(t["top1_first"]),
                    num(t["kl_first"], 4),
                    f"{num(t['prefill_dense_s'], 2)} / {num(t['prefill_patched_s'], 2)} ({t['speedup']:.2f}×)",
                    num(t["density"]),
                ]
                for task, t in per_task.items()
            ],
        ),
    ]


def _needle_table(meta: dict, grid: dict) -> list[str]:
    lengths = meta["lengths"]
    return [
        "## Needle in a haystack (dense / patched), depth × length",
        "",
        *table(
            ["depth", *map(format_length, lengths)],
            [
                [f"{d:g}", *(_pair({m: grid[m][i][j] for m in ("dense", "patched")}) for j in range(len(lengths)))]
                for i, d in enumerate(grid["depths"])
            ],
        ),
    ]


def _fidelity_table(meta: dict, per: dict) -> list[str]:
    lengths = meta["lengths"]
    return [
        "## Fidelity, prefill latency and density",
        "",
        (
            "Top-1 agreement and KL(dense ‖ patched) over the dense answer (teacher-forced); attention error: relative "
            "L2 of each layer's attention output, mean over layers (worst layer); prefill: median seconds of one "
            "forward "
            "of the prompt (time to first token), warm-up excluded; density: computed tiles over causal tiles."
        ),
        "",
        *table(
            ["length", "samples", "top-1", "KL (nats)", "attn rel. err (worst layer)", "prefill dense s"]
            + ["prefill patched s", "speedup", "density"],
            [
                [
                    format_length(n),
                    *fidelity_cells(p),
                    num(p["prefill_dense_s"], 2),
                    num(p["prefill_patched_s"], 2),
                    f"{p['speedup']:.2f}×",
                    num(p["density"]),
                ]
                for n in lengths
                for p in [per[str(n)]]
            ],
        ),
        "",
        (
            "Patterns run, over samples, layers and heads (adaptive heads choose per sample): "
            + "; ".join(
                f"{format_length(n)}: " + ", ".join(f"{p} {c}" for p, c in per[str(n)]["patterns_run"].items())
                for n in lengths
            )
        ),
    ]


def _per_layer_table(meta: dict, per: dict) -> list[str]:
    lengths = meta["lengths"]
    return [
        "## Per layer: density / attention rel. error",
        "",
        *table(
            ["layer", "patterns", *map(format_length, lengths)],
            [
                [
                    i,
                    meta["config"]["layer_patterns"][i],
                    *(
                        f"{num(per[str(n)]['layer_density'][i])} / {num(per[str(n)]['layer_attn_rel_err'][i], 4)}"
                        for n in lengths
                    ),
                ]
                for i in range(len(per[str(lengths[0])]["layer_density"]))
            ],
        ),
    ]


def _pair(cell: dict) -> str:
    return f"{num(cell['dense'])} / {num(cell['patched'])}"


def _shape(info: dict) -> str:
    return (
        f"{info['model_type']}, {info['num_layers']} layers, {info['num_heads']} query / {info['num_kv_heads']} KV "
        f"heads, head_dim {info['head_dim']}"
    )


def _layer_patterns(config: SparseConfig) -> list[str]:
    return [
        " ".join(f"{PATTERNS[p].alias}×{c}" for p, c in Counter(h.pattern for h in layer).items())
        for layer in config.layers
    ]


def _dumps(obj, indent: str = "") -> str:
    """JSON with short containers and containers of scalars on one line (a layer's head densities, a head's spec)."""
    flat = json.dumps(obj, ensure_ascii=False)
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else []
    if len(flat) <= 100 or not any(isinstance(v, (dict, list)) for v in items):
        return flat
    inner = indent + " "
    if isinstance(obj, dict):
        body = [f"{inner}{json.dumps(k)}: {_dumps(v, inner)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(body) + f"\n{indent}}}"
    return "[\n" + ",\n".join(inner + _dumps(v, inner) for v in obj) + f"\n{indent}]"


def write_outputs(results: dict, config: SparseConfig, out: Path) -> None:
    """Make ``out`` a folder of results.json, summary.md, needle_grid.png (if the run had ``niah``) and patterns.png.

    They are written into a temporary folder beside ``out``, which then takes the place of ``out`` (and of an earlier
    run's files there), by two renames within one folder. If anything fails or is interrupted, ``out`` is as it was
    (only a kill between the two renames leaves the earlier run's folder as ``.<out name>.old-*`` beside it).
    """
    from .plots import needle_heatmap, pattern_map  # matplotlib only when writing

    s = results["summary"]
    out = out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(4)
    tmp, old = out.with_name(f".{out.name}.new-{token}"), out.with_name(f".{out.name}.old-{token}")
    tmp.mkdir()
    try:
        (tmp / "results.json").write_text(_dumps(results) + "\n")
        (tmp / "summary.md").write_text(summary_markdown(results))
        if s["needle_grid"]:
            grid = s["needle_grid"]
            nan = float("nan")  # an empty cell
            cells = {m: [[nan if v is None else v for v in row] for row in grid[m]] for m in ("dense", "patched")}
            needle_heatmap(grid["depths"], grid["lengths"], cells, tmp / "needle_grid.png")
        pattern_map(
            config,
            tmp / "patterns.png",
            s["head_density"],
            title=f"{results['meta']['config']['made_for']}: pattern per head (adaptive: the most frequent choice), "
            f"text = density at {format_length(s['head_density_length'])} tokens",
            chosen=s["head_pattern"],
        )
        if out.exists():
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            if old.exists():
                os.rename(old, out)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def out_problem(out: Path) -> str | None:
    """Why ``out`` cannot take this run's outputs, or None. A folder with anything but an earlier run's outputs is
    refused: the run replaces the whole folder."""
    if problem := output_problem(out, folder=True):
        return problem
    try:
        other = sorted(p.name for p in out.iterdir() if p.name not in OUTPUTS) if out.is_dir() else []
    except OSError as e:
        return f"cannot list {out} ({e.strerror or e})"
    if other:
        return f"{out} holds files this tool did not write ({', '.join(other[:3])}); use a new or empty folder"
    return None


# --------------------------------------------------------------------------------------------------- CLI


def _tasks(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown task(s) {unknown or text!r}; choose from {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def _depths(text: str) -> list[float]:
    try:
        out = [float(d) for d in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of numbers in [0, 1]") from None
    if any(not 0 <= d <= 1 for d in out):
        raise argparse.ArgumentTypeError(f"{text!r}: depths must lie in [0, 1]")
    return sorted(set(out))


def _unit(name: str):
    def parse(text: str) -> float:
        try:
            return check_unit(float(text), name, name)
        except (ValueError, ConfigError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sparse-prefill-eval",
        description="Accuracy, fidelity and prefill latency of sparse prefill against dense, on long-context "
        "retrieval tasks built in code (RULER-style), or on public benchmark files (--dataset).",
    )
    p.add_argument(
        "--model",
        default=SMOLLM2,
        help="'smollm2' (the embedded SmolLM2-135M-Instruct) or a local transformers model folder",
    )
    p.add_argument(
        "--config",
        default=None,
        help="sparse config: a JSON file, or uniform-<pattern> (vs, a, block, or a pattern name: "
        f"{', '.join(PATTERN_DEFAULTS)}); default: the shipped config for the model, else vertical-slash",
    )
    p.add_argument(
        "--mode",
        choices=["config", "adaptive"],
        default="config",
        help="config: the patterns of --config; adaptive: no config, every head chooses its pattern and budget per "
        "input (patch_model(mode='adaptive'))",
    )
    p.add_argument("--gamma", type=_unit("gamma"), default=None, help="attention mass of adaptive heads' sets, (0, 1]")
    p.add_argument(
        "--tau", type=_unit("tau"), default=None, help="adaptive heads' block-sparse threshold on sqrt JS, [0, 1]"
    )
    p.add_argument("--tasks", type=_tasks, default=list(TASKS), help=f"comma list of {', '.join(TASKS)} (default all)")
    p.add_argument(
        "--lengths",
        type=lengths(MIN_LENGTH, distinct=True),
        default=[1024, 2048, 4096],
        help="lengths in tokens (prompt + answer), e.g. 1k,2k,4k",
    )
    p.add_argument(
        "--depths",
        type=_depths,
        default=[0.0, 0.25, 0.5, 0.75, 1.0],
        help="needle depths of the niah grid, e.g. 0,0.25,0.5,0.75,1",
    )
    p.add_argument(
        "--samples",
        type=integer(1),
        default=1,
        help="samples per niah (depth, length) cell and per other task and length",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the generated prompts (default 0)")
    p.add_argument(
        "--device",
        type=device,
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda if available, else cpu)",
    )
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="model dtype (default float32)")
    p.add_argument(
        "--haystack",
        type=Path,
        default=None,
        help="text file whose sentences fill the context (default: built-in English-like filler)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("eval-results"),
        help="output folder, new or of an earlier run, which this run replaces (default eval-results)",
    )
    p.add_argument(
        "--batch-size",
        type=integer(1),
        default=1,
        help="prompts per forward, of one task and length, left-padded (default 1)",
    )
    p.add_argument(
        "--min-seq-len",
        type=integer(0),
        default=0,
        help="prompts with fewer keys run dense (default 0: the sparse path on every prompt)",
    )
    p.add_argument(
        "--dataset",
        type=dataset_arg,
        action="append",
        default=[],
        metavar="FORMAT:PATH",
        help="run a public benchmark's examples instead of --tasks (repeatable): FORMAT is longbench, longbench-v2, "
        "ruler, infinitebench or jsonl; PATH a json, jsonl or parquet file, a folder of them, or a hub dataset id",
    )
    p.add_argument("--limit", type=integer(1), default=None, help="with --dataset: the first N examples of each task")
    p.add_argument(
        "--max-length",
        type=length(1),
        default=None,
        help="with --dataset: prompt + answer tokens; longer prompts are cut in the middle (default: the model's "
        "context)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_rope_scaling(p)
    return p


def resolve(model, args) -> SparseConfig:
    """The config the run patches with: the one ``patch_model(model, --config, mode=--mode, gamma=, tau=)`` would
    use, resolved without patching. Raises what patch_model would: UnsupportedModelError, ConfigError (also a config
    made for another shape), OSError, or ValueError (gamma / tau for a config without adaptive heads)."""
    info = adapter_for(model).model_info(model)
    return resolve_config(model, _config_arg(args.config, info), mode=args.mode, gamma=args.gamma, tau=args.tau)


def _config_arg(value: str | None, info) -> str | SparseConfig | None:
    """--config as resolve_config takes it: None, a path, or a uniform config for this model's shape."""
    if value is None or not value.startswith("uniform-"):
        return value
    return SparseConfig.uniform(info, _uniform_pattern(value))


def _uniform_pattern(value: str) -> str:
    """The pattern of ``uniform-<pattern or alias>``, else ConfigError."""
    pattern = ALIASES.get(value[len("uniform-") :], value[len("uniform-") :])
    if pattern not in PATTERN_DEFAULTS:
        raise ConfigError(f"{value!r}: unknown pattern; use uniform-<{'|'.join([*ALIASES, *PATTERN_DEFAULTS])}>")
    return pattern


def _adaptive_source(args) -> str:
    given = [f"{n}={v:g}" for n, v in (("gamma", args.gamma), ("tau", args.tau)) if v is not None]
    return f"patch_model(mode='adaptive'{''.join(', ' + g for g in given)})"


def _default_source(info) -> str:
    if find_shipped_config(info) is not None:
        return "the shipped config for this model (patch_model(model, None))"
    return (
        "the default: vertical_slash on every head at MInference's budgets, token slashes (no shipped config for "
        "this model)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def fail(arg: str, message) -> None:
        parser.error(f"argument {arg}: {message}")  # exits with code 2

    # Every argument is checked before the model loads, its fit to the model before anything runs.
    haystack, examples = _check_arguments(args, fail)
    try:
        model, tokenizer = load_model(args.model, DTYPES[args.dtype], args.device, args.rope_scaling)
    except (OSError, ValueError) as e:
        fail("--model", e)
    config = _resolve_or_fail(model, args, fail)
    samples = _samples(args, model, tokenizer, examples, haystack, fail)
    records = evaluate(
        model,
        tokenizer,
        config,
        samples,
        min_seq_len=args.min_seq_len,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    results = {
        "meta": run_meta(args, model, config),
        "summary": summarize(records, args.lengths, args.depths),
        "samples": records,
    }
    write_outputs(results, config, args.out)
    print(f"sparse-prefill-eval: wrote {args.out}")
    return 0


def _check_arguments(args, fail) -> tuple[Haystack | None, list[Example]]:
    """Refuse, through ``fail(argument, message)``, what can be refused before the model loads. Returns the haystack
    and the --dataset examples."""
    try:
        haystack = Haystack(args.haystack) if args.haystack else None
    except (OSError, ValueError) as e:
        fail("--haystack", e)
    if args.mode == "adaptive" and args.config:
        fail(
            "--mode",
            "adaptive builds its own config; leave out --config (or use --mode config with a config that has "
            "adaptive heads)",
        )
    if (args.gamma is not None or args.tau is not None) and args.mode != "adaptive" and not args.config:
        fail(
            "--gamma" if args.gamma is not None else "--tau",
            "applies to adaptive heads: use --mode adaptive or a config with adaptive heads",
        )
    if args.config and not args.config.startswith("uniform-") and not Path(args.config).is_file():
        fail("--config", f"{args.config!r} is not a file (nor uniform-<pattern>)")
    try:  # the model's shape is checked once it is loaded
        if args.config and args.config.startswith("uniform-"):
            _uniform_pattern(args.config)
        elif args.config:
            load_config(args.config)
    except ConfigError as e:
        fail("--config", e)
    if problem := out_problem(args.out):
        fail("--out", problem)
    if not args.dataset and (args.limit or args.max_length):
        fail("--limit" if args.limit else "--max-length", "applies to --dataset runs")
    examples = _read_datasets(args, fail)
    if args.model != SMOLLM2 and not Path(args.model).is_dir():
        fail("--model", f"{args.model!r} is neither {SMOLLM2!r} nor a local model folder")
    return haystack, examples


def _read_datasets(args, fail) -> list[Example]:
    """The examples of every --dataset, in order; a task read from two datasets is refused."""
    examples: list[Example] = []
    for fmt, path in args.dataset:
        try:
            read = read_examples(fmt, path, args.limit)
        except (OSError, ValueError) as e:
            fail("--dataset", f"{fmt}:{path}: {e}")
        if twice := {e.task for e in examples} & {e.task for e in read}:
            fail("--dataset", f"{fmt}:{path}: task(s) {', '.join(sorted(twice))} already read from another dataset")
        examples += read
    return examples


def _resolve_or_fail(model, args, fail) -> SparseConfig:
    """:func:`resolve`, its errors reported against the argument they come from."""
    try:
        return resolve(model, args)
    except UnsupportedModelError as e:
        fail("--model", e)
    except (ConfigError, OSError) as e:
        fail("--config", e)
    except ValueError as e:  # gamma / tau given for a config without adaptive heads
        fail("--gamma" if args.gamma is not None else "--tau", e)


def _samples(args, model, tokenizer, examples: list[Example], haystack: Haystack | None, fail) -> list[Sample]:
    """The run's prompts, within the model's context. A --dataset run's tasks and its one length become ``args.tasks``
    and ``args.lengths`` (no depths), as the outputs report them."""
    context = context_length(model.config)
    if args.dataset:
        if not (args.max_length or context):
            fail("--max-length", "the model states no context length (max_position_embeddings): give one")
        if context and (args.max_length or 0) > context:
            fail("--max-length", f"{args.max_length} exceeds the model's context of {context} tokens")
        try:
            samples = benchmark_samples(tokenizer, examples, args.max_length or context)
        except ValueError as e:
            fail("--max-length", e)
        args.tasks, args.lengths, args.depths = list(dict.fromkeys(s.task for s in samples)), [samples[0].length], []
        return samples
    if context and max(args.lengths) > context:
        fail("--lengths", f"{max(args.lengths)} exceeds the model's context of {context} tokens")
    try:
        return make_samples(tokenizer, args.tasks, args.lengths, args.depths, args.samples, args.seed, haystack)
    except ValueError as e:
        fail("--lengths", e)


def run_meta(args, model, config: SparseConfig) -> dict:
    """results.json's ``meta``: what ran (model, config, prompts) and where (device, threads, versions)."""
    info = adapter_for(model).model_info(model)
    return {
        "model": args.model if args.model != SMOLLM2 else info.name,
        "model_info": vars(info),
        "config": {
            "source": _adaptive_source(args) if args.mode == "adaptive" else args.config or _default_source(info),
            "made_for": config.model.name,
            "provenance": config.provenance,
            "patterns": dict(Counter(h.pattern for layer in config.layers for h in layer)),
            "layer_patterns": _layer_patterns(config),
            "min_seq_len": config.min_seq_len,
            "json": config.to_dict(),
        },
        "min_seq_len": args.min_seq_len,
        "datasets": [f"{fmt}:{path}" for fmt, path in args.dataset],
        "limit": args.limit,
        "tasks": args.tasks,
        "lengths": args.lengths,
        "depths": args.depths,
        "samples": args.samples,
        "seed": args.seed,
        "haystack": str(args.haystack or "built-in"),
        "device": args.device,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "versions": {
            "sparse_prefill": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }


if __name__ == "__main__":
    sys.exit(main())
