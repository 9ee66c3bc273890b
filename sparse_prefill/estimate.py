"""Online index estimation: turn one layer's head specs and q/k into a :class:`SparseIndex`.

Everything here is batched torch (heads of a pattern together, no host synchronisation once ``kv_start`` is known),
so the same code builds the index on the CPU and on the GPU.

* A-shape: the first ``sink`` columns and the ``local`` nearest diagonals. Static.
* Vertical-slash (MInference): softmax attention of the last ``last_q`` queries over all keys, causal; summed per key
  column (vertical scores) and per diagonal (slash scores). Keep the top ``vertical`` columns and top ``slash``
  diagonals, always including the first ``force_vertical`` columns and the ``force_slash`` nearest diagonals.
* Block-sparse: mean-pool q and k in blocks, score pooled q·k causally, keep the ``top_k`` key blocks per query
  block, always including the blocks on the query block's own diagonal.
* Dense: every block diagonal.
* Adaptive: pattern and budgets per (sample, head) from the input, :mod:`sparse_prefill.adaptive`.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict

import torch
import torch.nn.functional as F

from .config import HeadSpec
from .index import (
    BLOCK,
    SparseIndex,
    ascending,
    block_bases,
    cdiv,
    cumsum,
    make_index,
    query_offsets,
    slash_diagonals,
)
from .kernels import mean_pool_triton, pooled_supported, scores_supported, vertical_slash_scores_triton

logger = logging.getLogger("sparse_prefill")


class LayerPlan:
    """One layer's head specs, grouped by pattern once: the plan half of a plan/run split.

    :meth:`index` builds the :class:`SparseIndex` of a call in two stages: *measure* reads q/k (vertical-slash scores,
    block-sparse block sets, adaptive heads' :func:`~sparse_prefill.adaptive.measure`), *select* turns those
    measurements into the index (top-k, block diagonals, adaptive choices, lists) and depends on nothing else. What
    does not depend on q/k at all (dense and A-shape heads, and the whole index of a layer without vertical-slash or
    block-sparse heads) is built once per (lengths, padding, device) and reused by later calls and layers' calls of
    the same shape. On CUDA the select stage of a shape seen before is replayed as
    a CUDA graph (:class:`_GraphedSelect`): its hundred-odd small kernels would otherwise cost more host time to
    launch than the GPU spends running them.
    """

    CACHED_SHAPES = 4

    def __init__(self, heads: list[HeadSpec]):
        self.heads = list(heads)
        self.groups: dict[str, list[int]] = {}
        for h, spec in enumerate(self.heads):
            self.groups.setdefault(spec.pattern, []).append(h)
        self.dynamic = bool({"vertical_slash", "block_sparse", "adaptive"} & set(self.groups))
        # Slash scores are only needed per block diagonal (cheaper to estimate) unless a head ranks single offsets.
        vs_specs = [self.heads[h] for h in self.groups.get("vertical_slash", [])]
        self.slash_by_block = all(s.params["slash_select"] == "block" for s in vs_specs)
        self._static: OrderedDict = OrderedDict()

    def index(self, q: torch.Tensor, k: torch.Tensor, scale: float, kv_start: list[int]) -> SparseIndex:
        """The index of one call.

        Args:
            q: [B, Hq, Sq, D] queries after RoPE; k: [B, Hkv, Sk, D] keys (the full cache, Sq <= Sk).
            scale: softmax scale.
            kv_start: per sample, the first valid key column (left padding), as host integers.
        """
        B, H, Sq, _ = q.shape
        Sk = k.shape[2]
        static = self._static_part(B, H, Sq, Sk, kv_start, scale, q.device)
        if not self.dynamic:
            return static["index"]
        measured = self._measure(q, k, scale, kv_start, static["starts"])
        if q.is_cuda and CUDA_GRAPHS:
            graphed = static.setdefault("graphed", _GraphedSelect(lambda m: self._select(m, static, Sq, Sk)))
            return graphed(measured)
        return self._select(measured, static, Sq, Sk)

    def _measure(self, q, k, scale: float, kv_start: list[int], starts: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything the index needs from q/k, as tensors."""
        out = {}
        if vs_heads := self.groups.get("vertical_slash"):
            last_q = [self.heads[h].params["last_q"] for h in vs_heads]
            by_block = self.slash_by_block
            out["vertical"], out["slash"] = vertical_slash_scores(q, k, vs_heads, last_q, scale, starts, by_block)
        if bs_heads := self.groups.get("block_sparse"):
            out["blocks"] = block_sparse_sets(q, k, [self.heads[h] for h in bs_heads], bs_heads, scale, kv_start)
        if ad_heads := self.groups.get("adaptive"):
            from . import adaptive  # it builds on this module

            ad = adaptive.measure(q, k, [self.heads[h] for h in ad_heads], ad_heads, scale, kv_start)
            out.update({"ad_" + name: t for name, t in ad.items()})
        return out

    def _select(self, measured: dict[str, torch.Tensor], static: dict, Sq: int, Sk: int) -> SparseIndex:
        """The index from the measurements of :meth:`_measure`: no other input, so it can be captured as a graph."""
        starts, diag, cols = static["starts"], static["diag"], list(static["cols"])
        B, H = diag.shape[:2]
        dev = diag.device
        if vs_heads := self.groups.get("vertical_slash"):
            specs = [self.heads[h] for h in vs_heads]
            vertical, slash = measured["vertical"], measured["slash"]
            lengths = [Sk - s for s in static["kv_start"]]
            vs_cols, vs_diag = vertical_slash_select(vertical, slash, specs, Sq, starts, lengths, self.slash_by_block)
            cols.append((vs_heads, vs_cols))
            diag = diag.clone()
            diag[:, const(vs_heads, dev)] |= vs_diag
        blocks = measured.get("blocks")
        if blocks is None:
            blocks = torch.full((B, H, cdiv(Sq, BLOCK), 0), -1, dtype=torch.int32, device=dev)
        choice = None
        if ad_heads := self.groups.get("adaptive"):  # pattern and budgets chosen per (sample, head) from this input
            from . import adaptive

            ad_measured = {name[3:]: t for name, t in measured.items() if name.startswith("ad_")}
            group = H // ad_measured["pooled_k"].shape[1]
            specs = [self.heads[h] for h in ad_heads]
            ad = adaptive.choose(ad_measured, specs, ad_heads, group, static["scale"], Sq, Sk, static["kv_start"])
            idx = const(ad_heads, dev)
            cols.append((ad_heads, ad.cols))
            diag = diag.clone()
            diag[:, idx] |= ad.diag
            ad_blocks = ad.blocks
            if blocks.shape[-1] == 0 and len(ad_heads) == H:  # every head adaptive: its lists are the layer's
                blocks = ad_blocks
            else:
                width = max(blocks.shape[-1], ad_blocks.shape[-1])
                blocks = F.pad(blocks, (0, width - blocks.shape[-1]), value=-1)
                blocks[:, idx, :, : ad_blocks.shape[-1]] = ad_blocks.to(blocks.dtype)
            choice = torch.full((B, H), -1, dtype=torch.long, device=dev)
            choice[:, idx] = ad.choice
        index = make_index(Sq, Sk, starts, diag, _scatter_heads(B, H, cols, dev), blocks)
        index.choice = choice
        return index

    def _static_part(
        self, B: int, H: int, Sq: int, Sk: int, kv_start: list[int], scale: float, dev: torch.device
    ) -> dict:
        key = (B, H, Sq, Sk, tuple(kv_start), scale, str(dev))
        if key in self._static:
            self._static.move_to_end(key)
            return self._static[key]
        # Kept for later calls, which may run with autograd: made outside inference mode even when this call is in it.
        with torch.inference_mode(False):
            part = self._build_static(B, H, Sq, Sk, kv_start, scale, dev)
        self._static[key] = part
        if len(self._static) > self.CACHED_SHAPES:
            self._static.popitem(last=False)
        return part

    def _build_static(
        self, B: int, H: int, Sq: int, Sk: int, kv_start: list[int], scale: float, dev: torch.device
    ) -> dict:
        starts = const(kv_start, dev)
        diag = torch.zeros(B, H, cdiv(Sk, BLOCK), dtype=torch.bool, device=dev)
        diag[:, self.groups.get("dense", [])] = True
        cols = []  # (heads, [B, len(heads), n]) pieces, -1 = none
        if a_heads := self.groups.get("a_shape"):
            specs, lengths = [self.heads[h] for h in a_heads], [Sk - s for s in kv_start]
            sink, local = (per_sample_budgets(specs, name, lengths) for name in ("sink", "local"))
            cols.append((a_heads, _prefix(sink, dev)))
            diag |= slash_diagonals(_scatter_heads(B, H, [(a_heads, _prefix(local, dev))], dev), Sq, Sk, starts)
        part = {"starts": starts, "diag": diag, "cols": cols, "kv_start": list(kv_start), "scale": scale}
        if not self.dynamic:
            no_blocks = torch.full((B, H, cdiv(Sq, BLOCK), 0), -1, dtype=torch.long, device=dev)
            part["index"] = make_index(Sq, Sk, starts, diag, _scatter_heads(B, H, cols, dev), no_blocks)
        return part


# Replay the select stage of repeated shapes as CUDA graphs (LayerPlan). Off: every call runs it eagerly.
CUDA_GRAPHS = True


class _GraphedSelect:
    """One (plan, shape)'s select stage as a CUDA graph.

    The first call runs eagerly (it also fills the :func:`const` caches, which a capture cannot do); the second
    captures the stage with its measurements copied into a workspace shared by all graphs of the device; later calls
    copy their measurements in and replay. Graphs share one memory pool per device and run in stream order, so one
    plan's replay cannot overwrite what another's kernel still has to read; each call returns its own copy of the
    index. Should a capture fail, this shape stays eager.
    """

    _pools: dict = {}  # device -> (pool handle, the first graph captured into it: it keeps the pool alive)
    _workspaces: dict = {}
    broken = False  # a capture failed: every later call runs eagerly

    def __init__(self, select):
        self.select = select
        self.calls = 0
        self.graph = None

    def __call__(self, measured: dict[str, torch.Tensor]) -> SparseIndex:
        self.calls += 1
        if self.calls == 2 and not _GraphedSelect.broken:
            self._capture(measured)
        if self.graph is None:
            return self.select(measured)
        graph, inputs, output = self.graph
        for name, t in measured.items():
            inputs[name].copy_(t)
        graph.replay()
        return output.clone()

    def _capture(self, measured: dict[str, torch.Tensor]) -> None:
        dev = next(iter(measured.values())).device
        inputs = self._inputs(measured, dev)
        for name, t in measured.items():
            inputs[name].copy_(t)
        # capture_begin/end on a side stream rather than torch.cuda.graph(), which synchronises the device and
        # empties the allocator's cache: costs a model's forward would pay at every capture.
        current, side = torch.cuda.current_stream(dev), torch.cuda.Stream(dev)
        side.wait_stream(current)
        graph = torch.cuda.CUDAGraph()
        # A pool lives while a graph captured into it does: the first graph of the device is kept for good, so the
        # handle stays valid when the plans that captured later graphs are gone.
        pool, _ = self._pools.get(dev, (torch.cuda.graph_pool_handle(), None))
        try:
            with torch.cuda.stream(side):
                self.select({n: t.clone() for n, t in inputs.items()})  # warm-up off the capture
                graph.capture_begin(pool=pool, capture_error_mode="thread_local")
                try:
                    output = self.select(inputs)
                finally:
                    graph.capture_end()
        except RuntimeError as err:
            current.wait_stream(side)
            _GraphedSelect.broken = True
            logger.warning("sparse_prefill: CUDA graph capture of the index selection failed (%s); runs eagerly", err)
            return
        current.wait_stream(side)
        self._pools.setdefault(dev, (pool, graph))
        self.graph = (graph, inputs, output)

    @classmethod
    def _inputs(cls, measured: dict[str, torch.Tensor], dev: torch.device) -> dict[str, torch.Tensor]:
        """Views shaped like ``measured`` into the device's workspace (one flat buffer per dtype, grown on demand)."""
        need: dict[torch.dtype, int] = {}
        for t in measured.values():
            need[t.dtype] = need.get(t.dtype, 0) + t.numel()
        views, offset = {}, dict.fromkeys(need, 0)
        for dtype, numel in need.items():
            buf = cls._workspaces.get((dev, dtype))
            if buf is None or buf.numel() < numel:  # graphs captured on a smaller one keep it alive through views
                cls._workspaces[(dev, dtype)] = torch.empty(numel, dtype=dtype, device=dev)
        for name, t in measured.items():
            buf = cls._workspaces[(dev, t.dtype)]
            views[name] = buf[offset[t.dtype] : offset[t.dtype] + t.numel()].view(t.shape)
            offset[t.dtype] += t.numel()
        return views


def build_index(
    q: torch.Tensor, k: torch.Tensor, heads: list[HeadSpec], scale: float, kv_start: list[int]
) -> SparseIndex:
    """Estimate the index of one layer call: ``LayerPlan(heads).index(q, k, scale, kv_start)``.

    Args:
        q: [B, Hq, Sq, D] queries after RoPE; k: [B, Hkv, Sk, D] keys (the full cache, Sq <= Sk).
        heads: Hq head specs of this layer.
        scale: softmax scale.
        kv_start: per sample, the first valid key column (left padding), as host integers.
    Returns:
        The :class:`SparseIndex` for all heads; dense heads get every block diagonal.
    """
    return LayerPlan(heads).index(q, k, scale, kv_start)


@functools.lru_cache(maxsize=1024)
def _const(values: tuple, device: str, dtype: torch.dtype) -> torch.Tensor:
    # Outside inference mode: the tensor outlives the call, and an inference tensor could not be saved for backward
    # by a later call with autograd.
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype, device=device)


