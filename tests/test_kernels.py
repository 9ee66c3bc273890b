"""The Triton kernel against the fp32 reference over explicit token masks.

Without CUDA the kernel runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1 before triton is imported):
tiny shapes,
fp16/fp32 only (the interpreter's bf16 dot is not exact). The ``gpu`` tests need CUDA and cover bf16, long sequences
and head_dim 128, against the blockwise torch path in fp32.
"""

import pytest
import torch

pytest.importorskip("triton")

from conftest import assert_close

from sparse_prefill.blockwise import sparse_attention_torch
from sparse_prefill.index import block_bases, make_index, query_offsets
from sparse_prefill.kernels import sparse_attention_triton, supports
from sparse_prefill.masks import token_mask
from sparse_prefill.ops import ascending, cdiv
from sparse_prefill.reference import attention_ref

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")
ATOL = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def dt(dtype):
    """fp32 runs only in the interpreter; on a GPU those cases run in bf16."""
    return torch.bfloat16 if CUDA and dtype == torch.float32 else dtype


def random_index(kinds, q_len, kv_len, starts, seed=0, p_diag=0.3, n_cols=12, top_k=3, device="cpu"):
    """A SparseIndex with one pattern per head, chosen from ``kinds``:

    ``vs`` random diagonals (always d=0) + random columns, ``diag`` random diagonals only, ``dense`` every diagonal,
    ``blocks`` random causal block lists (the own block always in, some query blocks left empty), ``empty`` nothing.
    """
    g = torch.Generator().manual_seed(seed)
    B, H = len(starts), len(kinds)
    N, M = cdiv(kv_len, 64), cdiv(q_len, 64)
    kv_start = torch.tensor(starts)
    q_start, _ = query_offsets(q_len, kv_len, kv_start)
    base = block_bases(q_len, kv_len, kv_start)
    diag = torch.zeros(B, H, N, dtype=torch.bool)
    cols = torch.full((B, H, n_cols), -1, dtype=torch.long)
    blocks = torch.full((B, H, M, top_k if "blocks" in kinds else 0), -1, dtype=torch.long)
    for b in range(B):
        length = kv_len - starts[b]
        m_valid = cdiv(q_len - int(q_start[b]), 64)
        for h, kind in enumerate(kinds):
            if kind in ("vs", "diag"):
                diag[b, h] = torch.rand(N, generator=g) < p_diag
                diag[b, h, 0] = True
            if kind == "vs":
                n = min(n_cols, length)
                cols[b, h, :n] = torch.randperm(length, generator=g)[:n]
            if kind == "dense":
                diag[b, h] = True
            if kind == "blocks":
                for m in range(m_valid):
                    top = int(base[b, m])
                    # The own block (so the first rows see a key) and distinct others below it.
                    pick = torch.cat([torch.tensor([top]), torch.randperm(top, generator=g)[: top_k - 1]])
                    if m % 3 == 2:
                        pick[:] = -1  # a query block with no blocks: zeros
                    blocks[b, h, m, : pick.numel()] = pick
    cols, blocks = ascending(cols).to(device), ascending(blocks).to(device)
    return make_index(q_len, kv_len, kv_start.to(device), diag.to(device), cols, blocks)


