"""The streaming vertical-slash estimation kernel against the torch computation of the same scores.

Without CUDA the kernel runs in Triton's interpreter (fp32/fp16, tiny shapes); the ``gpu`` tests run bf16 at long
lengths on the device.
"""

import pytest
import torch

pytest.importorskip("triton")

from conftest import assert_close

from sparse_prefill.plan.vertical_slash import block_diagonal_mass, vertical_slash_scores_torch
from sparse_prefill.kernels import vertical_slash_scores_triton

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def scores(q, k, heads, last_q, scale, starts, by_block=False):
    as_tensor = lambda x: torch.tensor(x, device=q.device)  # noqa: E731
    vertical, slash = vertical_slash_scores_torch(q.float(), k.float(), heads, last_q, scale, as_tensor(starts))
    if by_block:
        slash = block_diagonal_mass(slash, q.shape[2], k.shape[2], as_tensor(starts))
    rows = min(max(last_q), q.shape[2])
    args = (as_tensor(heads), as_tensor(last_q), rows, scale, as_tensor(starts), by_block)
    return vertical_slash_scores_triton(q, k, *args), (vertical, slash)


@pytest.mark.parametrize(
    "group,q_len,kv_len,starts,last_q",
    [
        (1, 200, 200, [0], [64]),
        (3, 230, 230, [0, 70], [64, 16, 40]),  # padding; per-head windows
        (4, 90, 260, [0, 200], [64, 64, 9, 64]),  # chunked prefill; padding longer than the chunk's first rows
        (2, 40, 130, [5, 0], [100, 64]),  # window longer than the chunk: all 40 rows
        (1, 300, 300, [0], [128]),
        (3, 170, 170, [0, 30], [100, 70, 20]),  # by block: rows in two tiles, windows ending in either
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("by_block", [False, True])
def test_kernel_sums_columns_and_diagonals_like_torch(group, q_len, kv_len, starts, last_q, dtype, by_block):
    if CUDA and dtype == torch.float32:
        dtype = torch.bfloat16
    g = torch.Generator().manual_seed(q_len + group)
    Hkv = 2
    q = (torch.randn(len(starts), Hkv * group, q_len, 64, generator=g) * 2).to(DEV, dtype)
    k = (torch.randn(len(starts), Hkv, kv_len, 64, generator=g) * 2).to(DEV, dtype)
    heads = list(range(Hkv * group))[::-1][: len(last_q)]  # a subset, out of order
    (v1, s1), (v0, s0) = scores(q, k, heads, last_q, 0.3, starts, by_block)
    atol = 1e-4 if dtype == torch.float32 else 2e-3
    assert_close(v1, v0, atol=atol, rtol=1e-3)
    assert_close(s1, s0, atol=atol, rtol=1e-3)
    # Both sum the same probabilities, grouped two ways (by block, the shares of block diagonals past the last
    # are left out).
    if not by_block:
        assert_close(v1.sum(-1), s1.sum(-1), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("D", [128, 96])  # 96 (Phi-3-mini): tiles of 128 dims, the padding zero
def test_head_dims_and_strided_views(D):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 150, 2, D, generator=g)[..., 0, :].to(DEV, torch.float16)  # non-contiguous rows
    k = torch.randn(1, 2, 150, D, generator=g).to(DEV, torch.float16)
    (v1, s1), (v0, s0) = scores(q, k, [0, 1, 2, 3], [64] * 4, D**-0.5, [0])
    assert_close(v1, v0, atol=2e-3, rtol=1e-3)
    assert_close(s1, s0, atol=2e-3, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize(
    "S,starts,last_q,D",
    [(32768, [0], 64, 128), (20000, [0, 7000], 64, 128), (20000, [0, 7001], 128, 128), (20000, [0, 7001], 128, 96)],
)
@pytest.mark.parametrize("by_block", [False, True])
def test_gpu_long_bf16(S, starts, last_q, D, by_block):
    g = torch.Generator(device="cuda").manual_seed(S)
    q = torch.randn(len(starts), 32, S, D, device="cuda", generator=g).bfloat16()
    k = torch.randn(len(starts), 8, S, D, device="cuda", generator=g).bfloat16()
    (v1, s1), (v0, s0) = scores(q, k, list(range(32)), [last_q] * 32, D**-0.5, starts, by_block)
    assert_close(v1, v0, atol=1e-4, rtol=1e-3)
    assert_close(s1, s0, atol=1e-4, rtol=1e-3)
    again = scores(q, k, list(range(32)), [last_q] * 32, D**-0.5, starts, by_block)[0]
    assert torch.equal(again[1], s1)  # atomic adds in any order, the same sums