def const(values, device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A small tensor (int64 by default) of host values (a list, or a list of equal-length lists), made once per
    (values, device, dtype): a fresh host-to-device copy on every call would wait for the GPU (it synchronises the
    stream), and these lists repeat across calls and layers."""
    return _const(tuple(tuple(v) if isinstance(v, list) else v for v in values), str(device), dtype)


def per_sample_budgets(specs: list[HeadSpec], name: str, lengths: list[int]) -> list[list[int]]:
    """[B][h] budget ``name`` of each head resolved against each sample's own length (its valid keys, or key
    blocks), so that a sample gets what it would get alone, whatever else is in the batch."""
    return [[s.budget(name, n) for s in specs] for n in lengths]


def _prefix(lengths: list[list[int]], dev: torch.device) -> torch.Tensor:
    """[B, h, max(lengths)] from [B][h] lengths: 0..n-1 per sample and head, -1 after."""
    n = torch.arange(max(map(max, lengths)), device=dev)
    return torch.where(n < const(lengths, dev)[..., None], n, -1)


def _scatter_heads(B: int, H: int, pieces: list, dev: torch.device) -> torch.Tensor:
    """Stack per-pattern [B, h, n] pieces into one [B, H, max n] tensor, -1 where a head has nothing."""
    if len(pieces) == 1 and list(pieces[0][0]) == list(range(H)):  # one pattern for every head: already stacked
        return pieces[0][1]
    width = max((p.shape[-1] for _, p in pieces), default=0)
    out = torch.full((B, H, width), -1, dtype=torch.long, device=dev)
    for hs, p in pieces:
        out[:, const(hs, dev), : p.shape[-1]] = p.long()
    return out


def _topk_budget(scores: torch.Tensor, budgets: list) -> torch.Tensor:
    """Top entries along the last dim, with a budget per head: ``budgets`` is [h] for scores [h, ..., S], or [B][h]
    for scores [B, h, ..., S]. -1 past the budget or at a -inf score."""
    per_head = const(budgets, scores.device)
    kmax = min(max(max(row) if isinstance(row, list) else row for row in budgets), scores.shape[-1])
    vals, idx = scores.topk(kmax, dim=-1)
    per_head = per_head.view(*per_head.shape, *[1] * (scores.dim() - per_head.dim()))
    keep = torch.arange(kmax, device=scores.device) < per_head
    return torch.where(keep & (vals > float("-inf")), idx, -1)


def vertical_slash_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    heads: list[int],
    last_q: list[int],
    scale: float,
    starts: torch.Tensor,
    by_block: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertical and slash scores of the given heads: [B, len(heads), Sk] fp32 each, or with ``by_block`` the slash
    scores' :func:`block_diagonal_mass` ([B, len(heads), ceil(Sk / BLOCK)]) in their place.

    Causal softmax attention of each head's last ``last_q[i]`` queries over all keys (padding keys and padding
    queries get probability 0), summed per key column and per diagonal offset (query position - key position).
    On CUDA a streaming Triton kernel computes them without any [L, Sk] buffer (by block, without the per-offset
    sums either). Here (CPU, or shapes it does not take) one KV head at a time: the only large buffer is that KV
    head's [B, group, L, Sk] probabilities, and K/V are never repeated.
    """
    rows = min(max(last_q), q.shape[2])
    if scores_supported(q, rows):
        heads_t, last_q_t = const(heads, q.device), const(last_q, q.device)
        return vertical_slash_scores_triton(q, k, heads_t, last_q_t, rows, scale, starts, by_block)
    vertical, slash = vertical_slash_scores_torch(q, k, heads, last_q, scale, starts)
    return vertical, block_diagonal_mass(slash, q.shape[2], k.shape[2], starts) if by_block else slash


