"""Triton kernels for vertical-slash estimation: column and diagonal sums of the last queries' attention.

MInference's estimate is ``softmax(q[-L:] @ k.T)`` summed per key column (vertical scores) and per diagonal offset
(slash scores). Done in torch that materialises [heads, L, S] logits and probabilities in fp32 (1 GiB for 32 heads at
128K, read and written several times). Here two passes stream K instead, as flash attention does:

1. ``_row_stats``: per (sample, head, run of key tiles) the running max and exp-sum of each of the L rows;
2. ``_col_diag_sums``: per key tile, the probabilities from the combined row statistics, summed over rows into the
   tile's columns (a plain store) and along its diagonals (a skewed re-read of the tile from a per-program scratch,
   then one atomic add per diagonal; each diagonal spans at most two tiles, so the sums do not depend on the order
   the adds land in).

Heads that rank whole block diagonals (``by_block``) need only each block diagonal's share of the diagonal sums
(:func:`~sparse_prefill.plan.vertical_slash.block_diagonal_mass`): offset ``o`` adds to block diagonal ``d`` with the
weight
``max(0, 1 - |u / BLOCK - d|)``, ``u = o + BLOCK * (r > 0) - r`` and ``r`` the first query row's position modulo
BLOCK (the share of a block's rows whose offset ``o`` falls in that key block). Those weights are applied to the
tile's probabilities in registers, summed into the few block diagonals a tile reaches, and carried from tile to tile
until no later tile of the program's run can reach them: no scratch, and no skew. A program then takes at most BLOCK
rows (128 spill registers), and the row tiles' column sums meet in two atomic adds onto zero.

Nothing of size L x S is stored; K is read twice and never repeated for GQA.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .common import BLOCK, FLOAT_DTYPES, INTERPRET, LOG2E, device_reason

MAX_LAST_Q = 128  # rows held in one tile; longer estimates take the torch path
# Runs of key tiles per row at most: their row statistics are combined in one [MAX_SPLITS, rows] load, laid out for
# this many whatever the length, so that one compilation serves every length.
MAX_SPLITS = 64


@triton.jit
def _tile_logits(q, k_base, stride_kn, tile, rows_pos, start, kv_len, qk_scale, BLOCK_N: tl.constexpr,
                 HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PREC: tl.constexpr):
    """Scores (log2 domain) of the L rows against key tile ``tile``; -inf where a row cannot see the key. Dims past
    head_dim (up to the power of two D_PAD) are zeros in q and k."""
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    k = tl.load(k_base + offs_n.to(tl.int64)[:, None] * stride_kn + offs_d[None, :],
                mask=(offs_n < kv_len)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    visible = (offs_n[None, :] <= rows_pos[:, None]) & (offs_n[None, :] >= start)
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _load_rows(Q, heads_ptr, i, b, row0, q_len, L, GROUP, stride_qb, stride_qh, stride_qs, K, stride_kb, stride_kh,
               BLOCK_L: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """Rows row0.. of the last L query rows of selected head i of sample b (rows past L are zero), and the base of its
    KV head."""
    h = tl.load(heads_ptr + i)
    offs_l = row0 + tl.arange(0, BLOCK_L)
    rows = q_len - L + offs_l
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + rows.to(tl.int64)[:, None] * stride_qs
    d = tl.arange(0, D_PAD)
    q = tl.load(q_ptrs + d[None, :], mask=(offs_l < L)[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + (h // GROUP).to(tl.int64) * stride_kh
    return q, k_base


@triton.jit
def _row_stats(Q, K, heads_ptr, starts_ptr, Mx, Sm,
               stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_kn,
               q_len, kv_len, L, NH, GROUP, tiles_per_split, n_tiles, qk_scale,
               BLOCK_L: tl.constexpr, ROW_TILES: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
               D_PAD: tl.constexpr, PREC: tl.constexpr):
    # Grid (B * NH * ROW_TILES, splits): one program per (sample, selected head, BLOCK_L rows, run of key tiles).
    bi = tl.program_id(0)
    split = tl.program_id(1)
    b = bi // (NH * ROW_TILES)
    row0 = bi % ROW_TILES * BLOCK_L
    q, k_base = _load_rows(Q, heads_ptr, bi // ROW_TILES % NH, b, row0, q_len, L, GROUP, stride_qb, stride_qh,
                           stride_qs, K, stride_kb, stride_kh, BLOCK_L, HEAD_DIM, D_PAD)
    start = tl.load(starts_ptr + b)
    rows_pos = kv_len - L + row0 + tl.arange(0, BLOCK_L)
    # Finite start: a row that sees nothing in this split keeps (-1e30, 0) and never computes -inf - -inf.
    m_i = tl.full([BLOCK_L], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_L], dtype=tl.float32)
    first = tl.maximum(split * tiles_per_split, start // BLOCK_N)  # tiles before the sample's first key see nothing
    for tile in range(first, tl.minimum((split + 1) * tiles_per_split, n_tiles)):
        s = _tile_logits(q, k_base, stride_kn, tile, rows_pos, start, kv_len, qk_scale, BLOCK_N, HEAD_DIM, D_PAD,
                         PREC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    out = (bi * tl.num_programs(1) + split) * BLOCK_L + tl.arange(0, BLOCK_L)
    tl.store(Mx + out, m_i)
    tl.store(Sm + out, l_i)


@triton.jit
def _col_diag_sums(Q, K, heads_ptr, last_q_ptr, starts_ptr, Mx, Sm, Vert, Slash, Scratch,
                   stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_kn,
                   q_len, kv_len, L, NH, GROUP, tiles_per_split, n_tiles, n_splits, n_slash, qk_scale,
                   BLOCK_L: tl.constexpr, ROW_TILES: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                   D_PAD: tl.constexpr, SPLITS: tl.constexpr, SKEW: tl.constexpr, BY_BLOCK: tl.constexpr,
                   NB: tl.constexpr, BINS: tl.constexpr, BLOCK: tl.constexpr, PREC: tl.constexpr):
    # Same grid as _row_stats: the programs of one split run together, so the heads of a KV group read each key tile
    # at about the same time (from L2).
    bi = tl.program_id(0)
    split = tl.program_id(1)
    b = bi // (NH * ROW_TILES)
    i = bi // ROW_TILES % NH
    row0 = bi % ROW_TILES * BLOCK_L
    q, k_base = _load_rows(Q, heads_ptr, i, b, row0, q_len, L, GROUP, stride_qb, stride_qh, stride_qs, K, stride_kb,
                           stride_kh, BLOCK_L, HEAD_DIM, D_PAD)
    start = tl.load(starts_ptr + b)
    tile_l = tl.arange(0, BLOCK_L)
    offs_l = row0 + tile_l
    offs_n = tl.arange(0, BLOCK_N)
    rows_pos = kv_len - L + offs_l

    # Each row's log2-sum-exp from all splits' statistics. Rows that see nothing (padding, or outside this head's
    # last_q window) get +inf, so their probabilities are exactly 0.
    offs_s = tl.arange(0, SPLITS)
    stats = (bi * n_splits + offs_s)[:, None] * BLOCK_L + tile_l[None, :]
    mx = tl.load(Mx + stats, mask=(offs_s < n_splits)[:, None], other=-1.0e30)
    sm = tl.load(Sm + stats, mask=(offs_s < n_splits)[:, None], other=0.0)
    m_row = tl.max(mx, 0)
    l_row = tl.sum(sm * tl.math.exp2(mx - m_row[None, :]), 0)
    in_window = (offs_l < L) & (offs_l >= L - tl.load(last_q_ptr + i))
    lse = tl.where(in_window & (l_row > 0.0), m_row + tl.math.log2(tl.maximum(l_row, 1e-30)), float("inf"))

    # The program's own scratch tile, and a skewed view of it: column u of row r holds the tile's key
    # r + u - (BLOCK_L - 1), so a column is one diagonal (query position - key) across all rows.
    scratch = Scratch + (bi * n_splits + split).to(tl.int64) * (BLOCK_L * BLOCK_N)
    tile_ptrs = scratch + tile_l[:, None] * BLOCK_N + offs_n[None, :]
    offs_u = tl.arange(0, SKEW)
    skew = tile_l[:, None] + offs_u[None, :] - (BLOCK_L - 1)
    skew_ptrs = scratch + tile_l[:, None] * BLOCK_N + skew
    in_tile = (skew >= 0) & (skew < BLOCK_N)
    vert = Vert + (bi // ROW_TILES).to(tl.int64) * kv_len
    slash = Slash + bi.to(tl.int64) * n_slash  # [B, NH, ROW_TILES, n_slash]: summed over row tiles after

    # By block: u of row i and key j is u_row[i] - j. acc[n] holds block diagonal d0 + n, d0 the lowest that the
    # current tile reaches (its row 0 and last key); each next tile starts STEP block diagonals lower.
    STEP: tl.constexpr = BLOCK_N // BLOCK
    r = tl.maximum(kv_len - q_len - start, 0) % BLOCK
    u_row = rows_pos + tl.where(r > 0, BLOCK - r, 0)
    offs_d = tl.arange(0, BINS)
    acc = tl.zeros([BINS], dtype=tl.float32)

    first = tl.maximum(split * tiles_per_split, start // BLOCK_N)
    # (that lowest u is above -(L + BLOCK_N) >= -4 * BLOCK_N: shifted up by that to floor-divide a non-negative
    # integer)
    d0 = (tl.min(u_row) - first * BLOCK_N - BLOCK_N + 1 + 4 * BLOCK_N) // BLOCK - 4 * STEP
    for tile in range(first, tl.minimum((split + 1) * tiles_per_split, n_tiles)):
        s = _tile_logits(q, k_base, stride_kn, tile, rows_pos, start, kv_len, qk_scale, BLOCK_N, HEAD_DIM, D_PAD,
                         PREC)
        p = tl.math.exp2(s - lse[:, None])
        cols = tile * BLOCK_N + offs_n
        if ROW_TILES == 1:
            tl.store(vert + cols, tl.sum(p, 0), mask=cols < kv_len)
        else:  # two adds onto zero: the same sum in either order
            tl.atomic_add(vert + cols, tl.sum(p, 0), mask=cols < kv_len, sem="relaxed")
        if BY_BLOCK:
            x = (u_row[:, None] - cols[None, :] - d0 * BLOCK).to(tl.float32) * (1.0 / BLOCK)  # in [0, NB - 1)
            for n in tl.static_range(NB):
                acc += tl.where(offs_d == n, tl.sum(p * tl.maximum(1.0 - tl.abs(x - n), 0.0)), 0.0)
            # The run's later tiles reach only block diagonals below d0 + NB - STEP: add the ones above out, then
            # move the window down.
            done = (offs_d >= NB - STEP) & (offs_d < NB)
            tl.atomic_add(slash + d0 + offs_d, acc, mask=done & (d0 + offs_d >= 0) & (d0 + offs_d < n_slash),
                          sem="relaxed")
            acc = tl.where(done, 0.0, acc)
            acc = tl.sum(tl.where(offs_d[:, None] == offs_d[None, :] + STEP, acc[None, :], 0.0), 1)
            d0 -= STEP
        else:
            tl.store(tile_ptrs, p)
            tl.debug_barrier()  # the whole tile is in scratch before any thread reads it skewed
            diag = tl.sum(tl.load(skew_ptrs, mask=in_tile, other=0.0), 0)
            tl.debug_barrier()  # and read before the next tile overwrites it
            offset = kv_len - L - tile * BLOCK_N - offs_u + BLOCK_L - 1
            tl.atomic_add(slash + offset, diag, mask=(offset >= 0) & (offset < kv_len), sem="relaxed")
    if BY_BLOCK:
        left = (offs_d < NB) & (d0 + offs_d >= 0) & (d0 + offs_d < n_slash)
        tl.atomic_add(slash + d0 + offs_d, acc, mask=left, sem="relaxed")


@functools.lru_cache(maxsize=None)
def _num_sms(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def supports(q: torch.Tensor, rows: int) -> str | None:
    """None when :func:`vertical_slash_scores_triton` takes ``rows`` last queries of ``q``, else why not (the torch
    path computes the scores)."""
    if reason := device_reason(q):
        return reason
    if rows > MAX_LAST_Q:
        return f"{rows} estimation queries (at most {MAX_LAST_Q})"
    if q.shape[-1] % 16 or q.shape[-1] < 16:
        return f"head_dim {q.shape[-1]}"
    return None if q.dtype in FLOAT_DTYPES else f"dtype {q.dtype}"


def vertical_slash_scores_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    heads: torch.Tensor,
    last_q: torch.Tensor,
    rows: int,
    scale: float,
    starts: torch.Tensor,
    by_block: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertical and slash scores of the selected heads, streamed (see the module docstring).

    Arguments:
        q: (batch_size, nheads, seqlen_q, headdim); k: (batch_size, nheads_k, seqlen_k, headdim), same dtype
            (fp16/bf16; fp32 too), seqlen_q <= seqlen_k, any strides with unit stride on headdim; headdim a
            multiple of 16 (tiles are padded to a power of two).
        heads: integer tensor (nsel,) on q's device: the query heads to score.
        last_q: integer tensor (nsel,) on q's device: how many of the last queries each selected head uses.
        rows: min(max(last_q), seqlen_q), as a host integer (read on the host, it would wait for the GPU);
            at most MAX_LAST_Q.
        scale: softmax scale.
        starts: integer tensor (batch_size,) on q's device: first valid key (left padding); earlier keys and
            queries count as absent.
        by_block: return each block diagonal's share of the slash scores instead of the scores themselves.
    Return:
        vertical: (batch_size, nsel, seqlen_k) fp32. vertical[b, i, j] sums the causal softmax probabilities of key j
        over head i's last queries.
        slash: (batch_size, nsel, seqlen_k) fp32, slash[b, i, o] sums those at offset o = query position - key
        position; with ``by_block`` (batch_size, nsel, ceil(seqlen_k / BLOCK)), their
        :func:`~sparse_prefill.plan.vertical_slash.block_diagonal_mass`.
    """
    B, _, Sq, D = q.shape
    Sk = k.shape[2]
    NH = heads.numel()
    L = rows
    vertical = torch.zeros(B, NH, Sk, dtype=torch.float32, device=q.device)
    n_slash = triton.cdiv(Sk, BLOCK) if by_block else Sk
    if NH == 0 or Sk == 0:
        return vertical, torch.zeros(B, NH, n_slash, dtype=torch.float32, device=q.device)
    if not 0 < L <= min(MAX_LAST_Q, Sq):
        raise ValueError(f"vertical_slash_scores_triton: rows must be in [1, min({MAX_LAST_Q}, seqlen_q)], got {L}")
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    # By block, programs take at most BLOCK rows (more spill registers: 128 rows took 2.1 ms at 128K on an H200, two
    # programs of 64 rows 1.6 ms together); their sums are added up after (vertical: two atomic adds onto zero).
    BLOCK_L = max(16, triton.next_power_of_2(min(L, BLOCK) if by_block else L))
    row_tiles = triton.cdiv(L, BLOCK_L)
    slash = torch.zeros(B, NH, row_tiles, n_slash, dtype=torch.float32, device=q.device)
    # Key tiles at least as wide as the rows: then each diagonal crosses at most two tiles, and two atomic adds onto
    # zero give the same sum in either order.
    BLOCK_N = max(BLOCK, BLOCK_L)
    warps = 4 if BLOCK_L * BLOCK_N <= 64 * 64 else 8
    n_tiles = triton.cdiv(Sk, BLOCK_N)
    # Block diagonals one key tile reaches (u spans BLOCK_L + BLOCK_N - 1 values from any residue), and tiles that
    # reach one block diagonal: runs at least that long less one, so at most two runs add to it (in either order,
    # the same sum).
    reach = (BLOCK_L + BLOCK_N + BLOCK - 3) // BLOCK + 2
    min_run = triton.cdiv(reach, BLOCK_N // BLOCK) - 1 if by_block else 1
    sms = 4 if INTERPRET else _num_sms(q.device.index or 0)
    # About 8 programs per SM, each over a run of at least 1/MAX_SPLITS of the key tiles.
    per_split = max(triton.cdiv(n_tiles * B * NH * row_tiles, 8 * sms), triton.cdiv(n_tiles, MAX_SPLITS), min_run)
    n_splits = triton.cdiv(n_tiles, per_split)
    mx = torch.empty(B * NH * row_tiles, n_splits, BLOCK_L, dtype=torch.float32, device=q.device)
    sm = torch.empty_like(mx)
    scratch_rows = 1 if by_block else B * NH * n_splits  # by block: never touched
    scratch = torch.empty(scratch_rows, BLOCK_L * BLOCK_N, dtype=torch.float32, device=q.device)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    group = q.shape[1] // k.shape[1]
    qk_scale = scale * LOG2E
    grid = (B * NH * row_tiles, n_splits)
    d_pad = triton.next_power_of_2(D)  # tile shapes are powers of two; the padding dims load as zeros
    _row_stats[grid](
        q, k, heads, starts, mx, sm, *strides, Sq, Sk, L, NH, group, per_split, n_tiles, qk_scale,
        BLOCK_L=BLOCK_L, ROW_TILES=row_tiles, BLOCK_N=BLOCK_N, HEAD_DIM=D, D_PAD=d_pad, PREC=prec, num_warps=warps,
    )
    _col_diag_sums[grid](
        q, k, heads, last_q, starts, mx, sm, vertical, slash, scratch, *strides, Sq, Sk, L, NH, group, per_split,
        n_tiles, n_splits, n_slash, qk_scale,
        BLOCK_L=BLOCK_L, ROW_TILES=row_tiles, BLOCK_N=BLOCK_N, HEAD_DIM=D, D_PAD=d_pad, SPLITS=MAX_SPLITS,
        SKEW=triton.next_power_of_2(BLOCK_L + BLOCK_N - 1), BY_BLOCK=by_block, NB=reach,
        BINS=triton.next_power_of_2(reach), BLOCK=BLOCK, PREC=prec, num_warps=warps,
    )
    return vertical, slash[:, :, 0] if row_tiles == 1 else slash.sum(2)
