"""Slow, loop-by-loop restatements of the index semantics, written independently of sparse_prefill.index."""

import torch

BLOCK = 64


def frame(q_len: int, kv_len: int, start: int) -> tuple[int, int]:
    """(first valid query row, local position of that row)."""
    first_row = max(0, start - (kv_len - q_len))
    return first_row, kv_len - q_len + first_row - start


def mask_from_sets(index) -> torch.Tensor:
    """[B, H, q_len, kv_len] bool straight from the index fields, one (row, key) at a time."""
    B, H = index.diag_mask.shape[:2]
    Sq, Sk = index.q_len, index.kv_len
    out = torch.zeros(B, H, Sq, Sk, dtype=torch.bool)
    for b in range(B):
        start = int(index.kv_start[b])
        first_row, first_pos = frame(Sq, Sk, start)
        for h in range(H):
            diag = set(torch.nonzero(index.diag_mask[b, h]).flatten().tolist())
            cols = set(index.col_idx[b, h, : index.col_cnt[b, h]].tolist())
            for i in range(first_row, Sq):
                m = (i - first_row) // BLOCK
                base = (first_pos + m * BLOCK + BLOCK - 1) // BLOCK
                blocks = (
                    set(index.blk_idx[b, h, m, : index.blk_cnt[b, h, m]].tolist()) if index.blk_idx.shape[-1] else set()
                )
                p = first_pos + i - first_row
                for c in range(p + 1):
                    j = c // BLOCK
                    if (base - j) in diag or j in blocks or c in cols:
                        out[b, h, i, start + c] = True
    return out


