"""Chunked prefill (long prompts): ``generate(prefill_chunk_size=...)`` through the sparse path, against one-shot.

What "the same as one-shot" means. Each chunk's call has ``q_len`` = the chunk and ``kv_len`` = every key so far, so
its estimate reads the whole cache, but vertical-slash estimation scores the last ``last_q`` queries of the *call*:
those of the chunk, not of the prompt. So:

* exactly equal: the final chunk's index rows equal the one-shot index's rows of the same queries in the first layer
  (whose keys do not depend on attention), when the chunk boundaries are multiples of the 64-token block and the
  final chunk holds at least ``last_q`` queries (then both estimate from the same queries and keys);
* later layers differ: earlier chunks ran with their own estimates, so the cache they left differs from one-shot's;
* with budgets that cover every key, chunked prefill equals dense one-shot prefill (up to float rounding);
* with real budgets the final logits move by about as much as sparsity itself moves them: measured here on a tiny
  random model at ~1/3 tile density, relative L2 of the last logits 0.06-0.13 chunked vs one-shot, while one-shot
  sparse vs dense is 0.17-0.20 and chunked sparse vs dense 0.15-0.19.
"""

import pytest
import torch
from transformers import DynamicCache

from conftest import assert_close, tiny_model
from sparse_prefill import SparseConfig, last_report, patch_model
from sparse_prefill import state as sp_state
from sparse_prefill.config import FORMAT
from sparse_prefill.masks import block_mask, col_mask, token_mask
from sparse_prefill.tools.models import cache_kwarg
from sparse_prefill.patches import adapter_for

S = 1000
IDS = torch.randint(0, 128, (1, S), generator=torch.Generator().manual_seed(3))
SPARSE = dict(pattern="vertical_slash", vertical=32, slash=4, last_q=16, force_vertical=2, force_slash=1)
FULL = dict(pattern="vertical_slash", vertical=S, slash=S)


def config_for(model, **head):
    return SparseConfig.uniform(adapter_for(model).model_info(model), min_seq_len=0, **head)


def one_shot(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def chunked(model, chunk, ids=IDS):
    """Logits of a prefill in chunks of ``chunk`` tokens into one DynamicCache."""
    kw = {cache_kwarg(model): DynamicCache(config=model.config), "use_cache": True}
    with torch.no_grad():
        return torch.cat([model(ids[:, s : s + chunk], **kw).logits for s in range(0, ids.shape[1], chunk)], 1)


def rel_l2(a, b):
    return float((a - b).norm() / b.norm())


def test_generate_prefills_chunk_by_chunk_through_the_sparse_path(monkeypatch):
    stock, model = tiny_model(), tiny_model()
    patch_model(model, config_for(model, **FULL))
    calls = []

    def spy(mask, batch, q_len, kv_len):
        calls.append((q_len, kv_len, type(mask).__name__))
        return read_layout(mask, batch, q_len, kv_len)

    read_layout = sp_state.read_layout
    monkeypatch.setattr(sp_state, "read_layout", spy)
    kw = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)
    ids = IDS[:, :300]
    with torch.no_grad():
        want = stock.generate(ids, **kw)
        got = model.generate(ids, prefill_chunk_size=128, **kw)
    # Chunks of 128, 128 and 44 queries over the cache so far: the first without a mask (read per layer), the later
    # ones with a lower-right causal bias instead of a [1, 1, chunk, keys] tensor (read once per forward: every layer
    # gets the same); decode never reads one.
    assert calls == [(128, 128, "NoneType")] * 2 + [(128, 256, "CausalBias"), (44, 300, "CausalBias")]
    assert [(r.path, r.q_len, r.kv_len) for r in last_report(model)] == [("sparse", 44, 300)] * 2
    assert torch.equal(got.sequences, want.sequences)
    assert_close(torch.stack(got.logits), torch.stack(want.logits), 1e-4, 1e-4)


