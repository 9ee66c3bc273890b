"""Vertical-slash heads (MInference): the top key columns and the top diagonals of the last queries' attention.

*Measure*: softmax attention of the last ``last_q`` queries over all keys, causal; summed per key column (vertical
scores) and per diagonal (slash scores, or with every head's ``slash_select`` "block" only their share per block
diagonal). *Select*: keep the top ``vertical`` columns and the top ``slash`` diagonals ("token": each diagonal
costs the key blocks it crosses) or the block diagonals covering the most slash mass, ``slash`` keys' worth
("block"); always including the first ``force_vertical`` columns and the ``force_slash`` nearest diagonals.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .. import kernels
from ..index import BLOCK, query_offsets, slash_diagonals
from ..ops import ascending, cdiv, cumsum
from .common import Ctx, kv_chunks, per_sample_budgets, topk_budget
from .pattern import Pattern, Sets

if TYPE_CHECKING:
    from ..config import HeadSpec


class VerticalSlash(Pattern):
    def check(self, params: dict) -> str | None:
        for budget, forced in (("vertical", "force_vertical"), ("slash", "force_slash")):
            if isinstance(params[budget], int) and params[forced] > params[budget]:
                return f"{forced}: must not exceed {budget}={params[budget]}"
        return None

    def measure(self, q, k, specs, heads, shape, ctx) -> dict[str, torch.Tensor]:
        last_q = [s.params["last_q"] for s in specs]
        vertical, slash = vertical_slash_scores(q, k, heads, last_q, shape.scale, shape.starts, _by_block(specs), ctx)
        return {"vertical": vertical, "slash": slash}

    def select(self, measured, specs, heads, shape, ctx) -> Sets:
        vertical, slash, by_block = measured["vertical"], measured["slash"], _by_block(specs)
        cols, diag = vertical_slash_select(vertical, slash, specs, shape.Sq, shape.starts, shape.lengths, by_block, ctx)
        return Sets(cols=cols, diag=diag)


def _by_block(specs: list[HeadSpec]) -> bool:
    """Slash scores are only needed per block diagonal (cheaper to estimate) unless a head ranks single offsets."""
    return all(s.params["slash_select"] == "block" for s in specs)


# MInference's defaults. ``slash_select`` "token" keeps the ``slash`` top diagonals (MInference; each scattered one
# costs up to two key blocks per query block), "block" the slash/64 block diagonals that cover the most slash mass
# (the kernel's cost, fixed by the budget).
PATTERN = VerticalSlash(
    name="vertical_slash",
    abbrev="VS",
    alias="vs",
    defaults={
        "vertical": 1000,
        "slash": 6096,
        "last_q": 64,
        "force_vertical": 30,
        "force_slash": 100,
        "slash_select": "block",
    },
    budgets=frozenset({"vertical", "slash"}),
    choices={"slash_select": ("token", "block")},
    dynamic=True,
)


def vertical_slash_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    heads: list[int],
    last_q: list[int],
    scale: float,
    starts: torch.Tensor,
    by_block: bool = False,
    ctx: Ctx | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertical and slash scores of the given heads: [B, len(heads), Sk] fp32 each, or with ``by_block`` the slash
    scores' :func:`block_diagonal_mass` ([B, len(heads), ceil(Sk / BLOCK)]) in their place.

    Causal softmax attention of each head's last ``last_q[i]`` queries over all keys (padding keys and padding
    queries get probability 0), summed per key column and per diagonal offset (query position - key position).
    On the Triton backend a streaming kernel computes them without any [L, Sk] buffer (by block, without the per-offset
    sums either). Here (CPU, or shapes it does not take) one KV head at a time: the only large buffer is that KV
    head's [B, group, L, Sk] probabilities, and K/V are never repeated.
    """
    ctx = ctx or Ctx.default(q.device)
    rows = min(max(last_q), q.shape[2])
    if ctx.uses(kernels.vs_scores, q, rows):
        heads_t, last_q_t = ctx.const(heads, q.device), ctx.const(last_q, q.device)
        return kernels.vs_scores.vertical_slash_scores_triton(q, k, heads_t, last_q_t, rows, scale, starts, by_block)
    vertical, slash = vertical_slash_scores_torch(q, k, heads, last_q, scale, starts, ctx)
    return vertical, block_diagonal_mass(slash, q.shape[2], k.shape[2], starts) if by_block else slash


