"""Adaptive heads: the batched rule against a loop-by-loop restatement, synthetic heads, and attention outputs."""

import math

import pytest
import torch
import torch.nn.functional as F
from naive import adaptive_head, cover_set, frame, mask_from_sets

from conftest import assert_close, spec
from sparse_prefill.blockwise import sparse_attention_torch
from sparse_prefill.masks import block_mask, col_mask, token_mask
from sparse_prefill.plan import build_index
from sparse_prefill.plan.adaptive import CHOICES, adaptive_sets, cover
from sparse_prefill.plan.vertical_slash import block_diagonal_mass
from sparse_prefill.reference import attention_ref
from test_index import qkv


def test_cover_keeps_the_fewest_entries_that_reach_gamma():
    g = torch.Generator().manual_seed(0)
    mass = torch.rand(50, 40, generator=g) ** 4  # skewed, as attention is
    mass[:, 30:] = 0.0  # entries that cannot be chosen
    forced = torch.rand(50, 40, generator=g) < 0.05
    for gamma in (0.3, 0.9, 0.99, 1.0):
        order, keep, count = cover(mass, forced, torch.tensor(gamma))
        for r in range(50):
            kept = set(order[r][keep[r]].tolist())
            on = set(forced[r].nonzero().flatten().tolist())
            assert kept == set(cover_set(dict(enumerate(mass[r].tolist())), on, gamma))
            assert count[r] == len(kept) and on <= kept
            row = mass[r].double()
            assert float(row[list(kept)].sum()) >= gamma * float(row.sum()) * (1 - 1e-6)
            # Minimal: without its lightest unforced entry the set falls short of gamma (gamma 1: of the total).
            free = [i for i in kept if i not in on]
            if free:
                lightest = min(free, key=lambda i: float(row[i]))
                assert float(row[list(kept - {lightest})].sum()) < gamma * float(row.sum())
    # Ranking only the first k entries: the same set where it fits, and a count past k where it does not.
    order, keep, count = cover(mass, forced, torch.tensor(0.9))
    order_k, keep_k, count_k = cover(mass, forced, torch.tensor(0.9), k=6)
    fits = count <= 6
    assert torch.equal(count_k[fits], count[fits]) and (count_k[~fits] == 7).all()
    assert torch.equal(keep_k[fits], keep[fits, :7])


@pytest.mark.parametrize("gamma,want", [(0.9, [0, 100, 200]), (1.0, [0, 100, 200, 300])])
def test_a_heavy_sink_leaves_gamma_to_the_rest(gamma, want):
    """95 % of the last queries' attention on the sink: gamma 0.9 of the whole would keep the sink alone; the columns
    reach 0.95 + 0.9 x 0.05 instead (gamma 1: every column with mass)."""
    from sparse_prefill.plan.adaptive import _Geometry, vertical_slash_cover

    S = 512
    vertical = torch.zeros(1, 1, S)
    vertical[0, 0, [0, 100, 200, 300]] = torch.tensor([0.95, 0.036, 0.01, 0.004])
    slash = torch.zeros(1, 1, S)
    slash[0, 0, :8] = 0.125  # 94.5 % on the own (forced) block diagonal, 5.5 % on the next one
    mass = block_diagonal_mass(slash, S, S, torch.tensor([0]))
    head = spec("adaptive", gamma=gamma, force_vertical=1, force_slash=1)
    cols, diag, _ = vertical_slash_cover(vertical, mass, [head], _Geometry.of(S, S, [0], "cpu"))
    assert cols[0, 0][cols[0, 0] >= 0].tolist() == want
    assert diag[0, 0].nonzero().flatten().tolist() == [0, 1]  # the diagonals reach 0.995 of theirs too