def qkv(B, H, Hkv, Sq, Sk, D, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, s, D, generator=g) for h, s in ((H, Sq), (Hkv, Sk), (Hkv, Sk)))
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def check_against_ref(kinds, group, q_len, kv_len, starts, D, dtype, seed=0, **kw):
    H, dtype = len(kinds), dt(dtype)
    index = random_index(kinds, q_len, kv_len, starts, seed=seed, device=DEV, **kw)
    q, k, v = qkv(len(starts), H, H // group, q_len, kv_len, D, dtype, seed, DEV)
    scale = D**-0.5
    out = sparse_attention_triton(q, k, v, index, scale)
    assert out.shape == (len(starts), q_len, H, D) and out.dtype == dtype and out.is_contiguous()
    ref = attention_ref(q, k, v, token_mask(index), scale)
    assert_close(out, ref, ATOL[dtype], 1e-3 if dtype == torch.float32 else 1e-2)
    q_start, _ = query_offsets(q_len, kv_len, index.kv_start)
    for b, qs in enumerate(q_start.tolist()):
        assert (out[b, :qs] == 0).all(), "padding rows must be exactly zero"
    return out


MIXED = ["vs", "blocks", "dense", "diag", "vs", "blocks"]


@pytest.mark.parametrize(
    "kinds,group,q_len,kv_len,starts,dtype",
    [
        (["vs", "blocks", "dense"], 1, 150, 150, [0], torch.float32),  # one of each, length not a multiple of 64
        (MIXED, 3, 170, 170, [0, 45], torch.float16),  # GQA 3, left padding
        (MIXED[:4], 4, 70, 200, [0, 150], torch.float32),  # chunked prefill, kv_len - q_len = 130, padded rows
        (MIXED[:4], 4, 100, 197, [3, 0], torch.float16),  # chunked prefill, offset 97
        (["vs", "dense"], 2, 1, 90, [0], torch.float32),  # a single query row
        (["dense", "vs", "blocks", "diag"], 1, 128, 128, [0, 64], torch.float16),  # block-aligned everything
    ],
)
def test_matches_reference(kinds, group, q_len, kv_len, starts, dtype):
    check_against_ref(kinds, group, q_len, kv_len, starts, 64, dtype)


def test_head_dim_128():
    check_against_ref(["vs", "blocks"], 2, 130, 130, [0, 10], 128, torch.float16, seed=1)


@pytest.mark.parametrize("D,dtype", [(96, torch.float16), (48, torch.float32)])
def test_head_dims_below_a_power_of_two_are_padded(D, dtype):
    """Phi-3-mini's 96: tiles of 128 dims whose padding is zero (TMA fills it for whole blocks, masks elsewhere)."""
    out = check_against_ref(["vs", "blocks", "diag"], 3, 150, 150, [0, 20], D, dtype, seed=2)
    assert out.shape[-1] == D


@pytest.mark.parametrize(
    "kinds,n_cols",
    [(["dense", "diag"], 0), (["vs", "dense"], 12), (["blocks", "diag"], 0), (["vs", "blocks"], 12)],
)
def test_each_combination_of_column_and_block_lists(kinds, n_cols):
    """The kernel is compiled without the column loop when the index has no column list (width 0), and without the
    block loop when it has no block lists: each of the four builds against the reference (and a width-0 tensor is
    never read)."""
    index = random_index(kinds, 140, 140, [0], n_cols=n_cols)
    assert (index.col_idx.shape[-1] > 0, index.blk_idx.shape[-1] > 0) == (n_cols > 0, "blocks" in kinds)
    check_against_ref(kinds, 1, 140, 140, [0], 64, torch.float32, n_cols=n_cols)


def test_columns_in_computed_blocks_count_once():
    """Every column is also inside a diagonal block: the column loop must skip them all."""
    index = random_index(["vs"], 160, 160, [0], p_diag=1.0, n_cols=40, device=DEV)
    q, k, v = qkv(1, 1, 1, 160, 160, 64, dt(torch.float32), device=DEV)
    out = sparse_attention_triton(q, k, v, index, 0.125)
    dense_causal = torch.ones(160, 160, dtype=torch.bool, device=DEV).tril()[None, None]
    assert_close(out, attention_ref(q, k, v, dense_causal, 0.125), ATOL[q.dtype], 1e-3)


@pytest.mark.parametrize("q_len", [400, 150])  # prefill, and a chunk of a chunked prefill
def test_column_lists_of_several_chunks(q_len):
    """150 columns per head (three 64-column chunks, the last partial, read ahead of the tiles), some in diagonal
    blocks; left padding shifts them against the blocks."""
    check_against_ref(["vs", "vs", "diag"], 3, q_len, 400, [0, 37], 64, torch.float32, seed=6, p_diag=0.4, n_cols=150)


def test_column_counts_past_the_rows_are_masked():
    """col_row_cnt may over-count (here: every block sees the whole list); columns after a row stay masked."""
    index = random_index(["vs", "vs"], 190, 190, [0, 40], seed=3, n_cols=30, device=DEV)
    index.col_row_cnt = index.col_cnt[..., None].expand_as(index.col_row_cnt).contiguous()
    q, k, v = qkv(2, 2, 1, 190, 190, 64, dt(torch.float32), 3, DEV)
    out = sparse_attention_triton(q, k, v, index, 0.125)
    assert_close(out, attention_ref(q, k, v, token_mask(index), 0.125), ATOL[q.dtype], 1e-3)


def test_empty_rows_are_zero():
    out = check_against_ref(["empty", "blocks", "vs"], 1, 200, 200, [0, 30], 64, torch.float32)
    assert (out[:, :, 0] == 0).all(), "a head that attends to nothing gives zeros"
    assert out.isfinite().all()


@pytest.mark.parametrize("dense", [[1, 3, 4], [1, 3, 5]])  # KV head 1's dense heads: a slice, then a gather
def test_dense_heads_on_sdpa_next_to_the_kernel(dense):
    """Heads dropped from the index (zeros from the kernel) and computed by SDPA, one call per KV head, give the
    whole index's attention; also with left padding (its bool mask) and chunked prefill (q_len < kv_len)."""
    from sparse_prefill.dense import dense_heads_into
    from sparse_prefill.index import drop_heads

    kinds = ["dense" if h in dense else ("vs", "blocks")[h % 2] for h in range(6)]
    q_len, kv_len, starts = 192, 320, [0, 70]  # block-aligned chunk: the index's "dense" is exactly causal
    index = random_index(kinds, q_len, kv_len, starts, seed=4, device=DEV)
    q, k, v = qkv(2, 6, 2, q_len, kv_len, 64, dt(torch.float32), 4, DEV)
    out = sparse_attention_triton(q, k, v, drop_heads(index, torch.tensor(dense, device=DEV)), 0.125)
    assert (out[:, :, dense] == 0).all()
    j = torch.arange(kv_len, device=DEV)
    causal = j[None, :] <= kv_len - q_len + torch.arange(q_len, device=DEV)[:, None]
    mask = causal[None, None] & (j >= torch.tensor(starts, device=DEV)[:, None])[:, None, None]
    for attention_mask in (mask, None):
        dense_heads_into(out, q, k, v, attention_mask, dense, 0.125)
        if attention_mask is not None:
            assert_close(out, attention_ref(q, k, v, token_mask(index), 0.125), ATOL[q.dtype], 1e-3)
    # Without a mask the keys before kv_start count too (no padding): sample 0 has none, so it is unchanged.
    assert_close(out[0], attention_ref(q, k, v, token_mask(index), 0.125)[0], ATOL[q.dtype], 1e-3)


def test_strided_views_and_out_buffer():
    """q/k/v as transposed [B, S, H, D] views (what transformers hands over), written into a given buffer."""
    index = random_index(["vs", "blocks"], 100, 100, [0, 20], seed=2, device=DEV)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 100, h, 64, generator=g).to(DEV, dt(torch.float32)).transpose(1, 2) for h in (2, 1, 1))
    buf = torch.full((2, 100, 2, 64), float("nan"), dtype=q.dtype, device=DEV)
    out = sparse_attention_triton(q, k, v, index, 0.125, out=buf)
    assert out is buf
    assert_close(out, attention_ref(q, k, v, token_mask(index), 0.125), ATOL[q.dtype], 1e-3)


