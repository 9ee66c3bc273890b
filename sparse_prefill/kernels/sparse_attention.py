"""Triton kernel for sparse prefill attention over a :class:`~sparse_prefill.index.SparseIndex`.

One launch computes every (sample, query head, query block of 64 rows) of a layer, whatever pattern each head uses:
three loops with runtime trip counts (block diagonals, single columns, block lists) feed one flash-attention online
softmax. A loop a head does not use has zero trips; a loop no head of the layer uses is compiled out, since its
registers would otherwise be held by the whole-tile loops too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..index import SparseIndex
from .common import BLOCK, INTERPRET, LOG2E, device_reason, head_dim_reason


@triton.jit
def _tile(acc, l_i, m_i, q, k, v, qk_scale, keep, MASK: tl.constexpr, PREC: tl.constexpr):
    """One online-softmax step over a key tile. ``keep`` [BLOCK_M, BLOCK_N] is read only when MASK; masked scores
    become -inf, so exp2 gives exactly 0 for them."""
    qk = tl.dot(q, tl.trans(k), input_precision=PREC)
    if MASK:
        qk = tl.where(keep, qk, float("-inf"))
    # m_i starts finite (-1e30), so a row that is fully masked so far never computes -inf - -inf.
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
    return acc, l_i, m_new


@triton.jit
def _block_tiles(acc, l_i, m_i, q, q_pos, k_desc, v_desc, b, kv_head, kv_start, idx_ptr, lo, hi, base, qk_scale,
                 DIAG: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
                 PREC: tl.constexpr):
    """Whole key blocks named by ``idx_ptr[lo:hi]``: diagonals (key block = base - d) or block-list entries.
    Loaded through TMA descriptors (contiguous 64-row tiles); rows past the end of the keys, and dims past head_dim,
    come back as zeros."""
    offs_n = tl.arange(0, BLOCK_N)
    # Each entry is read one tile ahead. Triton's pipeliner prefetches the TMA loads but not this scalar load, so a
    # TMA load whose coordinates came from a load in the same iteration waited on global memory every tile
    # (benchmarks/results/kernel_index_prefetch_h200/).
    e_next = tl.load(idx_ptr + lo, mask=lo < hi, other=0)
    for i in range(lo, hi):
        e = e_next
        e_next = tl.load(idx_ptr + i + 1, mask=i + 1 < hi, other=0)
        if DIAG:
            j = base - e
        else:
            j = e
        row = kv_start + j * BLOCK_N
        k = k_desc.load([b, kv_head, row, 0]).reshape(BLOCK_N, D_PAD)
        v = v_desc.load([b, kv_head, row, 0]).reshape(BLOCK_N, D_PAD)
        if MASK:
            # Only the (at most two) blocks that reach past the query block's first row need the causal mask.
            keep = (j * BLOCK_N + offs_n)[None, :] <= q_pos[:, None]
        else:
            keep = 0
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, k, v, qk_scale, keep, MASK, PREC)
    return acc, l_i, m_i


@triton.jit
def _column_tiles(acc, l_i, m_i, q, q_pos, k_base, v_base, stride_kn, stride_vn, col_ptr, n_cols, dmask_ptr,
                  n_blocks, base, length, qk_scale, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                  D_PAD: tl.constexpr, PREC: tl.constexpr):
    """Single key columns ``col_ptr[:n_cols]``, gathered BLOCK_N at a time. Always masked: a chunk may be partial,
    may hold columns already computed by a diagonal (skipped, so they count once) and columns after some rows."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    dims = (offs_d < HEAD_DIM)[None, :]
    # Not software-pipelined: staging the gathers for a next iteration made every column tile 2-12% slower on H200
    # (each gather waits on its column list load anyway; a stage only adds shared-memory traffic).
    for start in tl.range(0, n_cols, BLOCK_N, num_stages=1):
        offs = start + offs_n
        in_list = offs < n_cols
        # Past the list c = 0, a valid row: the K/V gathers need no row mask and wait only on the column load.
        c = tl.minimum(tl.load(col_ptr + offs, mask=in_list, other=0), length - 1)
        rows = c.to(tl.int64)
        k = tl.load(k_base + rows[:, None] * stride_kn + offs_d[None, :], mask=dims, other=0.0)
        v = tl.load(v_base + rows[:, None] * stride_vn + offs_d[None, :], mask=dims, other=0.0)
        d = base - c // BLOCK_N  # the diagonal that would have computed column c
        covered = tl.load(dmask_ptr + d, mask=in_list & (d >= 0) & (d < n_blocks), other=0)
        keep = (in_list & (covered == 0))[None, :] & (c[None, :] <= q_pos[:, None])
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, k, v, qk_scale, keep, True, PREC)
    return acc, l_i, m_i


