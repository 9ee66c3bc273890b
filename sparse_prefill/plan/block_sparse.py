"""Block-sparse heads: per query block, the ``top_k`` key blocks by mean-pooled q·k, always including the blocks on
the query block's own diagonal. The whole choice is made in *measure* (select passes the lists on)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..index import BLOCK, block_bases, query_offsets
from ..ops import ascending, cdiv
from .common import Ctx, block_means, first_query_rows, kv_chunks, topk_budget
from .pattern import Pattern, Sets

if TYPE_CHECKING:
    from ..config import HeadSpec


class BlockSparse(Pattern):
    def measure(self, q, k, specs, heads, shape, ctx) -> dict[str, torch.Tensor]:
        return {"blocks": block_sparse_sets(q, k, specs, heads, shape.scale, shape.kv_start, ctx)}

    def select(self, measured, specs, heads, shape, ctx) -> Sets:
        return Sets(blocks=measured["blocks"])


PATTERN = BlockSparse(
    name="block_sparse",
    abbrev="BS",
    alias="block",
    defaults={"top_k": 100},  # key blocks per query block
    budgets=frozenset({"top_k"}),
    dynamic=True,
)


def block_sparse_sets(
    q: torch.Tensor,
    k: torch.Tensor,
    specs: list[HeadSpec],
    heads: list[int],
    scale: float,
    kv_start: list[int],
    ctx: Ctx,
) -> torch.Tensor:
    """[B, len(heads), M, K] int32 key blocks of the block-sparse ``heads`` per query block, ascending then -1, in
    each sample's own block grid. q: [B, Hq, Sq, D] after RoPE; k: [B, Hkv, Sk, D]."""
    B, H, Sq, _ = q.shape
    Sk = k.shape[2]
    group = H // k.shape[1]
    M, N = cdiv(Sq, BLOCK), cdiv(Sk, BLOCK)
    width = min(max(s.budget("top_k", N) for s in specs), N)  # no sample's budget is larger: N is the longest grid
    out = torch.full((B, len(heads), M, width), -1, dtype=torch.int32, device=q.device)
    starts = ctx.const(kv_start, q.device)
    _, off = query_offsets(Sq, Sk, starts)
    base = block_bases(Sq, Sk, starts)
    flag = torch.zeros(B, H, dtype=torch.bool, device=q.device)
    flag[:, ctx.const(heads, q.device)] = True
    first = first_query_rows(Sq, Sk, kv_start)
    pooled_q, pooled_k = block_means(q, first, flag, ctx), block_means(k, kv_start, ctx=ctx)
    for b in range(B):
        Mb, Nb = cdiv(Sq - first[b], BLOCK), cdiv(Sk - kv_start[b], BLOCK)
        budgets = [s.budget("top_k", Nb) for s in specs]
        j = torch.arange(Nb, device=q.device)
        top = base[b, :Mb, None]
        own = (off[b] + torch.arange(Mb, device=q.device) * BLOCK)[:, None] // BLOCK  # block of the first row
        for kv0, kv1, sel in kv_chunks(heads, group, Mb * Nb * 4):
            rows = ctx.const([heads[i] for i in sel], q.device)
            pq = pooled_q[b, :, :Mb].index_select(0, rows).unflatten(0, (kv1 - kv0, -1))
            scores = (pq @ pooled_k[b, kv0:kv1, None, :Nb].transpose(-1, -2)).flatten(0, 1) * scale  # [h, Mb, Nb]
            scores.masked_fill_(j[None, :] > top, float("-inf"))
            scores.masked_fill_((j[None, :] >= own) & (j[None, :] <= top), float("inf"))
            picked = topk_budget(scores, [budgets[i] for i in sel], ctx)
            out[b, ctx.const(sel, q.device), :Mb, : picked.shape[-1]] = ascending(picked).int()
    return out
