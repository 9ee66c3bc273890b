"""The gathered-key CPU path (``sparse_attention_torch``) against the fp32 reference on the same index: shape grids
over GQA, left padding, q_len < kv_len, odd lengths, every way an index names keys (diagonals, single columns, block
lists, dense and empty heads), densities from a few percent to 1, query-block groups and batch bounds, and dtypes."""

import pytest
import torch
from test_kernels import qkv, random_index

from conftest import TOLERANCES, assert_close
from sparse_prefill.blockwise import sparse_attention_torch
from sparse_prefill.index import query_offsets
from sparse_prefill.masks import token_mask
from sparse_prefill.reference import attention_ref
from sparse_prefill.report import tile_density

ALL = ["vs", "blocks", "dense", "diag", "empty", "vs"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "kinds, group, q_len, kv_len, starts, p_diag, n_cols, top_k",
    [
        (["vs", "diag", "vs"], 3, 100, 2000, [0], 0.02, 4, 2),  # 3% to 6% of the causal tiles
        (["blocks", "vs"], 2, 700, 700, [0, 300], 0.1, 40, 2),  # left padding, blocks past the padded sample
        (ALL, 3, 333, 333, [5, 0], 0.3, 12, 3),  # every kind, odd length, GQA 3
        (ALL[:4], 4, 97, 517, [0, 460], 0.5, 30, 4),  # q_len < kv_len, a sample with one partial query block
        (["dense", "vs"], 1, 1, 200, [0, 150], 0.3, 8, 3),  # a single query row
        (["dense"] * 2, 2, 200, 200, [0], 1.0, 0, 1),  # density 1
    ],
)
@pytest.mark.parametrize("group_blocks", [1, 2, 4])
def test_grid_matches_the_reference(kinds, group, q_len, kv_len, starts, p_diag, n_cols, top_k, dtype, group_blocks):
    H = len(kinds)
    index = random_index(kinds, q_len, kv_len, starts, seed=q_len, p_diag=p_diag, n_cols=n_cols, top_k=top_k)
    q, k, v = qkv(len(starts), H, H // group, q_len, kv_len, 32, dtype, seed=kv_len)
    ref = attention_ref(q, k, v, token_mask(index), 0.2)
    # A small bound: pairs of several lengths in several batches per sample.
    out = sparse_attention_torch(q, k, v, index, 0.2, max_mask_elems=1 << 14, group_blocks=group_blocks)
    assert out.shape == (len(starts), q_len, H, 32) and out.dtype == dtype and out.is_contiguous()
    assert_close(out, ref, *TOLERANCES[dtype])
    q_start, _ = query_offsets(q_len, kv_len, index.kv_start)
    for b, qs in enumerate(q_start.tolist()):
        assert (out[b, :qs] == 0).all(), "padding rows must be exactly zero"


def test_the_grid_spans_densities():
    low = random_index(["vs", "diag", "vs"], 100, 2000, [0], seed=100, p_diag=0.02, n_cols=4, top_k=2)
    assert tile_density(low).min() < 0.05
    full = random_index(["dense"] * 2, 200, 200, [0], p_diag=1.0)
    assert torch.equal(tile_density(full), torch.ones(1, 2))


def test_non_contiguous_inputs():
    """transformers hands over transposed views: the path reads them as they are."""
    index = random_index(ALL[:4], 150, 150, [0, 20], seed=3)
    q, k, v = qkv(2, 4, 2, 150, 150, 16, torch.float32, seed=3)
    views = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    assert_close(sparse_attention_torch(*views, index, 0.3), attention_ref(q, k, v, token_mask(index), 0.3), 1e-5, 1e-5)


def test_gradients_match_the_reference():
    index = random_index(ALL[:4], 140, 140, [0, 30], seed=4)
    q, k, v = (t.requires_grad_() for t in qkv(2, 4, 2, 140, 140, 16, torch.float32, seed=4))
    grad = torch.randn(2, 140, 4, 16, generator=torch.Generator().manual_seed(0))
    got = torch.autograd.grad(sparse_attention_torch(q, k, v, index, 0.3), (q, k, v), grad)
    want = torch.autograd.grad(attention_ref(q, k, v, token_mask(index), 0.3), (q, k, v), grad)
    for g, w in zip(got, want):
        assert_close(g, w, 1e-4, 1e-4)
