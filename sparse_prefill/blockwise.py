"""The blockwise torch backend: sparse attention over a :class:`~sparse_prefill.index.SparseIndex` in plain torch ops.

It computes only the index's tiles (keys gathered per group of query blocks), so a patched model runs for real off
CUDA, in memory O(chunk x selected keys), and autograd differentiates it. Its output equals
:func:`~sparse_prefill.reference.attention_ref` over :func:`~sparse_prefill.masks.token_mask`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .index import BLOCK, SparseIndex, query_offsets
from .masks import block_mask, col_mask
from .ops import cdiv, positions

GROUP_BLOCKS = 2  # measured on a 2-core CPU at 8K: vertical-slash and A-shape gain, block lists lose a little


def sparse_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: SparseIndex,
    scale: float,
    max_mask_elems: int | None = None,
    group_blocks: int = GROUP_BLOCKS,
) -> torch.Tensor:
    """Sparse attention that computes only the index's tiles, in plain torch ops (autograd differentiates it).

    Query blocks go in groups of ``group_blocks``; each (query head, group) pair of a sample attends to one compact
    key list: the BLOCK keys of every key block some block of the group computes (diagonals and block lists), then
    the single columns the group can see outside those blocks. The mask then keeps, for each row, the keys of its own
    block's tiles and its own columns, not after the row (the diagonal tile, later columns, keys past the sample, list
    padding all drop out). Pairs are sorted by list length and run in batches of near-equal lengths, one SDPA call
    each, so heads with different patterns share a call and padding stays small. A query head gathers its keys from
    its KV head: K/V are never repeated for GQA.

    Args:
        q: [B, Hq, Sq, D]; k, v: [B, Hkv, Sk, D], ``Hq % Hkv == 0`` (query head h reads KV head ``h // (Hq // Hkv)``);
            fp32, bf16 or fp16, any device.
        index: the layer's index (``index.q_len == Sq``, ``index.kv_len == Sk``).
        scale: softmax scale.
        max_mask_elems: bound on one batch's mask, rows × keys (at least one pair per batch); memory is O(that × D /
            rows per pair) for the gathered K/V, and the index masks read at once stay within it too. The default
            keeps a batch's buffers at a few MB: at 8K on a 2-core CPU, 4× larger batches ran 1.7× slower (fresh
            buffers' page faults and cache misses), 4× smaller ones 1.1× slower (more calls).
            On CUDA the default is 16× larger: there the cost is the number of calls, not the buffers.
        group_blocks: query blocks sharing one key list. More rows per gathered key make the gathers and SDPA
            cheaper per key, but a group computes the union of its blocks' keys (masked per block).
    Returns:
        [B, Sq, Hq, D] contiguous, dtype of q; padding rows and rows with no key are zero.
    """
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G, R = group_blocks, group_blocks * BLOCK  # query blocks and rows per pair
    dev = q.device
    max_mask_elems = max_mask_elems or (1 << 26 if q.is_cuda else 1 << 22)
    out = q.new_zeros(B * Sq * H, D)  # (sample, query, head) rows: each batch copies its rows in at once
    q_start, first_pos = query_offsets(Sq, Sk, index.kv_start)
    row = torch.arange(R, device=dev)
    for b in range(B):
        qs, ks, off = int(q_start[b]), int(index.kv_start[b]), int(first_pos[b])
        rows, length = Sq - qs, Sk - ks
        M = cdiv(rows, BLOCK)
        if M == 0:
            continue
        Mg = cdiv(M, G)
        own = F.pad(block_mask(index, b)[:, :M], (0, 0, 0, Mg * G - M)).unflatten(1, (Mg, G))  # [H, Mg, G, N]
        is_col = F.pad(col_mask(index, b), (0, 1))  # [H, length + 1]; the last entry stands for list padding
        cols = index.col_idx[b].long()  # [H, V]
        N, V = own.shape[-1], cols.shape[-1]
        last = (torch.arange(Mg, device=dev) * G + G - 1).clamp(max=M - 1)  # each group's last valid query block
        qb, kb, vb = q[b].reshape(H * Sq, D), k[b].reshape(Hkv * Sk, D), v[b].reshape(Hkv * Sk, D)
        step = max(1, max_mask_elems // (H * (G * N + V)))  # groups per range: its index masks stay in the bound
        for g0 in range(0, Mg, step):
            m = min(Mg, g0 + step) - g0
            union = own[:, g0 : g0 + m].any(2)  # [H, m, N]
            seen = torch.arange(V, device=dev) < index.col_row_cnt[b][:, last[g0 : g0 + m], None].long()  # [H, m, V]
            extra = seen & ~union.gather(2, (cols // BLOCK)[:, None, :].expand(-1, m, -1))
            n_blk, n_col = union.sum(-1).flatten(), extra.sum(-1).flatten()  # per pair, [H * m]
            n_keys = n_blk * BLOCK + n_col
            order = n_keys.argsort()
            lengths = n_keys[order].tolist()
            i = next((i for i, n in enumerate(lengths) if n), len(lengths))  # pairs with no key stay zero
            while i < len(lengths):
                j = i + 1
                while j < len(lengths) and (j + 1 - i) * R * lengths[j] <= max_mask_elems:
                    j += 1
                pair = order[i:j]
                h, grp = pair // m, pair % m
                n_b, n_c = int(n_blk[pair].max()), int(n_col[pair].max())
                pos = _key_positions(union[h, grp], n_b, extra[h, grp], n_c, cols[h])
                s, L = pos.shape
                key = pos.clamp(max=length)  # == length: list padding, or keys past the sample (masked as causal)
                mine = own[h, g0 + grp].gather(2, (key // BLOCK).clamp(max=N - 1)[:, None, :].expand(-1, G, -1))
                mine |= is_col[h].gather(1, key)[:, None, :]  # [s, G, L]: the keys each block of the group computes
                bias = torch.zeros((), dtype=q.dtype, device=dev).masked_fill(~mine, -torch.inf)[:, :, None]
                r = (g0 + grp)[:, None] * R + row  # [s, R] query rows from the first valid one
                # One pass builds the additive mask (in q's dtype: SDPA would convert a boolean one in two more).
                causal = pos[:, None, None, :] <= (off + r).view(s, G, BLOCK, 1)  # [s, G, BLOCK, L]
                mask = torch.where(causal, bias, -torch.inf).view(s, 1, R, L)
                kv_rows = (((h // (H // Hkv)) * Sk + ks)[:, None] + key.clamp(max=length - 1)).flatten()
                q_rows = ((h * Sq + qs)[:, None] + r.clamp(max=rows - 1)).flatten()
                # 4D: SDPA's fused CPU kernel takes [batch, heads, rows, D]; 3D inputs go to its slow math fallback.
                o = F.scaled_dot_product_attention(
                    qb.index_select(0, q_rows).view(s, 1, R, D),
                    kb.index_select(0, kv_rows).view(s, 1, L, D),
                    vb.index_select(0, kv_rows).view(s, 1, L, D),
                    attn_mask=mask,
                    scale=scale,
                )[:, 0]  # [s, R, D]
                valid = r < rows  # the last group's rows past the sample are not written
                out.index_copy_(0, ((b * Sq + qs + r) * H + h[:, None])[valid], o[valid])
                i = j
    return out.view(B, Sq, H, D)


def _key_positions(
    blocks: torch.Tensor, max_blocks: int, extra: torch.Tensor, max_cols: int, cols: torch.Tensor
) -> torch.Tensor:
    """[s, max_blocks * BLOCK + max_cols] int64 local key positions of s pairs: their blocks' keys, then their extra
    columns; list padding is a position past every key, so the causal mask drops it.

    Args:
        blocks: [s, N] bool key blocks of each pair; extra: [s, V] bool which of ``cols`` [s, V] it adds.
    """
    past = torch.iinfo(torch.int64).max
    blk = positions(blocks)[:, :max_blocks]  # [s, Kb] ascending, then -1
    keys = blk[:, :, None] * BLOCK + torch.arange(BLOCK, device=blocks.device)
    keys = keys.masked_fill_((blk < 0)[:, :, None], past).flatten(1)
    slot = positions(extra)[:, :max_cols]  # [s, Vc] indices into cols
    col = cols.gather(1, slot.clamp(min=0)).masked_fill_(slot < 0, past)
    return torch.cat([keys, col], 1)
