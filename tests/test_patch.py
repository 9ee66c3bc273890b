"""patch_model / unpatch_model on real transformers models: dispatch, padding, chunked prefill, errors."""

import logging

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from conftest import KINDS, assert_close, tiny_model
from sparse_prefill import (
    ConfigError,
    SparseConfig,
    UnsupportedModelError,
    is_patched,
    last_report,
    patch_model,
    unpatch_model,
)
from sparse_prefill.tools.models import cache_kwarg
from sparse_prefill.patches import adapter_for

SPARSE = dict(pattern="vertical_slash", vertical=8, slash=4, last_q=16, force_vertical=2, force_slash=4)


def config_for(model, **head):
    return SparseConfig.uniform(adapter_for(model).model_info(model), min_seq_len=0, **head)


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


IDS = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(1))


def left_padded_pair():
    """Prompts a (300 tokens) and b (200), batched with b left-padded by 100: (a, b, ids [2, 300], mask)."""
    a, b = IDS[:, :300], IDS[:, 50:250]
    ids = torch.cat([a, torch.cat([torch.zeros(1, 100, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :100] = 0
    return a, b, ids, mask


def test_unpatch_restores_bit_identical_outputs():
    model = tiny_model()
    before = logits(model, IDS)
    patch_model(model, config_for(model, **SPARSE))
    patch_model(model, config_for(model, **SPARSE))  # twice is harmless
    assert model.config._attn_implementation == "sparse_prefill" and is_patched(model)
    assert not torch.equal(logits(model, IDS), before)  # the sparse path really ran
    unpatch_model(model)
    assert model.config._attn_implementation == "sdpa" and not is_patched(model)
    assert torch.equal(logits(model, IDS), before)
    unpatch_model(model)  # and so is unpatching twice


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "head",
    [
        dict(pattern="vertical_slash", vertical=400, slash=400),
        dict(pattern="a_shape", sink=1, local=400),
        dict(pattern="block_sparse", top_k=8),
    ],
)
def test_full_budget_equals_dense(kind, head):
    model = tiny_model(kind)
    dense = logits(model, IDS)
    patch_model(model, config_for(model, **head))
    sparse = logits(model, IDS)
    assert {r.path for r in last_report(model)} == {"sparse"}
    assert all(d == pytest.approx(1.0) for r in last_report(model) for d in r.density[0])
    assert_close(sparse, dense, 1e-4, 1e-4)


def test_left_padding_equals_per_sample_runs():
    model = tiny_model()
    patch_model(model, config_for(model, **SPARSE))
    a, b, ids, mask = left_padded_pair()
    batched = logits(model, ids, attention_mask=mask)
    assert {r.path for r in last_report(model)} == {"sparse"}
    assert_close(batched[0], logits(model, a)[0], 1e-4, 1e-4)
    assert_close(batched[1, 100:], logits(model, b)[0], 1e-4, 1e-4)


def test_chunked_prefill_runs_sparse_on_the_new_queries():
    model = tiny_model()
    full = logits(model, IDS)
    patch_model(model, config_for(model, pattern="vertical_slash", vertical=400, slash=400))
    cache = DynamicCache(config=model.config)
    first = logits(model, IDS[:, :170], **{cache_kwarg(model): cache}, use_cache=True)
    second = logits(model, IDS[:, 170:], **{cache_kwarg(model): cache}, use_cache=True)
    record = last_report(model)[0]
    assert (record.path, record.q_len, record.kv_len) == ("sparse", 130, 300)
    assert_close(torch.cat([first, second], 1), full, 1e-4, 1e-4)


def test_short_prompts_and_decode_take_the_stock_path():
    model = tiny_model()
    patch_model(model, config_for(model, **SPARSE), min_seq_len=301)
    logits(model, IDS)
    assert [r.path for r in last_report(model)] == ["dense", "dense"]
    assert "min_seq_len" in last_report(model)[0].reason
    patch_model(model, config_for(model, **SPARSE), min_seq_len=0)
    with torch.no_grad():
        out = model.generate(IDS, max_new_tokens=3, do_sample=False)
    # generate's decode steps (one query each) leave the prefill record alone.
    assert out.shape[1] == 303 and last_report(model)[0].q_len == 300


def test_mask_other_than_left_padding_runs_dense_with_one_warning(caplog):
    model = tiny_model()
    patch_model(model, config_for(model, **SPARSE))
    mask = torch.ones(2, 300, dtype=torch.long)
    mask[1, 250:] = 0  # right padding
    with caplog.at_level(logging.WARNING, logger="sparse_prefill"):
        logits(model, IDS.repeat(2, 1), attention_mask=mask)
        logits(model, IDS.repeat(2, 1), attention_mask=mask)
    assert [r.path for r in last_report(model)] == ["dense", "dense"]
    assert len([r for r in caplog.records if "left padding" in r.message]) == 1


WINDOW_64 = "a sliding window (64 keys) shorter than the keys is not supported by the sparse path"


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_sliding_window_layers_run_dense_once_the_window_bites(kind):
    model = tiny_model(
        kind,
        use_sliding_window=True,
        sliding_window=64,
        max_window_layers=1,
        layer_types=["full_attention", "sliding_attention"],
    )
    cases = [(300, ("dense", WINDOW_64)), (64, ("sparse", ""))]  # 64 keys: the band is the causal mask
    dense = {n: logits(model, IDS[:, :n]) for n, _ in cases}
    # Every key in the patterns: a sparse run of layer 1 would be full causal attention, not its band.
    patch_model(model, config_for(model, pattern="vertical_slash", vertical=400, slash=400))
    for n, layer_1 in cases:
        assert_close(logits(model, IDS[:, :n]), dense[n], 1e-4, 1e-4)
        assert [(r.path, r.reason) for r in last_report(model)] == [("sparse", ""), layer_1]


def test_mistral_with_a_sliding_window_runs_sparse_up_to_it_and_dense_past_it_with_one_warning(caplog):
    model = tiny_model("mistral", sliding_window=64)
    cases = [(300, ("dense", WINDOW_64)), (200, ("dense", WINDOW_64)), (64, ("sparse", ""))]
    dense = {n: logits(model, IDS[:, :n]) for n, _ in cases}
    patch_model(model, config_for(model, pattern="vertical_slash", vertical=400, slash=400))
    with caplog.at_level(logging.WARNING, logger="sparse_prefill"):
        for n, path in cases:
            assert_close(logits(model, IDS[:, :n]), dense[n], 1e-4, 1e-4)
            assert [(r.path, r.reason) for r in last_report(model)] == [path] * 2
    assert [r.message for r in caplog.records] == [f"sparse_prefill: {WINDOW_64}; such calls run dense"]


def test_unsupported_model_is_refused_and_left_alone():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64)).eval()
    impl = model.config._attn_implementation
    with pytest.raises(UnsupportedModelError, match="model_type 'gpt2' is not supported"):
        patch_model(model)
    assert model.config._attn_implementation == impl and not is_patched(model)


@pytest.mark.parametrize("bad", [dict(num_heads=8), dict(num_layers=3)])
def test_wrong_config_leaves_the_model_unpatched(bad):
    model = tiny_model()
    info = adapter_for(model).model_info(model)
    config = SparseConfig.uniform(type(info)(**{**vars(info), **bad}), min_seq_len=0)
    with pytest.raises(ConfigError, match="config was made for"):
        patch_model(model, config)
    assert model.config._attn_implementation == "sdpa" and not is_patched(model)


def test_bad_arguments():
    model = tiny_model()
    with pytest.raises(ValueError, match="backend"):
        patch_model(model, backend="cuda")
    with pytest.raises(ValueError, match="min_seq_len"):
        patch_model(model, min_seq_len=-1)
    with pytest.raises(TypeError, match="config"):
        patch_model(model, config=42)
    assert not is_patched(model)


def test_default_config_without_a_shipped_one():
    model = tiny_model()
    config = patch_model(model)
    assert config.min_seq_len == "auto"
    assert {s.pattern for heads in config.layers for s in heads} == {"vertical_slash"}


@pytest.mark.parametrize("kind", KINDS)
def test_adaptive_mode_needs_no_config(kind):
    model = tiny_model(kind)
    dense = logits(model, IDS)
    config = patch_model(model, mode="adaptive", gamma=0.6, min_seq_len=0)
    assert {s.pattern for heads in config.layers for s in heads} == {"adaptive"}
    assert {s.params["gamma"] for heads in config.layers for s in heads} == {0.6}
    sparse = logits(model, IDS)
    records = last_report(model)
    assert {r.path for r in records} == {"sparse"}
    assert all(p.startswith("adaptive:") for r in records for p in r.patterns)
    assert all(len(r.choices) == 1 and len(r.choices[0]) == 4 for r in records)
    assert_close(sparse, dense, 1e-4, 1e-4)  # 300 tokens: the default minimum budget is most of the causal area
    # Random weights attend nearly uniformly (diffuse heads); a small gamma and minimum budget, and no dense switch,
    # make them sparse: block-sparse where the pooled estimate is close enough (tau), else vertical-slash.
    for tau, ran in ((0.0, "adaptive:vertical_slash"), (0.5, "adaptive:block_sparse")):
        patch_model(
            model,
            config_for(
                model,
                pattern="adaptive",
                gamma=0.3,
                tau=tau,
                dense_above=1.0,
                max_blocks=5,
                force_vertical=4,
                force_slash=16,
            ),
        )
        sparse = logits(model, IDS)
        assert {p for r in last_report(model) for p in r.patterns} == {ran}
        assert not torch.equal(sparse, dense)
        assert all(d < 0.95 for r in last_report(model) for d in r.density[0])
    # gamma 1 keeps every key with attention mass: dense, whatever pattern each head picks.
    patch_model(model, mode="adaptive", gamma=1.0, tau=0.3, min_seq_len=0)
    assert_close(logits(model, IDS), dense, 1e-4, 1e-4)


def test_adaptive_heads_that_all_choose_dense_run_the_dense_backend():
    model = tiny_model()
    dense = logits(model, IDS)
    patch_model(model, config_for(model, pattern="adaptive", dense_above=0.01))
    got = logits(model, IDS)
    assert {p for r in last_report(model) for p in r.patterns} == {"adaptive:dense"}
    assert all(r.reason.startswith("every head dense") for r in last_report(model))
    assert torch.equal(got, dense)  # stock SDPA itself, not the index's every-diagonal dense on the sparse path


def test_config_with_adaptive_heads_and_overrides():
    model = tiny_model()
    info = adapter_for(model).model_info(model)
    raw = SparseConfig.uniform(info, min_seq_len=0, **SPARSE).to_dict()
    raw["layers"][1][2] = {"pattern": "adaptive", "tau": 0.0}
    config = patch_model(model, raw, gamma=0.7)
    assert config.layers[1][2].params["gamma"] == 0.7 and config.layers[1][2].params["tau"] == 0.0
    assert config.layers[1][1].pattern == "vertical_slash"
    logits(model, IDS)
    patterns = last_report(model)[1].patterns
    assert patterns[:2] == ["vertical_slash"] * 2 and patterns[3] == "vertical_slash"
    assert patterns[2] in ("adaptive:vertical_slash", "adaptive:dense")  # tau 0: never block-sparse
    assert last_report(model)[0].choices == [["vertical_slash"] * 4]


def test_adaptive_left_padding_and_chunked_prefill_equal_single_runs():
    model = tiny_model()
    heads = dict(
        pattern="adaptive", gamma=0.3, tau=0.16, dense_above=1.0, max_blocks=5, force_vertical=4, force_slash=16
    )
    patch_model(model, config_for(model, **heads))
    a, b, ids, mask = left_padded_pair()
    batched = logits(model, ids, attention_mask=mask)
    choices = [r.choices for r in last_report(model)]
    assert_close(batched[0], logits(model, a)[0], 1e-4, 1e-4)
    assert [r.choices[0] for r in last_report(model)] == [c[0] for c in choices]
    assert_close(batched[1, 100:], logits(model, b)[0], 1e-4, 1e-4)
    assert [r.choices[0] for r in last_report(model)] == [c[1] for c in choices]
    # Chunked prefill: the second chunk's queries choose from the whole cache; gamma 1 keeps every key with mass, so
    # both chunks equal dense. (The split is block-aligned: with an unaligned one, the all-diagonals "dense" of the
    # index format misses key block 0 for the last, partial query block, for static dense heads as well.)
    patch_model(model, mode="adaptive", gamma=1.0, min_seq_len=0)
    cache = DynamicCache(config=model.config)
    first = logits(model, IDS[:, :192], **{cache_kwarg(model): cache}, use_cache=True)
    second = logits(model, IDS[:, 192:], **{cache_kwarg(model): cache}, use_cache=True)
    assert (last_report(model)[0].q_len, last_report(model)[0].kv_len) == (108, 300)
    unpatch_model(model)
    assert_close(torch.cat([first, second], 1), logits(model, IDS), 1e-4, 1e-4)


def test_slash_select_is_set_on_every_vertical_slash_head():
    model = tiny_model()
    raw = config_for(model, **SPARSE).to_dict()
    raw["layers"][0][1] = {"pattern": "a_shape", "sink": 4, "local": 64}
    for choice in ("token", "block"):
        config = patch_model(model, raw, slash_select=choice)
        heads = [h for layer in config.layers for h in layer]
        assert {h.params["slash_select"] for h in heads if h.pattern == "vertical_slash"} == {choice}
        assert heads[1].params == {"sink": 4, "local": 64}
        logits(model, IDS)
        assert {r.path for r in last_report(model)} == {"sparse"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="adaptive", gamma=0.0), "gamma: must be a number in (0, 1], got 0.0"),
        (dict(mode="adaptive", gamma=1.01), "gamma: must be a number in (0, 1], got 1.01"),
        (dict(mode="adaptive", tau=-1), "tau: must be a number in [0, 1], got -1"),
        (dict(mode="adaptive", tau="0.1"), "tau: must be a number in [0, 1]"),
        (dict(mode="flex"), "mode: must be one of ('config', 'adaptive'), got 'flex'"),
        (dict(mode="adaptive", config={"format": "sparse_prefill/1"}), "config: must be None with mode='adaptive'"),
        (dict(gamma=0.9), "gamma: the config has no adaptive heads to apply it to"),
        (dict(slash_select="tokens"), "slash_select: must be one of ('token', 'block'), got 'tokens'"),
        (dict(mode="adaptive", slash_select="token"), "slash_select: the config has no vertical_slash heads"),
    ],
)
def test_bad_adaptive_arguments_leave_the_model_unpatched(kwargs, message):
    model = tiny_model()
    with pytest.raises(ValueError) as e:
        patch_model(model, **kwargs)
    assert message in str(e.value)
    assert model.config._attn_implementation == "sdpa" and not is_patched(model)


