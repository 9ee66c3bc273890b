"""What a patch keeps between calls, and the registries that find it.

* :class:`Resources`: what a patch allocated on devices (cached constant tensors, the CUDA graphs' memory pools and
  input workspaces); :func:`~sparse_prefill.patch.unpatch_model` releases them.
* :class:`PatchState`: one patched model's options, its per-layer records and warnings, and its resources.
* :class:`LayerState`: one attention module's layer number, plan and global heads.
* :data:`MODELS` and :data:`LAYERS`: patched model -> :class:`Patched`, attention module -> :class:`LayerState`.
  Weak keys: a model that is deleted takes its entries with it.
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .devices import AUTO, dense_backend_for, device_class, min_seq_len_for
from .layout import KeyLayout, read_layout

if TYPE_CHECKING:
    from .plan import LayerPlan
    from .report import LayerRecord

logger = logging.getLogger("sparse_prefill")


class Resources:
    """Device memory a patch keeps between calls: small constant tensors, and what its plans' CUDA graphs use (one
    memory pool per device, one input workspace per device and dtype). Shared by the plans of one patch, so one
    plan's replay runs in stream order with another's and cannot overwrite what it still reads."""

    CONSTS = 1024  # constant tensors kept, least recently used dropped first

    def __init__(self) -> None:
        self.consts: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        # device -> (pool handle, the first graph captured into it: it keeps the pool alive)
        self.graph_pools: dict[torch.device, tuple] = {}
        self.workspaces: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}  # flat buffers, grown on demand

    def const(self, values, device, dtype: torch.dtype = torch.long) -> torch.Tensor:
        """A small tensor (int64 by default) of host values (a list, or a list of equal-length lists), made once per
        (values, device, dtype): a fresh host-to-device copy on every call would wait for the GPU (it synchronises
        the stream), and these lists repeat across calls and layers."""
        key = (tuple(tuple(v) if isinstance(v, list) else v for v in values), str(device), dtype)
        t = self.consts.get(key)
        if t is not None:
            self.consts.move_to_end(key)
            return t
        # Outside inference mode: the tensor outlives the call, and an inference tensor could not be saved for
        # backward by a later call with autograd.
        with torch.inference_mode(False):
            t = self.consts[key] = torch.tensor(key[0], dtype=dtype, device=key[1])
        if len(self.consts) > self.CONSTS:
            self.consts.popitem(last=False)
        return t

    def release(self) -> None:
        """Drop every tensor, graph and pool held here."""
        self.consts.clear()
        self.graph_pools.clear()
        self.workspaces.clear()

    def __len__(self) -> int:
        return len(self.consts) + len(self.graph_pools) + len(self.workspaces)


@dataclass
class PatchState:
    """Shared by the layers of one patched model."""

    min_seq_len: int | str  # an integer, or "auto": the measured crossover of the call's device and head_dim
    backend: str  # "auto", "triton" or "torch": the request; each call decides its Backend from it
    dense_backend: str = "auto"
    records: dict[int, LayerRecord] = field(default_factory=dict)
    warned: set[str] = field(default_factory=set)
    tp_group: object = None  # the tensor-parallel process group this rank shares the heads in; None: unsharded
    resources: Resources = field(default_factory=Resources)
    _layouts: dict = field(default_factory=dict)  # this forward's masks (by identity) -> their layout
    _resolved: dict = field(default_factory=dict)

    def warn_once(self, message: str) -> None:
        if message not in self.warned:
            self.warned.add(message)
            logger.warning(message)

    def resolved(self, query: torch.Tensor) -> tuple[int, str, str]:
        """(min_seq_len, where it came from, dense backend) for the device and head_dim of ``query``; looked up once
        per (device, head_dim)."""
        key = (query.device, query.shape[-1])
        if key not in self._resolved:
            dev_class = device_class(query.device)
            if self.min_seq_len == AUTO:
                min_len, source = min_seq_len_for(dev_class, query.shape[-1])
            else:
                min_len, source = self.min_seq_len, "set"
            self._resolved[key] = (min_len, source, dense_backend_for(self.dense_backend, dev_class, query.shape[-1]))
        return self._resolved[key]

    def layout(self, mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int) -> KeyLayout | str:
        """:func:`~sparse_prefill.layout.read_layout` of this call. Every layer of a forward gets the same mask tensor,
        so it is read once per forward: remembered by identity until the first layer's next call
        (:meth:`forward_starts`), never across forwards (a mask buffer can be rewritten in place between them)."""
        if mask is None:
            return read_layout(None, batch, q_len, kv_len)
        key = (id(mask), batch, q_len, kv_len)
        seen = self._layouts.get(key)
        if seen is None or seen[0]() is not mask:
            seen = self._layouts[key] = (weakref.ref(mask), read_layout(mask, batch, q_len, kv_len))
        return seen[1]

    def forward_starts(self) -> None:
        self._layouts.clear()


@dataclass
class LayerState:
    layer: int
    plan: LayerPlan  # the specs of the heads this process holds
    patch: PatchState
    heads: tuple[int, ...]  # their global ids

    @property
    def all_dense(self) -> bool:
        return set(self.plan.groups) == {"dense"}


@dataclass
class Patched:
    """A patched model: the attention implementation it had before the first patch, its state, and its attention
    modules (the keys of its :data:`LAYERS` entries)."""

    previous: str | None
    state: PatchState
    modules: list[torch.nn.Module]


MODELS: weakref.WeakKeyDictionary[torch.nn.Module, Patched] = weakref.WeakKeyDictionary()
LAYERS: weakref.WeakKeyDictionary[torch.nn.Module, LayerState] = weakref.WeakKeyDictionary()
