"""The sparse index: which keys each query block of each head attends to.

Built once per layer call by :mod:`sparse_prefill.estimate` and read by every backend (the torch reference, the
blockwise CPU path and the Triton kernels), so all of them compute exactly the same set of (query, key) pairs.

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
import torch.nn.functional as F

BLOCK = 64


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


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
        choice: [B, H] int64 or None: the pattern each adaptive head chose for each sample
            (:data:`sparse_prefill.adaptive.CHOICES`), -1 for heads with a fixed pattern; None without adaptive heads.
            Metadata for reports: the backends read only the fields above.
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
    choice: torch.Tensor | None = None

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


def ascending(values: torch.Tensor) -> torch.Tensor:
    """[..., K] integers, ``-1`` for none -> each row's entries ascending, then the ``-1`` (:func:`make_index`'s
    list format)."""
    big = torch.iinfo(values.dtype).max
    out = torch.where(values >= 0, values, big).sort(dim=-1).values
    return out.masked_fill_(out == big, -1)


def cumsum(x: torch.Tensor) -> torch.Tensor:
    """``x.cumsum(-1)``; on CUDA, rows longer than 4096 are scanned in chunks (:func:`chunked_cumsum`): torch scans
    each row in one thread block, so the few 128K-long rows of an index build kept most of the GPU idle (130 us for
    32 rows, against under 20 us in chunks)."""
    return chunked_cumsum(x, 1024) if x.is_cuda and x.shape[-1] > 4096 else x.cumsum(-1)


def chunked_cumsum(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """``x.cumsum(-1)`` as scans of ``chunk``-wide pieces plus a scan of their totals (floats sum in another order)."""
    n = x.shape[-1]
    y = F.pad(x, (0, -n % chunk)).unflatten(-1, (-1, chunk)).cumsum(-1)
    y[..., 1:, :] += y[..., :-1, -1].cumsum(-1)[..., None]
    return y.flatten(-2)[..., :n]


def positions(mask: torch.Tensor) -> torch.Tensor:
    """[..., n] bool -> [..., n] int64: where ``mask`` is set, ascending, then ``-1``; a prefix sum, not a sort."""
    n = mask.shape[-1]
    slot = torch.where(mask, cumsum(mask) - 1, n)  # unset entries all go to a slot past the end, then dropped
    out = torch.full((*mask.shape[:-1], n + 1), -1, dtype=torch.long, device=mask.device)
    return out.scatter_(-1, slot, torch.arange(n, device=mask.device).expand_as(slot))[..., :n]


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
        cols: [B, H, V] integer local key columns, ascending then ``-1`` for none (:func:`ascending`).
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


def block_mask(index: SparseIndex, b: int) -> torch.Tensor:
    """[H, M, N] bool: key blocks each query block of sample b computes as whole tiles (diagonals and block lists)."""
    base = block_bases(index.q_len, index.kv_len, index.kv_start)[b]  # [M]
    n = index.num_k_blocks
    j = torch.arange(n, device=base.device)
    d = base[:, None] - j[None, :]  # [M, N]
    on = index.diag_mask[b][:, d.clamp(0, n - 1)] & (d >= 0) & (d < n)  # [H, M, N]
    H, M, K = index.blk_idx[b].shape
    if K:
        valid = torch.arange(K, device=base.device) < index.blk_cnt[b][..., None]
        hits = torch.zeros(H, M, n + 1, dtype=torch.bool, device=base.device)
        hits.scatter_(2, torch.where(valid, index.blk_idx[b].long(), n), True)
        on = on | hits[..., :n]
    return on


def col_mask(index: SparseIndex, b: int) -> torch.Tensor:
    """[H, kv_len - kv_start[b]] bool: the single key columns of sample b (causality still applies per query)."""
    length = index.kv_len - int(index.kv_start[b])
    H, V = index.col_idx[b].shape
    out = torch.zeros(H, length + 1, dtype=torch.bool, device=index.col_idx.device)
    valid = torch.arange(V, device=out.device) < index.col_cnt[b][:, None]
    out.scatter_(1, torch.where(valid, index.col_idx[b].long(), length).clamp(max=length), True)
    return out[:, :length]


def rows_mask(blocks: torch.Tensor, cols: torch.Tensor, first_pos: int, rows: torch.Tensor) -> torch.Tensor:
    """[H, R, L] bool mask of some query rows of one sample, from its :func:`block_mask` and :func:`col_mask`.

    ``rows`` counts from the sample's first valid query, which sits at local position ``first_pos``; columns are local
    key positions. Callers that mask many row chunks build ``blocks`` and ``cols`` once.
    """
    k = torch.arange(cols.shape[-1], device=rows.device)
    causal = k[None, :] <= (first_pos + rows)[:, None]
    return causal & (blocks[:, rows // BLOCK][..., k // BLOCK] | cols[:, None, :])


def sample_mask(index: SparseIndex, b: int, rows: slice | None = None) -> torch.Tensor:
    """[H, R, kv_len - kv_start[b]] bool mask of sample b over its valid query rows (or the given slice of them).

    Rows are counted from the sample's first valid query; columns are local key positions.
    """
    q_start, off = query_offsets(index.q_len, index.kv_len, index.kv_start)
    r = torch.arange(index.q_len - int(q_start[b]), device=index.diag_mask.device)[rows or slice(None)]
    return rows_mask(block_mask(index, b), col_mask(index, b), int(off[b]), r)


def token_mask(index: SparseIndex) -> torch.Tensor:
    """[B, H, q_len, kv_len] bool: the explicit mask every backend must reproduce (tensor frame, False on padding)."""
    B, H = index.diag_mask.shape[:2]
    out = torch.zeros(B, H, index.q_len, index.kv_len, dtype=torch.bool, device=index.diag_mask.device)
    q_start, _ = query_offsets(index.q_len, index.kv_len, index.kv_start)
    for b in range(B):
        out[b, :, int(q_start[b]) :, int(index.kv_start[b]) :] = sample_mask(index, b)
    return out


def tile_density(index: SparseIndex) -> torch.Tensor:
    """[B, H] float: BLOCK×BLOCK tiles a kernel computes over the causal tiles of a dense causal kernel.

    Whole blocks count one tile each; the single columns a query block still needs count one tile per BLOCK columns.
    """
    B, H = index.diag_mask.shape[:2]
    out = torch.empty(B, H, device=index.diag_mask.device)
    q_start, _ = query_offsets(index.q_len, index.kv_len, index.kv_start)
    base = block_bases(index.q_len, index.kv_len, index.kv_start)
    for b in range(B):
        m_valid = cdiv(index.q_len - int(q_start[b]), BLOCK)
        n_valid = cdiv(index.kv_len - int(index.kv_start[b]), BLOCK)
        blocks = block_mask(index, b)[:, :m_valid, :n_valid]  # [H, M, N]
        cols = index.col_idx[b].long()  # [H, V]
        V = cols.shape[-1]
        col_blocks = (cols // BLOCK).clamp(max=n_valid - 1)
        extra = 0
        step = max(1, (1 << 26) // max(1, H * V))  # query blocks per chunk: [H, step, V] stays ~64M elements
        for m0 in range(0, m_valid, step):
            m1 = min(m0 + step, m_valid)
            visible = torch.arange(V, device=cols.device) < index.col_row_cnt[b][:, m0:m1, None]  # [H, m, V]
            covered = blocks[:, m0:m1].gather(2, col_blocks[:, None, :].expand(-1, m1 - m0, -1))
            extra = extra + cdiv_tensor((visible & ~covered).sum(-1), BLOCK).sum(-1)  # [H]
        causal_tiles = (base[b, :m_valid].clamp(max=n_valid - 1) + 1).sum()
        out[b] = (blocks.sum((-1, -2)) + extra).float() / causal_tiles.float()
    return out


def cdiv_tensor(a: torch.Tensor, b: int) -> torch.Tensor:
    return torch.div(a + b - 1, b, rounding_mode="floor")
