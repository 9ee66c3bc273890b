"""Models split across devices: which attention heads this process holds, and reports in global head numbers.

Two engines split a transformers model, and a patched model runs under both:

* accelerate's ``device_map``: whole layers sit on different devices. Nothing here: every layer's index and kernel
  run on the device of its q/k/v (see :func:`sparse_prefill.dispatch.sparse_prefill_attention`).
* transformers tensor parallelism (``from_pretrained(..., tp_plan="auto")`` under ``torchrun``): the q/k/v
  projections are sharded "colwise", so each rank computes a contiguous slice of the query heads and the matching
  slice of the KV heads, and the attention function sees only those. :func:`head_shard` reads the slice from the
  sharded ``q_proj``/``k_proj`` weights (DTensors with a ``Shard(0)`` placement on the TP mesh), and the patch gives
  each rank the per-head specs of its global heads. Example, 32 query / 8 KV heads over 2 ranks::

      rank 0: query heads  0..15, KV heads 0..3      (query head h reads KV head h // 4)
      rank 1: query heads 16..31, KV heads 4..7      (local query head 0 = global 16 reads local KV head 0 = global 4)

Reports keep global head numbers: each layer's record lists the global ids of its heads, and
:func:`sparse_prefill.report.gather_report` collects every rank's heads into one report per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import ModelInfo


@dataclass(frozen=True)
class HeadShard:
    """The attention heads one process holds, as global head ids (contiguous), and the TP group it shares them in."""

    q_heads: range
    kv_heads: range
    rank: int = 0
    size: int = 1
    group: object = field(default=None, compare=False, repr=False)  # torch.distributed process group; None: unsharded


def shard_heads(num_heads: int, num_kv_heads: int, tp_size: int, rank: int) -> HeadShard:
    """The heads of ``rank`` when ``tp_size`` ranks split a layer colwise: contiguous, equal slices.

    Query heads [rank * Hq/tp, (rank + 1) * Hq/tp) and KV heads [rank * Hkv/tp, (rank + 1) * Hkv/tp), so each rank's
    query heads read exactly its own KV heads (GQA groups never straddle ranks).

    Raises:
        ValueError: a size is not a positive integer, rank is outside [0, tp_size), or the query or KV heads do not
            divide by ``tp_size`` (the projections would split a head).
    """
    for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("tp_size", tp_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < tp_size:
        raise ValueError(f"rank: must be an integer in [0, {tp_size}), got {rank!r}")
    for name, heads in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        if heads % tp_size:
            raise ValueError(
                f"{name}={heads} does not divide by the tensor-parallel size {tp_size}: each rank must hold whole "
                "heads; use a TP size that divides both head counts"
            )
    q, kv = num_heads // tp_size, num_kv_heads // tp_size
    return HeadShard(range(rank * q, (rank + 1) * q), range(rank * kv, (rank + 1) * kv), rank, tp_size)


def _colwise_shard(weight: torch.Tensor | None, name: str) -> tuple[int, int, object] | None:
    """(rank, size, group) along the mesh dim where a [out, in] weight is split by output rows; None if it is not."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(weight, DTensor):
        return None
    sharded = [(d, p) for d, p in enumerate(weight.placements) if isinstance(p, Shard)]
    if not sharded:
        return None
    (dim, placement), *rest = sharded
    if rest or placement.dim not in (0, -weight.ndim):
        raise ValueError(
            f"{name}: sharded as {weight.placements}; sparse_prefill supports the colwise split of transformers' "
            "tp_plan (Shard(0) on one mesh dimension)"
        )
    mesh = weight.device_mesh
    return mesh.get_local_rank(dim), mesh.size(dim), mesh.get_group(dim)


def head_shard(q_proj: torch.nn.Module | None, k_proj: torch.nn.Module | None, info: ModelInfo) -> HeadShard:
    """The heads this process holds of one attention module, from its query and key projections.

    All heads unless transformers' tensor parallelism split the projections colwise; then the rank along the TP mesh
    dimension picks its slice (:func:`shard_heads`).

    Raises:
        ValueError: q_proj and k_proj are split differently, or the split does not give each rank whole heads.
    """
    q = _colwise_shard(getattr(q_proj, "weight", None), "q_proj")
    k = _colwise_shard(getattr(k_proj, "weight", None), "k_proj")
    q_split, k_split = (s[:2] if s else "unsplit" for s in (q, k))
    if q_split != k_split:
        raise ValueError(
            f"q_proj is {q_split} but k_proj is {k_split} ((rank, size) on the TP mesh): query and key heads must be "
            "sharded together (transformers' tp_plan 'colwise' on both)"
        )
    rank, size, group = q or (0, 1, None)
    shard = shard_heads(info.num_heads, info.num_kv_heads, size, rank)
    return HeadShard(shard.q_heads, shard.kv_heads, rank, size, group)
