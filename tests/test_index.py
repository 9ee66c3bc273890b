"""The index format: explicit masks, the torch reference and the blockwise CPU path agree."""

import pytest
import torch
from naive import mask_from_sets, slash_block_diagonals

from conftest import TOLERANCES, assert_close, spec
from sparse_prefill.blockwise import sparse_attention_torch
from sparse_prefill.index import make_index, slash_diagonals
from sparse_prefill.masks import token_mask
from sparse_prefill.plan import build_index
from sparse_prefill.reference import attention_ref
from sparse_prefill.report import tile_density

MIXED = [
    spec("vertical_slash", vertical=12, slash=40, last_q=16, force_vertical=4, force_slash=8),
    spec("a_shape", sink=8, local=70),
    spec("block_sparse", top_k=2),
    spec("dense"),
]


def qkv(B, H, Hkv, Sq, Sk, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Sq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize(
    "q_len,kv_len,starts", [(150, 150, [0]), (170, 170, [0, 45]), (70, 200, [0, 150]), (1, 90, [0])]
)
def test_token_mask_matches_the_sets(q_len, kv_len, starts):
    q, k, _ = qkv(len(starts), 4, 2, q_len, kv_len)
    index = build_index(q, k, MIXED, 0.25, starts)
    assert torch.equal(token_mask(index), mask_from_sets(index))


@pytest.mark.parametrize("q_len,kv_len,start", [(300, 300, 0), (100, 300, 0), (100, 333, 0), (250, 250, 37)])
def test_slash_diagonals_cover_exactly_the_slashes(q_len, kv_len, start):
    slashes = [0, 1, 5, 63, 64, 65, 130, 200]
    got = slash_diagonals(torch.tensor([[slashes]]), q_len, kv_len, torch.tensor([start]))[0, 0]
    want = {d for d in slash_block_diagonals(slashes, q_len, kv_len, start) if d < got.numel()}
    assert set(torch.nonzero(got).flatten().tolist()) == want


@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blockwise_torch_path_equals_reference(group, dtype):
    heads = (MIXED * 2)[: 2 * group] if group > 1 else MIXED[:1]
    q, k, v = qkv(2, len(heads), len(heads) // group, 190, 190, dtype=dtype)
    index = build_index(q, k, heads, 0.3, [0, 21])
    ref = attention_ref(q, k, v, token_mask(index), 0.3)
    # max_mask_elems forces several query chunks per sample.
    out = sparse_attention_torch(q, k, v, index, 0.3, max_mask_elems=len(heads) * 190 * 64)
    assert out.dtype == dtype and out.shape == (2, 190, len(heads), 16)
    same_dtype = attention_ref(q.float(), k.float(), v.float(), token_mask(index), 0.3)  # what dtype costs
    atol, rtol = TOLERANCES[dtype]
    assert_close(out, ref, atol, rtol)
    assert_close(same_dtype, ref, 1e-5, 1e-5)
    assert (out[1, :21] == 0).all(), "padding rows must be zero"


def test_full_index_is_dense_causal_attention():
    q, k, v = qkv(1, 4, 2, 200, 200)
    index = build_index(q, k, [spec("dense")] * 4, 0.25, [0])
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=True)
    assert_close(sparse_attention_torch(q, k, v, index, 0.25), expected.transpose(1, 2), 1e-5, 1e-5)
    assert torch.allclose(tile_density(index), torch.ones(1, 4))


def test_tile_density_counts_blocks_and_column_tiles():
    # 4 query blocks; one head with only the diagonal (4 tiles of 10 causal ones), one adding 3 far columns.
    n = 4
    diag = torch.zeros(1, 2, n, dtype=torch.bool)
    diag[..., 0] = True
    cols = torch.tensor([[[-1, -1, -1], [0, 1, 2]]])
    index = make_index(256, 256, torch.tensor([0]), diag, cols, torch.zeros(1, 2, n, 0, dtype=torch.long))
    # The columns sit in block 0: covered for query block 0, one extra tile for blocks 1..3.
    assert tile_density(index)[0].tolist() == pytest.approx([0.4, 0.7])


def test_empty_rows_give_zeros():
    q, k, v = qkv(1, 1, 1, 128, 128)
    diag = torch.zeros(1, 1, 2, dtype=torch.bool)  # nothing on: every row attends to nothing
    index = make_index(128, 128, torch.tensor([0]), diag, torch.full((1, 1, 1), -1), torch.zeros(1, 1, 2, 0))
    assert (attention_ref(q, k, v, token_mask(index), 1.0) == 0).all()
    assert (sparse_attention_torch(q, k, v, index, 1.0) == 0).all()


def test_column_counts_per_query_block_ignore_list_padding():
    # Head 0 lists two columns, head 1 five: head 0's list is padded, and the padding must not be counted.
    cols = torch.tensor([[[5, 100, -1, -1, -1], [0, 1, 70, 130, 190]]])
    diag = torch.ones(1, 2, 4, dtype=torch.bool)
    index = make_index(256, 256, torch.tensor([0]), diag, cols, torch.zeros(1, 2, 4, 0, dtype=torch.long))
    assert index.col_row_cnt[0].tolist() == [[1, 2, 2, 2], [2, 3, 5, 5]]


@pytest.mark.parametrize("n,chunk", [(1000, 64), (64, 64), (5, 8)])
def test_chunked_cumsum_is_a_cumsum(n, chunk):
    from sparse_prefill.ops import chunked_cumsum

    x = torch.rand(2, 3, n, generator=torch.Generator().manual_seed(n))
    assert_close(chunked_cumsum(x, chunk), x.cumsum(-1), 1e-4, 1e-6)
    mask = x > 0.5
    assert torch.equal(chunked_cumsum(mask, chunk), mask.cumsum(-1))