def check_against_loops(q, k, heads, scale, starts, tol=1e-4):
    """Every (sample, adaptive head) of a build_index call chose what the loop reference chooses, with its sets."""
    index = build_index(q, k, heads, scale, starts)
    adaptive = [h for h, s in enumerate(heads) if s.pattern == "adaptive"]
    ad = adaptive_sets(q, k, [heads[h] for h in adaptive], adaptive, scale, starts)
    n = index.diag_mask.shape[-1]
    for b, start in enumerate(starts):
        first_row, _ = frame(q.shape[2], k.shape[2], start)
        for i, h in enumerate(adaptive):
            s = heads[h]
            want = adaptive_head(q, k, b, h, s, scale, start)
            where = f"sample {b} head {h}: {want}"
            # JS itself, not its sqrt: near 0 the sqrt magnifies fp32 rounding (1e-8 becomes 1e-4).
            assert float(ad.js[b, i]) ** 2 == pytest.approx(want["js"] ** 2, abs=tol), where
            assert float(ad.vs_density[b, i]) == pytest.approx(want["vs_density"], rel=tol), where
            assert float(ad.bs_density[b, i]) == pytest.approx(want["bs_density"], rel=tol), where
            if abs(want["js"] ** 2 - s.params["tau"] ** 2) < tol:
                continue  # on the threshold, float rounding may go either way
            choice = CHOICES[int(index.choice[b, h])]
            assert choice == want["choice"], where
            diags = set(torch.nonzero(index.diag_mask[b, h]).flatten().tolist())
            cols = set(index.col_idx[b, h, : index.col_cnt[b, h]].tolist())
            rows = [set(index.blk_idx[b, h, m, : index.blk_cnt[b, h, m]].tolist()) for m in range(len(want["rows"]))]
            if choice == "dense":
                assert diags == set(range(n)) and not cols and not any(rows), where
            elif choice == "vertical_slash":
                assert cols == set(want["cols"]) and diags == set(want["diags"]) and not any(rows), where
            else:
                assert rows == [set(r) for r in want["rows"]] and not cols and not diags, where
    return index


RANDOM_HEADS = [
    spec("adaptive", gamma=0.9, tau=0.2, last_q=32, force_vertical=3, force_slash=10, dense_above=0.99),
    spec("adaptive", gamma=0.6, tau=0.5, last_q=64, force_vertical=70, force_slash=1, max_blocks=3),
    spec("adaptive", gamma=0.3, tau=0.45, last_q=17, force_vertical=0, force_slash=0, dense_above=0.9),
    spec("adaptive", gamma=1.0, tau=0.0, last_q=64, dense_above=1.0),
]


