"""Adaptive heads: each call picks a pattern and budgets for every (sample, head) from the input itself.

A head whose config entry is ``{"pattern": "adaptive"}`` has no fixed pattern or budget (FlexPrefill's rule, in this
package's index format). On every prefill call, for each sample and head:

1. **Estimate.** The last ``last_q`` queries' exact causal softmax over all keys, summed per key column (vertical
   scores ``v``) and per block diagonal (:func:`~sparse_prefill.plan.vertical_slash.vertical_slash_scores`, the
   estimate static vertical-slash heads use).
2. **Query-aware test.** ``a`` = the vertical scores summed per key block and normalised: where those queries really
   attend, per block. ``â`` = softmax over key blocks of (their mean query) · (each key block's mean key) × scale:
   what pooled q·k predicts. If ``sqrt(JS(a, â)) < tau`` (Jensen–Shannon divergence with natural logs, so it lies in
   [0, sqrt(ln 2)] ≈ [0, 0.83]), pooled q·k can be trusted: the head is *query-aware block-sparse*; otherwise
   *vertical-slash*. ``tau = 0`` never picks block-sparse.
3. **Budgets: the fewest entries, after a forced minimum, whose estimated mass reaches ``gamma``** (:func:`cover`).

   * vertical-slash: single key columns ranked by ``v``, and block diagonals ranked by the share of slash mass they
     cover, each to ``gamma`` of its own total. Forced: the first ``force_vertical`` columns (attention sinks) and the
     block diagonals of the ``max(1, force_slash)`` nearest offsets. Both reach ``gamma`` of the attention the sinks
     leave (``s + gamma (1 - s)`` with ``s`` the sinks' share): a head that puts nearly all its attention on the first
     token, whose value is near zero, would otherwise meet ``gamma`` with the sinks alone and drop the keys that
     carry its output.
   * block-sparse: per query block, key blocks ranked by the softmax of pooled q·k over its causal key blocks.
     Forced: the blocks of the first ``force_vertical`` keys and of the ``max(1, force_slash)`` keys nearest to the
     block's rows. A row may keep at most ``max_blocks`` key blocks (this sizes the index); a head with a row that
     needs more is not query-aware and takes vertical-slash.
4. **Dense.** If the chosen sets' estimated tile density reaches ``dense_above``, the head runs dense (every block
   diagonal). The estimate counts whole tiles exactly, and each column as 1/BLOCK of a tile per query block that sees
   it (an upper bound).

The result feeds the same index as static heads: a vertical-slash choice fills ``cols`` and ``diag``, a block-sparse
choice ``blocks``, a dense choice every diagonal. So every backend runs adaptive heads unchanged.

:func:`measure` reads q and k once (step 1, the test of step 2, block means); :func:`choose` does the rest from those
alone, so on CUDA the plan replays it as a CUDA graph. Nothing synchronises with the host: budgets that differ per
(sample, head, row) are masks over one ranking (sort / ``topk`` + ``cumsum``), never ``.item()``. On the Triton
backend kernels find the sets without sorting (:mod:`~sparse_prefill.kernels.cover_columns`,
:mod:`~sparse_prefill.kernels.cover_rows`) and skip the heads whose test said vertical-slash; the torch path does
every head. No S×S buffer is made. Defaults, their sources and measurements: docs/adaptive.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from typing import TYPE_CHECKING

from .. import kernels
from ..index import BLOCK, block_bases, query_offsets, slash_diagonals
from ..ops import ascending, cdiv, cdiv_tensor, cumsum, positions
from .common import Ctx, block_means, first_query_rows, kv_chunks, per_sample_budgets
from .pattern import Pattern, Sets
from .vertical_slash import vertical_slash_scores

if TYPE_CHECKING:
    from ..config import HeadSpec

CHOICES = ("vertical_slash", "block_sparse", "dense")  # codes of AdaptiveSets.choice
VERTICAL_SLASH, BLOCK_SPARSE, DENSE = range(len(CHOICES))
# Thresholds in a unit interval: name -> (0 allowed, the interval as text for errors).
UNIT = {"gamma": (False, "(0, 1]"), "tau": (True, "[0, 1]"), "dense_above": (False, "(0, 1]")}


@dataclass
class AdaptiveSets:
    """The choices of one layer call's adaptive heads (``h`` of them), in :func:`~sparse_prefill.index.make_index`'s
    format. A (sample, head) uses only the fields of its choice; the others hold nothing for it.

    Attributes:
        choice: [B, h] int64, index into :data:`CHOICES`.
        cols: [B, h, Sk] int64 local key columns ascending, then -1 (vertical-slash choices).
        diag: [B, h, N] bool block diagonals (vertical-slash choices; all of them for dense choices).
        blocks: [B, h, M, K] int64 key blocks per query block ascending, then -1 (block-sparse choices).
        js: [B, h] float, sqrt of the Jensen–Shannon divergence between true and pooled block attention.
        vs_density, bs_density: [B, h] float, estimated tile density of the vertical-slash sets and of the
            block-sparse sets (``inf`` where the head is not query-aware or a row needs more than ``max_blocks``).
    """

    choice: torch.Tensor
    cols: torch.Tensor
    diag: torch.Tensor
    blocks: torch.Tensor
    js: torch.Tensor
    vs_density: torch.Tensor
    bs_density: torch.Tensor


def cover(
    mass: torch.Tensor, forced: torch.Tensor, gamma: torch.Tensor, k: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The smallest set that holds ``forced`` and whose mass reaches ``gamma`` × the total, along the last dim.

    Entries are ranked forced first, then by mass, descending; the set is the shortest prefix of the ranking whose
    mass reaches the target (entries of mass 0 are never needed, so never kept unless forced; ``gamma = 1`` keeps
    every entry of positive mass, even where float rounding reaches the total early).

    Args:
        mass: [..., n] float >= 0. forced: [..., n] bool. gamma: broadcastable to [..., 1], in (0, 1].
        k: rank only the first ``k`` entries (``topk`` instead of a full sort); ``None``: all n.
    Returns:
        order: [..., min(k + 1, n)] entry indices by rank (all n when ``k`` is None).
        keep: like ``order``, bool: the set, a prefix of the ranking.
        count: [...] int64 size of the set; ``count > k`` means it does not fit in k entries.
    """
    n = mass.shape[-1]
    width = n if k is None else min(k + 1, n)
    total = mass.sum(-1, keepdim=True)
    key = mass.masked_fill(forced, float("inf"))
    order = key.argsort(dim=-1, descending=True) if k is None else key.topk(width, dim=-1).indices
    ranked = mass.gather(-1, order)
    before = F.pad(cumsum(ranked), (1, 0))[..., :-1]  # mass of the entries ranked above each one
    short = (before < gamma * total) | (gamma >= 1)  # gamma 1: every entry with mass, whatever the rounding
    keep = forced.gather(-1, order) | (short & (ranked > 0))
    return order, keep, keep.sum(-1)


