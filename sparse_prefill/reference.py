"""Torch attention over a :class:`~sparse_prefill.index.SparseIndex`: the exact reference and the blockwise CPU path.

``attention_ref`` is the definition every backend is tested against: fp32 softmax over an explicit boolean mask.
``sparse_attention_torch`` computes the same thing in query chunks with SDPA, so memory stays O(chunk × S) and the
patched model runs for real on the CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .index import BLOCK, SparseIndex, block_mask, col_mask, query_offsets, rows_mask


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Masked attention in fp32.

    Args:
        q: [B, Hq, Sq, D]; k, v: [B, Hkv, Sk, D], ``Hq % Hkv == 0``: query head h reads KV head ``h // (Hq // Hkv)``.
        mask: [B, Hq, Sq, Sk] bool, True = attend. Rows with no True give zeros.
        scale: softmax scale.
    Returns:
        [B, Sq, Hq, D] fp32.
    """
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = (q.float() @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (p @ v).transpose(1, 2)


def sparse_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: SparseIndex,
    scale: float,
    max_mask_elems: int = 1 << 26,
) -> torch.Tensor:
    """Sparse attention with SDPA over query chunks, without an S×S buffer.

    Args:
        q: [B, Hq, Sq, D]; k, v: [B, Hkv, Sk, D], any float dtype, any device.
        index: the layer's index (``index.q_len == Sq``, ``index.kv_len == Sk``).
        scale: softmax scale.
        max_mask_elems: bound on the boolean mask of one chunk (Hq × rows × Sk).
    Returns:
        [B, Sq, Hq, D] contiguous, dtype of q; padding rows are zero.
    """
    B, H, Sq, D = q.shape
    out = torch.zeros(B, Sq, H, D, dtype=q.dtype, device=q.device)
    q_start, first_pos = query_offsets(Sq, k.shape[2], index.kv_start)
    for b in range(B):
        qs, ks = int(q_start[b]), int(index.kv_start[b])
        rows = Sq - qs
        chunk = max(BLOCK, max_mask_elems // (H * (k.shape[2] - ks)) // BLOCK * BLOCK)
        kb, vb = k[b : b + 1, :, ks:], v[b : b + 1, :, ks:]
        blocks, cols = block_mask(index, b), col_mask(index, b)  # once per sample, sliced per chunk
        for r0 in range(0, rows, chunk):
            r1 = min(rows, r0 + chunk)
            mask = rows_mask(blocks, cols, int(first_pos[b]), torch.arange(r0, r1, device=q.device))
            o = F.scaled_dot_product_attention(
                q[b : b + 1, :, qs + r0 : qs + r1], kb, vb, attn_mask=mask[None], scale=scale, enable_gqa=True
            )
            out[b, qs + r0 : qs + r1] = o[0].transpose(0, 1)
    return out
