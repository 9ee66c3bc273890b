"""The input matrix: every input transformers can send either runs sparse exactly or falls back to dense.

A full-coverage config (the default's budgets cover every key of these 300-token prompts) must give stock's outputs
on every input: where the sparse path runs it must compute what stock computes, and where it cannot it must run
dense with a recorded reason and one warning. Sparse configs must give each sample of a padded batch what it gets
alone.
"""

import logging

import pytest
import torch
from torch.nn.attention.bias import CausalBias, causal_upper_left
from transformers import DynamicCache, StaticCache
from transformers.masking_utils import sdpa_mask

from conftest import KINDS, assert_close, tiny_model
from sparse_prefill import SparseConfig, last_report, patch_model
from sparse_prefill.layout import KeyLayout, lower_right_mask, read_layout
from sparse_prefill.tools.models import cache_kwarg
from sparse_prefill.patches import adapter_for

S = 300
IDS = torch.randint(0, 128, (2, S), generator=torch.Generator().manual_seed(7))
NOT_CAUSAL = "an attention mask that is not causal with left padding"
BIAS = "a float attention mask with values other than 0 and -inf"


def pair(kind):
    """(stock model, the same weights patched with the default config on every prefill)."""
    stock, patched = tiny_model(kind), tiny_model(kind)
    patch_model(patched, min_seq_len=0)
    return stock, patched


