"""Triton kernels for the key columns of adaptive vertical-slash heads (:func:`sparse_prefill.plan.adaptive.cover` per
head).

Each (sample, head) has one row of vertical scores as long as the keys (128K at 128K tokens). Ranking it takes a
full sort in torch, and turning the kept ranks back into ascending columns a scatter and a prefix sum: a dozen
kernels over [B, h, Sk]. Here the set is found without sorting. With ``F`` the forced (sink) mass and
``g(x) = F + sum of unforced scores > x``, an unforced column is kept iff ``g`` of its score falls short of the
target (the mass ranked above it does), and ``g`` is monotone, so the smallest kept score is a threshold found by
search over the bit patterns of non-negative floats (as in :mod:`~sparse_prefill.kernels.cover_rows`, where a row
fits in registers). A row here does not, so the search is spread over chunks of the row and over launches:

1. ``PASSES`` search passes, one program per (chunk, row): each evaluates ``g`` at ``CUTS`` points of the current
   interval of bit patterns over its chunk and stores the partial sums. A pass narrows the interval ``CUTS``-fold
   (2^31 patterns: 8 passes of 16). Each program replays the earlier passes' choices from their partial sums,
   summed in chunk order, so every program of a row agrees on the interval and the result is deterministic.
2. A count pass: the kept columns of each chunk, and their ``per_col`` sum.
3. A write pass: each chunk's kept columns at their place in the row's ascending list (after the earlier chunks'),
   and ``-1`` past the list's end.

The target is sink-aware, as in :func:`~sparse_prefill.plan.adaptive.cover_columns_torch`: with ``s`` the forced
columns'
share of the row, the set reaches ``s + gamma (1 - s)`` of it (``gamma >= 1``: every column with mass).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, device_reason

# 16 points per pass (8 passes: 16^8 >= 2^31 bit patterns): on an H200 at 128K keys, 0.21 ms for 32 rows, against
# 0.27 ms with 32 points and 1.1 ms for the torch ranking.
CUTS = 16
PASSES = 8


@triton.jit
def _target(Stats, row, NCH: tl.constexpr, gamma):
    """(sink-aware gamma, what the unforced columns must add) of a row, from its chunks' total and forced sums."""
    ch = tl.arange(0, NCH)
    total = tl.sum(tl.load(Stats + (row * NCH + ch) * 2), 0)
    forced = tl.sum(tl.load(Stats + (row * NCH + ch) * 2 + 1), 0)
    sinks = forced / tl.maximum(total, 1e-30)
    gamma = tl.where(gamma >= 1.0, 1.0, sinks + gamma * (1.0 - sinks))
    return gamma, gamma * total - forced


@triton.jit
def _interval(Part, row, n_rows, target, PASS: tl.constexpr, NCH: tl.constexpr, CUTS: tl.constexpr):
    """[lo, hi] bit patterns holding the smallest kept score, after search passes 0..PASS-1 (g(hi) < target)."""
    lo = tl.zeros((), dtype=tl.int64)
    hi = tl.full((), 0x7F800000, dtype=tl.int64)  # g(+inf) = 0 < target whenever anything is still needed
    j = tl.arange(0, CUTS)
    ch = tl.arange(0, NCH)
    for p in tl.static_range(PASS):
        part = tl.load(Part + ((p * n_rows + row) * NCH + ch)[:, None] * CUTS + j[None, :])
        short = tl.sum(part, 0) < target  # [CUTS] g(cut) < target: the answer is at or below the cut
        first = tl.min(tl.where(short, j, CUTS), 0)
        cut = lo + (hi - lo) * j.to(tl.int64) // CUTS
        below = tl.sum(tl.where(j == first - 1, cut, 0), 0)  # the last cut still >= target
        at = tl.sum(tl.where(j == first, cut, 0), 0)
        new_lo = tl.where(first == 0, lo, below + 1)
        hi = tl.where(first == CUTS, hi, at)
        lo = new_lo
    return lo, hi