@triton.jit
def _count_at_most(ptr, n, a, b, CHUNK: tl.constexpr):
    """How many of the ascending ``ptr[:n]`` are <= a and <= b (a <= b): split points of the tile loops."""
    n_a = n * 0
    n_b = n * 0
    for start in range(0, n, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        x = tl.load(ptr + offs, mask=offs < n, other=2147483647)
        n_a += tl.sum((x <= a).to(tl.int32), 0)
        n_b += tl.sum((x <= b).to(tl.int32), 0)
    return n_a, n_b


def _configs():
    # The interpreter cannot autotune several configs. On the GPU: one warpgroup per 64 query rows (8 warps split
    # the tiles and ran 2x slower on H200), and 2-3 stages, the autotuner choosing (4 stages cost occupancy: whole
    # tiles at head_dim 128 took 1.7x as long on H200).
    if INTERPRET:
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=4, num_stages=s) for s in (2, 3)]


@triton.autotune(configs=_configs(), key=["HEAD_DIM", "HAS_COLS", "HAS_BLKS"])
@triton.jit
def _sparse_attn_fwd(
    Q, K, V, Out, k_desc, v_desc,
    kv_start_ptr, diag_mask_ptr, diag_idx_ptr, diag_cnt_ptr, col_idx_ptr, col_row_cnt_ptr, blk_idx_ptr, blk_cnt_ptr,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_os, stride_oh,
    q_len, kv_len, H, GROUP, M, N, NCOL, NBLK,
    qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    PREC: tl.constexpr, HAS_COLS: tl.constexpr, HAS_BLKS: tl.constexpr,
):
    # One grid axis, in launch order: per (sample, KV head), query blocks last first (the causal blocks with most keys
    # start early, the cheap ones fill the tail), and within a block the GROUP query heads that read the same K/V, so
    # neighbouring programs share it in L2 (on the H200, columns at head_dim 64 ran 9 % faster than with each query
    # head's blocks together, head_dim 128 the same: benchmarks/results/kernel_launch_order_h200/).
    pid = tl.program_id(0)
    rest = pid // GROUP
    m = M - 1 - rest % M
    bh = rest // M * GROUP + pid % GROUP  # (sample * KV heads + KV head) * GROUP + query head within the group
    b = bh // H
    h = bh % H
    head = bh.to(tl.int64)  # (b, h) row of the index tensors
    offs_m = tl.arange(0, BLOCK_M)
    # head_dim padded to a power of two (tile shapes must be); the padding dims are zeros, which leave q·k and the
    # output unchanged.
    offs_d = tl.arange(0, D_PAD)
    dims = (offs_d < HEAD_DIM)[None, :]

    # Frames (sparse_prefill.index): the sample's keys are tensor columns kv_start.., its queries tensor rows
    # q_start.., the first of which sits at local position first_pos.
    kv_start = tl.load(kv_start_ptr + b)
    length = kv_len - kv_start
    q_start = tl.maximum(kv_start - (kv_len - q_len), 0)
    first_pos = kv_len - q_len + q_start - kv_start
    o_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh

    # Padding rows are zero: each program clears the padding rows of tensor block m (the grid covers all rows).
    if m * BLOCK_M < q_start:
        pad = m * BLOCK_M + offs_m
        tl.store(o_base + pad.to(tl.int64)[:, None] * stride_os + offs_d[None, :],
                 tl.zeros([BLOCK_M, D_PAD], Out.dtype.element_ty), mask=(pad < q_start)[:, None] & dims)
    if q_start + m * BLOCK_M >= q_len:
        return

    p0 = first_pos + m * BLOCK_M  # local position of the block's first row
    q_pos = p0 + offs_m
    q_rows = q_start + m * BLOCK_M + offs_m
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + q_rows.to(tl.int64)[:, None] * stride_qs
    q = tl.load(q_ptrs + offs_d[None, :], mask=(q_rows < q_len)[:, None] & dims, other=0.0)

    kv_head = h // GROUP  # GQA: never repeat K/V
    k_base = K + b.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh + kv_start.to(tl.int64) * stride_kn
    v_base = V + b.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh + kv_start.to(tl.int64) * stride_vn

    base = (p0 + BLOCK_M - 1) // BLOCK_N  # key block of the nominal last row
    j_end = (p0 + 1) // BLOCK_N  # key blocks j < j_end lie wholly at or before every row: no mask needed

    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)

    # 1. Block diagonals, ascending d: the first n_masked (d <= base - j_end) need the causal mask, those after
    # n_valid (d > base) would give key blocks < 0.
    diag_ptr = diag_idx_ptr + head * N
    n_diag = tl.minimum(tl.load(diag_cnt_ptr + head), base + 1)
    n_masked, n_valid = _count_at_most(diag_ptr, n_diag, base - j_end, base, CHUNK)
    acc, l_i, m_i = _block_tiles(acc, l_i, m_i, q, q_pos, k_desc, v_desc, b, kv_head, kv_start, diag_ptr, 0,
                                 n_masked, base, qk_scale, True, True, BLOCK_N, D_PAD, PREC)
    acc, l_i, m_i = _block_tiles(acc, l_i, m_i, q, q_pos, k_desc, v_desc, b, kv_head, kv_start, diag_ptr, n_masked,
                                 n_valid, base, qk_scale, True, False, BLOCK_N, D_PAD, PREC)

    # 2. Single columns this block can see.
    if HAS_COLS:
        n_cols = tl.load(col_row_cnt_ptr + head * M + m)
        acc, l_i, m_i = _column_tiles(acc, l_i, m_i, q, q_pos, k_base, v_base, stride_kn, stride_vn,
                                      col_idx_ptr + head * NCOL, n_cols, diag_mask_ptr + head * N, N, base, length,
                                      qk_scale, BLOCK_N, HEAD_DIM, D_PAD, PREC)

    # 3. Block lists, ascending: blocks < j_end unmasked, then up to two masked ones; blocks > base see nothing.
    if HAS_BLKS:
        blk_ptr = blk_idx_ptr + (head * M + m) * NBLK
        n_blk = tl.load(blk_cnt_ptr + head * M + m)
        n_full, n_valid = _count_at_most(blk_ptr, n_blk, j_end - 1, base, CHUNK)
        acc, l_i, m_i = _block_tiles(acc, l_i, m_i, q, q_pos, k_desc, v_desc, b, kv_head, kv_start, blk_ptr, 0,
                                     n_full, base, qk_scale, False, False, BLOCK_N, D_PAD, PREC)
        acc, l_i, m_i = _block_tiles(acc, l_i, m_i, q, q_pos, k_desc, v_desc, b, kv_head, kv_start, blk_ptr, n_full,
                                     n_valid, base, qk_scale, False, True, BLOCK_N, D_PAD, PREC)

    # Rows that attended to nothing have l_i == 0 and acc == 0: write 0, not NaN.
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_ptrs = o_base + q_rows.to(tl.int64)[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(q_rows < q_len)[:, None] & dims)


