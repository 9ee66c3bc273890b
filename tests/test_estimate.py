"""Index estimation against loop-by-loop restatements of MInference's rules."""

import gc

import pytest
import torch
from naive import block_mass, block_sparse_sets, slash_block_diagonals, top_set, vertical_slash_scores

from conftest import spec
from sparse_prefill.index import query_offsets
from sparse_prefill.masks import block_mask, col_mask, token_mask
from sparse_prefill.plan import build_index
from sparse_prefill.plan.vertical_slash import diagonal_sums
from test_index import qkv


def test_diagonal_sums_is_a_sum_along_each_diagonal():
    L, S = 5, 12
    p = torch.rand(2, L, S)
    want = torch.zeros(2, S)
    for r in range(L):
        pos = S - L + r
        for c in range(pos + 1):
            want[:, pos - c] += p[:, r, c]
    # diagonal_sums expects causal rows (zeros right of each query's position).
    causal = torch.arange(S)[None, :] <= (S - L + torch.arange(L))[:, None]
    assert torch.allclose(diagonal_sums(p * causal), want, atol=1e-6)


@pytest.mark.parametrize("q_len,kv_len,starts", [(200, 200, [0]), (230, 230, [0, 70]), (90, 260, [0, 200])])
@pytest.mark.parametrize("group", [1, 3])
def test_vertical_slash_picks_the_top_columns_and_diagonals(q_len, kv_len, starts, group):
    heads = [
        spec(
            "vertical_slash",
            vertical=9 + h,
            slash=20 - 3 * h,
            last_q=24 + 8 * h,
            force_vertical=3,
            force_slash=5,
            slash_select="token",
        )
        for h in range(group * 2)
    ]
    q, k, _ = qkv(len(starts), len(heads), 2, q_len, kv_len, seed=group)
    index = build_index(q, k, heads, 0.3, starts)
    for b, start in enumerate(starts):
        for h, s in enumerate(heads):
            vertical, slash = vertical_slash_scores(q, k, h, b, s.params["last_q"], 0.3, start)
            cols = index.col_idx[b, h, : index.col_cnt[b, h]].tolist()
            assert cols == sorted(top_set(vertical, s.params["vertical"], 3))
            diagonals = slash_block_diagonals(top_set(slash, s.params["slash"], 5), q_len, kv_len, start)
            n = index.diag_mask.shape[-1]
            assert set(torch.nonzero(index.diag_mask[b, h]).flatten().tolist()) == {d for d in diagonals if d < n}


