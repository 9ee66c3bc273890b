"""The sparse index: which keys each query block of each head attends to.

Built once per layer call by :mod:`sparse_prefill.plan` and read by every backend (the fp32 reference, the
blockwise torch path and the Triton kernels), so all of them compute exactly the same set of (query, key) pairs.

Frames. Sample ``b`` has valid keys ``kv_start[b] .. kv_len - 1`` (left padding before that). Positions are
*local*: key ``c`` is tensor column ``kv_start[b] + c``. The queries are the last ``q_len`` keys' positions
(bottom-right causal alignment, as in chunked prefill)::

    q_len=2, kv_len=5, no padding: query 0 sees keys 0..3, query 1 sees keys 0..4
        1 1 1 1 0
        1 1 1 1 1

Query rows before the sample's first valid position are padding; the valid ones are split into blocks of
``BLOCK`` rows from the first valid row on, exactly as a run on the unpadded sample would split them. Key blocks are
``BLOCK`` local columns each.

Three ways a head names its keys; a head uses the first two, or the third alone (a pair named twice would count
twice in a kernel):

* ``diag_mask[b, h, d]``: block diagonal ``d`` is on. Query block ``m`` then computes key block ``base(m) - d``, where
  ``base(m)`` is the key block holding block ``m``'s nominal last row (vertical-slash, A-shape and dense heads).
* ``col_idx[b, h, :col_cnt[b, h]]``: single key columns, ascending; each query attends to those not after it
  (vertical-slash and A-shape heads). A column in a block already computed through ``diag_mask`` counts once.
* ``blk_idx[b, h, m, :blk_cnt[b, h, m]]``: key blocks for query block ``m``, ascending (block-sparse heads).

Memory is O(B·H·(N + V) + B·H·M·K) for N key blocks, V columns and K blocks per row: no S×S and no S×slash buffer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .ops import cdiv, positions

BLOCK = 64  # rows of a query block and keys of a key block: the kernels' tile


@dataclass
class SparseIndex:
    """Per-layer index in the kernels' format. All integer tensors are int32 on the device of q/k/v.

    Attributes:
        q_len, kv_len: tensor lengths of the queries and keys (``q_len <= kv_len``).
        kv_start: [B] first valid key column of each sample (0 without padding).
        diag_mask: [B, H, N] bool, block diagonals that are on; ``N = cdiv(kv_len, BLOCK)``.
        diag_idx: [B, H, N] the on diagonals ascending, then padding; ``diag_cnt``: [B, H] how many are on.
        col_idx: [B, H, V] local key columns ascending, then padding; ``col_cnt``: [B, H].
        col_row_cnt: [B, H, M] how many of ``col_idx`` a query block can see (columns ``<=`` its last row).
        blk_idx: [B, H, M, K] key blocks ascending, then padding; ``blk_cnt``: [B, H, M]. K may be 0.
    """

    q_len: int
    kv_len: int
    kv_start: torch.Tensor
    diag_mask: torch.Tensor
    diag_idx: torch.Tensor
    diag_cnt: torch.Tensor
    col_idx: torch.Tensor
    col_cnt: torch.Tensor
    col_row_cnt: torch.Tensor
    blk_idx: torch.Tensor
    blk_cnt: torch.Tensor

    def clone(self) -> SparseIndex:
        tensors = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **{k: v.clone() for k, v in tensors.items() if isinstance(v, torch.Tensor)})

    @property
    def num_q_blocks(self) -> int:
        return cdiv(self.q_len, BLOCK)

    @property
    def num_k_blocks(self) -> int:
        return cdiv(self.kv_len, BLOCK)


def drop_heads(index: SparseIndex, heads: torch.Tensor) -> SparseIndex:
    """The index with nothing to compute for ``heads`` (int64 [n] on its device): their output rows come out zero,
    for heads that are computed elsewhere."""
    clear = lambda t: t.index_fill(1, heads, 0)  # noqa: E731
    return dataclasses.replace(
        index,
        diag_mask=clear(index.diag_mask),
        diag_cnt=clear(index.diag_cnt),
        col_cnt=clear(index.col_cnt),
        col_row_cnt=clear(index.col_row_cnt),
        blk_cnt=clear(index.blk_cnt),
    )


def query_offsets(q_len: int, kv_len: int, kv_start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: the first valid query row and its local position. Both [B] int64."""
    first_pos = kv_len - q_len - kv_start.long()
    q_start = (-first_pos).clamp(min=0)
    return q_start, first_pos.clamp(min=0)