def vertical_slash_scores(q, k, h, b, last_q, scale, start):
    """Vertical and slash scores of head h, sample b: plain softmax rows of the last queries, summed by column and by
    diagonal. Both indexed in the local frame (column, offset)."""
    group = q.shape[1] // k.shape[1]
    Sk = k.shape[2]
    rows = range(q.shape[2] - min(last_q, q.shape[2]), q.shape[2])
    vertical = torch.zeros(Sk - start, dtype=torch.float64)
    slash = torch.zeros(Sk - start, dtype=torch.float64)
    for r in rows:
        p = Sk - q.shape[2] + r - start  # local position
        if p < 0:
            continue
        logits = (k[b, h // group, start : start + p + 1].double() @ q[b, h, r].double()) * scale
        probs = torch.softmax(logits, 0)
        vertical[: p + 1] += probs
        for c in range(p + 1):
            slash[p - c] += probs[c]
    return vertical, slash


def top_set(scores: torch.Tensor, budget: int, forced: int) -> set[int]:
    scores = scores.clone()
    scores[:forced] = float("inf")
    return set(scores.topk(min(budget, scores.numel())).indices.tolist())


def slash_block_diagonals(slashes, q_len: int, kv_len: int, start: int) -> set[int]:
    """Block diagonals hit by the slashes, found by walking the rows of a full query block far from the start."""
    _, first_pos = frame(q_len, kv_len, start)
    m = 10_000  # far enough that every key p - s exists; the diagonals do not depend on m
    base = (first_pos + m * BLOCK + BLOCK - 1) // BLOCK
    return {base - (first_pos + m * BLOCK + i - s) // BLOCK for s in slashes for i in range(BLOCK)}


def block_sparse_sets(q, k, h, b, top_k, scale, start, q_len_start):
    """Top-k key blocks per query block of head h, sample b, from mean-pooled q/k in the sample's own block grid."""
    group = q.shape[1] // k.shape[1]
    qs = q[b, h, q_len_start:].double()
    ks = k[b, h // group, start:].double()
    Sk = k.shape[2]
    first_pos = Sk - q.shape[2] + q_len_start - start
    out = []
    for m in range((qs.shape[0] + BLOCK - 1) // BLOCK):
        pq = qs[m * BLOCK : (m + 1) * BLOCK].mean(0)
        base = (first_pos + m * BLOCK + BLOCK - 1) // BLOCK
        own = (first_pos + m * BLOCK) // BLOCK
        scores = {}
        for j in range(base + 1):
            if j * BLOCK >= ks.shape[0]:
                break
            pk = ks[j * BLOCK : (j + 1) * BLOCK].mean(0)
            scores[j] = float("inf") if j >= own else float(pq @ pk) * scale
        ranked = sorted(scores, key=lambda j: -scores[j])
        out.append(set(ranked[:top_k]))
    return out


def block_mass(slash, q_len: int, kv_len: int, start: int) -> dict[int, float]:
    """Slash mass per block diagonal: each row of a full query block far from the start adds the offsets that land
    in each key block, and the block's rows are averaged."""
    _, first_pos = frame(q_len, kv_len, start)
    m = 10_000
    base = (first_pos + m * BLOCK + BLOCK - 1) // BLOCK
    mass: dict[int, float] = {}
    for i in range(BLOCK):
        p = first_pos + m * BLOCK + i
        for o in range(len(slash)):
            d = base - (p - o) // BLOCK
            mass[d] = mass.get(d, 0.0) + float(slash[o]) / BLOCK
    return mass


def cover_set(mass: dict, forced: set, gamma: float) -> list:
    """Forced entries, then the heaviest others one at a time while the kept mass is below gamma × the total (an
    entry of mass 0 adds nothing, so it is never taken)."""
    total = sum(mass.values())
    kept, acc = [], 0.0
    for i in sorted(forced, key=lambda i: -mass.get(i, 0.0)) + sorted(set(mass) - forced, key=lambda i: -mass[i]):
        if i in forced or (acc < gamma * total and mass[i] > 0):
            kept.append(i)
            acc += mass.get(i, 0.0)
    return kept


def adaptive_head(q, k, b, h, spec, scale, start):
    """The adaptive rule for one (sample, head), written out with loops in float64.

    Returns a dict: choice, js, vs_density, bs_density (inf when a row needs more than max_blocks), and the sets of
    the choice: cols (local columns), diags (block diagonals), rows (per valid query block, its key blocks).
    """
    import math

    # tau as the implementation holds it, fp32 on the device: a denormal tau is 0 there and picks nothing.
    p = {**spec.params, "tau": float(torch.tensor(spec.params["tau"], dtype=torch.float32))}
    Sq, Sk = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    first_row, first_pos = frame(Sq, Sk, start)
    length = Sk - start
    nb = -(-length // BLOCK)
    n = -(-Sk // BLOCK)
    mb = -(-(Sq - first_row) // BLOCK)
    base = [min((first_pos + m * BLOCK + BLOCK - 1) // BLOCK, nb - 1) for m in range(mb)]
    last_row = [first_pos + m * BLOCK + BLOCK - 1 for m in range(mb)]
    causal = sum(x + 1 for x in base)
    nearest = max(1, p["force_slash"])

    # Vertical-slash sets and their tile estimate.
    vertical, slash = vertical_slash_scores(q, k, h, b, p["last_q"], scale, start)
    sinks = set(range(min(p["force_vertical"], length)))
    total = sum(float(vertical[c]) for c in range(length))
    share = sum(float(vertical[c]) for c in sinks) / total if total > 0 else 0.0
    gamma = 1.0 if p["gamma"] >= 1 else share + p["gamma"] * (1 - share)  # of the attention the sinks leave
    cols = cover_set({c: float(vertical[c]) for c in range(length)}, sinks, gamma)
    dmass = {d: m for d, m in block_mass(slash, Sq, Sk, start).items() if 0 <= d < nb}
    forced = {d for d in slash_block_diagonals(range(nearest), Sq, Sk, start) if 0 <= d < n}
    diags = cover_set(dmass, forced, gamma)
    tiles = sum(sum(1 for x in base if x >= d) for d in diags if d < nb)
    tiles += sum(sum(1 for r in last_row if r >= c) for c in cols) / BLOCK
    vs_density = tiles / causal

    # Query-aware test: true block attention of the last queries against their mean query's pooled estimate.
    true = [float(vertical[j * BLOCK : (j + 1) * BLOCK].sum()) for j in range(nb)]
    true = [x / sum(true) for x in true]
    window = [r for r in range(Sq - min(p["last_q"], Sq), Sq) if r >= first_row]
    q_mean = q[b, h, window].double().mean(0)
    keys = k[b, h // group, start:].double()
    pooled = [keys[j * BLOCK : (j + 1) * BLOCK].mean(0) for j in range(nb)]
    est = torch.softmax(torch.stack([q_mean @ pk for pk in pooled]) * scale, 0).tolist()

    def kl(a, m):
        return sum(x * math.log(x / y) for x, y in zip(a, m) if x > 0)

    mid = [(x + y) / 2 for x, y in zip(true, est)]
    js = math.sqrt(max(0.0, (kl(true, mid) + kl(est, mid)) / 2))

    # Query-aware sets: per query block, its pooled query against the pooled keys of its causal blocks.
    rows, fits = [], True
    limit = spec.budget("max_blocks", nb)  # a fraction of the sample's own key blocks
    queries = q[b, h, first_row:].double()
    for m in range(mb):
        pq = queries[m * BLOCK : (m + 1) * BLOCK].mean(0)
        top = (first_pos + m * BLOCK + BLOCK - 1) // BLOCK
        visible = [j for j in range(nb) if j <= top]
        probs = torch.softmax(torch.stack([pq @ pooled[j] for j in visible]) * scale, 0).tolist()
        lo = max(0, first_pos + m * BLOCK - nearest + 1) // BLOCK
        sinks = -(-p["force_vertical"] // BLOCK)
        forced = {j for j in visible if j >= lo or j < sinks}
        rows.append(cover_set(dict(zip(visible, probs)), forced, p["gamma"]))
        fits &= len(rows[-1]) <= limit
    block_sparse = js < p["tau"] and fits
    bs_density = sum(map(len, rows)) / causal if block_sparse else math.inf
    density = bs_density if block_sparse else vs_density
    choice = "dense" if density >= p["dense_above"] else "block_sparse" if block_sparse else "vertical_slash"
    return dict(choice=choice, js=js, vs_density=vs_density, bs_density=bs_density, cols=cols, diags=diags, rows=rows)
