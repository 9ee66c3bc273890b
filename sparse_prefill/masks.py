"""Explicit boolean masks of a :class:`~sparse_prefill.index.SparseIndex`: what every backend must compute.

The fp32 reference (:func:`~sparse_prefill.reference.attention_ref`) runs dense attention over :func:`token_mask`;
the blockwise torch path and the reports read the per-sample block and column masks.
"""

from __future__ import annotations

import torch

from .index import BLOCK, SparseIndex, block_bases, query_offsets


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
