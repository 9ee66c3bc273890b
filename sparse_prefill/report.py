"""What a patched model did on its last prefill, per layer: path, reason, the patterns that ran and tile density.

Each call of the dispatcher leaves a :class:`LayerRecord` in its patch's state; :func:`last_report` lists them,
:func:`report_json` serialises them and :func:`gather_report` merges the tensor-parallel ranks' heads.
:func:`tile_density` is the density measure of an index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .index import BLOCK, SparseIndex, block_bases, query_offsets
from .masks import block_mask
from .ops import cdiv, cdiv_tensor
from .plan.adaptive import CHOICES
from .state import MODELS, Patched

if TYPE_CHECKING:
    from .plan import PlannedIndex


@dataclass
class LayerRecord:
    """What one layer did on its last call. ``heads`` gives the global id of each head (this rank's slice under tensor
    parallelism); ``specs``, ``patterns``, ``choices`` and ``density`` follow its order. ``density`` and ``choices``
    are per (sample, head) and computed when first read (so the forward never waits for them)."""

    layer: int
    path: str
    heads: tuple[int, ...] = ()
    reason: str = ""
    specs: list[str] = field(default_factory=list)  # each head's configured pattern (sparse path only)
    q_len: int = 0
    kv_len: int = 0
    index: PlannedIndex | None = None
    _density: torch.Tensor | None = None
    _choices: list[list[str]] | None = None

    @property
    def density(self) -> list[list[float]] | None:
        """Per sample and head: computed BLOCK×BLOCK tiles over causal tiles (1.0 on the dense path)."""
        if self.index is None:
            return None
        if self._density is None:
            self._density = tile_density(self.index).cpu()
        return self._density.tolist()

    @property
    def choices(self) -> list[list[str]] | None:
        """Per sample and head, the pattern that ran: the configured one, or ``adaptive:<pattern>`` for an adaptive
        head (``adaptive:vertical_slash``, ``adaptive:block_sparse`` or ``adaptive:dense``). None on the dense path."""
        if self.index is None:
            return None
        if self._choices is None:
            B = self.index.diag_mask.shape[0]
            choice = self.index.choice
            codes = choice.tolist() if choice is not None else [[-1] * len(self.specs)] * B
            self._choices = [
                [f"adaptive:{CHOICES[c]}" if c >= 0 else p for p, c in zip(self.specs, row)] for row in codes
            ]
        return self._choices

    @property
    def patterns(self) -> list[str]:
        """Per head, the pattern that ran (an adaptive head's choices per sample joined by ``,`` where samples
        differ, e.g. ``adaptive:vertical_slash,adaptive:dense``); empty on the dense path."""
        if self.choices is None:
            return []
        return [",".join(dict.fromkeys(per_sample)) for per_sample in zip(*self.choices)]

    def to_dict(self) -> dict:
        """JSON-ready: layer, path, reason, heads (global ids), patterns, choices and density, aligned with heads."""
        fields = ("layer", "path", "reason", "patterns", "choices", "density")
        return {"heads": list(self.heads), **{name: getattr(self, name) for name in fields}}


def tile_density(index: SparseIndex) -> torch.Tensor:
    """[B, H] float: BLOCK×BLOCK tiles a kernel computes over the causal tiles of a dense causal kernel.

    Whole blocks count one tile each; the single columns a query block still needs count one tile per BLOCK columns.
    """
    B, H = index.diag_mask.shape[:2]
    out = torch.empty(B, H, device=index.diag_mask.device)
    q_start, _ = query_offsets(index.q_len, index.kv_len, index.kv_start)
    base = block_bases(index.q_len, index.kv_len, index.kv_start)
    for b in range(B):
        m_valid = cdiv(index.q_len - int(q_start[b]), BLOCK)
        n_valid = cdiv(index.kv_len - int(index.kv_start[b]), BLOCK)
        blocks = block_mask(index, b)[:, :m_valid, :n_valid]  # [H, M, N]
        cols = index.col_idx[b].long()  # [H, V]
        V = cols.shape[-1]
        col_blocks = (cols // BLOCK).clamp(max=n_valid - 1)
        extra = 0
        step = max(1, (1 << 26) // max(1, H * V))  # query blocks per chunk: [H, step, V] stays ~64M elements
        for m0 in range(0, m_valid, step):
            m1 = min(m0 + step, m_valid)
            visible = torch.arange(V, device=cols.device) < index.col_row_cnt[b][:, m0:m1, None]  # [H, m, V]
            covered = blocks[:, m0:m1].gather(2, col_blocks[:, None, :].expand(-1, m1 - m0, -1))
            extra = extra + cdiv_tensor((visible & ~covered).sum(-1), BLOCK).sum(-1)  # [H]
        causal_tiles = (base[b, :m_valid].clamp(max=n_valid - 1) + 1).sum()
        out[b] = (blocks.sum((-1, -2)) + extra).float() / causal_tiles.float()
    return out


def _patched(model) -> Patched:
    if model not in MODELS:
        raise ValueError("model: not patched by sparse_prefill")
    return MODELS[model]


def last_report(model) -> list[LayerRecord]:
    """Per layer, what its last prefill call did: path ("sparse" / "dense"), why, the pattern each head ran
    (``adaptive:<pattern>`` for adaptive heads, per sample in ``choices``) and tile density.

    ``heads`` are the global ids of the heads this process ran (all of them unless the model is tensor-parallel; then
    :func:`gather_report` collects every rank's)."""
    records = _patched(model).state.records
    return [records[i] for i in sorted(records)]


def report_json(model) -> str:
    """:func:`last_report` as JSON (densities per sample and head)."""
    return json.dumps([r.to_dict() for r in last_report(model)])


def gather_report(model) -> list[dict]:
    """Every layer's last prefill record with all its heads, in global head order, as JSON-ready dicts.

    Under tensor parallelism each rank records only its own heads; this gathers them over the TP group (a collective:
    call it on every rank). Without TP it is :func:`report_json`'s content. Each entry:
    ``layer``, ``path``, ``reason``, ``heads`` (global ids), ``patterns`` and ``density`` [sample][head] (None on the
    dense path), both aligned with ``heads``.
    """
    local = [r.to_dict() for r in last_report(model)]
    group = _patched(model).state.tp_group
    if group is None:
        return local
    parts: list = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(parts, local, group=group)
    merged = []
    for entries in zip(*parts):
        entries = sorted(entries, key=lambda e: e["heads"][0] if e["heads"] else 0)
        first = entries[0]
        dens = [e["density"] for e in entries]
        merged.append(
            {
                **first,
                "heads": [h for e in entries for h in e["heads"]],
                "patterns": [p for e in entries for p in e["patterns"]],
                "density": None if None in dens else [sum(rows, []) for rows in zip(*dens)],
            }
        )
    return merged
