import pytest
import torch
import torch.nn.functional as F

from sparse_prefill.tools.divergence import kl_to_dense


def test_kl_to_dense_is_the_mean_kl_over_rows_from_dense():
    g = torch.Generator().manual_seed(0)
    want, got = (F.log_softmax(torch.randn(5, 11, generator=g), -1) for _ in range(2))
    expected = F.kl_div(got, want, reduction="batchmean", log_target=True)  # KL(want || got), mean over rows
    assert kl_to_dense(want, got) == pytest.approx(float(expected), rel=1e-6)
    assert kl_to_dense(want, got) != pytest.approx(kl_to_dense(got, want), rel=1e-3)  # the direction matters
    assert kl_to_dense(want, want) == 0.0
