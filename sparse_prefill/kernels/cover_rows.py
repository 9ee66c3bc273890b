"""Triton kernel for the block lists of query-aware adaptive heads (:func:`sparse_prefill.plan.adaptive.cover` per row).

For each (head, query block) row of pooled scores: causal softmax over key blocks, then the smallest set of key blocks
that holds the forced ones and reaches ``gamma`` of the row's mass, written as an ascending list. Heads whose flag is
0 (not query-aware on this input) return at once, so the cost follows the heads that use the lists; the torch path
has to rank every head's rows because it cannot skip work without reading the flags on the host.

The set is found without sorting: with ``F`` the forced mass and ``g(x) = F + sum of unforced p > x``, an unforced
entry is kept iff ``g(p) < gamma`` (the mass ranked above it falls short of the target), and ``g`` is monotone, so
a bisection over the bit patterns of non-negative floats finds the smallest kept value exactly. This is the same set
as ranking and accumulating (ties aside), up to float rounding of the sums at the boundary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import device_reason


@triton.jit
def _cover_rows(
    scores_ptr, top_ptr, lo_ptr, sink_ptr, gamma_ptr, flag_ptr, out_ptr, count_ptr,
    stride_sh, stride_sm, stride_oh, stride_om, stride_lh, Nb, K, scale,
    NPAD: tl.constexpr, ITERS: tl.constexpr,
):
    m = tl.program_id(0)
    i = tl.program_id(1)
    if tl.load(flag_ptr + i) == 0:
        return
    j = tl.arange(0, NPAD)
    top = tl.load(top_ptr + m)
    causal = (j <= top) & (j < Nb)
    s = tl.load(scores_ptr + i.to(tl.int64) * stride_sh + m.to(tl.int64) * stride_sm + j, mask=causal,
                other=float("-inf"))
    s = s * scale
    p = tl.exp(s - tl.max(s, 0))
    p = tl.where(causal, p, 0.0)
    p = p / tl.sum(p, 0)
    lo = tl.load(lo_ptr + i * stride_lh + m)
    forced = causal & ((j >= lo) | (j < tl.load(sink_ptr + i)))
    gamma = tl.load(gamma_ptr + i)
    free = tl.where(forced, 0.0, p)
    target = gamma * tl.sum(p, 0) - tl.sum(tl.where(forced, p, 0.0), 0)
    # Smallest x (as float bits in [0, 2^31)) with sum(free > x) < target: entries >= x are kept.
    lo_bits = 0
    hi_bits = 0x7F800000  # +inf: sum(free > inf) = 0 < target whenever anything is still needed
    for _ in range(ITERS):
        mid = lo_bits + (hi_bits - lo_bits) // 2
        x = mid.to(tl.int32).to(tl.float32, bitcast=True)
        short = tl.sum(tl.where(free > x, free, 0.0), 0) < target
        hi_bits = tl.where(short, mid, hi_bits)
        lo_bits = tl.where(short, lo_bits, mid + 1)
    x = hi_bits.to(tl.int32).to(tl.float32, bitcast=True)
    x = tl.where(gamma >= 1.0, 0.0, x)  # gamma 1: every block with mass, whatever the rounding
    x = tl.where(target > 0.0, x, float("inf"))  # the forced blocks already reach gamma
    keep = forced | ((free > 0.0) & (free >= x))
    pos = tl.cumsum(keep.to(tl.int32), 0) - 1
    tl.store(out_ptr + i.to(tl.int64) * stride_oh + m.to(tl.int64) * stride_om + pos, j, mask=keep & (pos < K))
    tl.store(count_ptr + i * tl.num_programs(0) + m, tl.sum(keep.to(tl.int32), 0))


def supports(x: torch.Tensor) -> str | None:
    """None when :func:`cover_rows_triton` takes scores like ``x`` (any shape its arguments allow on CUDA), else why
    not."""
    return device_reason(x)


def cover_rows_triton(
    scores: torch.Tensor,
    top: torch.Tensor,
    lo: torch.Tensor,
    sink: torch.Tensor,
    gamma: torch.Tensor,
    flag: torch.Tensor,
    K: int,
    scale: float = 1.0,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key-block lists of rows of pooled scores.

    Arguments:
        scores: (heads, rows, nblocks) float32 pooled q·k of each query block (row) and key block, unscaled.
        top: (rows,) int, the last causal key block of each row (``j > top[m]`` is masked).
        lo: (heads, rows) int, forced from this key block on (the row's own and local blocks).
        sink: (heads,) int, forced below this key block (the sinks' blocks).
        gamma: (heads,) float32, the mass each row's set must reach (1 keeps every block with mass).
        flag: (heads,) int or bool, rows of heads with 0 are skipped (count 0, list empty).
        K: list width.
        scale: softmax scale applied to ``scores``.
        out: (heads, rows, K) int32 filled with -1 (any strides with unit stride on K) to write the lists into;
            ``None``: a new one.
    Return:
        blocks: (heads, rows, K) int32 (``out``), each row's set ascending then -1 (cut at K);
        count: (heads, rows) int64, the set's size (may exceed K: the row does not fit).
    """
    H, M, N = scores.shape
    scores = scores.float().contiguous()
    lo = lo.to(torch.int32).contiguous()
    blocks = torch.full((H, M, K), -1, dtype=torch.int32, device=scores.device) if out is None else out
    count = torch.zeros(H, M, dtype=torch.int32, device=scores.device)
    if H == 0 or M == 0:
        return blocks, count.long()
    # One program per (row, head); a row's scores sit in registers (NPAD = N rounded up to a power of two).
    _cover_rows[(M, H)](
        scores, top.to(torch.int32).contiguous(), lo, sink.to(torch.int32).contiguous(),
        gamma.float().contiguous(), flag.to(torch.int32).contiguous(), blocks, count,
        scores.stride(0), scores.stride(1), blocks.stride(0), blocks.stride(1), lo.stride(0), N, K, scale,
        NPAD=triton.next_power_of_2(N), ITERS=32, num_warps=4 if N <= 2048 else 8,
    )
    return blocks, count.long()