@pytest.mark.slow
def test_smollm2_full_budget_generates_the_dense_tokens(smollm2, passkey):
    model, tok = smollm2
    ids, key = passkey
    with torch.no_grad():
        dense = model.generate(ids, max_new_tokens=6, do_sample=False)
    patch_model(model, config_for(model, pattern="vertical_slash", vertical=ids.shape[1], slash=ids.shape[1]))
    try:
        with torch.no_grad():
            sparse = model.generate(ids, max_new_tokens=6, do_sample=False)
        assert {r.path for r in last_report(model)} == {"sparse"}
    finally:
        unpatch_model(model)
    assert key in tok.decode(dense[0, ids.shape[1] :])
    assert torch.equal(sparse, dense)


@pytest.mark.slow
def test_smollm2_sparse_answers_the_passkey(smollm2, passkey):
    model, tok = smollm2
    ids, key = passkey
    patch_model(model, config_for(model, pattern="a_shape", sink=16, local=128))
    try:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=6, do_sample=False)
        density = [d for r in last_report(model) for d in r.density[0]]
    finally:
        unpatch_model(model)
    assert key in tok.decode(out[0, ids.shape[1] :])
    assert sum(density) / len(density) < 0.75


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dense", [(), (1, 2)])  # dense heads run on SDPA next to the kernel, one call per KV head
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_kernel_path_matches_the_torch_path(dtype, dense, kind):
    # Phi-3-mini's head_dim 96 runs on tiles padded to 128.
    model = tiny_model(kind, head_dim=96 if kind == "phi3" else 64).to("cuda", dtype)
    ids = torch.randint(0, 128, (2, 700), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :90] = 0
    config = config_for(model, **SPARSE).to_dict()
    for heads in config["layers"]:
        for h in dense:
            heads[h] = {"pattern": "dense"}
    patch_model(model, config, backend="torch")
    want = logits(model, ids, attention_mask=mask)
    patch_model(model, config)  # auto: the Triton kernel on CUDA
    got = logits(model, ids, attention_mask=mask)
    assert {r.path for r in last_report(model)} == {"sparse"}
    assert_close(got[0], want[0], 3e-2, 3e-2)
    assert_close(got[1, 90:], want[1, 90:], 3e-2, 3e-2)