@pytest.mark.parametrize("q_len,kv_len,starts", [(700, 700, [0]), (650, 650, [0, 90]), (300, 700, [0, 450])])
def test_block_slash_select_keeps_the_block_diagonals_with_most_slash_mass(q_len, kv_len, starts):
    heads = [
        spec("vertical_slash", vertical=10, slash=100 + 64 * h, force_vertical=2, force_slash=3 + 70 * h)
        for h in range(3)
    ]
    q, k, _ = qkv(len(starts), 3, 1, q_len, kv_len, seed=11)
    index = build_index(q, k, heads, 0.3, starts)
    for b, start in enumerate(starts):
        for h, s in enumerate(heads):
            _, slash = vertical_slash_scores(q, k, h, b, 64, 0.3, start)
            mass = block_mass(slash, q_len, kv_len, start)
            forced = slash_block_diagonals(range(s.params["force_slash"]), q_len, kv_len, start)
            n = -(-s.params["slash"] // 64) + -(-s.params["force_slash"] // 64) + 1
            ranked = sorted((d for d in mass if mass[d] > 0), key=lambda d: -mass[d])
            want = {d for d in list(dict.fromkeys(sorted(forced) + ranked))[:n] if d < index.diag_mask.shape[-1]}
            assert set(torch.nonzero(index.diag_mask[b, h]).flatten().tolist()) == want, (b, h)


@pytest.mark.parametrize("q_len,kv_len,starts", [(200, 200, [0]), (260, 260, [0, 100]), (100, 230, [0, 170])])
def test_block_sparse_picks_the_top_pooled_blocks(q_len, kv_len, starts):
    heads = [spec("block_sparse", top_k=2), spec("block_sparse", top_k=3)]
    q, k, _ = qkv(len(starts), 2, 1, q_len, kv_len, seed=5)
    index = build_index(q, k, heads, 0.25, starts)
    q_start, _ = query_offsets(q_len, kv_len, torch.tensor(starts))
    for b, start in enumerate(starts):
        for h, s in enumerate(heads):
            want = block_sparse_sets(q, k, h, b, s.params["top_k"], 0.25, start, int(q_start[b]))
            for m, blocks in enumerate(want):
                assert set(index.blk_idx[b, h, m, : index.blk_cnt[b, h, m]].tolist()) == blocks, (b, h, m)


def test_a_shape_keeps_sinks_and_the_local_window():
    q, k, _ = qkv(1, 1, 1, 300, 300)
    index = build_index(q, k, [spec("a_shape", sink=10, local=100)], 1.0, [0])
    assert index.col_idx[0, 0, : index.col_cnt[0, 0]].tolist() == list(range(10))
    # local=100 spans at most offsets 0..99: the diagonal block and the two before it.
    assert torch.nonzero(index.diag_mask[0, 0]).flatten().tolist() == [0, 1, 2]


def test_left_padding_gives_each_sample_its_unpadded_index():
    heads = [
        spec("vertical_slash", vertical=10, slash=30, last_q=32, force_vertical=3, force_slash=5),
        spec("block_sparse", top_k=2),
        spec("a_shape", sink=4, local=64),
    ]
    q, k, _ = qkv(2, 3, 1, 250, 250, seed=9)
    pad = 77
    q[1, :, :pad] = 123.0  # garbage in the padding must not matter
    k[1, :, :pad] = -55.0
    batched = build_index(q, k, heads, 0.25, [0, pad])
    alone = build_index(q[1:, :, pad:], k[1:, :, pad:], heads, 0.25, [0])
    assert torch.equal(batched.col_idx[1, :, : alone.col_idx.shape[-1]], alone.col_idx[0])
    assert torch.equal(batched.col_cnt[1], alone.col_cnt[0])
    n = alone.diag_mask.shape[-1]
    # Diagonals past the sample's own block count can only point before its first key: they compute nothing.
    assert torch.equal(batched.diag_mask[1, :, :n], alone.diag_mask[0])
    m = alone.blk_idx.shape[2]
    assert torch.equal(batched.blk_cnt[1, :, :m], alone.blk_cnt[0])
    assert torch.equal(batched.blk_idx[1, :, :m, : alone.blk_idx.shape[-1]], alone.blk_idx[0])
    assert torch.equal(token_mask(batched)[1, :, pad:, pad:], token_mask(alone)[0])


def test_fraction_budgets_scale_with_the_key_length():
    s = spec("vertical_slash", vertical=0.1, slash=0.25, force_vertical=1, force_slash=1)
    assert (s.budget("vertical", 1000), s.budget("slash", 1000)) == (100, 250)
    assert (s.budget("vertical", 4000), s.budget("slash", 4000)) == (400, 1000)
    assert spec("a_shape", local=5000).budget("local", 300) == 300


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("S", [4096, 32768])
def test_gpu_builds_the_cpu_index(S):
    heads = [
        spec("vertical_slash"),
        spec("vertical_slash", vertical=300, slash=0.1),
        spec("block_sparse", top_k=40),
        spec("a_shape"),
        spec("dense"),
        spec("block_sparse", top_k=0.05),
    ] * 2
    q, k, _ = qkv(2, len(heads), 4, S, S, D=64, seed=S)
    starts = [0, 1000]
    cpu = build_index(q, k, heads, 0.125, starts)
    gpu = build_index(q.cuda(), k.cuda(), heads, 0.125, starts)
    # Top-k sets may differ only where two scores tie within float rounding (CPU and GPU sum in other orders).
    for b in range(2):
        for part in (block_mask, col_mask):
            want, got = part(cpu, b), part(gpu, b).cpu()
            assert want.shape == got.shape
            assert (want != got).sum() <= 0.005 * want.sum(), part.__name__


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_graph_replays_give_each_call_its_own_index(monkeypatch):
    """The select stage replayed as a CUDA graph equals the eager one on every call, also when two plans share the
    workspace and their calls interleave, and an index handed out earlier is not overwritten by later replays."""
    from sparse_prefill.plan import LayerPlan, graphs

    plans = [
        LayerPlan([spec("vertical_slash", vertical=200, slash=600), spec("block_sparse", top_k=6)] * 4),
        LayerPlan([spec("vertical_slash", vertical=0.05, slash_select="token"), spec("a_shape")] * 4),
        LayerPlan([spec("adaptive"), spec("adaptive", gamma=0.95, tau=0.5), spec("vertical_slash"), spec("dense")] * 2),
    ]
    inputs = [qkv(2, 8, 2, 3000, 3000, D=64, dtype=torch.bfloat16, seed=s) for s in range(4)]
    inputs = [(q.cuda(), k.cuda()) for q, k, _ in inputs]
    got = [plan.index(q, k, 0.125, [0, 300]) for q, k in inputs for plan in plans]  # call 2 of each plan captures
    got += [plan.index(q, k, 0.125, [0, 300]) for q, k in inputs[:2] for plan in plans]
    assert all(p._static[next(iter(p._static))]["graphed"].graph is not None for p in plans)
    monkeypatch.setattr(graphs, "CUDA_GRAPHS", False)
    eager = [LayerPlan(plan.heads).index(q, k, 0.125, [0, 300]) for q, k in inputs + inputs[:2] for plan in plans]
    for g, e in zip(got, eager):
        for name in ("diag_mask", "col_idx", "col_cnt", "col_row_cnt", "blk_idx", "blk_cnt", "choice"):
            assert (getattr(g, name) is None and getattr(e, name) is None) or torch.equal(
                getattr(g, name), getattr(e, name)
            ), name
    # The shared memory pool outlives the plans whose graphs used it: a later plan still captures.
    monkeypatch.setattr(graphs, "CUDA_GRAPHS", True)
    del plans, got
    gc.collect()
    later = LayerPlan([spec("vertical_slash")] * 8)
    for q, k in inputs[:3]:
        later.index(q, k, 0.125, [0, 300])
    assert later._static[next(iter(later._static))]["graphed"].graph is not None
    assert not graphs.GraphedSelect.broken
