"""The attention function registered with transformers, and its per-call dispatch.

transformers calls ``sparse_prefill_attention(module, query, key, value, attention_mask, ...)`` for every attention
layer of a patched model. It reads the layer's state from ``module`` (set by :func:`sparse_prefill.patch_model`)
and picks one path per call:

* ``decode``: q_len == 1 -> the stock SDPA function, untouched;
* ``dense``: prompt shorter than ``min_seq_len``, every head dense, or an input the sparse path does not compute
  exactly (:mod:`sparse_prefill.layout`: a mask that is not causal + left padding; also dropout, soft-capping,
  non-causal modules, a sliding window shorter than the keys) -> :mod:`sparse_prefill.dense`: SDPA (cuDNN first), or
  flash-attn where :mod:`sparse_prefill.devices` measured it faster (or ``dense_backend="flash_attn"`` asks for it);
* ``sparse``: decide the call's :class:`~sparse_prefill.backend.Backend` once (Triton on CUDA, blockwise torch
  elsewhere, or as ``backend=`` forces), build the index for all heads with it (the layer's
  :class:`~sparse_prefill.plan.LayerPlan`) and run the index on it. Heads that run dense on the input (configured
  dense, or adaptive heads that chose dense for every sample) go to the dense backend instead, which is faster per
  tile than the kernel: the whole call when every head is dense, else those heads next to the Triton kernel (the
  torch path computes them with the sparse heads, in its gathered batches).
"""

from __future__ import annotations

import contextlib

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .backend import Backend
from .dense import dense_attention, dense_heads_into, flash_attention, flash_unsupported
from .index import drop_heads
from .kernels import sparse_attention
from .layout import call_unsupported
from .plan import LayerPlan, PlannedIndex
from .plan.adaptive import DENSE
from .report import LayerRecord
from .state import LAYERS

ATTN_NAME = "sparse_prefill"


def dense_heads(plan: LayerPlan, index: PlannedIndex) -> list[int]:
    """The heads that run dense for every sample of this call: the configured dense heads and the adaptive heads that
    chose dense (read on the host: one synchronisation per call of a layer with adaptive heads)."""
    heads = set(plan.groups.get("dense", ()))
    if index.choice is not None:
        chose = (index.choice == DENSE).all(0).tolist()
        heads.update(h for h, dense in enumerate(chose) if dense)
    return sorted(heads)


def choose_backend(
    requested: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[Backend | None, str]:
    """(the backend of this sparse call, "") or (None, why only dense can run it). Decided once per call: the plan
    and the run both use it."""
    backend = Backend.of(requested, query.device)
    if backend is Backend.TORCH:
        return backend, ""  # torch ops: autograd differentiates it
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return None, "gradients (the Triton kernel has no backward)"
    reason = sparse_attention.supports(query, key)
    return (None, f"the Triton kernel cannot run this input ({reason})") if reason else (backend, "")


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
    layout = call_unsupported(module, kwargs, dropout, kv_len) or patch.layout(
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
    backend, why_not = choose_backend(patch.backend, query, k, v)
    if backend is None:
        record.reason = why_not
        patch.warn_once(f"sparse_prefill: {why_not}; such calls run dense")
        return dense()
    # Triton launches on the current CUDA device: make it this layer's (a model split by device_map spans several).
    with torch.cuda.device(query.device) if query.is_cuda else contextlib.nullcontext():
        index = state.plan.index(query, k, scale, layout.kv_start, backend)
        heads = dense_heads(state.plan, index)
        if len(heads) == query.shape[1]:
            record.reason = "every head dense on this input: the dense backend ran"
            out, _ = dense()
        elif heads and backend is Backend.TRITON:
            dropped = drop_heads(index, patch.resources.const(heads, query.device))
            out = backend.attention(query, k, v, dropped, scale)
            dense_heads_into(out, query, k, v, mask, heads, scale)
        else:
            out = backend.attention(query, k, v, index, scale)
    record.path, record.index = "sparse", index
    record.specs = [h.pattern for h in state.plan.heads]
    return out, None