def test_final_chunk_index_rows_equal_one_shot_in_the_first_layer():
    model = tiny_model()
    patch_model(model, config_for(model, **SPARSE))
    one_shot(model)
    want = [token_mask(r.index) for r in last_report(model)]
    for chunk in (256, 192):  # final chunks of 232 and 40 queries, both at least last_q
        chunked(model, chunk)
        got = [token_mask(r.index) for r in last_report(model)]
        q_len = got[0].shape[2]
        assert torch.equal(got[0], want[0][:, :, S - q_len :])
        assert not torch.equal(got[1], want[1][:, :, S - q_len :])  # the cache of layer 1 differs (docstring)


def test_full_coverage_chunked_equals_dense_one_shot():
    model = tiny_model()
    dense = one_shot(model)
    patch_model(model, config_for(model, **FULL))
    got = chunked(model, 256)
    assert {r.path for r in last_report(model)} == {"sparse"}
    assert_close(got, dense, 1e-4, 1e-4)


def test_real_budgets_chunked_is_as_close_to_dense_as_one_shot():
    model = tiny_model()
    dense = one_shot(model)[0, -1]
    patch_model(model, config_for(model, **SPARSE))
    sparse = one_shot(model)[0, -1]
    density = [sum(r.density[0]) / len(r.density[0]) for r in last_report(model)]
    assert max(density) < 0.5
    got = chunked(model, 256)[0, -1]
    assert rel_l2(got, sparse) < 0.15  # measured 0.104
    assert rel_l2(got, dense) < 1.2 * rel_l2(sparse, dense)  # measured 0.160 vs 0.170


GPU = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")])


@pytest.mark.parametrize("device", ["cpu", GPU])
def test_dense_heads_next_to_the_kernel_take_the_bias(device):
    """The Triton backend (the interpreter on the CPU) with dense heads next to sparse ones: those heads run SDPA with
    the chunk's lower-right bias (``dense_heads_into``); a layer of dense heads only runs transformers' SDPA with it."""
    dtype, tol = (torch.float32, 1e-4) if device == "cpu" else (torch.bfloat16, 3e-2)
    stock, model = (tiny_model(head_dim=64).to(device, dtype) for _ in range(2))
    info = adapter_for(model).model_info(model)
    mixed = [{"pattern": "dense"}, {"pattern": "vertical_slash", "vertical": 1024, "slash": 1024}] * 2
    layers = [mixed, [{"pattern": "dense"}] * 4]
    config = SparseConfig.from_dict({"format": FORMAT, "model": vars(info), "min_seq_len": 0, "layers": layers})
    patch_model(model, config, backend="triton")
    ids = IDS[:, :300].to(device)
    kw = dict(max_new_tokens=2, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        want = stock.generate(ids, **kw)
        got = model.generate(ids, prefill_chunk_size=128, **kw)
    records = last_report(model)
    assert [(r.path, r.reason, r.q_len, r.kv_len) for r in records] == [
        ("sparse", "", 44, 300), ("dense", "all heads dense", 44, 300)
    ]  # fmt: skip
    assert torch.equal(got.sequences, want.sequences)
    assert_close(torch.stack(got.logits), torch.stack(want.logits), tol, tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")
def test_chunked_equals_one_shot_at_64k_on_the_kernel():
    """At 64K tokens in 32K chunks, on the Triton path at MInference's budgets: the final chunk's first-layer index
    rows equal one-shot's exactly, and the last logits move less against one-shot than sparsity moves them."""
    n = 1 << 16
    ids = torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(5)).cuda()
    model = tiny_model(head_dim=64, max_position_embeddings=n).to("cuda", torch.bfloat16)
    dense = one_shot(model, ids)[0, -1].float()
    patch_model(model, config_for(model, pattern="vertical_slash"), backend="triton")
    sparse = one_shot(model, ids)[0, -1].float()
    index = last_report(model)[0].index  # token masks would be 16 GB here: compare its tiles and columns
    want = block_mask(index, 0)[:, n // 2 // 64 :], col_mask(index, 0)
    got = chunked(model, n // 2, ids)[0, -1].float()
    records = last_report(model)
    assert [(r.path, r.q_len, r.kv_len) for r in records] == [("sparse", n // 2, n)] * 2
    index = records[0].index
    assert torch.equal(block_mask(index, 0), want[0]) and torch.equal(col_mask(index, 0), want[1])
    assert rel_l2(got, dense) < 1.2 * rel_l2(sparse, dense)