def _tma_ready(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])


def supports(q: torch.Tensor, k: torch.Tensor) -> str | None:
    """None when :func:`sparse_attention_triton` can run on these inputs, else a short reason."""
    if not INTERPRET and (reason := device_reason(q)):
        return reason
    dtypes = (torch.float16, torch.bfloat16) + ((torch.float32,) if INTERPRET else ())
    if q.dtype not in dtypes or k.dtype != q.dtype:
        return f"dtype {q.dtype}"
    if reason := head_dim_reason(q.shape[-1], 128):
        return reason
    if k.shape[-1] != q.shape[-1]:
        return f"head_dim {q.shape[-1]}"
    if q.shape[1] % k.shape[1]:
        return f"{q.shape[1]} query heads over {k.shape[1]} KV heads"
    return None


def sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: SparseIndex,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sparse causal attention over a :class:`SparseIndex`, flash-attention style (fp32 online softmax).

    Arguments:
        q: (batch_size, nheads, seqlen_q, headdim), fp16 or bf16 (fp32 only under TRITON_INTERPRET=1).
        k, v: (batch_size, nheads_k, seqlen_k, headdim), same dtype; nheads % nheads_k == 0 (GQA: query head h
            reads KV head h // (nheads // nheads_k)). Any strides (views are fine); headdim a multiple of 16 up to 128
            (tiles are padded to a power of two: headdim 96 costs what 128 does).
        index: the layer's index, ``index.q_len == seqlen_q <= index.kv_len == seqlen_k``, int32 tensors on the
            device of q. Per (sample b, head h, query block m of 64 rows) the kernel computes:
            1. key blocks base(m) - d for the on diagonals d (skipped when < 0), as whole 64x64 tiles;
            2. the single columns ``col_idx[b, h, :col_row_cnt[b, h, m]]``, except those in a block of step 1;
            3. the key blocks ``blk_idx[b, h, m, :blk_cnt[b, h, m]]`` (those after base(m) see nothing).
            A head uses 1 + 2 or 3 (a pair computed by two steps would count twice). Every tile keeps the causal,
            bottom-right aligned mask and the sample's left padding (``kv_start``).
        scale: softmax scale.
        out: optional (batch_size, seqlen_q, nheads, headdim) output buffer.
    Return:
        out: (batch_size, seqlen_q, nheads, headdim), dtype of q: the layout transformers expects. Padding rows and
        rows without any attended key are 0. Equals ``attention_ref(q, k, v, token_mask(index), scale)``.
    """
    if reason := supports(q, k):
        raise ValueError(f"sparse_attention_triton: unsupported input ({reason})")
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if (index.q_len, index.kv_len) != (Sq, Sk) or v.shape != k.shape or index.diag_mask.shape[:2] != (B, H):
        raise ValueError("sparse_attention_triton: index and q/k/v shapes disagree")
    # The kernel reads head_dim with unit stride; other strides come in as arguments. TMA descriptors of k/v need
    # 16-byte aligned base and strides: copy the rare view that is not.
    q = q if q.stride(-1) == 1 else q.contiguous()
    k, v = (t if _tma_ready(t) else t.contiguous() for t in (k, v))
    if out is None:
        out = torch.empty(B, Sq, H, D, dtype=q.dtype, device=q.device)
    elif out.shape != (B, Sq, H, D) or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError("sparse_attention_triton: out must be (batch, seqlen_q, nheads, headdim), dtype of q")
    if Sq == 0:
        return out
    M, N = index.num_q_blocks, index.num_k_blocks
    ints = [t.to(device=q.device, dtype=torch.int32).contiguous() for t in (
        index.kv_start, index.diag_idx, index.diag_cnt, index.col_idx, index.col_row_cnt, index.blk_idx,
        index.blk_cnt)]
    kv_start, diag_idx, diag_cnt, col_idx, col_row_cnt, blk_idx, blk_cnt = ints
    ncol, nblk = col_idx.shape[-1], blk_idx.shape[-1]
    # Empty column / block lists: their loops are compiled out, but the pointer arguments must still be valid.
    col_idx = col_idx if ncol else col_row_cnt
    blk_idx = blk_idx if nblk else blk_cnt
    diag_mask = index.diag_mask.to(q.device).contiguous().view(torch.uint8)

    # One program per (sample, query head, query block): it owns 64 query rows of one head and loops over the key
    # tiles the index names. Strides in elements: q/k/v as (batch, head, seq), out as (batch, seq, head).
    grid = (M * B * H,)
    d_pad = triton.next_power_of_2(D)
    _sparse_attn_fwd[grid](
        q, k, v, out,
        TensorDescriptor(k, list(k.shape), list(k.stride()), [1, 1, BLOCK, d_pad]),
        TensorDescriptor(v, list(v.shape), list(v.stride()), [1, 1, BLOCK, d_pad]),
        kv_start, diag_mask, diag_idx, diag_cnt, col_idx, col_row_cnt, blk_idx, blk_cnt,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        Sq, Sk, H, H // Hkv, M, N, ncol, nblk,
        scale * LOG2E,
        HEAD_DIM=D, D_PAD=d_pad, BLOCK_M=BLOCK, BLOCK_N=BLOCK, CHUNK=256,
        PREC="ieee" if q.dtype == torch.float32 else "tf32", HAS_COLS=ncol > 0, HAS_BLKS=nblk > 0,
    )
    return out