def _param(specs: list[HeadSpec], name: str, device, ctx: Ctx) -> torch.Tensor:
    """[h] per-head parameter as a cached device tensor (:meth:`Ctx.const`): float32 for the thresholds, else
    int64."""
    return ctx.const([s.params[name] for s in specs], device, torch.float32 if name in UNIT else torch.long)


@dataclass
class _Geometry:
    """One call's lengths and left padding, and its tile counts per sample, for estimating a set's density without
    building its index."""

    q_len: int
    kv_len: int
    kv_start: list[int]  # per sample, the first valid key column, as host integers
    starts: torch.Tensor  # the same, [B] on the device
    causal: torch.Tensor  # [B] causal tiles (query blocks × key blocks at or before them), as tile_density counts
    per_diag: torch.Tensor  # [B, N] tiles of block diagonal d
    per_col: torch.Tensor  # [B, Sk] query blocks that see local column c

    @classmethod
    def of(cls, q_len: int, kv_len: int, kv_start: list[int], device, ctx: Ctx | None = None) -> _Geometry:
        starts = (ctx or Ctx.default(device)).const(kv_start, device)
        q_start, off = query_offsets(q_len, kv_len, starts)
        M, N = cdiv(q_len, BLOCK), cdiv(kv_len, BLOCK)
        m = torch.arange(M, device=starts.device)
        n_rows = ((q_len - q_start)[:, None] > m[None, :] * BLOCK).sum(-1)  # [B] valid query blocks
        n_keys = cdiv_tensor(kv_len - starts, BLOCK)  # [B] valid key blocks
        base = torch.minimum(block_bases(q_len, kv_len, starts), (n_keys - 1)[:, None])  # [B, M], ascending
        valid = m[None, :] < n_rows[:, None]
        causal = ((base + 1) * valid).sum(-1)
        # Rows past the valid ones have base n_keys - 1 and later last rows: they sort last and are subtracted.
        d = torch.arange(N, device=starts.device).expand(len(starts), -1).contiguous()
        per_diag = (n_rows[:, None] - torch.searchsorted(base.contiguous(), d)).clamp(min=0)
        per_diag = per_diag.masked_fill(d >= n_keys[:, None], 0)
        last_row = (off[:, None] + m[None, :] * BLOCK + BLOCK - 1).contiguous()
        c = torch.arange(kv_len, device=starts.device).expand(len(starts), -1).contiguous()
        per_col = (n_rows[:, None] - torch.searchsorted(last_row, c)).clamp(min=0)
        return cls(q_len, kv_len, list(kv_start), starts, causal.float(), per_diag.float(), per_col.float())