def vertical_slash_scores_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    heads: list[int],
    last_q: list[int],
    scale: float,
    starts: torch.Tensor,
    ctx: Ctx | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`vertical_slash_scores` in plain torch, on any device."""
    ctx = ctx or Ctx.default(q.device)
    B, H, Sq, _ = q.shape
    Sk = k.shape[2]
    group = H // k.shape[1]
    L = min(max(last_q), Sq)
    pos = Sk - L + torch.arange(L, device=q.device)
    keys = torch.arange(Sk, device=q.device)
    visible = (keys[None, None, :] <= pos[None, :, None]) & (keys[None, None, :] >= starts[:, None, None])  # [B, L, Sk]
    in_window = torch.arange(L, device=q.device)[None, :] >= L - ctx.const(last_q, q.device)[:, None]
    vertical = torch.empty(B, len(heads), Sk, device=q.device)
    slash = torch.empty_like(vertical)
    for kv0, kv1, sel in kv_chunks(heads, group, B * L * Sk * 4):
        qh = (
            q[:, :, Sq - L :]
            .index_select(1, ctx.const([heads[i] for i in sel], q.device))
            .float()
            .unflatten(1, (kv1 - kv0, -1))
        )  # [B, kv, g, L, D]
        logits = (qh @ k[:, kv0:kv1, None].float().transpose(-1, -2)).flatten(1, 2) * scale  # [B, kv*g, L, Sk]
        logits.masked_fill_(~visible[:, None], float("-inf"))
        p = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
        p.mul_(in_window[sel][None, :, :, None])
        vertical[:, sel] = p.sum(-2)
        slash[:, sel] = diagonal_sums(p)
    return vertical, slash


def diagonal_sums(p: torch.Tensor) -> torch.Tensor:
    """[..., L, Sk] attention of the last L queries -> [..., Sk] mass per diagonal offset (query pos - key pos).

    Row r sits at position Sk - L + r; shifting row r right by L - 1 - r lines up equal offsets in one column. A
    strided view of the left-padded rows does the shift without a gather.
    """
    *lead, L, Sk = p.shape
    buf = F.pad(p, (L, 0)).contiguous()
    strides = list(buf.stride())
    strides[-2] = Sk + L + 1
    skewed = buf.as_strided((*lead, L, Sk), strides, buf.storage_offset() + 1)
    return skewed.sum(-2).flip(-1)


def vertical_slash_select(
    vertical: torch.Tensor,
    slash: torch.Tensor,
    specs: list[HeadSpec],
    q_len: int,
    starts: torch.Tensor,
    lengths: list[int],
    by_block: bool,
    ctx: Ctx,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns and block diagonals of the vertical-slash heads from their scores (:func:`vertical_slash_scores`).

    Args:
        vertical, slash: [B, h, Sk] fp32 scores of the h heads with ``specs``, or with ``by_block`` (every head's
            ``slash_select`` is "block") slash [B, h, N] by block diagonal. Overwritten: scratch after this.
        q_len: query length of the call. starts: [B] first valid key per sample. lengths: per sample, its number of
            valid keys (fractional budgets are of it).
    Returns:
        cols: [B, h, V] local key columns, -1 = none. diag: [B, h, N] bool block diagonals covering the chosen slashes.
    """
    B, h, Sk = vertical.shape
    dev = vertical.device
    local = torch.arange(Sk, device=dev)[None, :] - starts[:, None]  # [B, Sk] local column of each key
    forced_v = ctx.const([s.params["force_vertical"] for s in specs], dev)
    vertical.masked_fill_((local < 0)[:, None], float("-inf"))
    vertical.masked_fill_((local >= 0)[:, None] & (local[:, None] < forced_v[:, None]), float("inf"))
    cols = topk_budget(vertical, per_sample_budgets(specs, "vertical", lengths), ctx)
    cols = ascending(torch.where(cols >= 0, cols - starts[:, None, None], -1))

    offsets = torch.arange(Sk, device=dev)
    exists = (offsets[None, :] <= Sk - 1 - starts[:, None])[:, None]  # [B, 1, Sk]: offsets some query can have
    forced_s = ctx.const([s.params["force_slash"] for s in specs], dev)
    forced = offsets[None, None, :] < forced_s[None, :, None]  # [1, h, Sk]
    diag = torch.zeros(B, h, cdiv(Sk, BLOCK), dtype=torch.bool, device=dev)
    for select in ("token", "block"):
        sel = [i for i, s in enumerate(specs) if s.params["slash_select"] == select]
        if not sel:
            continue
        idx = ctx.const(sel, dev)
        part, forced_part = (slash, forced) if len(sel) == h else (slash[:, idx], forced[:, idx])
        budgets = per_sample_budgets([specs[i] for i in sel], "slash", lengths)
        if select == "token":  # MInference: the top offsets, each costing the key blocks it crosses
            part.masked_fill_(~exists, float("-inf")).masked_fill_(forced_part, float("inf"))
            diag[:, idx] = slash_diagonals(topk_budget(part, budgets, ctx), q_len, Sk, starts)
        else:  # the block diagonals that cover the most slash mass, as many as the budget's worth of key blocks
            mass = part if by_block else block_diagonal_mass(part, q_len, Sk, starts)
            keep = slash_diagonals(torch.where(forced_part, offsets, -1).expand(B, -1, -1), q_len, Sk, starts)
            per_head = [
                [cdiv(n, BLOCK) + cdiv(specs[i].params["force_slash"], BLOCK) + 1 for n, i in zip(row, sel)]
                for row in budgets
            ]
            mass = mass.masked_fill_(mass <= 0, float("-inf")).masked_fill_(keep, float("inf"))
            picked = topk_budget(mass, per_head, ctx)
            chosen = torch.zeros_like(keep).scatter_(2, picked.clamp(min=0), picked >= 0)
            diag[:, idx] = chosen | keep
    return cols, diag