def forward(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def causal(n=S):
    return torch.ones(n, n, dtype=torch.bool).tril()


def padded_2d(pads):
    mask = torch.ones(len(pads), S, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
    return mask


def left_padded_4d(pads):
    keys = padded_2d(pads).bool()
    return causal()[None, None] & keys[:, None, None, :]


def prefix_lm(prefix=40):
    mask = causal().clone()
    mask[:prefix, :prefix] = True
    return mask[None, None].expand(2, 1, S, S)


def packed(split=170):
    mask = causal().clone()
    mask[split:, :split] = False
    return mask[None, None].expand(2, 1, S, S)


def as_float(mask):
    return torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)


def paths(model):
    return [(r.path, r.reason) for r in last_report(model)]


def assert_sparse(model):
    assert paths(model) == [("sparse", "")] * len(last_report(model))


def assert_dense(model, reason):
    assert all(path == "dense" and reason in why for path, why in paths(model)), paths(model)


# (name, forward kwargs, rows of each sample to compare (left padding's are meaningless), expected reason or None)
MASKS = [
    ("no mask", {}, None, None),
    ("2D left padding", dict(attention_mask=padded_2d([0, 90])), [0, 90], None),
    ("4D bool causal", dict(attention_mask=causal()[None, None].expand(2, 1, S, S)), None, None),
    ("4D float causal", dict(attention_mask=as_float(causal()[None, None].expand(2, 1, S, S))), None, None),
    ("4D bool left padding", dict(attention_mask=left_padded_4d([30, 0])), [30, 0], None),
    ("4D float left padding", dict(attention_mask=as_float(left_padded_4d([30, 0]))), [30, 0], None),
    ("4D bool prefix-LM", dict(attention_mask=prefix_lm()), None, NOT_CAUSAL),
    ("4D float prefix-LM", dict(attention_mask=as_float(prefix_lm())), None, NOT_CAUSAL),
    ("4D bool packed documents", dict(attention_mask=packed()), None, NOT_CAUSAL),
    ("4D float packed documents", dict(attention_mask=as_float(packed())), None, NOT_CAUSAL),
    ("4D float causal with a bias", dict(attention_mask=as_float(causal()[None, None]) - 0.5), None, BIAS),
]
RIGHT = padded_2d([0, 60]).flip(-1)  # sample 1: 240 tokens, then 60 padding


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name, kw, rows, reason", MASKS, ids=[m[0] for m in MASKS])
def test_masks_run_sparse_exactly_or_dense(kind, name, kw, rows, reason, caplog):
    stock, patched = pair(kind)
    want = forward(stock, IDS, **kw)
    with caplog.at_level(logging.WARNING, logger="sparse_prefill"):
        got = forward(patched, IDS, **kw)
        forward(patched, IDS, **kw)
    warnings = [r.message for r in caplog.records if "run dense" in r.message]
    if reason is None:
        assert_sparse(patched)
        assert not warnings
    else:
        assert_dense(patched, reason)
        assert len(warnings) == 1 and reason in warnings[0]
    for b, first in enumerate(rows or [0, 0]):
        assert_close(got[b, first:], want[b, first:], 1e-4, 1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_right_padding_runs_dense(kind):
    stock, patched = pair(kind)
    want = forward(stock, IDS, attention_mask=RIGHT)
    got = forward(patched, IDS, attention_mask=RIGHT)
    assert_dense(patched, NOT_CAUSAL)
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_static_cache_prefill_attends_only_to_the_filled_keys(kind):
    stock, patched = pair(kind)
    caches = [StaticCache(config=m.config, max_cache_len=S + 100) for m in (stock, patched)]
    want, got = (forward(m, IDS, **{cache_kwarg(m): c}) for m, c in zip((stock, patched), caches))
    assert_sparse(patched)
    assert {(r.q_len, r.kv_len) for r in last_report(patched)} == {(S, S)}
    assert_close(got, want, 1e-4, 1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_static_cache_generate_gives_stock_logits(kind):
    stock, patched = pair(kind)
    kw = dict(max_new_tokens=24, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        want, got = (m.generate(IDS, return_dict_in_generate=True, output_logits=True, **kw) for m in (stock, patched))
    assert {r.path for r in last_report(patched)} == {"sparse"}
    assert torch.equal(got.sequences, want.sequences)
    assert_close(torch.stack(got.logits), torch.stack(want.logits), 1e-4, 1e-4)


@pytest.mark.parametrize("cache_type", ["dynamic", "static"])
@pytest.mark.parametrize("pads", [[0, 0], [0, 90]])
def test_chunked_prefill_runs_sparse_over_the_whole_cache(cache_type, pads):
    stock, patched = pair("llama")
    mask = padded_2d(pads)
    outs = []
    for model in (stock, patched):
        cache = DynamicCache(config=model.config) if cache_type == "dynamic" else StaticCache(model.config, S + 64)
        kw = {cache_kwarg(model): cache, "use_cache": True}
        first = forward(model, IDS[:, :170], attention_mask=mask[:, :170], **kw)
        second = forward(model, IDS[:, 170:], attention_mask=mask, **kw)
        outs.append(torch.cat([first, second], 1))
    assert_sparse(patched)
    assert {(r.q_len, r.kv_len) for r in last_report(patched)} == {(130, S)}
    for b, p in enumerate(pads):
        assert_close(outs[1][b, p:], outs[0][b, p:], 1e-4, 1e-4)


def test_a_chunk_without_padding_gets_a_lower_right_bias_read_without_a_scan():
    chunk = dict(batch_size=2, q_length=130, kv_length=S, q_offset=170, device="cpu")
    bias = lower_right_mask(**chunk)
    assert isinstance(bias, CausalBias) and (bias.seq_len_q, bias.seq_len_kv) == (130, S)
    assert bias.untyped_storage().nbytes() == 0  # CausalBias's own constructor would allocate [2, 130, S] floats
    assert torch.equal(bias._materialize(), sdpa_mask(**chunk)[0, 0])
    assert isinstance(lower_right_mask(**chunk, attention_mask=torch.ones(2, S, dtype=torch.bool)), CausalBias)
    assert read_layout(bias, 2, 130, S) == KeyLayout([0, 0], S)
    # Padding, a one-shot prefill (SDPA's is_causal) and a mask that is not lower-right are sdpa_mask's / dense.
    padded = lower_right_mask(**chunk, attention_mask=padded_2d([0, 90]).bool())
    assert type(padded) is torch.Tensor and padded.shape == (2, 1, 130, S)
    assert lower_right_mask(**{**chunk, "q_length": S, "q_offset": 0}) is None
    assert read_layout(bias, 2, 129, S).startswith("a LOWER_RIGHT causal bias of 130 x 300 for 129 x 300")
    assert read_layout(causal_upper_left(130, S), 2, 130, S).startswith("a UPPER_LEFT causal bias")


@pytest.mark.parametrize("min_seq_len", [0, S + 1], ids=["sparse", "dense"])
def test_chunked_prefill_with_the_bias_gives_stock_logits(min_seq_len):
    stock, patched = tiny_model("llama"), tiny_model("llama")
    patch_model(patched, min_seq_len=min_seq_len)
    outs = []
    for model in (stock, patched):
        kw = {cache_kwarg(model): DynamicCache(config=model.config), "use_cache": True}
        outs.append(torch.cat([forward(model, IDS[:, :170], **kw), forward(model, IDS[:, 170:], **kw)], 1))
    assert {r.path for r in last_report(patched)} == {"sparse" if min_seq_len == 0 else "dense"}
    assert_close(outs[1], outs[0], 1e-5, 1e-5)


@pytest.mark.parametrize("first_layer_dense", [False, True])
def test_a_mask_buffer_rewritten_in_place_is_read_again(first_layer_dense):
    stock, patched = pair("llama")
    if first_layer_dense:  # layer 0 never reads the mask: the next forward must still read it again
        raw = SparseConfig.uniform(adapter_for(patched).model_info(patched), min_seq_len=0).to_dict()
        raw["layers"][0] = [{"pattern": "dense"}] * 4
        patch_model(patched, raw)
    buffer = left_padded_4d([0, 100])
    for pads in ([0, 100], [0, 20]):
        buffer.copy_(left_padded_4d(pads))
        want, got = forward(stock, IDS, attention_mask=buffer), forward(patched, IDS, attention_mask=buffer)
        assert last_report(patched)[1].path == "sparse"
        assert_close(got[1, pads[1] :], want[1, pads[1] :], 1e-4, 1e-4)
    buffer.copy_(prefix_lm())
    want, got = forward(stock, IDS, attention_mask=buffer), forward(patched, IDS, attention_mask=buffer)
    assert NOT_CAUSAL in last_report(patched)[1].reason
    assert torch.equal(got, want)


def test_grad_modes_and_a_backward_after_inference_mode():
    stock, patched = pair("llama")
    with torch.inference_mode():
        assert_close(patched(IDS).logits, stock(IDS).logits, 1e-4, 1e-4)
    assert_sparse(patched)
    grads = []
    for model in (stock, patched):
        model.zero_grad()
        model(IDS).logits.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert_sparse(patched)
    assert_close(grads[1], grads[0], 1e-5, 1e-3)
    # A model patched after an inference-mode call in the process gets no inference tensors either.
    again = tiny_model("qwen2")
    patch_model(again, min_seq_len=0)
    again(IDS).logits.sum().backward()


SPARSE_HEADS = [
    dict(pattern="vertical_slash", vertical=0.05, slash=0.1, last_q=16, force_vertical=2, force_slash=4),
    dict(
        pattern="vertical_slash",
        vertical=0.02,
        slash=0.02,
        last_q=16,
        force_vertical=2,
        force_slash=4,
        slash_select="token",
    ),
    dict(pattern="vertical_slash", vertical=12, slash=40, last_q=16, force_vertical=2, force_slash=4),
    dict(pattern="a_shape", sink=0.02, local=0.2),
    dict(pattern="block_sparse", top_k=0.4),
    dict(pattern="adaptive", gamma=0.3, tau=0.5, dense_above=1.0, max_blocks=0.5, force_vertical=4, force_slash=16),
]


@pytest.mark.parametrize("head", SPARSE_HEADS, ids=lambda h: "-".join(f"{v}" for v in h.values())[:60])
def test_each_sample_of_a_padded_batch_gets_what_it_gets_alone(head):
    model = tiny_model()
    patch_model(model, SparseConfig.uniform(adapter_for(model).model_info(model), min_seq_len=0, **head))
    ids = torch.randint(0, 128, (2, 640), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :250] = 0
    batched = forward(model, ids, attention_mask=mask)
    assert_sparse(model)
    assert min(d for r in last_report(model) for row in r.density for d in row) < 0.9  # the budgets really bite
    for b, p in enumerate([0, 250]):
        alone = forward(model, ids[b : b + 1, p:])
        assert_close(batched[b, p:], alone[0], 1e-4, 1e-4)


def test_triton_backend_runs_dense_where_gradients_are_needed(caplog):
    stock, patched = tiny_model(), tiny_model()
    patch_model(patched, min_seq_len=0, backend="triton")  # the interpreter on a CPU
    forward(patched, IDS[:1, :128])
    assert_sparse(patched)
    with caplog.at_level(logging.WARNING, logger="sparse_prefill"):
        got = patched(IDS[:1, :128]).logits
    assert_dense(patched, "gradients (the Triton kernel has no backward)")
    assert len([r for r in caplog.records if "run dense" in r.message]) == 1
    got.sum().backward()
    stock(IDS[:1, :128]).logits.sum().backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(patched.parameters(), stock.parameters()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_kernel_path_over_the_input_matrix(kind):
    def on_gpu(model):
        return model.to("cuda", torch.bfloat16)

    stock, patched = on_gpu(tiny_model(kind, head_dim=64)), on_gpu(tiny_model(kind, head_dim=64))
    patch_model(patched, min_seq_len=0)
    ids = torch.randint(0, 128, (2, 700), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    keys = torch.ones_like(ids)
    keys[1, :90] = 0
    padded = causal(700).cuda()[None, None] & keys[:, None, None, :].bool()
    prefix = causal(700).cuda().clone()
    prefix[:64, :64] = True
    cases = [
        ("static cache", lambda m: {cache_kwarg(m): StaticCache(config=m.config, max_cache_len=1000)}, "sparse"),
        ("4D float padded", lambda m: dict(attention_mask=as_float(padded.cpu()).cuda().bfloat16()), "sparse"),
        ("prefix-LM", lambda m: dict(attention_mask=prefix[None, None].expand(2, 1, 700, 700)), "dense"),
    ]
    for name, kw, path in cases:
        want, got = forward(stock, ids, **kw(stock)), forward(patched, ids, **kw(patched))
        assert {r.path for r in last_report(patched)} == {path}, name
        assert_close(got[0], want[0], 3e-2, 3e-2)
        assert_close(got[1, 90:], want[1, 90:], 3e-2, 3e-2)
    # Three inference-mode calls (the third replays the captured index selection), then one with autograd.
    for _ in range(3):
        with torch.inference_mode():
            assert_close(patched(ids).logits, stock(ids).logits, 3e-2, 3e-2)
        assert_sparse(patched)
    patched(ids).logits.float().square().mean().backward()
    assert_dense(patched, "gradients")
    assert_close(forward(patched, ids), forward(stock, ids), 3e-2, 3e-2)