def to_local(x: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """[B, h, Sk] per tensor column -> per local column (column ``kv_start[b] + c`` at ``c``), zeros past the end."""
    Sk = x.shape[-1]
    idx = starts[:, None] + torch.arange(Sk, device=x.device)[None, :]  # [B, Sk]
    out = x.gather(-1, idx.clamp(max=Sk - 1)[:, None, :].expand_as(x))
    return out.masked_fill((idx >= Sk)[:, None, :], 0.0)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sqrt of the Jensen–Shannon divergence (natural log) between distributions along the last dim."""
    m = (p + q) / 2
    kl = lambda a: (torch.xlogy(a, a) - torch.xlogy(a, m)).sum(-1)  # noqa: E731
    return ((kl(p) + kl(q)) / 2).clamp(min=0).sqrt()


def vertical_slash_cover(
    vertical: torch.Tensor, slash_mass: torch.Tensor, specs: list[HeadSpec], geo: _Geometry, ctx: Ctx | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The vertical-slash sets of adaptive heads from their [B, h, Sk] vertical scores (tensor frame, as estimated)
    and [B, h, N] slash scores by block diagonal (``vertical_slash_scores(..., by_block=True)``).

    Returns:
        cols: [B, h, Sk] local columns ascending, -1 past the set. diag: [B, h, N] bool. density: [B, h] estimate.
    """
    ctx = ctx or Ctx.default(vertical.device)
    B, _, Sk = vertical.shape
    dev = vertical.device
    q_len, starts = geo.q_len, geo.starts
    args = (vertical, starts, _param(specs, "force_vertical", dev, ctx), _param(specs, "gamma", dev, ctx), geo.per_col)
    triton = ctx.uses(kernels.cover_columns, vertical)
    # Diagonals reach the same sink-aware share of theirs as the columns do (cover_columns_torch says why).
    cols, col_tiles, gamma = (kernels.cover_columns.cover_columns_triton if triton else cover_columns_torch)(*args)
    col_tiles, gamma = col_tiles / BLOCK, gamma[..., None]

    mass = slash_mass.masked_fill(geo.per_diag[:, None, :] == 0, 0.0)  # diagonals that reach no key of the sample
    nearest = _param(specs, "force_slash", dev, ctx).clamp(min=1)[None, :, None]
    c = torch.arange(min(Sk, max(max(1, s.params["force_slash"]) for s in specs)), device=dev)  # offsets forced
    forced_s = slash_diagonals(torch.where(c < nearest, c, -1).expand(B, -1, -1), q_len, Sk, starts)
    order, keep, _ = cover(mass, forced_s, gamma)
    diag = torch.zeros_like(forced_s).scatter_(-1, order, keep)
    diag_tiles = (diag * geo.per_diag[:, None, :]).sum(-1)
    return cols, diag, (diag_tiles + col_tiles) / geo.causal[:, None]


def cover_columns_torch(
    vertical: torch.Tensor, starts: torch.Tensor, force: torch.Tensor, gamma: torch.Tensor, per_col: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The key columns of vertical-slash heads (the reference of
    :func:`~sparse_prefill.kernels.cover_columns.cover_columns_triton`, which takes the same arguments).

    Args:
        vertical: [B, h, Sk] scores per tensor column. starts: [B] first valid key. force: [h] forced first local
            columns. gamma: [h]. per_col: [B, Sk] per local column, summed over the kept ones.
    Returns:
        cols: [B, h, Sk] int32 local columns ascending, -1 past the set. tiles: [B, h] ``per_col`` summed over the
        set.
        gamma: [B, h] the share of each row the set reached for: ``s + gamma (1 - s)`` with ``s`` the forced
        columns' share (heads that put 90-99 % of their attention on the first token, whose value is near zero,
        would meet ``gamma`` of the whole with the sinks alone), 1 where ``gamma >= 1``.
    """
    h, Sk = vertical.shape[1:]
    local = to_local(vertical, starts)
    c = torch.arange(Sk, device=vertical.device)
    forced = (c[None, None, :] < force[None, :, None]) & (c < (Sk - starts)[:, None, None])
    sinks = (local * forced).sum(-1) / local.sum(-1).clamp(min=1e-30)
    gamma = torch.where(gamma >= 1, 1.0, sinks + gamma * (1 - sinks))  # [B, h]
    order, keep, _ = cover(local, forced, gamma[..., None])
    cols = positions(torch.zeros_like(keep).scatter_(-1, order, keep)).int()
    tiles = (per_col[:, None, :].expand(-1, h, -1).gather(-1, order) * keep).sum(-1)
    return cols, tiles, gamma


def query_aware_js(
    q: torch.Tensor,
    vertical: torch.Tensor,
    pooled_k: torch.Tensor,
    specs: list[HeadSpec],
    heads: list[int],
    scale: float,
    starts: torch.Tensor,
    ctx: Ctx | None = None,
) -> torch.Tensor:
    """The query-aware test's sqrt JS divergence ([B, h]), every head at once: the mean of each head's last
    ``last_q`` valid queries against the pooled keys (softmax over the sample's key blocks) vs. those queries' true
    attention per key block (``vertical`` [B, h, Sk] summed per block of the sample's grid). ``pooled_k``:
    :func:`~sparse_prefill.plan.common.block_means` of the keys. The torch path, and the reference of
    :mod:`sparse_prefill.kernels.query_aware_js`."""
    ctx = ctx or Ctx.default(q.device)
    B, H, Sq, _ = q.shape
    Sk, N = vertical.shape[-1], pooled_k.shape[2]
    dev = q.device
    last_q = [s.params["last_q"] for s in specs]
    L = min(max(last_q), Sq)
    pos = Sq - L + torch.arange(L, device=dev)  # tensor rows of the last L queries
    q_start, _ = query_offsets(Sq, Sk, starts)
    # [B, h, L]: each head's last_q rows that hold a query of the sample
    w = ((pos >= Sq - ctx.const(last_q, dev)[:, None])[None] & (pos >= q_start[:, None, None])).float()
    last = q[:, :, Sq - L :].index_select(1, ctx.const(heads, dev)).float()  # [B, h, L, D]
    q_mean = torch.einsum("bhl,bhld->bhd", w, last) / w.sum(-1, keepdim=True)
    true = F.pad(to_local(vertical, starts), (0, N * BLOCK - Sk)).unflatten(-1, (N, BLOCK)).sum(-1)  # [B, h, N]
    kv = ctx.const([x // (H // pooled_k.shape[1]) for x in heads], dev)
    est = torch.einsum("bhd,bknd->bhkn", q_mean, pooled_k).gather(2, kv[None, :, None, None].expand(B, -1, 1, N))
    beyond = torch.arange(N, device=dev)[None, :] >= cdiv_tensor(Sk - starts, BLOCK)[:, None]  # [B, N]
    est = torch.softmax((est.squeeze(2) * scale).masked_fill(beyond[:, None], float("-inf")), -1)
    return js_divergence(true / true.sum(-1, keepdim=True), est)


def query_aware_cover(
    measured: dict[str, torch.Tensor],
    specs: list[HeadSpec],
    heads: list[int],
    group: int,
    scale: float,
    geo: _Geometry,
    ctx: Ctx,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block-sparse sets of adaptive heads, one sample at a time (each in its own grid).

    Args:
        measured: :func:`measure` of the call (``query_aware``, ``pooled_q``, ``pooled_k``).
        group: query heads per KV head.
    Returns:
        blocks: [B, h, M, K] key blocks per query block ascending, -1 past the set.
        density: [B, h] estimated tile density of the block-sparse sets, ``inf`` where the head is not query-aware
        (``sqrt JS >= tau``; on the Triton backend its rows are not even ranked) or a row needs more than
        ``max_blocks``.
    """
    pooled_q, pooled_k = measured["pooled_q"], measured["pooled_k"]
    q_len, kv_len, kv_start = geo.q_len, geo.kv_len, geo.kv_start
    B, h, M, _ = pooled_q.shape
    dev = pooled_q.device
    n_keys = [cdiv(kv_len - s, BLOCK) for s in kv_start]  # each sample's key blocks: its fractions are of them
    max_blocks = per_sample_budgets(specs, "max_blocks", n_keys)
    K = max(map(max, max_blocks))
    gamma, limit = _param(specs, "gamma", dev, ctx), ctx.const(max_blocks, dev)
    nearest = _param(specs, "force_slash", dev, ctx).clamp(min=1)
    query_aware = measured["query_aware"]
    # The integer inputs of the row kernels in int32 once: each KV-head run below takes slices, with no conversions.
    sink = cdiv_tensor(
        _param(specs, "force_vertical", dev, ctx), BLOCK
    ).int()  # [h] key blocks of the forced first keys
    flags = query_aware.int()

    # Query-aware sets: per query block, softmax of pooled q·k over its causal key blocks; one sample at a time.
    blocks = torch.full((B, h, M, K), -1, dtype=torch.int32, device=dev)
    count = torch.zeros(B, h, M, dtype=torch.long, device=dev)
    _, off = query_offsets(q_len, kv_len, geo.starts)
    base = block_bases(q_len, kv_len, geo.starts).int()
    for b, qs in enumerate(first_query_rows(q_len, kv_len, kv_start)):
        Mb, Nb = cdiv(q_len - qs, BLOCK), cdiv(kv_len - kv_start[b], BLOCK)
        first = off[b] + torch.arange(Mb, device=dev) * BLOCK  # local position of each query block's first row
        lo = ((first[None, :] - nearest[:, None] + 1).clamp(min=0) // BLOCK).int()  # [h, Mb] forced from this block
        for kv0, kv1, sel in kv_chunks(heads, group, Mb * Nb * 4 * 4):
            h0, h1 = sel[0], sel[-1] + 1  # heads ascending: a run of KV heads serves consecutive positions
            pq, pk, flag = pooled_q[b, h0:h1, :Mb], pooled_k[b, kv0:kv1, :Nb], flags[b, h0:h1]
            args = (base[b, :Mb], lo[h0:h1], sink[h0:h1], gamma[h0:h1])
            if ctx.uses(kernels.cover_rows, pq):  # heads that are not query-aware are skipped
                scores = kernels.pooled.pooled_scores_triton(pq, pk, base[b, :Mb], flag)
                _, n = kernels.cover_rows.cover_rows_triton(scores, *args, flag, K, scale, out=blocks[b, h0:h1, :Mb])
            else:
                scores = (pq.unflatten(0, (kv1 - kv0, -1)) @ pk[:, None].transpose(-1, -2)).flatten(0, 1)
                picked, n = cover_rows_torch(scores * scale, *args, K)
                blocks[b, h0:h1, :Mb, : picked.shape[-1]] = picked
            count[b, h0:h1, :Mb] = n
    fits = (count <= limit[..., None]).all(-1) & query_aware
    tiles = torch.where(fits, count.sum(-1).float(), float("inf"))
    return blocks, tiles / geo.causal[:, None]


def cover_rows_torch(
    scores: torch.Tensor, top: torch.Tensor, lo: torch.Tensor, sink: torch.Tensor, gamma: torch.Tensor, K: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block lists of query-aware rows, every head (the reference of
    :func:`~sparse_prefill.kernels.cover_rows.cover_rows_triton`, which takes the same arguments and skips heads).

    Args:
        scores: [h, M, N] scaled pooled q·k. top: [M] last causal key block per row. lo: [h, M] forced from this key
            block on (own and local blocks). sink: [h] forced below this key block. gamma: [h]. K: list width.
    Returns:
        blocks: [h, M, min(K, N)] int32 key blocks ascending, -1 past the set; count: [h, M] set sizes (> K: no
        fit).
    """
    j = torch.arange(scores.shape[-1], device=scores.device)
    causal = j[None, :] <= top[:, None]  # [M, N]
    p = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
    forced = causal & ((j >= lo[..., None]) | (j < sink[:, None, None]))
    order, keep, count = cover(p, forced, gamma[:, None, None], k=K)
    width = min(K, order.shape[-1])
    return ascending(torch.where(keep[..., :width], order[..., :width], -1)).int(), count


def measure(
    q: torch.Tensor,
    k: torch.Tensor,
    specs: list[HeadSpec],
    heads: list[int],
    scale: float,
    kv_start: list[int],
    ctx: Ctx | None = None,
) -> dict[str, torch.Tensor]:
    """Everything the choice of the adaptive heads of one layer call reads from q and k: ``vertical`` scores
    [B, h, Sk], ``slash_mass`` (slash scores by block diagonal) [B, h, N], the query-aware test's ``js`` [B, h]
    (:func:`query_aware_js`) and its outcome ``query_aware`` (``js < tau``, bool [B, h]), and fp32 block means in
    each sample's own grid (zeros past its blocks): ``pooled_k`` [B, Hkv, N, D], and ``pooled_q`` [B, h, M, D] (on
    the Triton backend only the query-aware heads' queries are pooled: the others' stay 0, unread). :func:`choose`
    depends on nothing else, so :class:`~sparse_prefill.plan.layer.LayerPlan` can replay it as a CUDA graph.

    Args:
        q: [B, Hq, Sq, D] queries after RoPE; k: [B, Hkv, Sk, D] keys (the full cache, Sq <= Sk).
        specs: the adaptive heads' specs; heads: their query-head numbers (ascending).
        scale: softmax scale.
        kv_start: per sample, the first valid key column (left padding), as host integers.
    """
    ctx = ctx or Ctx.default(q.device)
    B, H, Sq, _ = q.shape
    dev = q.device
    last_q = [s.params["last_q"] for s in specs]
    starts = ctx.const(kv_start, dev)
    vertical, slash_mass = vertical_slash_scores(q, k, heads, last_q, scale, starts, True, ctx)
    pooled_k = block_means(k, kv_start, ctx=ctx)
    if ctx.uses(kernels.query_aware_js, q):
        heads_t, last_q_t = ctx.const(heads, dev), ctx.const(last_q, dev)
        js = kernels.query_aware_js.query_aware_js_triton(q, vertical, pooled_k, heads_t, last_q_t, scale, starts)
    else:
        js = query_aware_js(q, vertical, pooled_k, specs, heads, scale, starts, ctx)
    query_aware = js < _param(specs, "tau", dev, ctx)
    flag = torch.zeros(B, H, dtype=torch.bool, device=dev)
    flag[:, ctx.const(heads, dev)] = query_aware
    pooled_q = block_means(q, first_query_rows(Sq, k.shape[2], kv_start), flag, ctx)
    pooled_q = pooled_q if len(heads) == H else pooled_q.index_select(1, ctx.const(heads, dev))
    return {
        "vertical": vertical,
        "slash_mass": slash_mass,
        "js": js,
        "query_aware": query_aware,
        "pooled_q": pooled_q,
        "pooled_k": pooled_k,
    }


def choose(
    measured: dict[str, torch.Tensor],
    specs: list[HeadSpec],
    heads: list[int],
    group: int,
    scale: float,
    q_len: int,
    kv_len: int,
    kv_start: list[int],
    ctx: Ctx | None = None,
) -> AdaptiveSets:
    """Pattern and budgets of the adaptive heads of one layer call from their :func:`measure` (module docstring: the
    rule). ``group``: query heads per KV head; the other arguments as in :func:`measure`."""
    vertical = measured["vertical"]
    ctx = ctx or Ctx.default(vertical.device)
    geo = _Geometry.of(q_len, kv_len, kv_start, vertical.device, ctx)
    cols, diag, vs_density = vertical_slash_cover(vertical, measured["slash_mass"], specs, geo, ctx)
    blocks, bs_density = query_aware_cover(measured, specs, heads, group, scale, geo, ctx)

    block_sparse = bs_density.isfinite()  # query-aware (sqrt JS < tau) and every row fits in max_blocks
    density = torch.where(block_sparse, bs_density, vs_density)
    dense = density >= _param(specs, "dense_above", geo.starts.device, ctx)[None, :]
    choice = torch.where(dense, DENSE, torch.where(block_sparse, BLOCK_SPARSE, VERTICAL_SLASH))
    is_vs = choice == VERTICAL_SLASH
    return AdaptiveSets(
        choice=choice,
        cols=cols.masked_fill(~is_vs[..., None], -1),
        diag=(diag & is_vs[..., None]) | (choice == DENSE)[..., None],
        blocks=blocks.masked_fill((choice != BLOCK_SPARSE)[..., None, None], -1),
        js=measured["js"],
        vs_density=vs_density,
        bs_density=bs_density,
    )


def adaptive_sets(
    q: torch.Tensor,
    k: torch.Tensor,
    specs: list[HeadSpec],
    heads: list[int],
    scale: float,
    kv_start: list[int],
    ctx: Ctx | None = None,
) -> AdaptiveSets:
    """:func:`choose` of :func:`measure`, with the same arguments as :func:`measure`."""
    ctx = ctx or Ctx.default(q.device)
    measured = measure(q, k, specs, heads, scale, kv_start, ctx)
    return choose(measured, specs, heads, q.shape[1] // k.shape[1], scale, q.shape[2], k.shape[2], kv_start, ctx)


class Adaptive(Pattern):
    def measure(self, q, k, specs, heads, shape, ctx) -> dict[str, torch.Tensor]:
        return measure(q, k, specs, heads, shape.scale, shape.kv_start, ctx)

    def select(self, measured, specs, heads, shape, ctx) -> Sets:
        group = shape.H // measured["pooled_k"].shape[1]
        ad = choose(measured, specs, heads, group, shape.scale, shape.Sq, shape.Sk, shape.kv_start, ctx)
        return Sets(cols=ad.cols, diag=ad.diag, blocks=ad.blocks, choice=ad.choice)


# Defaults (docs/adaptive.md gives their sources): gamma and tau are FlexPrefill's; the forced minimum is MInference's
# floor rounded to whole blocks; dense_above sends a head dense when its sets would cost 80 % of dense anyway;
# max_blocks bounds the block lists.
PATTERN = Adaptive(
    name="adaptive",
    abbrev="AD",
    alias="adaptive",
    defaults={
        "gamma": 0.9,
        "tau": 0.1,
        "last_q": 128,
        "force_vertical": 64,
        "force_slash": 128,
        "max_blocks": 0.125,
        "dense_above": 0.8,
    },
    budgets=frozenset({"max_blocks"}),
    unit=UNIT,
    dynamic=True,
)
