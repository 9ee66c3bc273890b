"""Convert MInference's published per-head search results into a ``sparse_prefill/1`` config.

    sparse-prefill-convert Llama_3.1_8B_Instruct_128k_kv_out_v32_fit_o_best_pattern_v2.json out.json \\
        --hf-config path/to/Llama-3.1-8B-Instruct --hub-id meta-llama/Llama-3.1-8B-Instruct

MInference's format (``minference/configs/*.json``, MIT): a JSON list with one object per layer, mapping each head
index (a string) to ``[pattern, a, b, score]``; ``score`` is what the search measured for the head (attention recall
in most files, a raw count in some older ones: kept as is in the provenance).

Mapping, with MInference's run-time semantics kept exactly:

* ``"vertical_and_slash", a, b`` -> ``vertical_slash`` with ``vertical = max(a, 30)`` and ``slash = max(b, 50)``
  (MInference's floors; the budgets' clamp to the key length is :meth:`HeadSpec.budget`'s, so the run-time budgets
  are MInference's ``min(q_len, max(a, 30))`` and ``min(q_len, max(b, 50))``), ``last_q = 64``,
  ``force_vertical = 30`` (the first 30 columns), ``force_slash = 100`` (the 100 nearest diagonals; the slash budget
  where that is under 100: MInference then keeps an unspecified ``b`` of the 100 forced ones, here the nearest) and
  ``slash_select = "token"`` (the top single diagonals).
* ``"stream_llm", a, b`` -> ``a_shape`` with ``sink = a`` and ``local = b`` (MInference's streaming kernel: the first
  ``a`` keys and the ``b`` nearest diagonals, no floors).

Any other pattern name is a ConfigError naming the layer and head.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from .config import FORMAT, ConfigError, ModelInfo, SparseConfig, save_config
from .patches.base import UNNAMED

SOURCE_REPO = "https://github.com/microsoft/MInference"
LICENSE = "MIT, Copyright (c) Microsoft Corporation"
MIN_VERTICAL, MIN_SLASH = 30, 50  # MInference's floors on the budgets
FORCE_VERTICAL, FORCE_SLASH = 30, 100  # the columns and diagonals MInference always keeps
# The vertical-slash parameters every converted head shares (the config's defaults).
VERTICAL_SLASH = {"last_q": 64, "force_vertical": FORCE_VERTICAL, "force_slash": FORCE_SLASH, "slash_select": "token"}


def convert_minference(
    path: str | Path,
    model: ModelInfo | Any,
    *,
    name: str | None = None,
    hub_ids: list[str] | tuple[str, ...] = (),
    commit: str | None = None,
) -> SparseConfig:
    """A :class:`SparseConfig` from one MInference per-head config file.

    Args:
        path: MInference's JSON file.
        model: the model it was searched on, as a :class:`ModelInfo` or a transformers config (``PretrainedConfig``:
            ``model_type``, ``num_hidden_layers``, ``num_attention_heads``, ...). Its layer and head counts must match
            the file's.
        name: the config's ``model.name`` (default: ``model``'s name, or the file's stem for an unnamed model).
        hub_ids: the Hugging Face ids the config is for (``model.hub_ids``: :func:`sparse_prefill.patch_model` picks a
            shipped config by them).
        commit: the MInference commit the file comes from, for the provenance.
    Returns:
        The validated config; its provenance names the source file, commit and license, and keeps each head's
        ``score`` (per layer, in head order).
    Raises:
        ConfigError: a file that is not MInference's format, an unknown pattern, or counts that do not match
        ``model``; the message names the layer and head.
    """
    path = Path(path)
    info = _model_info(model, name, path.stem)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, list) or len(raw) != info.num_layers:
        got = len(raw) if isinstance(raw, list) else type(raw).__name__
        raise ConfigError(f"{path}: must list model.num_layers={info.num_layers} layers, got {got}")
    layers, scores = [], []
    for li, heads in enumerate(raw):
        if not isinstance(heads, dict) or set(heads) != {str(h) for h in range(info.num_heads)}:
            raise ConfigError(f"{path}: layer {li} must map head indices 0..{info.num_heads - 1} (model.num_heads)")
        entries = [heads[str(h)] for h in range(info.num_heads)]
        layers.append([_head(entry, f"{path.name}: layer {li} head {h}") for h, entry in enumerate(entries)])
        scores.append([_score(entry[3]) for entry in entries])
    # The most common vertical-slash budgets become the defaults, so a head lists only what differs.
    vs_heads = [h for heads in layers for h in heads if h["pattern"] == "vertical_slash"]
    budgets = Counter((h["vertical"], h["slash"]) for h in vs_heads)
    common = dict(zip(("vertical", "slash"), budgets.most_common(1)[0][0])) if budgets else {}
    layers = [[{k: v for k, v in h.items() if common.get(k) != v} for h in heads] for heads in layers]
    return SparseConfig.from_dict(
        {
            "format": FORMAT,
            "model": info.to_dict() | ({"hub_ids": list(hub_ids)} if hub_ids else {}),
            "min_seq_len": "auto",
            "defaults": {"vertical_slash": {**common, **VERTICAL_SLASH}},
            "layers": layers,
            "provenance": {
                "tool": "sparse_prefill.convert",
                "source": f"{SOURCE_REPO}, minference/configs/{path.name}",
                "commit": commit,
                "license": LICENSE,
                "semantics": "MInference's run-time rule: budgets floored at 30 columns / 50 diagonals and clamped "
                "to the key length, last 64 queries, first 30 columns and 100 nearest diagonals kept, token slashes",
                "score": scores,
            },
        }
    )


def _model_info(model: ModelInfo | Any, name: str | None, fallback: str) -> ModelInfo:
    """``model`` as a ModelInfo named ``name`` if given, else by its own name, else ``fallback``."""
    if not isinstance(model, ModelInfo):
        from .patches import ADAPTERS, Adapter  # the adapters read shapes from a transformers config

        model_type = getattr(model, "model_type", None)
        if not model_type:
            raise ConfigError(f"model: expected a ModelInfo or a transformers config, got {type(model).__name__}")
        model = ADAPTERS.get(model_type, Adapter(model_type)).config_info(model)
    if name or model.name == UNNAMED:
        model = ModelInfo(**{**vars(model), "name": name or fallback})
    return model


def _head(entry: Any, where: str) -> dict[str, Any]:
    """One MInference head entry as a sparse_prefill head entry."""
    if not (isinstance(entry, list) and len(entry) == 4 and all(_count(x) for x in entry[1:3])):
        raise ConfigError(f"{where}: must be [pattern, a, b, score] with integer budgets a, b >= 1, got {entry!r}")
    pattern, a, b = entry[:3]
    if pattern == "vertical_and_slash":
        vertical, slash = max(a, MIN_VERTICAL), max(b, MIN_SLASH)
        head = {"pattern": "vertical_slash", "vertical": vertical, "slash": slash}
        return head | ({"force_slash": slash} if slash < FORCE_SLASH else {})
    if pattern == "stream_llm":
        return {"pattern": "a_shape", "sink": a, "local": b}
    raise ConfigError(f"{where}: pattern {pattern!r} is not converted (known: 'vertical_and_slash', 'stream_llm')")


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def _score(x: Any) -> float | int:
    return round(x, 4) if isinstance(x, float) else x


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-prefill-convert",
        description=__doc__.split("\n\n")[0] + " Give the model's shape by --hf-config or all of --model-type, "
        "--layers, --heads, --kv-heads and --head-dim.",
    )
    parser.add_argument("source", type=Path, help="MInference's per-head JSON file")
    parser.add_argument("out", type=Path, help="the sparse_prefill config to write")
    parser.add_argument("--hf-config", help="a local model folder or its config.json (nothing is downloaded)")
    parser.add_argument("--model-type", help="transformers model_type, e.g. llama")
    for flag in ("--layers", "--heads", "--kv-heads", "--head-dim"):
        parser.add_argument(flag, type=int)
    parser.add_argument("--name", help="model name (default: the --hf-config folder's, else the source file's stem)")
    parser.add_argument("--hub-id", action="append", default=[], help="a Hugging Face id it is for (repeatable)")
    parser.add_argument("--commit", help="the MInference commit the file comes from")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    shape = (args.model_type, args.layers, args.heads, args.kv_heads, args.head_dim)
    if args.hf_config and any(x is not None for x in shape):
        parser.error("argument --hf-config: give either it or the shape flags, not both")
    if args.hf_config:
        model = _local_hf_config(Path(args.hf_config), parser)
    elif all(x is not None for x in shape):
        model = ModelInfo(UNNAMED, *shape)
    else:
        parser.error("the model's shape: give --hf-config, or --model-type, --layers, --heads, --kv-heads, --head-dim")
    try:
        config = convert_minference(args.source, model, name=args.name, hub_ids=args.hub_id, commit=args.commit)
    except (OSError, ConfigError) as e:
        print(f"sparse-prefill-convert: {e}", file=sys.stderr)
        return 1
    save_config(config, args.out)
    print(f"wrote {args.out}: {config.model.name}, {config.model.num_layers} layers x {config.model.num_heads} heads")
    return 0


def _local_hf_config(path: Path, parser: argparse.ArgumentParser):
    from transformers import AutoConfig

    folder = path.parent if path.name == "config.json" else path
    if not (folder / "config.json").is_file():
        parser.error(f"argument --hf-config: {path} is not a local model folder or config.json")
    return AutoConfig.from_pretrained(folder, local_files_only=True)


if __name__ == "__main__":
    sys.exit(main())
