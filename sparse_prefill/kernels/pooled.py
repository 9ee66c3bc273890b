"""Triton kernels for block-mean (pooled) estimates: the block means of q or k, and the pooled q·k scores.

FlexPrefill's query-aware test and block lists read mean-pooled q·k: the means of each BLOCK rows of queries and of
keys, and their dot products. In torch the means are a strided reduction and the scores an fp32 GEMM over every head
and every (query block, key block) pair. Here the means are one pass at memory speed, and the scores skip the heads
whose flag is 0 (not query-aware on this input: the flag is read on the device, so no host sync) and the key blocks
past each query block's causal reach, whose scores nothing reads. The scores use 3xTF32 tensor-core products, within
fp32 rounding of the fp32 GEMM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import BLOCK, INTERPRET, device_reason, head_dim_reason


@triton.jit
def _mean_pool(X, Out, flag_ptr, S, stride_xh, stride_xs, stride_oh, stride_on, BLOCK: tl.constexpr,
               HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, FLAGGED: tl.constexpr):
    h = tl.program_id(0)
    n = tl.program_id(1)
    if FLAGGED:
        if tl.load(flag_ptr + h) == 0:
            return
    rows = n * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, D_PAD)  # head_dim padded to a power of two
    x = tl.load(X + h.to(tl.int64) * stride_xh + rows.to(tl.int64)[:, None] * stride_xs + d[None, :],
                mask=(rows < S)[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    count = tl.minimum(S - n * BLOCK, BLOCK).to(tl.float32)
    tl.store(Out + h.to(tl.int64) * stride_oh + n * stride_on + d, tl.sum(x.to(tl.float32), 0) / count,
             mask=d < HEAD_DIM)


@triton.jit
def _pooled_scores(PQ, PK, Out, top_ptr, flag_ptr, M, N, GROUP,
                   stride_qh, stride_qm, stride_kh, stride_kn, stride_oh, stride_om,
                   BM: tl.constexpr, BN: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                   PREC: tl.constexpr):
    # Grid (query-block tiles, key-block tiles, heads).
    i = tl.program_id(2)
    if tl.load(flag_ptr + i) == 0:
        return
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    reach = tl.load(top_ptr + tl.minimum(tl.program_id(0) * BM + BM - 1, M - 1))  # the tile's last row sees most
    if tl.program_id(1) * BN > reach:
        return
    d = tl.arange(0, D_PAD)  # head_dim padded to a power of two: the padding dims are zeros
    q = tl.load(PQ + i.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm + d[None, :],
                mask=(offs_m < M)[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    k = tl.load(PK + (i // GROUP).to(tl.int64) * stride_kh + offs_n[:, None] * stride_kn + d[None, :],
                mask=(offs_n < N)[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    tl.store(Out + i.to(tl.int64) * stride_oh + offs_m[:, None] * stride_om + offs_n[None, :], s,
             mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def supports(x: torch.Tensor) -> str | None:
    """None when these kernels take a q or k like ``x`` [..., S, D], else why not (torch pools and multiplies)."""
    return device_reason(x) or head_dim_reason(x.shape[-1], 256)


def mean_pool_triton(x: torch.Tensor, flag: torch.Tensor | None = None) -> torch.Tensor:
    """Block means of rows.

    Arguments:
        x: (nheads, seqlen, headdim) fp16/bf16/fp32, unit stride on headdim.
        flag: (nheads,) int or bool, or None: heads with 0 are skipped (read on the device: no host sync).
    Return:
        (nheads, cdiv(seqlen, 64), headdim) fp32: the mean of each 64 rows (the last block over the rows it has);
        0 for skipped heads.
    """
    H, S, D = x.shape
    shape = (H, triton.cdiv(S, BLOCK), D)
    out = (torch.empty if flag is None else torch.zeros)(shape, dtype=torch.float32, device=x.device)
    if out.numel():
        flags = out if flag is None else flag.to(torch.int32).contiguous()  # unread without a flag
        _mean_pool[(H, out.shape[1])](
            x, out, flags, S, x.stride(0), x.stride(1), out.stride(0), out.stride(1), BLOCK=BLOCK, HEAD_DIM=D,
            D_PAD=triton.next_power_of_2(D), FLAGGED=flag is not None, num_warps=4,
        )
    return out


def pooled_scores_triton(pq: torch.Tensor, pk: torch.Tensor, top: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
    """Pooled q·k of flagged heads over their causal key blocks.

    Arguments:
        pq: (nheads, nrows, headdim) fp32 pooled queries; pk: (nheads_k, nblocks, headdim) fp32 pooled keys, with
            nheads a multiple of nheads_k (head i reads KV head i // (nheads / nheads_k)); unit stride on headdim.
        top: (nrows,) int, the last causal key block of each row, ascending.
        flag: (nheads,) int or bool: heads with 0 are skipped.
    Return:
        (nheads, nrows, nblocks) fp32 unscaled scores. Entries of skipped heads and past ``top`` (up to the tile of
        64 key blocks holding it) are left uninitialised: readers must mask them.
    """
    H, M, D = pq.shape
    N = pk.shape[1]
    out = torch.empty(H, M, N, dtype=torch.float32, device=pq.device)
    if out.numel() == 0:
        return out
    BM = BN = 64
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN), H)
    _pooled_scores[grid](
        pq, pk, out, top.to(torch.int32).contiguous(), flag.to(torch.int32).contiguous(), M, N, H // pk.shape[0],
        pq.stride(0), pq.stride(1), pk.stride(0), pk.stride(1), out.stride(0), out.stride(1),
        BM=BM, BN=BN, HEAD_DIM=D, D_PAD=triton.next_power_of_2(D), PREC="ieee" if INTERPRET else "tf32x3",
        num_warps=4,
    )
    return out
