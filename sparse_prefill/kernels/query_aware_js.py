"""Triton kernels for the adaptive heads' query-aware test (:func:`sparse_prefill.plan.adaptive.query_aware_js`).

Per (sample, head) the test compares two distributions over the sample's key blocks: the last queries' true
attention per block (their vertical scores summed per block) and softmax of their mean query against each block's
mean key. In torch that is about thirty small operations on [B, h, N] tensors, and at any length their launches cost
more host time than the GPU spends (0.65 ms per layer call on an H200, more than the rest of the estimate's host
work together). Here two launches do it:

1. ``_block_scores``: each head's key blocks spread over programs (128 blocks each: one program per head took 0.39 ms
   at 128K), each writing its blocks' pooled logit and true mass to a [2, B, h, N] buffer;
2. ``_divergence``: one program per (sample, head) reads them back twice, once for the softmax's max and sum and the
   true total, once for the divergence.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import BLOCK
from .pooled import supports  # it reads what the pooled kernels make of the same q/k

__all__ = ["query_aware_js_triton", "supports"]


@triton.jit
def _block_scores(Q, Vert, PK, Est, Mass, heads_ptr, last_q_ptr, starts_ptr,
                  stride_qb, stride_qh, stride_qs, stride_kb, stride_kh,
                  q_len, kv_len, NH, GROUP, N, scale,
                  BLOCK_R: tl.constexpr, BLOCK_NB: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                  HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    # Grid (batch, head, chunk of CHUNK key blocks): the blocks of one head are spread over programs, each
    # recomputing the mean query (a few KiB from L2) rather than waiting for it.
    b = tl.program_id(0)
    i = tl.program_id(1)
    c = tl.program_id(2)
    start = tl.load(starts_ptr + b)
    n_blocks = tl.cdiv(kv_len - start, BLOCK)
    if c * CHUNK >= n_blocks:
        return
    h = tl.load(heads_ptr + i)
    d = tl.arange(0, D_PAD)  # head_dim padded to a power of two: the padding dims load as zeros
    dims = (d < HEAD_DIM)[None, :]

    # Mean of the head's last last_q queries that hold a query of the sample (left padding: the first valid row).
    first = tl.maximum(tl.maximum(q_len - tl.load(last_q_ptr + i), start - (kv_len - q_len)), 0)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    acc = tl.zeros([D_PAD], dtype=tl.float32)
    for r0 in range(first, q_len, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        x = tl.load(q_base + rows.to(tl.int64)[:, None] * stride_qs + d[None, :],
                    mask=(rows < q_len)[:, None] & dims, other=0.0)
        acc += tl.sum(x.to(tl.float32), 0)
    q_mean = acc / (q_len - first)

    pk = PK + b.to(tl.int64) * stride_kb + (h // GROUP).to(tl.int64) * stride_kh
    vert = Vert + (b * NH + i).to(tl.int64) * kv_len
    row = (b * NH + i).to(tl.int64) * N
    for n0 in range(c * CHUNK, tl.minimum(c * CHUNK + CHUNK, n_blocks), BLOCK_NB):
        n = n0 + tl.arange(0, BLOCK_NB)
        valid = n < n_blocks
        pk_n = tl.load(pk + n[:, None] * HEAD_DIM + d[None, :], mask=valid[:, None] & dims, other=0.0)
        cols = start + n[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        true = tl.sum(tl.load(vert + cols, mask=valid[:, None] & (cols < kv_len), other=0.0), 1)
        tl.store(Est + row + n, tl.sum(pk_n * q_mean[None, :], 1) * scale, mask=valid)
        tl.store(Mass + row + n, true, mask=valid)


@triton.jit
def _divergence(Est, Mass, Out, starts_ptr, kv_len, NH, N, BLOCK_NB: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    i = tl.program_id(1)
    n_blocks = tl.cdiv(kv_len - tl.load(starts_ptr + b), BLOCK)
    row = (b * NH + i).to(tl.int64) * N
    offs = tl.arange(0, BLOCK_NB)
    # Pass 1: the softmax's max m and sum z (online), and the true mass's total.
    m = tl.full([], float("-inf"), tl.float32)
    z = tl.zeros([], tl.float32)
    total = tl.zeros([], tl.float32)
    for n0 in range(0, n_blocks, BLOCK_NB):
        valid = n0 + offs < n_blocks
        est = tl.load(Est + row + n0 + offs, mask=valid, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(est))
        z = z * tl.exp(m - m_new) + tl.sum(tl.exp(est - m_new))
        m = m_new
        total += tl.sum(tl.load(Mass + row + n0 + offs, mask=valid, other=0.0))
    # Pass 2: JS = (KL(p || mid) + KL(e || mid)) / 2, terms of zero probability counting 0 (as torch.xlogy).
    js = tl.zeros([], tl.float32)
    for n0 in range(0, n_blocks, BLOCK_NB):
        valid = n0 + offs < n_blocks
        e = tl.exp(tl.load(Est + row + n0 + offs, mask=valid, other=float("-inf")) - m) / z
        p = tl.load(Mass + row + n0 + offs, mask=valid, other=0.0) / total
        mid = tl.where(p + e > 0, (p + e) / 2, 1.0)  # (no 0 / 0 in the terms that count 0)
        kl_p = p * tl.log(tl.where(p > 0, p / mid, 1.0))
        kl_e = e * tl.log(tl.where(e > 0, e / mid, 1.0))
        js += tl.sum(kl_p + kl_e)
    tl.store(Out + b * NH + i, tl.sqrt(tl.maximum(js / 2, 0.0)))


def query_aware_js_triton(
    q: torch.Tensor,
    vertical: torch.Tensor,
    pooled_k: torch.Tensor,
    heads: torch.Tensor,
    last_q: torch.Tensor,
    scale: float,
    starts: torch.Tensor,
) -> torch.Tensor:
    """sqrt of the Jensen–Shannon divergence between each head's true and pooled block attention.

    Arguments:
        q: (batch_size, nheads, seqlen_q, headdim) fp16/bf16/fp32 queries, unit stride on headdim.
        vertical: (batch_size, nsel, seqlen_k) fp32 vertical scores of the selected heads, per tensor column.
        pooled_k: (batch_size, nheads_k, nblocks, headdim) fp32 block means of the keys in each sample's own grid
            (:func:`~sparse_prefill.plan.common.block_means`), nblocks >= ceil(seqlen_k / 64).
        heads: integer tensor (nsel,) on q's device: the selected query heads (head i reads KV head
            i // (nheads / nheads_k)).
        last_q: integer tensor (nsel,) on q's device: how many of the last queries each selected head uses.
        scale: softmax scale.
        starts: integer tensor (batch_size,) on q's device: first valid key (left padding).
    Return:
        (batch_size, nsel) fp32, in [0, sqrt(ln 2)].
    """
    B, H, Sq, D = q.shape
    NH, Sk = vertical.shape[1:]
    out = torch.empty(B, NH, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    pooled_k = pooled_k.contiguous()
    N = triton.cdiv(Sk, BLOCK)
    est = torch.empty(2, B, NH, N, dtype=torch.float32, device=q.device)  # pooled logits, true mass per key block
    CHUNK = 128
    _block_scores[(B, NH, triton.cdiv(N, CHUNK))](
        q, vertical.contiguous(), pooled_k, est[0], est[1], heads.contiguous(), last_q.contiguous(), starts,
        q.stride(0), q.stride(1), q.stride(2), pooled_k.stride(0), pooled_k.stride(1),
        Sq, Sk, NH, H // pooled_k.shape[1], N, scale,
        BLOCK_R=32, BLOCK_NB=32, CHUNK=CHUNK, BLOCK=BLOCK, HEAD_DIM=D, D_PAD=triton.next_power_of_2(D), num_warps=4,
    )
    _divergence[(B, NH)](est[0], est[1], out, starts, Sk, NH, N, BLOCK_NB=256, BLOCK=BLOCK, num_warps=4)
    return out