def block_diagonal_mass(slash: torch.Tensor, q_len: int, kv_len: int, starts: torch.Tensor) -> torch.Tensor:
    """[B, h, Sk] slash scores by offset -> [B, h, N] the share of them each block diagonal covers.

    Block diagonal d of query block m is key block base(m) - d. Row i of the block (local position p0 + i) meets it
    at offsets o with floor((r + i - o) / BLOCK) = top - d, r = p0 % BLOCK, top = ceil(r / BLOCK)-ish as in
    :func:`~sparse_prefill.index.slash_diagonals`: an offset range per row, summed from prefix sums and averaged
    over the BLOCK rows. Independent of m, like the diagonals themselves.
    """
    B, h, Sk = slash.shape
    n = cdiv(kv_len, BLOCK)
    _, off = query_offsets(q_len, kv_len, starts)
    r = (off % BLOCK)[:, None, None]  # [B, 1, 1]
    top = (r + BLOCK - 1) // BLOCK
    t = top - torch.arange(n, device=slash.device)[None, :, None]  # [B, N, 1]
    first = r + torch.arange(BLOCK, device=slash.device)[None, None, :] - BLOCK * t  # [B, N, BLOCK]: highest offset
    hi = (first + 1).clamp(0, Sk)  # exclusive end in the prefix sums
    lo = torch.minimum((first - (BLOCK - 1)).clamp(0, Sk), hi)
    prefix = cumsum(F.pad(slash, (1, 0)))  # [B, h, Sk + 1]
    take = lambda x: prefix.gather(-1, x.flatten(1)[:, None, :].expand(-1, h, -1))  # noqa: E731
    return ((take(hi) - take(lo)).view(B, h, n, BLOCK).sum(-1) / BLOCK).float()