@triton.jit
def _cover_pass(V, starts_ptr, force_ptr, gamma_ptr, per_col_ptr, Stats, Part, Counts, TilesPart, Cols, Tiles,
                Gammas, Sk, NH, PASS: tl.constexpr, PASSES: tl.constexpr, CUTS: tl.constexpr, CHUNK: tl.constexpr,
                NCH: tl.constexpr, SUB: tl.constexpr):
    # Grid (chunks, rows); PASS < PASSES: search, PASSES: count, PASSES + 1: write.
    chunk = tl.program_id(0)
    row = tl.program_id(1)
    n_rows = tl.num_programs(1)
    b = row // NH
    i = row % NH
    start = tl.load(starts_ptr + b)
    n = Sk - start  # the sample's keys: local column c is tensor column start + c
    v = V + row.to(tl.int64) * Sk + start
    force = tl.load(force_ptr + i)
    c0 = chunk * CHUNK

    if PASS == 0:
        c = c0 + tl.arange(0, CHUNK)
        x = tl.load(v + c, mask=c < n, other=0.0)
        tl.store(Stats + (row * NCH + chunk) * 2, tl.sum(x, 0))
        tl.store(Stats + (row * NCH + chunk) * 2 + 1, tl.sum(tl.where(c < force, x, 0.0), 0))
    if PASS < PASSES:
        # Partial g at the cuts of the interval the earlier passes left (pass 0: everything); chunks use no target.
        target = 0.0
        if PASS > 0:
            target = _target(Stats, row, NCH, tl.load(gamma_ptr + i))[1]
        lo, hi = _interval(Part, row, n_rows, target, PASS, NCH, CUTS)
        j = tl.arange(0, CUTS)
        cut = (lo + (hi - lo) * j.to(tl.int64) // CUTS).to(tl.int32).to(tl.float32, bitcast=True)
        acc = tl.zeros([SUB, CUTS], dtype=tl.float32)  # reduced once at the end, not per step
        for s0 in range(0, CHUNK, SUB):
            cs = c0 + s0 + tl.arange(0, SUB)
            xs = tl.load(v + cs, mask=(cs < n) & (cs >= force), other=0.0)
            acc += tl.where(xs[:, None] > cut[None, :], xs[:, None], 0.0)
        tl.store(Part + ((PASS * n_rows + row) * NCH + chunk) * CUTS + j, tl.sum(acc, 0))
    else:
        gamma, target = _target(Stats, row, NCH, tl.load(gamma_ptr + i))
        x_min = _interval(Part, row, n_rows, target, PASSES, NCH, CUTS)[1].to(tl.int32).to(tl.float32, bitcast=True)
        x_min = tl.where(gamma >= 1.0, 0.0, x_min)  # gamma 1: every column with mass, whatever the rounding
        x_min = tl.where(target > 0.0, x_min, float("inf"))  # the forced columns already reach gamma
        c = c0 + tl.arange(0, CHUNK)
        x = tl.load(v + c, mask=c < n, other=0.0)
        keep = (c < n) & ((c < force) | ((x > 0.0) & (x >= x_min)))
        if PASS == PASSES:
            tl.store(Counts + row * NCH + chunk, tl.sum(keep.to(tl.int32), 0))
            per_col = tl.load(per_col_ptr + b.to(tl.int64) * Sk + c, mask=c < n, other=0.0)
            tl.store(TilesPart + row * NCH + chunk, tl.sum(tl.where(keep, per_col, 0.0), 0))
        else:
            ch = tl.arange(0, NCH)
            counts = tl.load(Counts + row * NCH + ch)
            before = tl.sum(tl.where(ch < chunk, counts, 0), 0)
            pos = before + tl.cumsum(keep.to(tl.int32), 0) - 1
            cols = Cols + row.to(tl.int64) * Sk
            tl.store(cols + pos, c, mask=keep)
            tl.store(cols + c, tl.full([CHUNK], -1, tl.int32), mask=(c < Sk) & (c >= tl.sum(counts, 0)))
            if chunk == 0:
                tl.store(Tiles + row, tl.sum(tl.load(TilesPart + row * NCH + ch), 0))
                tl.store(Gammas + row, gamma)


def supports(x: torch.Tensor) -> str | None:
    """None when :func:`cover_columns_triton` takes scores like ``x`` (any shape its arguments allow on CUDA), else why
    not."""
    return device_reason(x)


def cover_columns_triton(
    vertical: torch.Tensor, starts: torch.Tensor, force: torch.Tensor, gamma: torch.Tensor, per_col: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Key columns of vertical-slash heads from their vertical scores.

    Arguments:
        vertical: (batch_size, nheads, seqlen_k) float32 scores per tensor column (padding columns hold 0).
        starts: (batch_size,) int, first valid key column of each sample (its local column 0).
        force: (nheads,) int, the first ``force[i]`` local columns are always kept (sinks).
        gamma: (nheads,) float32 in (0, 1]: the share of the mass the sinks leave that the set must reach.
        per_col: (batch_size, seqlen_k) float32 per local column, summed over the kept ones into ``tiles``.
    Return:
        cols: (batch_size, nheads, seqlen_k) int32 kept local columns ascending, then -1;
        tiles: (batch_size, nheads) float32, ``per_col`` summed over the kept columns;
        gamma: (batch_size, nheads) float32, the sink-aware share the set reached for.
    """
    B, H, Sk = vertical.shape
    dev = vertical.device
    cols = torch.empty(B, H, Sk, dtype=torch.int32, device=dev)
    tiles = torch.zeros(B, H, dtype=torch.float32, device=dev)
    gammas = torch.zeros_like(tiles)
    if cols.numel() == 0:
        return cols, tiles, gammas
    # Chunks of at least 4096 columns (256 interpreted), at most 64 per row: a program sums its row's partials.
    chunk = 256 if INTERPRET else max(4096, triton.next_power_of_2(triton.cdiv(Sk, 64)))
    n_chunks = triton.cdiv(Sk, chunk)
    NCH = triton.next_power_of_2(n_chunks)
    stats = torch.zeros(B * H, NCH, 2, dtype=torch.float32, device=dev)  # (total, forced) per chunk
    part = torch.zeros(PASSES, B * H, NCH, CUTS, dtype=torch.float32, device=dev)
    counts = torch.zeros(B * H, NCH, dtype=torch.int32, device=dev)
    tiles_part = torch.zeros(B * H, NCH, dtype=torch.float32, device=dev)
    args = (
        vertical.float().contiguous(), starts.to(torch.int32).contiguous(), force.to(torch.int32).contiguous(),
        gamma.float().contiguous(), per_col.float().contiguous(), stats, part, counts, tiles_part, cols, tiles,
        gammas, Sk, H,
    )
    for p in range(PASSES + 2):
        _cover_pass[(n_chunks, B * H)](*args, PASS=p, PASSES=PASSES, CUTS=CUTS, CHUNK=chunk, NCH=NCH, SUB=256,
                                           num_warps=4)
    return cols, tiles, gammas
