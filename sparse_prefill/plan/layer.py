"""One layer's plan: its head specs grouped by pattern, turned into the :class:`~sparse_prefill.index.SparseIndex` of
each call."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..backend import Backend
from ..index import BLOCK, SparseIndex, make_index
from ..ops import cdiv
from ..state import Resources
from . import graphs
from .common import Ctx, scatter_heads
from .pattern import Sets, Shape
from .registry import PATTERNS

if TYPE_CHECKING:
    from ..config import HeadSpec


@dataclass
class PlannedIndex(SparseIndex):
    """A call's index and what the plan chose in it. ``choice``: [B, H] int64 or None, the pattern each adaptive
    head chose for each sample (:data:`sparse_prefill.plan.adaptive.CHOICES`), -1 for heads with a fixed pattern;
    None without adaptive heads. Report data: the backends read only the :class:`SparseIndex` fields."""

    choice: torch.Tensor | None = None

    @classmethod
    def of(cls, index: SparseIndex, choice: torch.Tensor | None = None) -> PlannedIndex:
        return cls(**{f.name: getattr(index, f.name) for f in dataclasses.fields(SparseIndex)}, choice=choice)


class LayerPlan:
    """One layer's head specs, grouped by pattern once: the plan half of a plan/run split.

    :meth:`index` builds the index of a call in two stages: *measure* reads q/k (each dynamic pattern's
    :meth:`~sparse_prefill.plan.pattern.Pattern.measure`), *select* turns those measurements into the index and
    depends on nothing else. What does not depend on q/k at all (static patterns' heads, and the whole index of a
    layer without dynamic heads) is built once per (lengths, padding, device, backend) and reused by later calls and
    layers' calls of the same shape. On CUDA the select stage of a shape seen before is replayed as a CUDA graph
    (:class:`~sparse_prefill.plan.graphs.GraphedSelect`).

    ``resources``: where cached constants and graph memory live (a patch's, shared by its plans); a plan made
    alone gets its own.
    """

    CACHED_SHAPES = 4

    def __init__(self, heads: list[HeadSpec], resources: Resources | None = None):
        self.heads = list(heads)
        self.resources = resources if resources is not None else Resources()
        self.groups: dict[str, list[int]] = {}
        for h, spec in enumerate(self.heads):
            self.groups.setdefault(spec.pattern, []).append(h)
        self.dynamic = any(PATTERNS[p].dynamic for p in self.groups)
        self._static: OrderedDict = OrderedDict()

    def specs(self, pattern: str) -> list[HeadSpec]:
        return [self.heads[h] for h in self.groups[pattern]]

    def index(
        self, q: torch.Tensor, k: torch.Tensor, scale: float, kv_start: list[int], backend: Backend | None = None
    ) -> PlannedIndex:
        """The index of one call.

        Args:
            q: [B, Hq, Sq, D] queries after RoPE; k: [B, Hkv, Sk, D] keys (the full cache, Sq <= Sk).
            scale: softmax scale.
            kv_start: per sample, the first valid key column (left padding), as host integers.
            backend: the call's backend, which decides the estimation kernels; None: ``"auto"`` for q's device.
        """
        ctx = Ctx(backend or Backend.of("auto", q.device), self.resources)
        B, H, Sq, _ = q.shape
        static = self._static_part(B, H, Sq, k.shape[2], kv_start, scale, q.device, ctx)
        if not self.dynamic:
            return static["index"]
        measured = {
            name: PATTERNS[name].measure(q, k, self.specs(name), heads, static["shape"], ctx)
            for name, heads in self.groups.items()
            if PATTERNS[name].dynamic
        }
        if q.is_cuda and graphs.CUDA_GRAPHS:
            select = lambda m: self._select(m, static, ctx)  # noqa: E731
            return static.setdefault("graphed", graphs.GraphedSelect(select, self.resources))(measured)
        return self._select(measured, static, ctx)

    def release(self) -> None:
        """Drop the cached static parts and their graphs."""
        self._static.clear()

    def _select(self, measured: graphs.Measured, static: dict, ctx: Ctx) -> PlannedIndex:
        """The index from the measurements: no other tensor input, so it can be captured as a graph."""
        shape = static["shape"]
        B, H, dev = shape.B, shape.H, shape.starts.device
        diag, cols, blocks, choices = static["diag"].clone(), list(static["cols"]), [], []
        for name, part in measured.items():
            heads = self.groups[name]
            sets = PATTERNS[name].select(part, self.specs(name), heads, shape, ctx)
            _add(sets, heads, diag, cols, ctx)
            if sets.blocks is not None:
                blocks.append((heads, sets.blocks))
            if sets.choice is not None:
                choices.append((heads, sets.choice))
        if blocks:
            block_lists = scatter_heads(B, H, blocks, dev, ctx)
        else:
            block_lists = torch.full((B, H, cdiv(shape.Sq, BLOCK), 0), -1, dtype=torch.int32, device=dev)
        choice = None
        if choices:
            choice = torch.full((B, H), -1, dtype=torch.long, device=dev)
            for heads, c in choices:
                choice[:, ctx.const(heads, dev)] = c
        index = make_index(shape.Sq, shape.Sk, shape.starts, diag, scatter_heads(B, H, cols, dev, ctx), block_lists)
        return PlannedIndex.of(index, choice)

    def _static_part(
        self, B: int, H: int, Sq: int, Sk: int, kv_start: list[int], scale: float, dev: torch.device, ctx: Ctx
    ) -> dict:
        key = (B, H, Sq, Sk, tuple(kv_start), scale, str(dev), ctx.backend)
        if key in self._static:
            self._static.move_to_end(key)
            return self._static[key]
        # Kept for later calls, which may run with autograd: made outside inference mode even when this call is in it.
        with torch.inference_mode(False):
            part = self._build_static(B, H, Sq, Sk, kv_start, scale, dev, ctx)
        self._static[key] = part
        if len(self._static) > self.CACHED_SHAPES:
            self._static.popitem(last=False)
        return part

    def _build_static(
        self, B: int, H: int, Sq: int, Sk: int, kv_start: list[int], scale: float, dev: torch.device, ctx: Ctx
    ) -> dict:
        shape = Shape(B, H, Sq, Sk, list(kv_start), ctx.const(kv_start, dev), scale)
        diag = torch.zeros(B, H, cdiv(Sk, BLOCK), dtype=torch.bool, device=dev)
        cols: list = []  # (heads, [B, len(heads), n]) pieces, -1 = none
        for name, heads in self.groups.items():
            if not PATTERNS[name].dynamic:
                _add(PATTERNS[name].static(self.specs(name), shape, ctx), heads, diag, cols, ctx)
        part = {"shape": shape, "diag": diag, "cols": cols}
        if not self.dynamic:
            no_blocks = torch.full((B, H, cdiv(Sq, BLOCK), 0), -1, dtype=torch.long, device=dev)
            index = make_index(Sq, Sk, shape.starts, diag, scatter_heads(B, H, cols, dev, ctx), no_blocks)
            part["index"] = PlannedIndex.of(index)
        return part


def _add(sets: Sets, heads: list[int], diag: torch.Tensor, cols: list, ctx: Ctx) -> None:
    """Put a pattern's diagonals into the layer's ``diag`` [B, H, N] (in place) and its columns onto ``cols``."""
    if sets.diag is not None:
        diag[:, ctx.const(heads, diag.device)] |= sets.diag
    if sets.cols is not None:
        cols.append((heads, sets.cols))


def build_index(
    q: torch.Tensor,
    k: torch.Tensor,
    heads: list[HeadSpec],
    scale: float,
    kv_start: list[int],
    backend: Backend | None = None,
) -> PlannedIndex:
    """Estimate the index of one layer call: ``LayerPlan(heads).index(q, k, scale, kv_start, backend)``.

    Args:
        q: [B, Hq, Sq, D] queries after RoPE; k: [B, Hkv, Sk, D] keys (the full cache, Sq <= Sk).
        heads: Hq head specs of this layer.
        scale: softmax scale.
        kv_start: per sample, the first valid key column (left padding), as host integers.
        backend: as for :meth:`LayerPlan.index`.
    Returns:
        The index for all heads; dense heads get every block diagonal.
    """
    return LayerPlan(heads).index(q, k, scale, kv_start, backend)
