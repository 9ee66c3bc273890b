"""The select stage of a plan replayed as a CUDA graph: its hundred-odd small kernels would otherwise cost more host
time to launch than the GPU spends running them."""

from __future__ import annotations

import logging
from typing import Callable

import torch

from ..index import SparseIndex
from ..state import Resources

logger = logging.getLogger("sparse_prefill")

# Replay the select stage of repeated shapes as CUDA graphs (LayerPlan). Off: every call runs it eagerly.
CUDA_GRAPHS = True

Measured = dict[str, dict[str, torch.Tensor]]  # pattern name -> that pattern's measurements


class GraphedSelect:
    """One (plan, shape)'s select stage as a CUDA graph.

    The first call runs eagerly (it also fills the constant caches, which a capture cannot do); the second captures
    the stage with its measurements copied into a workspace shared by all graphs of the device; later calls copy
    their measurements in and replay. Graphs share one memory pool per device (held by the patch's
    :class:`~sparse_prefill.state.Resources`) and run in stream order, so one plan's replay cannot overwrite what
    another's kernel still has to read; each call returns its own copy of the index. Should a capture fail, this
    shape stays eager.
    """

    # A capture failed: every later call runs eagerly. Process-wide: it says what the driver and runtime can do.
    broken = False

    def __init__(self, select: Callable[[Measured], SparseIndex], resources: Resources):
        self.select = select
        self.resources = resources
        self.calls = 0
        self.graph = None

    def __call__(self, measured: Measured) -> SparseIndex:
        self.calls += 1
        if self.calls == 2 and not GraphedSelect.broken:
            self._capture(measured)
        if self.graph is None:
            return self.select(measured)
        graph, inputs, output = self.graph
        for key, t in _flat(measured).items():
            inputs[key].copy_(t)
        graph.replay()
        return output.clone()

    def _capture(self, measured: Measured) -> None:
        flat = _flat(measured)
        dev = next(iter(flat.values())).device
        inputs = self._inputs(flat, dev)
        for key, t in flat.items():
            inputs[key].copy_(t)
        # capture_begin/end on a side stream rather than torch.cuda.graph(), which synchronises the device and
        # empties the allocator's cache: costs a model's forward would pay at every capture.
        current, side = torch.cuda.current_stream(dev), torch.cuda.Stream(dev)
        side.wait_stream(current)
        graph = torch.cuda.CUDAGraph()
        # A pool lives while a graph captured into it does: the first graph of the device is kept (until the patch
        # releases its resources), so the handle stays valid when the plans that captured later graphs are gone.
        pools = self.resources.graph_pools
        pool, _ = pools.get(dev, (torch.cuda.graph_pool_handle(), None))
        try:
            with torch.cuda.stream(side):
                self.select(_nest({key: t.clone() for key, t in inputs.items()}))  # warm-up off the capture
                graph.capture_begin(pool=pool, capture_error_mode="thread_local")
                try:
                    output = self.select(_nest(inputs))
                finally:
                    graph.capture_end()
        except RuntimeError as err:
            current.wait_stream(side)
            GraphedSelect.broken = True
            logger.warning("sparse_prefill: CUDA graph capture of the index selection failed (%s); runs eagerly", err)
            return
        current.wait_stream(side)
        pools.setdefault(dev, (pool, graph))
        self.graph = (graph, inputs, output)

    def _inputs(self, flat: dict[tuple, torch.Tensor], dev: torch.device) -> dict[tuple, torch.Tensor]:
        """Views shaped like ``flat`` into the device's workspace (one flat buffer per dtype, grown on demand)."""
        workspaces = self.resources.workspaces
        need: dict[torch.dtype, int] = {}
        for t in flat.values():
            need[t.dtype] = need.get(t.dtype, 0) + t.numel()
        views, offset = {}, dict.fromkeys(need, 0)
        for dtype, numel in need.items():
            buf = workspaces.get((dev, dtype))
            if buf is None or buf.numel() < numel:  # graphs captured on a smaller one keep it alive through views
                workspaces[(dev, dtype)] = torch.empty(numel, dtype=dtype, device=dev)
        for key, t in flat.items():
            buf = workspaces[(dev, t.dtype)]
            views[key] = buf[offset[t.dtype] : offset[t.dtype] + t.numel()].view(t.shape)
            offset[t.dtype] += t.numel()
        return views


def _flat(measured: Measured) -> dict[tuple[str, str], torch.Tensor]:
    return {(pattern, name): t for pattern, part in measured.items() for name, t in part.items()}


def _nest(flat: dict[tuple[str, str], torch.Tensor]) -> Measured:
    out: Measured = {}
    for (pattern, name), t in flat.items():
        out.setdefault(pattern, {})[name] = t
    return out
