"""Which keys an attention call attends to, read from what transformers passed: the calls the sparse path computes
exactly as stock SDPA would.

The sparse path computes bottom-right causal attention over each sample's valid keys (:mod:`sparse_prefill.index`).
A call is that, and so runs sparse, when its mask says so row by row:

* no mask: stock SDPA runs ``is_causal=True``, whose alignment is top-left: query ``i`` sees keys ``0..i``. With as
  many keys as queries that is bottom-right causal; with more (an empty static cache, whose keys span the whole
  cache) the keys past ``q_len`` are never seen, so the call is bottom-right causal over the first ``q_len`` keys.
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
        mask: what transformers passed as ``attention_mask``: None, or a 4D bool / float mask.
        batch, q_len, kv_len: the call's batch size and query and key lengths (keys: the whole cache).
    Returns:
        A :class:`KeyLayout`, or a reason ("a prefix-LM or packed mask ..."), for the record and the warning.
    Reads the mask once on the device and synchronises once.
    """
    if mask is None:
        return KeyLayout([0] * batch, q_len)
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
