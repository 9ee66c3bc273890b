"""patch_model / unpatch_model: switch a transformers model to sparse prefill and back."""

from __future__ import annotations

import dataclasses
import json
import logging
import torch
from importlib import resources
from pathlib import Path

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .backend import REQUESTS as BACKENDS
from .config import (
    CHOICES,
    SHAPE,
    ConfigError,
    HeadSpec,
    ModelInfo,
    SparseConfig,
    check_min_seq_len,
    check_unit,
    load_config,
)
from .dense import load_flash_attn
from .devices import DENSE_BACKENDS
from .dispatch import ATTN_NAME, sparse_prefill_attention
from .layout import lower_right_mask
from .parallel import head_shard
from .patches import adapter_for
from .plan import LayerPlan
from .report import last_report, report_json
from .state import LAYERS, MODELS, LayerState, Patched, PatchState

MODES = ("config", "adaptive")

__all__ = [
    "is_patched",
    "last_report",
    "patch_model",
    "patch_module",
    "pick_shipped_config",
    "report_json",
    "resolve_config",
    "unpatch_model",
    "unpatch_module",
]

logger = logging.getLogger("sparse_prefill")


def register_attention(name: str, attention, mask) -> None:
    """Register ``attention`` (transformers' ``AttentionInterface`` signature) and its mask function under ``name``,
    for ``model.set_attn_implementation(name)``. Without a mask function of its own name, transformers would build no
    padding mask for the implementation."""
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, mask)


def _register() -> None:
    register_attention(ATTN_NAME, sparse_prefill_attention, lower_right_mask)


def shipped_configs() -> list[Path]:
    """The JSON configs installed with the package."""
    return sorted(Path(str(p)) for p in resources.files("sparse_prefill.configs").iterdir() if p.name.endswith(".json"))


def pick_shipped_config(info: ModelInfo) -> tuple[SparseConfig | None, str]:
    """The shipped config for a model, and why it was picked.

    First by hub id: the model's name (the basename of its ``_name_or_path``: a hub id with or without its org, or a
    local folder named after the repository) equals, ignoring case, the repository name of one of a config's
    ``model.hub_ids``. Else by shape: the one config made for this model type and shape, if exactly one is.

    Returns:
        (config, reason), or (None, reason) when no config (or more than one by shape) fits.
    Raises:
        ConfigError: a config picked by hub id was made for another shape; the message names the config, the id and
        the mismatch.
    """
    models = {path: json.loads(path.read_text()).get("model", {}) for path in shipped_configs()}
    name = info.name.lower()
    for path, model in models.items():
        hub_id = next((i for i in model.get("hub_ids", []) if i.rsplit("/", 1)[-1].lower() == name), None)
        if hub_id is not None:
            config = load_config(path)
            try:
                config.check_model(info)
            except ConfigError as e:
                raise ConfigError(f"{path.name} (picked by hub id {hub_id!r} for {info.name!r}): {e}") from e
            return config, f"by hub id: {info.name!r} is {hub_id!r} ({path.name})"
    by_shape = [path for path, model in models.items() if all(model.get(k) == getattr(info, k) for k in SHAPE)]
    shape = ", ".join(f"{k} {getattr(info, k)}" for k in SHAPE)
    if len(by_shape) == 1:
        return load_config(by_shape[0]), f"by shape: {by_shape[0].name} is the only shipped config for {shape}"
    if by_shape:
        names = ", ".join(p.name for p in by_shape)
        return None, f"{len(by_shape)} shipped configs have its shape ({shape}: {names}) and none its hub id"
    return None, f"no shipped config has its hub id or its shape ({shape})"


def find_shipped_config(info: ModelInfo) -> SparseConfig | None:
    """The shipped config :func:`pick_shipped_config` picks for this model, or None."""
    return pick_shipped_config(info)[0]


def config_from(config, info: ModelInfo) -> SparseConfig:
    """A SparseConfig from a path, a dict, a SparseConfig, or None: the shipped config for the model
    (:func:`pick_shipped_config`), else the uncalibrated default. For None, logs (logger ``sparse_prefill``) which
    config was chosen and why at INFO, and warns when it is the default."""
    if config is None:
        picked, reason = pick_shipped_config(info)
        if picked is not None:
            logger.info("sparse_prefill: %s uses the shipped config %r, %s", info.name, picked.model.name, reason)
            return picked
        logger.warning(
            "sparse_prefill: %s uses the default config (%s): vertical-slash on every head at MInference's "
            "uncalibrated budgets, token slashes; calibrate one for this model with `sparse-prefill-calibrate "
            "--model <folder>`",
            info.name,
            reason,
        )
        # Token slashes: on held-out text at 16K, block slashes at these budgets lost top-1 agreement with dense
        # (0.952, KL 0.010) where token slashes kept it (0.995, KL 0.0001); docs/fidelity.md.
        return SparseConfig.uniform(info, "vertical_slash", slash_select="token")
    if isinstance(config, SparseConfig):
        return config
    if isinstance(config, dict):
        return SparseConfig.from_dict(config)
    if isinstance(config, (str, Path)):
        return load_config(config)
    raise TypeError(f"config: expected a path, dict, SparseConfig or None, got {type(config).__name__}")


