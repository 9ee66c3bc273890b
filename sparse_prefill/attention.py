"""The attention function registered with transformers, and its per-call dispatch.

transformers calls ``sparse_prefill_attention(module, query, key, value, attention_mask, ...)`` for every attention
layer of a patched model. It reads the layer's head specs from ``module`` (set by :func:`sparse_prefill.patch_model`)
and picks one path per call:

* ``decode``: q_len == 1 -> the stock SDPA function, untouched;
* ``dense``: prompt shorter than ``min_seq_len``, every head dense, or an input the sparse path does not compute
  exactly (:mod:`sparse_prefill.layout`: a mask that is not causal + left padding; also dropout, soft-capping,
  non-causal modules, a sliding window shorter than the keys) -> SDPA
  (cuDNN first), or flash-attn where :mod:`sparse_prefill.devices` measured it faster (or
  ``dense_backend="flash_attn"`` asks for it);
* ``sparse``: build the index for all heads (:func:`~sparse_prefill.estimate.build_index`) and run it on one backend:
  the Triton kernel on CUDA, the blockwise torch path elsewhere. Heads that run dense on the input (configured dense,
  or adaptive heads that chose dense for every sample) go to the dense backend instead, which is faster per tile
  than the kernel: the whole call when every head is dense, else those heads next to the kernel (on CUDA; the torch
  path computes them with the sparse heads, in its gathered batches).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .adaptive import CHOICES, DENSE
from .config import AUTO
from .devices import dense_backend_for, device_class, load_flash_attn, min_seq_len_for
from .estimate import LayerPlan, const
from .index import SparseIndex, drop_heads, tile_density
from .layout import KeyLayout, read_layout
from .reference import sparse_attention_torch

logger = logging.getLogger("sparse_prefill")

ATTN_NAME = "sparse_prefill"
# Fastest first: cuDNN is the fastest dense kernel on Hopper; SDPA skips the ones that cannot take the input.
_DENSE_BACKENDS = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


@dataclass
class LayerRecord:
    """What one layer did on its last call. ``heads`` gives the global id of each head (this rank's slice under tensor
    parallelism); ``specs``, ``patterns``, ``choices`` and ``density`` follow its order. ``density`` and ``choices``
    are per (sample, head) and computed when first read (so the forward never waits for them)."""

    layer: int
    path: str
    heads: tuple[int, ...] = ()
    reason: str = ""
    specs: list[str] = field(default_factory=list)  # each head's configured pattern (sparse path only)
    q_len: int = 0
    kv_len: int = 0
    index: SparseIndex | None = None
    _density: torch.Tensor | None = None
    _choices: list[list[str]] | None = None

    @property
    def density(self) -> list[list[float]] | None:
        """Per sample and head: computed BLOCK×BLOCK tiles over causal tiles (1.0 on the dense path)."""
        if self.index is None:
            return None
        if self._density is None:
            self._density = tile_density(self.index).cpu()
        return self._density.tolist()

    @property
    def choices(self) -> list[list[str]] | None:
        """Per sample and head, the pattern that ran: the configured one, or ``adaptive:<pattern>`` for an adaptive
        head (``adaptive:vertical_slash``, ``adaptive:block_sparse`` or ``adaptive:dense``). None on the dense path."""
        if self.index is None:
            return None
        if self._choices is None:
            B = self.index.diag_mask.shape[0]
            codes = self.index.choice.tolist() if self.index.choice is not None else [[-1] * len(self.specs)] * B
            self._choices = [
                [f"adaptive:{CHOICES[c]}" if c >= 0 else p for p, c in zip(self.specs, row)] for row in codes
            ]
        return self._choices

    @property
    def patterns(self) -> list[str]:
        """Per head, the pattern that ran (an adaptive head's choices per sample joined by ``,`` where samples
        differ, e.g. ``adaptive:vertical_slash,adaptive:dense``); empty on the dense path."""
        if self.choices is None:
            return []
        return [",".join(dict.fromkeys(per_sample)) for per_sample in zip(*self.choices)]

    def to_dict(self) -> dict:
        """JSON-ready: layer, path, reason, heads (global ids), patterns, choices and density, aligned with heads."""
        fields = ("layer", "path", "reason", "patterns", "choices", "density")
        return {"heads": list(self.heads), **{name: getattr(self, name) for name in fields}}


@dataclass
class PatchState:
    """Shared by the layers of one patched model."""

    min_seq_len: int | str  # an integer, or "auto": the measured crossover of the call's device and head_dim
    backend: str
    dense_backend: str = "auto"
    records: dict[int, LayerRecord] = field(default_factory=dict)
    warned: set[str] = field(default_factory=set)
    tp_group: object = None  # the tensor-parallel process group this rank shares the heads in; None: unsharded
    _layouts: dict = field(default_factory=dict)  # this forward's masks (by identity) -> their layout
    _resolved: dict = field(default_factory=dict)

    def warn_once(self, message: str) -> None:
        if message not in self.warned:
            self.warned.add(message)
            logger.warning(message)

    def resolved(self, query: torch.Tensor) -> tuple[int, str, str]:
        """(min_seq_len, where it came from, dense backend) for the device and head_dim of ``query``; looked up once
        per (device, head_dim)."""
        key = (query.device, query.shape[-1])
        if key not in self._resolved:
            dev_class = device_class(query.device)
            if self.min_seq_len == AUTO:
                min_len, source = min_seq_len_for(dev_class, query.shape[-1])
            else:
                min_len, source = self.min_seq_len, "set"
            self._resolved[key] = (min_len, source, dense_backend_for(self.dense_backend, dev_class, query.shape[-1]))
        return self._resolved[key]

    def layout(self, mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int) -> KeyLayout | str:
        """:func:`~sparse_prefill.layout.read_layout` of this call. Every layer of a forward gets the same mask tensor,
        so it is read once per forward: remembered by identity until the first layer's next call
        (:meth:`forward_starts`), never across forwards (a mask buffer can be rewritten in place between them)."""
        if mask is None:
            return read_layout(None, batch, q_len, kv_len)
        key = (id(mask), batch, q_len, kv_len)
        seen = self._layouts.get(key)
        if seen is None or seen[0]() is not mask:
            seen = self._layouts[key] = (weakref.ref(mask), read_layout(mask, batch, q_len, kv_len))
        return seen[1]

    def forward_starts(self) -> None:
        self._layouts.clear()


@dataclass
class LayerState:
    layer: int
    plan: LayerPlan  # the specs of the heads this process holds
    patch: PatchState
    heads: tuple[int, ...]  # their global ids

    @property
    def all_dense(self) -> bool:
        return set(self.plan.groups) == {"dense"}


# Attention module -> its layer's state. Weak keys: a model that is deleted takes its entries with it.
LAYERS: weakref.WeakKeyDictionary[torch.nn.Module, LayerState] = weakref.WeakKeyDictionary()


def _fastest_first(query: torch.Tensor):
    return sdpa_kernel(_DENSE_BACKENDS, set_priority=True) if query.is_cuda else contextlib.nullcontext()


def dense_attention(module, query, key, value, attention_mask, **kwargs):
    """Stock SDPA, with the fastest backend first on CUDA."""
    with _fastest_first(query):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def dense_heads(plan: LayerPlan, index: SparseIndex) -> list[int]:
    """The heads that run dense for every sample of this call: the configured dense heads and the adaptive heads that
    chose dense (read on the host: one synchronisation per call of a layer with adaptive heads)."""
    heads = set(plan.groups.get("dense", ()))
    if index.choice is not None:
        chose = (index.choice == DENSE).all(0).tolist()
        heads.update(h for h, dense in enumerate(chose) if dense)
    return sorted(heads)


def dense_heads_into(
    out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    heads: list[int],
    scale: float,
) -> None:
    """Dense attention of some query heads by SDPA (fastest backend first), written into their slots of ``out``.

    Args:
        out: [B, q_len, Hq, D], the other heads' output. query, key, value: as for
            :func:`sparse_prefill_attention`. attention_mask: its mask (a tensor or a lower-right ``CausalBias``), or
            None for bottom-right causal attention (the queries are the last q_len positions, as in the index).
            heads: ascending query heads.
    One SDPA call per KV head over its selected query heads, so K/V are never repeated.
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    mask, causal = attention_mask, attention_mask is None
    if causal and q_len != kv_len:  # is_causal aligns top-left
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        causal = False
    group = query.shape[1] // key.shape[1]
    with _fastest_first(query):
        for kv, run in itertools.groupby(heads, lambda h: h // group):
            run = list(run)
            rows = slice(run[0], run[-1] + 1) if run[-1] - run[0] + 1 == len(run) else run  # a view when it can be
            o = F.scaled_dot_product_attention(
                query[:, rows],
                key[:, kv : kv + 1],
                value[:, kv : kv + 1],
                attn_mask=mask,
                is_causal=causal,
                scale=scale,
                enable_gqa=True,
            )
            out[:, :, rows] = o.transpose(1, 2)


def flash_unsupported(query, key, attention_mask, kwargs: dict) -> str:
    """Why flash-attn cannot run this dense call ("" when it can). It runs causal prefill without a mask only: a
    padding mask or q_len != kv_len stays on SDPA, which reads the mask transformers built."""
    if not query.is_cuda:
        return "not a CUDA tensor"
    if query.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {query.dtype}"
    if attention_mask is not None:
        return "an attention mask"
    if query.shape[2] != key.shape[2]:
        return "q_len != kv_len"
    if query.shape[-1] > 256:
        return f"head_dim {query.shape[-1]}"
    return _unsupported(None, kwargs, 0.0, key.shape[2])


def flash_attention(query, key, value, dropout: float, scaling: float) -> tuple[torch.Tensor, None]:
    """Causal attention with flash-attn's ``flash_attn_func`` (GQA-native): query [B, Hq, S, D], key/value
    [B, Hkv, S, D] -> ([B, S, Hq, D], None), the layout transformers expects."""
    out = load_flash_attn()(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        dropout_p=dropout,
        softmax_scale=scaling,
        causal=True,
    )
    return out, None


def _unsupported(module, kwargs: dict, dropout: float, kv_len: int) -> str:
    """What of this call the causal patterns cannot express ("" when nothing)."""
    if dropout:
        return "dropout"
    if kwargs.get("is_causal") is False or not getattr(module, "is_causal", True):
        return "non-causal attention"
    window = kwargs.get("sliding_window")
    if window is not None and kv_len > window:  # up to its length the band is the causal mask: sparse runs exactly
        return f"a sliding window ({window} keys) shorter than the keys"
    for name in ("softcap", "position_bias", "cache"):
        if kwargs.get(name) is not None:
            return name
    return ""


def sparse_prefill_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function (``AttentionInterface``) with per-head sparse prefill.

    Args:
        module: the attention module; its patched state says the layer's head specs.
        query: [B, Hq, q_len, D] after RoPE. key, value: [B, Hkv, kv_len, D], the whole cache, not repeated.
        attention_mask: None (causal, top-left aligned as SDPA's ``is_causal``), a lower-right ``CausalBias``
            (chunked prefill: :func:`~sparse_prefill.layout.lower_right_mask`) or a 4D mask, bool (True = attend) or
            float (additive); :func:`~sparse_prefill.layout.read_layout` decides whether the sparse path runs it.
        dropout, scaling: as for SDPA; the sparse path needs ``dropout == 0``.
    Returns:
        ([B, q_len, Hq, D] contiguous, None).
    """
    state = LAYERS.get(module)
    q_len, kv_len = query.shape[2], key.shape[2]
    if state is None or q_len == 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.shape[1] != len(state.heads):
        raise ValueError(
            f"layer {state.layer}: the attention call has {query.shape[1]} query heads, but the patch holds "
            f"{len(state.heads)} (global heads {state.heads[0]}..{state.heads[-1]}); the model was split or reshaped "
            "after patch_model: patch it again"
        )
    patch = state.patch
    if state.layer == 0:  # a forward starts (patch_model numbers the layers from 0)
        patch.forward_starts()
    record = LayerRecord(state.layer, "dense", state.heads, q_len=q_len, kv_len=kv_len)
    patch.records[state.layer] = record
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    dense = lambda: dense_attention(  # noqa: E731
        module, query, key, value, attention_mask, dropout=dropout, scaling=scale, **kwargs
    )
    min_seq_len, source, dense_backend = patch.resolved(query)
    if dense_backend == "flash_attn":
        if reason := flash_unsupported(query, key, attention_mask, kwargs):
            if patch.dense_backend == "flash_attn":
                patch.warn_once(f"sparse_prefill: flash-attn cannot run this input ({reason}); dense calls use SDPA")
        else:
            dense = lambda: flash_attention(query, key, value, dropout, scale)  # noqa: E731
    if state.all_dense:
        record.reason = "all heads dense"
        return dense()

    def too_short(n: int) -> bool:
        if n < min_seq_len:
            record.reason = f"kv_len {n} < min_seq_len {min_seq_len} ({source})"
        return n < min_seq_len

    if too_short(kv_len):  # the keys attended are at most the cache's: no need to read the mask of a short prompt
        return dense()
    layout = _unsupported(module, kwargs, dropout, kv_len) or patch.layout(
        attention_mask, query.shape[0], q_len, kv_len
    )
    if isinstance(layout, str):
        record.reason = f"{layout} is not supported by the sparse path"
        patch.warn_once(f"sparse_prefill: {record.reason}; such calls run dense")
        return dense()
    # Keys past the layout's are never attended (an empty static cache's slots): the sparse path does not see them.
    record.kv_len = kv_len = layout.kv_len
    k, v = key[:, :, :kv_len], value[:, :, :kv_len]
    mask = attention_mask if attention_mask is None or kv_len == key.shape[2] else attention_mask[..., :kv_len]
    if too_short(kv_len):
        return dense()
    run, why_not = _backend(patch, query, k, v)
    if run is None:
        record.reason = why_not
        patch.warn_once(f"sparse_prefill: {why_not}; such calls run dense")
        return dense()
    # Triton launches on the current CUDA device: make it this layer's (a model split by device_map spans several).
    with torch.cuda.device(query.device) if query.is_cuda else contextlib.nullcontext():
        index = state.plan.index(query, k, scale, layout.kv_start)
        heads = dense_heads(state.plan, index)
        if len(heads) == query.shape[1]:
            record.reason = "every head dense on this input: the dense backend ran"
            out, _ = dense()
        elif heads and run is not sparse_attention_torch:
            out = run(query, k, v, drop_heads(index, const(heads, query.device)), scale)
            dense_heads_into(out, query, k, v, mask, heads, scale)
        else:
            out = run(query, k, v, index, scale)
    record.path, record.index = "sparse", index
    record.specs = [h.pattern for h in state.plan.heads]
    return out, None


def _backend(patch: PatchState, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """(the sparse runner for this input, "") or (None, why only dense can run it)."""
    if patch.backend == "torch" or (patch.backend == "auto" and not query.is_cuda):
        return sparse_attention_torch, ""  # torch ops: autograd differentiates it
    from .kernels import sparse_attention_triton, supports

    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return None, "gradients (the Triton kernel has no backward)"
    reason = supports(query, key)
    return (None, f"the Triton kernel cannot run this input ({reason})") if reason else (sparse_attention_triton, "")
