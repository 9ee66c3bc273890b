"""Small tensor helpers with no sparse-attention meaning: ceil division, prefix sums, ascending lists."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def cdiv_tensor(a: torch.Tensor, b: int) -> torch.Tensor:
    return torch.div(a + b - 1, b, rounding_mode="floor")


def ascending(values: torch.Tensor) -> torch.Tensor:
    """[..., K] integers, ``-1`` for none -> each row's entries ascending, then the ``-1`` (the list format of
    :func:`~sparse_prefill.index.make_index`)."""
    big = torch.iinfo(values.dtype).max
    out = torch.where(values >= 0, values, big).sort(dim=-1).values
    return out.masked_fill_(out == big, -1)


def cumsum(x: torch.Tensor) -> torch.Tensor:
    """``x.cumsum(-1)``; on CUDA, rows longer than 4096 are scanned in chunks (:func:`chunked_cumsum`): torch scans
    each row in one thread block, so the few 128K-long rows of an index build would keep most of the GPU idle
    (timings: docs/estimation.md)."""
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
