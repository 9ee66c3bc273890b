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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import HeadSpec
from .index import BLOCK, SparseIndex, block_bases, cdiv, make_index, query_offsets, slash_diagonals


def build_index(
    q: torch.Tensor, k: torch.Tensor, heads: list[HeadSpec], scale: float, kv_start: list[int]
) -> SparseIndex:
    """Estimate the index of one layer call.

    Args:
        q: [B, Hq, Sq, D] queries after RoPE; k: [B, Hkv, Sk, D] keys (the full cache, Sq <= Sk).
        heads: Hq head specs of this layer.
        scale: softmax scale.
        kv_start: per sample, the first valid key column (left padding), as host integers.
    Returns:
        The :class:`SparseIndex` for all heads; dense heads get every block diagonal.
    """
    B, H, Sq, _ = q.shape
    Sk = k.shape[2]
    dev = q.device
    starts = torch.tensor(kv_start, device=dev, dtype=torch.long)
    diag = torch.zeros(B, H, cdiv(Sk, BLOCK), dtype=torch.bool, device=dev)
    by_pattern: dict[str, list[int]] = {}
    for h, spec in enumerate(heads):
        by_pattern.setdefault(spec.pattern, []).append(h)

    diag[:, by_pattern.get("dense", [])] = True
    cols, slash = [], []  # (heads, [B, len(heads), n]) pieces, -1 = none
    if a_heads := by_pattern.get("a_shape"):
        sink = [heads[h].budget("sink", Sk) for h in a_heads]
        local = [heads[h].budget("local", Sk) for h in a_heads]
        cols.append((a_heads, _prefix(B, sink, dev)))
        slash.append((a_heads, _prefix(B, local, dev)))
    if vs_heads := by_pattern.get("vertical_slash"):
        vs_cols, vs_slash = vertical_slash_sets(q, k, [heads[h] for h in vs_heads], vs_heads, scale, starts)
        cols.append((vs_heads, vs_cols))
        slash.append((vs_heads, vs_slash))
    if slash:
        diag |= slash_diagonals(_scatter_heads(B, H, slash, dev), Sq, Sk, starts)
    blocks = torch.full((B, H, cdiv(Sq, BLOCK), 0), -1, dtype=torch.long, device=dev)
    if bs_heads := by_pattern.get("block_sparse"):
        blocks = block_sparse_sets(q, k, [heads[h] for h in bs_heads], bs_heads, scale, kv_start)
    return make_index(Sq, Sk, starts, diag, _scatter_heads(B, H, cols, dev), blocks)


def _prefix(B: int, lengths: list[int], dev: torch.device) -> torch.Tensor:
    """[B, len(lengths), max(lengths)]: 0..n-1 per head, -1 after."""
    n = torch.arange(max(lengths), device=dev)
    out = torch.where(n[None, :] < torch.tensor(lengths, device=dev)[:, None], n, -1)
    return out.expand(B, -1, -1)


def _scatter_heads(B: int, H: int, pieces: list, dev: torch.device) -> torch.Tensor:
    """Stack per-pattern [B, h, n] pieces into one [B, H, max n] tensor, -1 where a head has nothing."""
    width = max((p.shape[-1] for _, p in pieces), default=0)
    out = torch.full((B, H, width), -1, dtype=torch.long, device=dev)
    for hs, p in pieces:
        out[:, hs, : p.shape[-1]] = p
    return out


def _topk_budget(scores: torch.Tensor, budgets: list[int], head_dim: int = 1) -> torch.Tensor:
    """Top entries along the last dim with a budget per head (dim ``head_dim``); -1 past it or where the score is -inf."""
    kmax = min(max(budgets), scores.shape[-1])
    vals, idx = scores.topk(kmax, dim=-1)
    per_head = torch.tensor(budgets, device=scores.device).view(-1, *[1] * (scores.dim() - head_dim - 1))
    keep = torch.arange(kmax, device=scores.device) < per_head
    return torch.where(keep & (vals > float("-inf")), idx, -1)


