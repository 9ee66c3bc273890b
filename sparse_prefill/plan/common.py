"""What the patterns' estimators share: the call context (backend and cached constants), per-sample budgets, top-k
with per-head budgets, per-head scatter, KV-head runs, and block means."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .. import kernels
from ..backend import Backend
from ..index import BLOCK
from ..ops import cdiv
from ..state import Resources

if TYPE_CHECKING:
    from ..config import HeadSpec


@dataclass(frozen=True)
class Ctx:
    """What an index build reads besides q/k: the call's backend (which estimation kernels may run) and the
    resources of the patch (cached constants, graph pools)."""

    backend: Backend
    resources: Resources

    @classmethod
    def default(cls, device: torch.device) -> Ctx:
        """Outside a patch: the ``"auto"`` backend of ``device`` and resources of its own."""
        return cls(Backend.of("auto", device), Resources())

    def const(self, values, device, dtype: torch.dtype = torch.long) -> torch.Tensor:
        """:meth:`~sparse_prefill.state.Resources.const`."""
        return self.resources.const(values, device, dtype)

    def uses(self, kernel, *args) -> bool:
        """:meth:`~sparse_prefill.backend.Backend.uses`."""
        return self.backend.uses(kernel, *args)


def per_sample_budgets(specs: list[HeadSpec], name: str, lengths: list[int]) -> list[list[int]]:
    """[B][h] budget ``name`` of each head resolved against each sample's own length (its valid keys, or key
    blocks), so that a sample gets what it would get alone, whatever else is in the batch."""
    return [[s.budget(name, n) for s in specs] for n in lengths]


def prefix(lengths: list[list[int]], dev: torch.device, ctx: Ctx) -> torch.Tensor:
    """[B, h, max(lengths)] from [B][h] lengths: 0..n-1 per sample and head, -1 after."""
    n = torch.arange(max(map(max, lengths)), device=dev)
    return torch.where(n < ctx.const(lengths, dev)[..., None], n, -1)


def scatter_heads(B: int, H: int, pieces: list, dev: torch.device, ctx: Ctx) -> torch.Tensor:
    """Stack per-pattern (heads, [B, h, ..., n]) pieces into one [B, H, ..., max n] int64 tensor, -1 where a head
    has nothing; pieces agree on the middle dims."""
    if len(pieces) == 1 and list(pieces[0][0]) == list(range(H)):  # one pattern for every head: already stacked
        return pieces[0][1]
    width = max((p.shape[-1] for _, p in pieces), default=0)
    middle = pieces[0][1].shape[2:-1] if pieces else ()
    out = torch.full((B, H, *middle, width), -1, dtype=torch.long, device=dev)
    for hs, p in pieces:
        out[:, ctx.const(hs, dev), ..., : p.shape[-1]] = p.long()
    return out


def topk_budget(scores: torch.Tensor, budgets: list, ctx: Ctx) -> torch.Tensor:
    """Top entries along the last dim, with a budget per head: ``budgets`` is [h] for scores [h, ..., S], or [B][h]
    for scores [B, h, ..., S]. -1 past the budget or at a -inf score."""
    per_head = ctx.const(budgets, scores.device)
    kmax = min(max(max(row) if isinstance(row, list) else row for row in budgets), scores.shape[-1])
    vals, idx = scores.topk(kmax, dim=-1)
    per_head = per_head.view(*per_head.shape, *[1] * (scores.dim() - per_head.dim()))
    keep = torch.arange(kmax, device=scores.device) < per_head
    return torch.where(keep & (vals > float("-inf")), idx, -1)


def kv_chunks(heads: list[int], group: int, bytes_per_head: int, budget: int = 1 << 26):
    """Runs of consecutive KV heads that select the same number of query heads, within a memory budget.

    Yields (first KV head, last KV head + 1, positions in ``heads`` in KV-head order), so one batched matmul per run
    serves every selected query head of those KV heads without repeating K.
    """
    by_kv: dict[int, list[int]] = {}
    for i, h in enumerate(heads):
        by_kv.setdefault(h // group, []).append(i)
    run: list[int] = []
    for kv in sorted(by_kv):
        fits = (len(run) + 1) * len(by_kv[kv]) * bytes_per_head <= budget
        if run and (kv != run[-1] + 1 or len(by_kv[kv]) != len(by_kv[run[0]]) or not fits):
            yield run[0], run[-1] + 1, [i for r in run for i in by_kv[r]]
            run = []
        run.append(kv)
    if run:
        yield run[0], run[-1] + 1, [i for r in run for i in by_kv[r]]


def first_query_rows(q_len: int, kv_len: int, kv_start: list[int]) -> list[int]:
    """Per sample, the first tensor row of the queries that holds a valid query (host integers)."""
    return [max(0, s - (kv_len - q_len)) for s in kv_start]


def _mean_pool(x: torch.Tensor, flag: torch.Tensor | None, ctx: Ctx) -> torch.Tensor:
    """[h, S, D] -> [h, cdiv(S, BLOCK), D] fp32 means over BLOCK rows (the last block over the rows it has).

    Sums in fp32 straight from x: no fp32 or padded copy of it. On the Triton backend a kernel does it in one pass,
    and skips the heads whose ``flag`` ([h] bool) is off (their means stay 0); the torch path pools every head."""
    if ctx.uses(kernels.pooled, x):
        return kernels.pooled.mean_pool_triton(x, flag)
    S = x.shape[1]
    full = S // BLOCK
    sums = x[:, : full * BLOCK].unflatten(1, (full, BLOCK)).sum(2, dtype=torch.float32)
    if full * BLOCK < S:
        sums = torch.cat([sums, x[:, full * BLOCK :].sum(1, keepdim=True, dtype=torch.float32)], 1)
    counts = (S - torch.arange(sums.shape[1], device=x.device) * BLOCK).clamp(max=BLOCK)
    return sums / counts[None, :, None]


def block_means(
    x: torch.Tensor, first: list[int], flag: torch.Tensor | None = None, ctx: Ctx | None = None
) -> torch.Tensor:
    """[B, H, S, D] queries or keys -> [B, H, cdiv(S, BLOCK), D] fp32 means of each BLOCK rows, in each sample's own
    block grid: from row ``first[b]`` on (zeros past its blocks). ``flag`` [B, H] bool: on the Triton backend, only
    these heads are pooled (the others stay zero)."""
    ctx = ctx or Ctx.default(x.device)
    B, H, S, D = x.shape
    out = torch.zeros(B, H, cdiv(S, BLOCK), D, device=x.device)
    for b in range(B):
        pooled = _mean_pool(x[b, :, first[b] :], None if flag is None else flag[b], ctx)
        out[b, :, : pooled.shape[1]] = pooled
    return out