def test_supports_gives_reasons():
    q = torch.zeros(1, 2, 4, 64, dtype=torch.float16, device=DEV)
    assert supports(q, q) is None
    assert "head_dim" in supports(q[..., :40], q[..., :40])  # not a multiple of 16
    assert supports(q[..., :32], q[..., :32]) is None
    assert "dtype" in supports(q.double(), q.double())
    assert "heads" in supports(q, torch.zeros(1, 3, 4, 64, dtype=torch.float16, device=DEV))


# ---------------------------------------------------------------- GPU: bf16, long sequences, all GQA ratios


def gpu_case(kinds, group, q_len, kv_len, starts, D, dtype, seed=0, **kw):
    """Error of the kernel and of the same-dtype torch path against the torch path in fp32 (flash-attn style)."""
    index = random_index(kinds, q_len, kv_len, starts, seed=seed, device="cuda", **kw)
    q, k, v = qkv(len(starts), len(kinds), len(kinds) // group, q_len, kv_len, D, dtype, seed, "cuda")
    scale = D**-0.5
    out = sparse_attention_triton(q, k, v, index, scale)
    ref = sparse_attention_torch(q.float(), k.float(), v.float(), index, scale)
    same_dtype = sparse_attention_torch(q, k, v, index, scale)
    assert out.isfinite().all()
    q_start, _ = query_offsets(q_len, kv_len, index.kv_start)
    for b, qs in enumerate(q_start.tolist()):
        assert (out[b, :qs] == 0).all(), "padding rows must be exactly zero"
    err = (out.float() - ref).abs().max().item()
    err_torch = (same_dtype.float() - ref).abs().max().item()
    assert err <= 2 * err_torch + 1e-3, f"kernel error {err:.3g} vs torch {dtype} error {err_torch:.3g}"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group,D", [(1, 64), (3, 64), (4, 128), (8, 128), (4, 96)])
def test_gpu_mixed_heads(dtype, group, D):
    kinds = (MIXED * 3)[: max(group, 2) * 2] if group > 1 else MIXED[:4]
    gpu_case(kinds, group, 3000, 3000, [0, 517], D, dtype, n_cols=200, top_k=8)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kinds,n_cols", [(["dense", "diag"], 0), (["vs", "dense"], 200), (["blocks", "diag"], 0)])
def test_gpu_without_column_or_block_lists(kinds, n_cols):
    gpu_case(kinds * 2, 2, 3000, 3000, [0, 517], 128, torch.bfloat16, n_cols=n_cols, top_k=8)


@gpu
@pytest.mark.gpu
def test_gpu_chunked_prefill():
    gpu_case(MIXED[:4], 4, 1000, 4133, [0, 2000], 128, torch.bfloat16, n_cols=100, top_k=6)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 96, 128])
def test_gpu_32k(D):
    gpu_case(
        ["vs", "blocks", "dense", "vs"], 4, 32768, 32768, [0], D, torch.bfloat16, p_diag=0.02, n_cols=1000, top_k=16
    )


@gpu
@pytest.mark.gpu
def test_gpu_dense_index_matches_causal_sdpa():
    """All diagonals on = plain causal attention, the case the per-tile efficiency is measured on."""
    S, D = 8192, 128
    index = random_index(["dense"] * 8, S, S, [0], device="cuda")
    q, k, v = qkv(1, 8, 2, S, S, D, torch.bfloat16, 0, "cuda")
    out = sparse_attention_triton(q, k, v, index, D**-0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert (out.float() - ref.transpose(1, 2).float()).abs().max() < 2e-2