def patch_model(
    model,
    config: str | Path | dict | SparseConfig | None = None,
    *,
    mode: str = "config",
    gamma: float | None = None,
    tau: float | None = None,
    slash_select: str | None = None,
    min_seq_len: int | str | None = None,
    backend: str = "auto",
    dense_backend: str = "auto",
    force: bool = False,
) -> SparseConfig:
    """Make ``model``'s prefill attention sparse, per head, through transformers' attention interface.

    Args:
        model: a transformers causal LM of a supported type (``llama``, ``mistral``, ``phi3``, ``qwen2``, ``qwen3``,
            ``glm``).
            A sliding-window layer runs dense on prompts longer than its window.
        config: a JSON path, a dict in the same schema, a :class:`SparseConfig`, or None: the shipped config for this
            model if there is one (by hub id, else by shape when exactly one fits: :func:`pick_shipped_config`; an
            INFO line on logger ``sparse_prefill`` says which and why), else vertical-slash on every head at
            MInference's budgets (1000 columns, 6096 diagonals, 64 estimation queries), with one warning. Must be
            None with ``mode="adaptive"``.
        mode: ``"config"`` (the patterns of ``config``) or ``"adaptive"``: no config, every head adaptive
            (:mod:`sparse_prefill.plan.adaptive`: each call chooses vertical-slash, query-aware block-sparse or dense
            per sample and head, with budgets set by attention mass), so any supported model works without
            calibration.
        gamma: the attention mass adaptive heads' sets must reach, in (0, 1] (default 0.9). Overrides the config's
            value on every adaptive head; an error if there is none.
        tau: adaptive heads go query-aware block-sparse when sqrt(JS) of the pooled estimate is below it, in [0, 1]
            (default 0.1; 0 = never). Overrides like ``gamma``.
        slash_select: ``"token"`` or ``"block"``, set on every vertical-slash head (an error if there is none).
            ``"token"`` keeps MInference's top diagonals (the converted real-model configs' choice); ``"block"``
            spends the same budget on whole block diagonals: at the Llama-3.1-8B config's budgets on the H200 at
            128K, 2.4x faster with less attention recall (benchmarks/results/bench_layer_llama31_8b_config_h200.md).
        min_seq_len: prompts with fewer keys than this run dense. None: the config's ``min_seq_len``, whose
            default ``"auto"`` is the crossover measured for the call's device class and head_dim
            (``sparse_prefill.devices.MIN_SEQ_LEN``; 65536 where nothing was measured, the CPU included).
            An integer overrides it; 0 forces the sparse path on any prefill.
        backend: ``"auto"`` (Triton kernel on CUDA, torch elsewhere), ``"triton"`` or ``"torch"``.
        dense_backend: the kernel of dense calls (short prompts, all-dense layers, unsupported inputs): ``"auto"``
            (SDPA with cuDNN first, or flash-attn where ``sparse_prefill.devices.DENSE_BACKEND`` says it measured
            faster and it is installed), ``"sdpa"``, or ``"flash_attn"`` (needs ``pip install
            'sparse-prefill[flash]'``; inputs it cannot run, such as padding masks, stay on SDPA with one warning).
        force: patch a model type without an adapter, assuming the Llama layout.
    Returns:
        The config in use.
    Raises:
        ValueError: a bad argument, named in the message (ConfigError for a bad gamma or tau), or a tensor-parallel
        split that does not map to whole heads. ConfigError: the config is invalid or made for another shape.
        UnsupportedModelError: unknown model type. ImportError: ``dense_backend="flash_attn"`` without flash-attn.
        In every case the model is left as it was.

    Decode steps (one query) always take the stock SDPA path. Patching again replaces the config; ``unpatch_model``
    restores the implementation the model had before the first patch.

    Split models: under accelerate's ``device_map`` (offload included) every layer runs on its own device. Under
    transformers' tensor parallelism (``tp_plan``) each rank holds a slice of the heads and gets the specs of its
    global heads (:mod:`sparse_prefill.parallel`); patch on every rank, with the same config.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: must be one of {BACKENDS}, got {backend!r}")
    if min_seq_len is not None:
        check_min_seq_len(min_seq_len, "min_seq_len")
    if dense_backend not in DENSE_BACKENDS:
        raise ValueError(f"dense_backend: must be one of {DENSE_BACKENDS}, got {dense_backend!r}")
    if dense_backend == "flash_attn":
        load_flash_attn()
    adapter = adapter_for(model, force)
    info = adapter.model_info(model)
    cfg = _resolve(info, config, mode, gamma, tau, slash_select)
    modules = adapter.attention_modules(model)
    shards = [head_shard(*adapter.head_projections(module), info) for module in modules]

    _register()
    before = MODELS.get(model)
    previous = before.previous if before else model.config._attn_implementation
    if before:
        _release(before)
    state = PatchState(
        min_seq_len=cfg.min_seq_len if min_seq_len is None else min_seq_len,
        backend=backend,
        tp_group=shards[0].group if shards else None,
        dense_backend=dense_backend,
    )
    plans: dict[str, LayerPlan] = {}  # layers with the same head specs share a plan, and so its cached indices
    for layer, (module, shard) in enumerate(zip(modules, shards)):
        heads = cfg.layers[layer][shard.q_heads.start : shard.q_heads.stop]
        plan = plans.setdefault(json.dumps([h.to_dict() for h in heads]), LayerPlan(heads, state.resources))
        LAYERS[module] = LayerState(layer, plan, state, tuple(shard.q_heads))
    MODELS[model] = Patched(previous, state, modules)
    model.set_attn_implementation(ATTN_NAME)
    return cfg


def resolve_config(
    model,
    config: str | Path | dict | SparseConfig | None = None,
    *,
    mode: str = "config",
    gamma: float | None = None,
    tau: float | None = None,
    slash_select: str | None = None,
    force: bool = False,
) -> SparseConfig:
    """The config :func:`patch_model` would use for ``model`` with these arguments, checked against the model; the
    model is not touched.

    Args and raises: as for :func:`patch_model` (its other arguments do not change the config).
    """
    adapter = adapter_for(model, force)
    return _resolve(adapter.model_info(model), config, mode, gamma, tau, slash_select)


def _resolve(info: ModelInfo, config, mode: str, gamma, tau, slash_select) -> SparseConfig:
    if mode not in MODES:
        raise ValueError(f"mode: must be one of {MODES}, got {mode!r}")
    if mode == "adaptive" and config is not None:
        raise ValueError(
            "config: must be None with mode='adaptive' (every head is adaptive); for a config with "
            "adaptive heads use mode='config'"
        )
    overrides = {name: check_unit(v, name, name) for name, v in (("gamma", gamma), ("tau", tau)) if v is not None}
    if slash_select not in (None, *CHOICES["slash_select"]):
        raise ValueError(f"slash_select: must be one of {CHOICES['slash_select']}, got {slash_select!r}")
    vs_overrides = {} if slash_select is None else {"slash_select": slash_select}
    if mode == "adaptive":
        cfg = SparseConfig.uniform(info, "adaptive", **overrides)
        cfg.provenance = {"tool": "patch_model(mode='adaptive')"}
    else:
        cfg = with_head_params(config_from(config, info), "adaptive", overrides)
    cfg = with_head_params(cfg, "vertical_slash", vs_overrides)
    cfg.check_model(info)
    return cfg


def with_head_params(config: SparseConfig, pattern: str, params: dict) -> SparseConfig:
    """``config`` with ``params`` set on every head of ``pattern`` (the config itself if ``params`` is empty)."""
    if not params:
        return config
    if not any(h.pattern == pattern for heads in config.layers for h in heads):
        raise ValueError(f"{next(iter(params))}: the config has no {pattern} heads to apply it to")
    layers = [
        [HeadSpec(h.pattern, {**h.params, **params}) if h.pattern == pattern else h for h in heads]
        for heads in config.layers
    ]
    return dataclasses.replace(config, layers=layers)


def patch_module(
    module: torch.nn.Module,
    heads: list[HeadSpec],
    *,
    min_seq_len: int | str = 0,
    backend: str = "auto",
    dense_backend: str = "auto",
) -> PatchState:
    """Route one attention module's calls of :func:`~sparse_prefill.dispatch.sparse_prefill_attention` through the
    given head specs (one per query head), as layer 0 of a patch of its own, outside any model (benchmarks of one
    layer). Returns the patch's state: its ``records[0]`` is the module's last call. :func:`unpatch_module` undoes it.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: must be one of {BACKENDS}, got {backend!r}")
    check_min_seq_len(min_seq_len, "min_seq_len")
    unpatch_module(module)
    state = PatchState(min_seq_len=min_seq_len, backend=backend, dense_backend=dense_backend)
    LAYERS[module] = LayerState(0, LayerPlan(heads, state.resources), state, tuple(range(len(heads))))
    return state


def unpatch_module(module: torch.nn.Module) -> None:
    """Undo :func:`patch_module`, releasing what its patch allocated. A no-op if not patched."""
    layer = LAYERS.pop(module, None)
    if layer is not None:
        layer.plan.release()
        layer.patch.resources.release()


def _release(patched: Patched) -> None:
    """Detach a patch from its modules and free what it allocated: cached indices, CUDA graphs, their memory pools and
    workspaces, cached constants."""
    for module in patched.modules:
        layer = LAYERS.pop(module, None)
        if layer is not None:
            layer.plan.release()
    patched.state.resources.release()


def unpatch_model(model) -> None:
    """Restore the attention implementation the model had before :func:`patch_model`, and free everything the patch
    allocated (plans, CUDA graphs and their memory, cached constants). A no-op if not patched."""
    patched = MODELS.pop(model, None)
    if patched is None:
        return
    _release(patched)
    model.set_attn_implementation(patched.previous)


def is_patched(model) -> bool:
    return model in MODELS
