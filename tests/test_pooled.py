"""The pooled-estimate kernels (block means, pooled q·k) against torch; interpreted without CUDA."""

import pytest
import torch

pytest.importorskip("triton")

from conftest import assert_close

from sparse_prefill.kernels.pooled import mean_pool_triton, pooled_scores_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"


# 96 (Phi-3-mini): tiles of 128 dims, the padding masked.
@pytest.mark.parametrize(
    "S,D,dtype", [(64, 64, torch.float16), (130, 128, torch.float32), (1, 64, torch.bfloat16), (100, 96, torch.float16)]
)
def test_mean_pool_averages_each_block_of_rows(S, D, dtype):
    x = torch.randn(3, S + 5, D, generator=torch.Generator().manual_seed(S)).to(DEV, dtype)[:, 5:]  # a strided view
    got = mean_pool_triton(x)
    want = torch.stack([x[:, i : i + 64].float().mean(1) for i in range(0, S, 64)], 1)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert_close(got, want, 1e-5, 1e-5)
    flagged = mean_pool_triton(x, torch.tensor([True, False, True], device=DEV))
    assert_close(flagged[[0, 2]], want[[0, 2]], 1e-5, 1e-5)
    assert (flagged[1] == 0).all()  # skipped


@pytest.mark.parametrize("M,N,D", [(70, 130, 64), (3, 200, 128), (64, 64, 64), (70, 130, 96)])
def test_pooled_scores_of_flagged_heads_over_causal_blocks(M, N, D):
    g = torch.Generator().manual_seed(M)
    pq = torch.randn(6, M, D, generator=g).to(DEV)
    pk = torch.randn(2, N, D, generator=g).to(DEV)  # heads 0-2 read KV head 0, heads 3-5 KV head 1
    top = (torch.arange(M) * max(1, (N - 1) // M) + (N - 1) % max(1, M)).clamp(max=N - 1).to(DEV)  # ascending
    flag = torch.tensor([1, 0, 1, 1, 0, 1], device=DEV)
    got = pooled_scores_triton(pq, pk, top, flag)
    want = pq @ pk.repeat_interleave(3, 0).transpose(-1, -2)
    causal = torch.arange(N, device=DEV)[None, :] <= top[:, None]
    for i in (0, 2, 3, 5):
        assert_close(got[i][causal], want[i][causal], 1e-4, 1e-4)