def vertical_slash_scores(
    q: torch.Tensor, k: torch.Tensor, heads: list[int], last_q: list[int], scale: float, starts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertical and slash scores of the given heads: two [B, len(heads), Sk] fp32 tensors.

    Causal softmax attention of each head's last ``last_q[i]`` queries over all keys (padding keys and padding
    queries get probability 0), summed per key column and per diagonal offset (query position - key position).
    Computed one KV head at a time: the only large buffer is that KV head's [B, group, L, Sk] probabilities, and K/V
    are never repeated.
    """
    B, H, Sq, _ = q.shape
    Sk = k.shape[2]
    group = H // k.shape[1]
    L = min(max(last_q), Sq)
    pos = Sk - L + torch.arange(L, device=q.device)
    keys = torch.arange(Sk, device=q.device)
    visible = (keys[None, None, :] <= pos[None, :, None]) & (keys[None, None, :] >= starts[:, None, None])  # [B, L, Sk]
    in_window = torch.arange(L, device=q.device)[None, :] >= L - torch.tensor(last_q, device=q.device)[:, None]
    vertical = torch.empty(B, len(heads), Sk, device=q.device)
    slash = torch.empty_like(vertical)
    for kv in sorted({h // group for h in heads}):
        sel = [i for i, h in enumerate(heads) if h // group == kv]
        qh = q[:, [heads[i] for i in sel], Sq - L :].float()
        logits = (qh @ k[:, kv, None].float().transpose(-1, -2)) * scale
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


def vertical_slash_sets(q, k, specs: list[HeadSpec], heads: list[int], scale: float, starts: torch.Tensor):
    """Columns (local) and slash offsets of the vertical-slash heads: two [B, h, n] tensors, -1 = none."""
    Sk = k.shape[2]
    vertical, slash = vertical_slash_scores(q, k, heads, [s.params["last_q"] for s in specs], scale, starts)
    local = torch.arange(Sk, device=q.device)[None, :] - starts[:, None]  # [B, Sk] local column of each key
    vertical = vertical.masked_fill((local < 0)[:, None], float("-inf"))
    forced_v = torch.tensor([s.params["force_vertical"] for s in specs], device=q.device)
    vertical = vertical.masked_fill((local >= 0)[:, None] & (local[:, None] < forced_v[:, None]), float("inf"))
    cols = _topk_budget(vertical, [s.budget("vertical", Sk) for s in specs])
    cols = torch.where(cols >= 0, cols - starts[:, None, None], -1)

    offsets = torch.arange(Sk, device=q.device)
    slash = slash.masked_fill((offsets[None, :] > Sk - 1 - starts[:, None])[:, None], float("-inf"))
    forced_s = torch.tensor([s.params["force_slash"] for s in specs], device=q.device)
    slash = slash.masked_fill(offsets[None, None, :] < forced_s[None, :, None], float("inf"))
    return cols, _topk_budget(slash, [s.budget("slash", Sk) for s in specs])


def _mean_pool(x: torch.Tensor) -> torch.Tensor:
    """[h, S, D] -> [h, cdiv(S, BLOCK), D] means over BLOCK rows (the last block over the rows it has)."""
    S = x.shape[1]
    n = cdiv(S, BLOCK)
    sums = F.pad(x.float(), (0, 0, 0, n * BLOCK - S)).unflatten(1, (n, BLOCK)).sum(2)
    counts = (S - torch.arange(n, device=x.device) * BLOCK).clamp(max=BLOCK)
    return sums / counts[None, :, None]


def block_sparse_sets(q, k, specs: list[HeadSpec], heads: list[int], scale: float, kv_start: list[int]) -> torch.Tensor:
    """[B, H, M, K] key blocks of the block-sparse heads (other heads -1), in each sample's own block grid."""
    B, H, Sq, _ = q.shape
    Sk = k.shape[2]
    group = H // k.shape[1]
    M, N = cdiv(Sq, BLOCK), cdiv(Sk, BLOCK)
    budgets = [s.budget("top_k", N) for s in specs]
    out = torch.full((B, H, M, min(max(budgets), N)), -1, dtype=torch.long, device=q.device)
    starts = torch.tensor(kv_start, device=q.device)
    q_start, off = query_offsets(Sq, Sk, starts)
    base = block_bases(Sq, Sk, starts)
    heads_t = torch.tensor(heads, device=q.device)
    for b in range(B):
        pq = _mean_pool(q[b, heads_t, int(q_start[b]) :])  # [h, Mb, D]
        pk = _mean_pool(k[b, :, kv_start[b] :])[heads_t // group]  # [h, Nb, D], pooled once per KV head
        scores = (pq @ pk.transpose(-1, -2)) * scale  # [h, Mb, Nb]
        Mb, Nb = scores.shape[1:]
        j = torch.arange(Nb, device=q.device)
        top = base[b, :Mb, None]
        own = (off[b] + torch.arange(Mb, device=q.device) * BLOCK)[:, None] // BLOCK  # block of the first row
        scores = scores.masked_fill(j[None, :] > top, float("-inf"))
        scores = scores.masked_fill((j[None, :] >= own) & (j[None, :] <= top), float("inf"))
        picked = _topk_budget(scores, budgets, head_dim=0)
        out[b, heads_t, :Mb, : picked.shape[-1]] = picked
    return out
