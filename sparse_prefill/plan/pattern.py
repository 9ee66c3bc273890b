"""What a sparse pattern is to the rest of the package: its config schema, its display names, and how it builds its
heads' part of a layer call's index. Each pattern module defines one :class:`Pattern`; :mod:`.registry` lists them.

A pattern is either *static* (its part depends only on the call's lengths and padding: :meth:`Pattern.static`,
built once per shape) or *dynamic* (it reads q/k: :meth:`Pattern.measure`, then :meth:`Pattern.select` from those
measurements alone, which :class:`~sparse_prefill.plan.layer.LayerPlan` may replay as a CUDA graph).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..config import HeadSpec
    from .common import Ctx


@dataclass
class Sets:
    """One pattern's part of a layer call's index, for its ``h`` heads, in :func:`~sparse_prefill.index.make_index`'s
    format; a field a pattern does not use is None.

    Attributes:
        cols: [B, h, V] integer local key columns ascending, then -1.
        diag: [B, h, N] bool block diagonals.
        blocks: [B, h, M, K] integer key blocks per query block ascending, then -1.
        choice: [B, h] int64, the pattern each head chose per sample (codes of
            :data:`sparse_prefill.plan.adaptive.CHOICES`): for reports and the dense-head shortcut, not the kernels.
    """

    cols: torch.Tensor | None = None
    diag: torch.Tensor | None = None
    blocks: torch.Tensor | None = None
    choice: torch.Tensor | None = None


@dataclass(frozen=True)
class Shape:
    """One call's shape: B samples of H query heads, Sq queries over Sk keys, sample b's valid keys from
    ``kv_start[b]`` (host integers; ``starts``: the same [B] int64 on the device), softmax ``scale``."""

    B: int
    H: int
    Sq: int
    Sk: int
    kv_start: list[int]
    starts: torch.Tensor
    scale: float

    @property
    def lengths(self) -> list[int]:
        """Per sample, its number of valid keys (fractional budgets are of it)."""
        return [self.Sk - s for s in self.kv_start]


@dataclass(frozen=True)
class Pattern:
    """A pattern's schema and names. Subclasses implement :meth:`static`, or :meth:`measure` and :meth:`select`.

    Attributes:
        name: its name in configs (``"vertical_slash"``).
        abbrev: its column heading in tables (``"VS"``).
        alias: its short name on command lines and in pattern mixes (``"vs"``).
        defaults: every parameter with its built-in value (the config's ``PATTERN_DEFAULTS`` entry).
        budgets: the parameters that are budgets: positive integers, or fractions in (0, 1) of the call's length.
        choices: parameters taking one of some strings: name -> the strings.
        unit: thresholds in a unit interval: name -> (0 allowed, the interval as text for errors).
        dynamic: reads q/k.
    """

    name: str
    abbrev: str
    alias: str
    defaults: dict = field(default_factory=dict)
    budgets: frozenset = frozenset()
    choices: dict = field(default_factory=dict)
    unit: dict = field(default_factory=dict)
    dynamic: bool = False

    def check(self, params: dict) -> str | None:
        """A rule across a head's filled-in parameters: None, or the broken rule as ``"<param>: <rule>"``."""
        return None

    def static(self, specs: list[HeadSpec], shape: Shape, ctx: Ctx) -> Sets:
        """A static pattern's sets for heads with ``specs``."""
        raise NotImplementedError

    def measure(
        self, q: torch.Tensor, k: torch.Tensor, specs: list[HeadSpec], heads: list[int], shape: Shape, ctx: Ctx
    ) -> dict[str, torch.Tensor]:
        """A dynamic pattern's measurements of q [B, Hq, Sq, D] and k [B, Hkv, Sk, D] for ``heads`` (query heads,
        ascending) with ``specs``: tensors only, the only input of :meth:`select`."""
        raise NotImplementedError

    def select(
        self, measured: dict[str, torch.Tensor], specs: list[HeadSpec], heads: list[int], shape: Shape, ctx: Ctx
    ) -> Sets:
        """A dynamic pattern's sets from its :meth:`measure`: no other tensor input, so it can be graph-captured."""
        raise NotImplementedError