@pytest.mark.parametrize("q_len,kv_len,starts", [(300, 300, [0]), (333, 333, [0, 90]), (120, 400, [0, 250])])
@pytest.mark.parametrize("group", [1, 2])
def test_random_heads_follow_the_loop_reference(q_len, kv_len, starts, group):
    heads = RANDOM_HEADS + [spec("vertical_slash", vertical=9)] if group == 1 else RANDOM_HEADS
    q, k, _ = qkv(len(starts), len(heads), len(heads) // group, q_len, kv_len, seed=q_len + group)
    q = q * torch.linspace(0.2, 3.0, len(heads))[None, :, None, None]  # from diffuse to peaked heads
    check_against_loops(q, k, heads, 0.3, starts)


def synthetic_heads(kv_len: int, D: int = 64, seed: int = 0):
    """q [1, 3, S, D], k [1, 3, S, D] for three heads (no GQA) built to be, in order:

    * vertical-slash: two sink keys and one hot key that every query attends to (a dimension of their own), and a
      strong self and offset-17 diagonal (query i carries token t_i, key j tokens t_j and t_{j+17});
    * query-aware block-sparse: key block j has one of 5 topics, the queries of each 256 rows ask for one topic;
    * diffuse: tiny random queries, near-uniform attention.

    Use scale D**-0.5.
    """
    g = torch.Generator().manual_seed(seed)
    S = kv_len

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    tokens = F.pad(randn(S + 17, D - 1), (0, 1))  # the last dimension is the hot keys'
    k_vs = tokens[:S] * 1.3 + tokens[17 : S + 17] * 1.2
    k_vs[[0, 1, S // 2], -1] = 16.0
    q_vs = tokens[:S] * 1.3
    q_vs[:, -1] = 8.0
    topics = randn(5, D)
    k_bs = topics[(7 * (torch.arange(S) // 64)) % 5] + randn(S, D) * 0.3
    q_bs = topics[(3 * (torch.arange(S) // 256)) % 5] * 0.8 + randn(S, D) * 0.3
    k_d, q_d = randn(S, D), randn(S, D) * 0.01
    return torch.stack([q_vs, q_bs, q_d])[None], torch.stack([k_vs, k_bs, k_d])[None]


# 64 estimation rows: one query block, as the bounds below count (the default, 128, is an 8th of these prompts).
SYNTHETIC = spec(
    "adaptive", gamma=0.9, tau=0.1, last_q=64, force_vertical=4, force_slash=1, max_blocks=0.5, dense_above=0.8
)


@pytest.mark.parametrize("kv_len,q_len", [(1024, 1024), (1500, 1500), (1536, 700)])
def test_synthetic_heads_choose_their_pattern(kv_len, q_len):
    q, k = synthetic_heads(kv_len)
    q = q[:, :, kv_len - q_len :]
    heads = [SYNTHETIC] * 3
    index = check_against_loops(q, k, heads, 64**-0.5, [0])
    assert [CHOICES[c] for c in index.choice[0].tolist()] == ["vertical_slash", "block_sparse", "dense"]
    ad = adaptive_sets(q, k, heads, [0, 1, 2], 64**-0.5, [0])
    assert ad.js[0, 0] > 0.3 and ad.js[0, 1] < 0.1
    # The structured heads need few entries: the sinks, the hot key and the local columns of the last queries (to
    # gamma of what the sinks leave), the local diagonals (and the ones that meet the hot keys from the last query
    # block); the topic's blocks.
    assert index.col_cnt[0, 0] <= 24 and index.diag_mask[0, 0].sum() <= 5
    assert ad.vs_density[0, 0] < 0.3 and ad.bs_density[0, 1] < 0.4


def test_padding_gives_each_sample_its_unpadded_choice():
    pad = 130
    q, k = synthetic_heads(1100 - pad, seed=3)
    other_q, other_k = synthetic_heads(1100, seed=4)
    qp = torch.cat([torch.full((1, 3, pad, 64), 50.0), q], 2)  # garbage in the padding must not matter
    kp = torch.cat([torch.full((1, 3, pad, 64), -9.0), k], 2)
    heads = [SYNTHETIC] * 3
    batched = build_index(torch.cat([other_q, qp]), torch.cat([other_k, kp]), heads, 0.2, [0, pad])
    alone = build_index(q, k, heads, 0.2, [0])
    assert torch.equal(batched.choice[1], alone.choice[0])
    assert torch.equal(token_mask(batched)[1, :, pad:, pad:], token_mask(alone)[0])


@pytest.mark.parametrize("valid", [100, 200])
def test_padding_rows_never_enter_the_estimate(valid):
    """A sample shorter than last_q: its padding queries (garbage here) must not move the mean query or the scores."""
    heads = [spec("adaptive", **{**s.params, "last_q": 256}) for s in RANDOM_HEADS]
    q, k, _ = qkv(1, 4, 2, valid, valid, seed=valid)
    pad = 230 - valid
    qp = torch.cat([torch.full((1, 4, pad, 16), 7.0), q], 2)
    kp = torch.cat([torch.full((1, 2, pad, 16), -3.0), k], 2)
    other_q, other_k, _ = qkv(1, 4, 2, 230, 230, seed=1)
    batched = adaptive_sets(torch.cat([other_q, qp]), torch.cat([other_k, kp]), heads, [0, 1, 2, 3], 0.3, [0, pad])
    alone = adaptive_sets(q, k, heads, [0, 1, 2, 3], 0.3, [0])
    assert (alone.js[0] > 0.01).all()
    for name in ("js", "vs_density", "bs_density"):
        assert_close(
            getattr(batched, name)[1].nan_to_num(posinf=9), getattr(alone, name)[0].nan_to_num(posinf=9), 1e-5, 1e-5
        )
    assert torch.equal(batched.choice[1], alone.choice[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adaptive_output_equals_the_reference_attention(dtype):
    q, k = synthetic_heads(700, seed=1)
    q, k = q.repeat(2, 2, 1, 1), k.repeat(2, 1, 1, 1)  # 6 query heads on 3 KV heads, two samples
    v = torch.randn_like(k)
    starts = [0, 150]
    heads = [SYNTHETIC, spec("adaptive"), spec("vertical_slash", vertical=30, slash=64), SYNTHETIC, spec("dense")]
    heads += [spec("block_sparse", top_k=3)]
    q, k, v = (x.to(dtype) for x in (q, k, v))
    index = build_index(q, k, heads, 0.2, starts)
    mask = token_mask(index)
    assert torch.equal(mask, mask_from_sets(index))
    ref = attention_ref(q, k, v, mask, 0.2)
    out = sparse_attention_torch(q, k, v, index, 0.2, max_mask_elems=6 * 700 * 64)
    atol, rtol = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}[dtype]
    assert_close(out[0], ref[0], atol, rtol)
    assert_close(out[1, 150:], ref[1, 150:], atol, rtol)
    assert index.choice[:, [2, 4, 5]].eq(-1).all() and index.choice[:, [0, 1, 3]].ge(0).all()


def test_gamma_trades_density_for_mass():
    q, k = synthetic_heads(1024, seed=2)
    densities = []
    for gamma in (0.5, 0.8, 0.95, 0.999):
        s = spec("adaptive", gamma=gamma, tau=0.0, dense_above=1.0)  # tau 0: never block-sparse
        ad = adaptive_sets(q, k, [s] * 3, [0, 1, 2], 64**-0.5, [0])
        assert ad.choice[0, 0] == 0  # the others are too diffuse for vertical-slash: dense
        densities.append(ad.vs_density[0])
    for lo, hi in zip(densities, densities[1:]):
        assert (lo <= hi).all()
    assert math.isfinite(float(densities[-1].sum()))


@pytest.mark.parametrize("N,M", [(5, 5), (40, 33), (130, 7)])
def test_cover_rows_kernel_equals_the_torch_rows(N, M):
    """The Triton row kernel (interpreted without CUDA) keeps the torch ranking's sets, ascending, and skips the rows
    of unflagged heads."""
    pytest.importorskip("triton")
    from sparse_prefill.plan.adaptive import cover_rows_torch
    from sparse_prefill.kernels import cover_rows_triton

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(N)
    h = 4
    scores = (torch.randn(h, M, N, generator=g) * torch.tensor([0.5, 2.0, 4.0, 8.0])[:, None, None]).to(dev)
    top = torch.arange(M, device=dev) * max(1, N // M) + (N - 1 - (M - 1) * max(1, N // M))  # causal reach per row
    lo = (top[None, :] - torch.tensor([0, 1, 3, 0], device=dev)[:, None]).clamp(min=0)
    sink = torch.tensor([1, 0, 2, 0], device=dev)
    gamma = torch.tensor([0.9, 0.5, 0.99, 1.0], device=dev)
    K = max(2, N // 3)
    want, want_count = cover_rows_torch(scores * 0.7, top, lo, sink, gamma, K)
    flag = torch.tensor([True, True, False, True], device=dev)
    got, count = cover_rows_triton(scores, top, lo, sink, gamma, flag, K, 0.7)
    # Written into a view of a wider -1-filled tensor (as adaptive does, one sample and KV-head run at a time).
    wider = torch.full((2, h, M + 3, K), -1, dtype=torch.int32, device=dev)
    cover_rows_triton(scores, top, lo, sink, gamma, flag, K, 0.7, out=wider[1, :, :M])
    assert torch.equal(wider[1, :, :M], got) and (wider[0] == -1).all() and (wider[1, :, M:] == -1).all()
    compared = 0
    for i in range(h):
        for m in range(M):
            if not flag[i]:
                assert count[i, m] == 0 and (got[i, m] == -1).all()
                continue
            if want_count[i, m] > K:  # no fit: the torch ranking stops counting at K + 1
                assert count[i, m] > K, (i, m)
                continue
            assert count[i, m] == want_count[i, m], (i, m)
            kept = got[i, m][got[i, m] >= 0].tolist()
            assert kept == sorted(kept) and set(kept) == set(want[i, m][want[i, m] >= 0].tolist()), (i, m)
            compared += 1
    assert compared >= M


@pytest.mark.parametrize("Sk,starts", [(7, [0]), (700, [0, 13]), (1500, [1499, 100])])
def test_cover_columns_kernel_equals_the_torch_columns(Sk, starts):
    """The Triton column kernel (interpreted without CUDA) keeps the torch ranking's columns, ascending, with the same
    tiles and sink-aware gamma, whatever the sinks' share, padding or gamma."""
    pytest.importorskip("triton")
    from sparse_prefill.plan.adaptive import cover_columns_torch
    from sparse_prefill.kernels import cover_columns_triton

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(Sk)
    B, h = len(starts), 5
    vertical = torch.rand(B, h, Sk, generator=g) ** torch.tensor([1.0, 4.0, 16.0, 2.0, 8.0])[:, None]
    vertical[:, 1, :2] += 50.0  # a heavy sink: gamma is left to the rest
    vertical[:, 4, ::3] = 0.0  # columns of mass 0 are never kept, even at gamma 1
    st = torch.tensor(starts)
    vertical = vertical.masked_fill(torch.arange(Sk)[None, None, :] < st[:, None, None], 0.0)  # padding keys
    force = torch.tensor([0, 2, 3, 9000, 1])
    gamma = torch.tensor([0.9, 0.5, 0.99, 0.9, 1.0])
    per_col = torch.rand(B, Sk, generator=g)
    args = [t.to(dev) for t in (vertical, st, force, gamma, per_col)]
    want_cols, want_tiles, want_gamma = cover_columns_torch(*args)
    cols, tiles, got_gamma = cover_columns_triton(*args)
    for b in range(B):
        for i in range(h):
            kept = cols[b, i][cols[b, i] >= 0].tolist()
            assert kept == sorted(kept) == want_cols[b, i][want_cols[b, i] >= 0].tolist(), (b, i)
            assert (cols[b, i, len(kept) :] == -1).all()
    torch.testing.assert_close(tiles, want_tiles, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_gamma, want_gamma)


def _js_both(Sq, Sk, starts, dtype, dev, D=64):
    """(kernel, torch) query-aware JS of 3 heads of different ``last_q`` on 2 KV heads (one unselected query
    head in between), from real vertical scores."""
    from sparse_prefill.plan.adaptive import query_aware_js
    from sparse_prefill.plan.common import block_means
    from sparse_prefill.plan.vertical_slash import vertical_slash_scores
    from sparse_prefill.state import Resources

    const = Resources().const
    from sparse_prefill.kernels import query_aware_js_triton

    g = torch.Generator().manual_seed(Sk)
    B = len(starts)
    q = (torch.randn(B, 4, Sq, D, generator=g) * 2).to(dev, dtype)
    k = (torch.randn(B, 2, Sk, D, generator=g) * 2).to(dev, dtype)
    k[:, 1, ::7] += 3 * q[:, 3, -1:]  # head 3 attends a block-spread set of keys
    heads, last_q = [0, 1, 3], [16, 40, 128]
    specs = [spec("adaptive", last_q=n) for n in last_q]
    st = const(starts, dev)
    vertical, _ = vertical_slash_scores(q, k, heads, last_q, D**-0.5, st)
    pooled_k = block_means(k, starts)
    got = query_aware_js_triton(q, vertical, pooled_k, const(heads, dev), const(last_q, dev), D**-0.5, st)
    return got, query_aware_js(q, vertical, pooled_k, specs, heads, D**-0.5, st)


@pytest.mark.parametrize(
    "Sq,Sk,starts,dtype,D",
    [
        (200, 200, [0, 37], torch.float32, 64),
        (70, 8300, [0, 5], torch.float16, 64),
        (64, 129, [0, 128], torch.float32, 64),
        (150, 300, [0, 20], torch.float16, 96),  # Phi-3-mini's head_dim: tiles of 128 dims, the padding masked
    ],
)
def test_query_aware_js_kernel_equals_the_torch_test(Sq, Sk, starts, dtype, D):
    """The Triton test (interpreted without CUDA) gives torch's divergence with left padding, chunked prefill (fewer
    queries than keys), per-head last_q windows, GQA and key blocks spread over two programs (130 > 128); a sample
    with one key block gives 0."""
    pytest.importorskip("triton")
    got, want = _js_both(Sq, Sk, starts, dtype, "cuda" if torch.cuda.is_available() else "cpu", D)
    assert got.shape == want.shape == (len(starts), 3)
    assert_close(got, want, 1e-4, 1e-4)
    assert got.max() > 0.05  # not a trivially equal 0
    if Sk - starts[-1] <= 64:
        assert (got[-1] == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_query_aware_js_bf16_long():
    got, want = _js_both(2048, 32768, [0, 1000], torch.bfloat16, "cuda")
    assert_close(got, want, 1e-4, 1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("S", [4096, 32768])
def test_gpu_builds_the_cpu_adaptive_index(S):
    """CUDA (row kernel, bf16-free fp32 inputs) and CPU (torch ranking) choose the same patterns and sets."""
    heads = [spec("adaptive"), spec("adaptive", gamma=0.95, tau=0.3, max_blocks=0.5), spec("vertical_slash")] * 2
    q, k = synthetic_heads(S, seed=S)
    q = torch.cat([q, q * 0.5], 1)  # 6 query heads on 3 KV heads
    starts = [0, 1000]
    q, k = q.repeat(2, 1, 1, 1), k.repeat(2, 1, 1, 1)
    cpu = build_index(q, k, heads, 64**-0.5, starts)
    gpu = build_index(q.cuda(), k.cuda(), heads, 64**-0.5, starts)
    assert torch.equal(cpu.choice, gpu.choice.cpu())
    for b in range(2):
        for part in (block_mask, col_mask):
            want, got = part(cpu, b), part(gpu, b).cpu()
            assert (want != got).sum() <= 0.005 * want.sum(), part.__name__
