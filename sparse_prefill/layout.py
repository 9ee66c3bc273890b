"""Which keys an attention call attends to, read from what transformers passed: the calls the sparse path computes
exactly as stock SDPA would.

The sparse path computes bottom-right causal attention over each sample's valid keys (:mod:`sparse_prefill.index`).
A call is that, and so runs sparse, when its mask says so row by row:

* no mask: stock SDPA runs ``is_causal=True``, whose alignment is top-left: query ``i`` sees keys ``0..i``. With as
  many keys as queries that is bottom-right causal; with more (an empty static cache, whose keys span the whole
  cache) the keys past ``q_len`` are never seen, so the call is bottom-right causal over the first ``q_len`` keys.
* a lower-right :class:`~torch.nn.attention.bias.CausalBias` of ``(q_len, kv_len)``: what :func:`lower_right_mask`
  gives a chunked-prefill call without padding, instead of a ``q_len x kv_len`` tensor (16 GiB for a 16K chunk over
  1M keys);
* a 4D mask ``[B or 1, 1, q_len, kv_len]``, bool (True = attend) or float (0 = attend, ``-inf`` or the dtype's
  minimum = masked, as transformers builds them), in which every sample's valid query rows are exactly
  "keys ``kv_start[b]`` up to the row's own position", for one position of the last row shared by the batch: causal
  with left padding, chunked prefill (the queries are the last positions of the cache) and a static cache's empty
  slots after them. Padding query rows (before ``kv_start[b]``) must see no key, or every key (older transformers
  unmasked such rows).

Anything else (prefix-LM or packed-documents masks, right padding, holes, float masks carrying biases, per-head
masks) is not a :class:`KeyLayout` but a reason, and the call runs dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention.bias import CausalBias, CausalVariant, causal_lower_right
from transformers.masking_utils import causal_mask_function, sdpa_mask

# Row chunks of the mask are read at most this many elements at a time: the temporaries stay small even for a
# [B, 1, S, S] mask at 128K.
_CHUNK_ELEMS = 1 << 24


@dataclass(frozen=True)
class KeyLayout:
    """A call the sparse path runs exactly: sample ``b`` attends to keys ``kv_start[b] .. kv_len - 1`` of the first
    ``kv_len`` keys of the cache (later ones are never attended), and query row ``i`` sits at key position
    ``kv_len - q_len + i`` (bottom-right causal)."""

    kv_start: list[int]
    kv_len: int


def read_layout(mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int) -> KeyLayout | str:
    """The call's :class:`KeyLayout`, or why the sparse path cannot run it exactly.

    Args:
        mask: what transformers passed as ``attention_mask``: None, a lower-right ``CausalBias``, or a 4D bool /
            float mask.
        batch, q_len, kv_len: the call's batch size and query and key lengths (keys: the whole cache).
    Returns:
        A :class:`KeyLayout`, or a reason ("a prefix-LM or packed mask ..."), for the record and the warning.
    Reads the mask once on the device and synchronises once.
    """
    if mask is None:
        return KeyLayout([0] * batch, q_len)
    if isinstance(mask, CausalBias):
        if mask.variant == CausalVariant.LOWER_RIGHT and (mask.seq_len_q, mask.seq_len_kv) == (q_len, kv_len):
            return KeyLayout([0] * batch, kv_len)
        return f"a {mask.variant.name} causal bias of {mask.seq_len_q} x {mask.seq_len_kv} for {q_len} x {kv_len}"
    if not isinstance(mask, torch.Tensor):
        return f"an attention mask of type {type(mask).__name__}"
    if mask.dim() != 4:
        return f"a {mask.dim()}D attention mask"
    if mask.shape[1] != 1 or mask.shape[0] not in (1, batch) or tuple(mask.shape[2:]) != (q_len, kv_len):
        return f"an attention mask of shape {tuple(mask.shape)} for {batch} samples, {q_len} queries, {kv_len} keys"
    if mask.dtype != torch.bool and not mask.is_floating_point():
        return f"an attention mask of dtype {mask.dtype}"
    first, last, count, exact = _row_extents(mask[:, 0])
    first, last, count = (t.expand(batch, -1) for t in (first, last, count))
    start, end = first[:, -1], last[:, -1] + 1  # the last query row sees every valid key
    pos = end[:, None] - q_len + torch.arange(q_len, device=mask.device)  # [B, q] key position of each query row
    valid = pos >= start[:, None]
    rows_ok = torch.where(
        valid,
        (first == start[:, None]) & (last == pos) & (count == pos - start[:, None] + 1),
        (count == 0) | (count == kv_len),
    )
    ok = rows_ok.all() & (count[:, -1] > 0).all() & (end == end[0]).all() & (end[0] >= q_len)
    *kv_start, kv_end, fine, no_bias = torch.cat([start, end[:1], ok[None].long(), exact[None].long()]).tolist()
    if not no_bias:
        return "a float attention mask with values other than 0 and -inf (a bias)"
    if not fine:
        return "an attention mask that is not causal with left padding (prefix-LM, packed documents, right padding?)"
    return KeyLayout(kv_start, kv_end)


def _row_extents(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[b, q, kv] mask -> per row the first and last attended key and how many keys it attends ([b, q] int64 each;
    meaningless first and last for a row with none), and whether a float mask held only 0 and masked values (a bool
    tensor: read with the rest, in one synchronisation)."""
    b, q, kv = mask.shape
    first = torch.empty(b, q, dtype=torch.long, device=mask.device)
    last, count = torch.empty_like(first), torch.empty_like(first)
    exact = torch.ones((), dtype=torch.bool, device=mask.device)
    step = max(1, _CHUNK_ELEMS // max(1, b * kv))
    for r0 in range(0, q, step):
        rows = mask[:, r0 : r0 + step]
        if rows.dtype != torch.bool:
            attend = rows == 0
            exact &= (attend | (rows <= torch.finfo(rows.dtype).min / 2)).all()
            rows = attend
        as_bytes = rows.contiguous().view(torch.uint8)
        first[:, r0 : r0 + step] = as_bytes.argmax(-1)
        last[:, r0 : r0 + step] = kv - 1 - as_bytes.flip(-1).argmax(-1)
        count[:, r0 : r0 + step] = as_bytes.sum(-1)
    return first, last, count, exact


def lower_right_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    allow_is_causal_skip: bool = True,
    use_vmap: bool = False,
    **kwargs,
):
    """The mask function patched models register (``AttentionMaskInterface``): transformers' ``sdpa_mask``, except
    for a call that appends ``q_length > 1`` queries to a cache it fills exactly (chunked prefill: ``q_offset +
    q_length == kv_length > q_length``) with plain causal attention and no padding, which gets
    ``causal_lower_right(q_length, kv_length)`` instead of a ``[B, 1, q_length, kv_length]`` bool tensor.

    The two mean the same: query ``i`` attends to keys ``0 .. kv_length - q_length + i``. SDPA takes the
    ``CausalBias`` as ``attn_mask`` (flash or memory-efficient attention with bottom-right alignment, else its
    materialised mask), and :func:`read_layout` reads it without scanning anything. Arguments as ``sdpa_mask``'s;
    anything else (padding, a static cache's offsets, overlays of other mask functions, tracing) is ``sdpa_mask``'s.
    """
    plain = (
        allow_is_causal_skip
        and not use_vmap
        and mask_function is causal_mask_function
        and isinstance(q_offset, int)
        and kv_offset == 0
        and 1 < q_length < kv_length == q_offset + q_length
        and not torch.compiler.is_compiling()
        and (attention_mask is None or (attention_mask.shape[-1] == kv_length and bool(attention_mask.all())))
    )
    if plain:
        return _lower_right(q_length, kv_length)
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        allow_is_causal_skip=allow_is_causal_skip,
        use_vmap=use_vmap,
        **kwargs,
    )


def _lower_right(q_len: int, kv_len: int) -> CausalBias:
    """``causal_lower_right(q_len, kv_len)`` without its storage: ``CausalBias`` is a tensor subclass whose
    constructor allocates an uninitialised float32 tensor of shape ``[2, q_len, kv_len]`` on the host (its arguments
    read as a size), 128 GiB of address space for a 16K chunk over 1M keys, which the host may refuse."""
    bias = causal_lower_right(0, 0)
    bias.seq_len_q, bias.seq_len_kv = q_len, kv_len
    return bias


def call_unsupported(module, kwargs: dict, dropout: float, kv_len: int) -> str:
    """What of an attention call (its module, its keyword arguments, dropout, kv_len) the causal kernels, sparse
    or flash-attn, cannot express: "" when nothing."""
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