def block_bases(q_len: int, kv_len: int, kv_start: torch.Tensor) -> torch.Tensor:
    """[B, M] the key block holding query block m's nominal last row (``base(m)`` in the module docstring)."""
    _, off = query_offsets(q_len, kv_len, kv_start)
    m = torch.arange(cdiv(q_len, BLOCK), device=kv_start.device)
    return (off[:, None] + m[None, :] * BLOCK + BLOCK - 1) // BLOCK


def slash_diagonals(slash: torch.Tensor, q_len: int, kv_len: int, kv_start: torch.Tensor) -> torch.Tensor:
    """Block diagonals that cover the slash offsets (query position - key position).

    Args:
        slash: [B, H, S] int64 offsets ``>= 0``; entries ``< 0`` are ignored.
    Returns:
        [B, H, N] bool diagonal mask. A slash at offset s, seen from a query block starting at local row p0, spans keys
        ``p0 - s .. p0 + 63 - s``: at most two key blocks, whose distance to ``base(m)`` does not depend on m.
    """
    B, H, _ = slash.shape
    n = cdiv(kv_len, BLOCK)
    _, off = query_offsets(q_len, kv_len, kv_start)
    r = (off % BLOCK)[:, None, None]
    top = (r + BLOCK - 1) // BLOCK
    near = top - torch.div(r + BLOCK - 1 - slash, BLOCK, rounding_mode="floor")
    far = top - torch.div(r - slash, BLOCK, rounding_mode="floor")
    out = torch.zeros(B, H, n + 2, dtype=torch.bool, device=slash.device)
    valid = slash >= 0
    for d in (near, far):
        out.scatter_(2, torch.where(valid, d, n + 1).clamp(0, n + 1), True)
    return out[..., :n]


def _listed(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An ascending list with ``-1`` after its entries -> (int32 entries, padding 0; int32 count)."""
    return values.clamp(min=0).int(), (values >= 0).sum(-1, dtype=torch.int32)


def make_index(
    q_len: int,
    kv_len: int,
    kv_start: torch.Tensor,
    diag_mask: torch.Tensor,
    cols: torch.Tensor,
    blocks: torch.Tensor,
) -> SparseIndex:
    """Pack per-head choices into a :class:`SparseIndex`.

    Args:
        kv_start: [B] first valid key column per sample.
        diag_mask: [B, H, N] bool block diagonals.
        cols: [B, H, V] integer local key columns, ascending then ``-1`` for none
            (:func:`~sparse_prefill.ops.ascending`).
        blocks: [B, H, M, K] integer key blocks per query block, ascending then ``-1`` (K may be 0).

    The lists come sorted from their producers, which know their width: sorting the widest list of the layer here
    cost more than the rest of the index at 128K keys.
    """
    diag_idx, diag_cnt = _listed(positions(diag_mask))
    col_idx, col_cnt = _listed(cols)
    _, off = query_offsets(q_len, kv_len, kv_start)
    m = torch.arange(cdiv(q_len, BLOCK), device=cols.device)
    last_row = off[:, None] + m[None, :] * BLOCK + BLOCK - 1  # [B, M]
    B, H, V = col_idx.shape
    # Search the list with its padding pushed past every position, so it is sorted end to end.
    listed = torch.where(cols >= 0, col_idx, torch.iinfo(torch.int32).max)
    rows = last_row[:, None, :].expand(B, H, -1).int().contiguous()
    col_row_cnt = torch.searchsorted(listed.contiguous(), rows, right=True, out_int32=True)
    blk_idx, blk_cnt = _listed(blocks)
    return SparseIndex(
        q_len=q_len,
        kv_len=kv_len,
        kv_start=kv_start.int(),
        diag_mask=diag_mask,
        diag_idx=diag_idx,
        diag_cnt=diag_cnt,
        col_idx=col_idx,
        col_cnt=col_cnt,
        col_row_cnt=col_row_cnt,
        blk_idx=blk_idx,
        blk_cnt=blk_cnt,
    )