def vertical_slash_scores_torch(
    q: torch.Tensor, k: torch.Tensor, heads: list[int], last_q: list[int], scale: float, starts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`vertical_slash_scores` in plain torch, on any device."""
    B, H, Sq, _ = q.shape
    Sk = k.shape[2]
    group = H // k.shape[1]
    L = min(max(last_q), Sq)
    pos = Sk - L + torch.arange(L, device=q.device)
    keys = torch.arange(Sk, device=q.device)
    visible = (keys[None, None, :] <= pos[None, :, None]) & (keys[None, None, :] >= starts[:, None, None])  # [B, L, Sk]
    in_window = torch.arange(L, device=q.device)[None, :] >= L - const(last_q, q.device)[:, None]
    vertical = torch.empty(B, len(heads), Sk, device=q.device)
    slash = torch.empty_like(vertical)
    for kv0, kv1, sel in _kv_chunks(heads, group, B * L * Sk * 4):
        qh = (
            q[:, :, Sq - L :]
            .index_select(1, const([heads[i] for i in sel], q.device))
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


def _kv_chunks(heads: list[int], group: int, bytes_per_head: int, budget: int = 1 << 26):
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
    by_block: bool = False,
):
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
    forced_v = const([s.params["force_vertical"] for s in specs], dev)
    vertical.masked_fill_((local < 0)[:, None], float("-inf"))
    vertical.masked_fill_((local >= 0)[:, None] & (local[:, None] < forced_v[:, None]), float("inf"))
    cols = _topk_budget(vertical, per_sample_budgets(specs, "vertical", lengths))
    cols = ascending(torch.where(cols >= 0, cols - starts[:, None, None], -1))

    offsets = torch.arange(Sk, device=dev)
    exists = (offsets[None, :] <= Sk - 1 - starts[:, None])[:, None]  # [B, 1, Sk]: offsets some query can have
    forced_s = const([s.params["force_slash"] for s in specs], dev)
    forced = offsets[None, None, :] < forced_s[None, :, None]  # [1, h, Sk]
    diag = torch.zeros(B, h, cdiv(Sk, BLOCK), dtype=torch.bool, device=dev)
    for select in ("token", "block"):
        sel = [i for i, s in enumerate(specs) if s.params["slash_select"] == select]
        if not sel:
            continue
        idx = const(sel, dev)
        part, forced_part = (slash, forced) if len(sel) == h else (slash[:, idx], forced[:, idx])
        budgets = per_sample_budgets([specs[i] for i in sel], "slash", lengths)
        if select == "token":  # MInference: the top offsets, each costing the key blocks it crosses
            part.masked_fill_(~exists, float("-inf")).masked_fill_(forced_part, float("inf"))
            diag[:, idx] = slash_diagonals(_topk_budget(part, budgets), q_len, Sk, starts)
        else:  # the block diagonals that cover the most slash mass, as many as the budget's worth of key blocks
            mass = part if by_block else block_diagonal_mass(part, q_len, Sk, starts)
            keep = slash_diagonals(torch.where(forced_part, offsets, -1).expand(B, -1, -1), q_len, Sk, starts)
            per_head = [
                [cdiv(n, BLOCK) + cdiv(specs[i].params["force_slash"], BLOCK) + 1 for n, i in zip(row, sel)]
                for row in budgets
            ]
            mass = mass.masked_fill_(mass <= 0, float("-inf")).masked_fill_(keep, float("inf"))
            picked = _topk_budget(mass, per_head)
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


def _mean_pool(x: torch.Tensor, flag: torch.Tensor | None = None) -> torch.Tensor:
    """[h, S, D] -> [h, cdiv(S, BLOCK), D] fp32 means over BLOCK rows (the last block over the rows it has).

    Sums in fp32 straight from x: no fp32 or padded copy of it. On CUDA a Triton kernel does it in one pass, and
    skips the heads whose ``flag`` ([h] bool) is off (their means stay 0); the torch path pools every head."""
    if pooled_supported(x):
        return mean_pool_triton(x, flag)
    S = x.shape[1]
    full = S // BLOCK
    sums = x[:, : full * BLOCK].unflatten(1, (full, BLOCK)).sum(2, dtype=torch.float32)
    if full * BLOCK < S:
        sums = torch.cat([sums, x[:, full * BLOCK :].sum(1, keepdim=True, dtype=torch.float32)], 1)
    counts = (S - torch.arange(sums.shape[1], device=x.device) * BLOCK).clamp(max=BLOCK)
    return sums / counts[None, :, None]


def first_query_rows(q_len: int, kv_len: int, kv_start: list[int]) -> list[int]:
    """Per sample, the first tensor row of the queries that holds a valid query (host integers)."""
    return [max(0, s - (kv_len - q_len)) for s in kv_start]


def block_means(x: torch.Tensor, first: list[int], flag: torch.Tensor | None = None) -> torch.Tensor:
    """[B, H, S, D] queries or keys -> [B, H, cdiv(S, BLOCK), D] fp32 means of each BLOCK rows, in each sample's own
    block grid: from row ``first[b]`` on (zeros past its blocks). ``flag`` [B, H] bool: on CUDA, only these heads
    are pooled (the others stay zero)."""
    B, H, S, D = x.shape
    out = torch.zeros(B, H, cdiv(S, BLOCK), D, device=x.device)
    for b in range(B):
        pooled = _mean_pool(x[b, :, first[b] :], None if flag is None else flag[b])
        out[b, :, : pooled.shape[1]] = pooled
    return out


def block_sparse_sets(q, k, specs: list[HeadSpec], heads: list[int], scale: float, kv_start: list[int]) -> torch.Tensor:
    """[B, H, M, K] key blocks of the block-sparse heads (other heads -1), in each sample's own block grid."""
    B, H, Sq, _ = q.shape
    Sk = k.shape[2]
    group = H // k.shape[1]
    M, N = cdiv(Sq, BLOCK), cdiv(Sk, BLOCK)
    width = min(max(s.budget("top_k", N) for s in specs), N)  # no sample's budget is larger: N is the longest grid
    out = torch.full((B, H, M, width), -1, dtype=torch.int32, device=q.device)
    starts = const(kv_start, q.device)
    _, off = query_offsets(Sq, Sk, starts)
    base = block_bases(Sq, Sk, starts)
    flag = torch.zeros(B, H, dtype=torch.bool, device=q.device)
    flag[:, const(heads, q.device)] = True
    first = first_query_rows(Sq, Sk, kv_start)
    pooled_q, pooled_k = block_means(q, first, flag), block_means(k, kv_start)
    for b in range(B):
        Mb, Nb = cdiv(Sq - first[b], BLOCK), cdiv(Sk - kv_start[b], BLOCK)
        budgets = [s.budget("top_k", Nb) for s in specs]
        j = torch.arange(Nb, device=q.device)
        top = base[b, :Mb, None]
        own = (off[b] + torch.arange(Mb, device=q.device) * BLOCK)[:, None] // BLOCK  # block of the first row
        for kv0, kv1, sel in _kv_chunks(heads, group, Mb * Nb * 4):
            rows = const([heads[i] for i in sel], q.device)
            pq = pooled_q[b, :, :Mb].index_select(0, rows).unflatten(0, (kv1 - kv0, -1))
            scores = (pq @ pooled_k[b, kv0:kv1, None, :Nb].transpose(-1, -2)).flatten(0, 1) * scale  # [h, Mb, Nb]
            scores.masked_fill_(j[None, :] > top, float("-inf"))
            scores.masked_fill_((j[None, :] >= own) & (j[None, :] <= top), float("inf"))
            picked = _topk_budget(scores, [budgets[i] for i in sel])
            out[b, rows, :Mb, : picked.shape[-1]] = ascending(picked).int()
    return out
