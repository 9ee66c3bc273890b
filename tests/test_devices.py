"""The measured per-device tables: device classes, the min_seq_len crossover and its overrides, the dense backend."""

import json
import logging
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close, tiny_model
from sparse_prefill import ConfigError, SparseConfig, is_patched, last_report, load_config, patch_model
from sparse_prefill import devices
from sparse_prefill.dense import dense_attention, flash_attention, flash_unsupported
from sparse_prefill.patches import adapter_for

IDS = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(2))
SPARSE = dict(pattern="vertical_slash", vertical=8, slash=4, last_q=16, force_vertical=2, force_slash=4)
HEAD_DIM = 16  # tiny_model: hidden 64 over 4 heads


def run(model, n: int) -> list:
    with torch.no_grad():
        model(IDS[:, :n])
    return last_report(model)


def uniform(model, **kw) -> SparseConfig:
    return SparseConfig.uniform(adapter_for(model).model_info(model), **{**SPARSE, **kw})


@pytest.fixture
def gpu_names(monkeypatch):
    """Pretend CUDA devices have the given names."""
    names = {}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: names[torch.device(d).index or 0])
    devices._cuda_name.cache_clear()
    yield names
    devices._cuda_name.cache_clear()


@pytest.mark.parametrize(
    "name,cls",
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA GH200 480GB", "GH200"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 4090"),
    ],
)
def test_device_class_is_the_gpu_family(gpu_names, name, cls):
    gpu_names[1] = name
    assert devices.device_class(torch.device("cuda:1")) == cls


def test_device_class_off_cuda():
    assert devices.device_class("cpu") == "cpu"
    assert devices.device_class(torch.device("meta")) == "meta"


def test_table_lookup_keys_on_device_and_head_dim(monkeypatch):
    monkeypatch.setattr(devices, "MIN_SEQ_LEN", {("H100", 128): 12288, ("H100", 64): 20480, ("H200", 128): 8192})
    assert devices.min_seq_len_for("H100", 128) == (12288, "measured for H100, head_dim 128")
    assert devices.min_seq_len_for("H100", 64)[0] == 20480
    assert devices.min_seq_len_for("H200", 128)[0] == 8192
    for unknown in [("H200", 64), ("A100", 128), ("cpu", 128), ("H100", 96)]:
        value, source = devices.min_seq_len_for(*unknown)
        assert value == devices.FALLBACK_MIN_SEQ_LEN and source.startswith("fallback")


def test_shipped_table_is_sane():
    assert devices.FALLBACK_MIN_SEQ_LEN >= max(devices.MIN_SEQ_LEN.values())
    for (cls, head_dim), value in devices.MIN_SEQ_LEN.items():
        assert devices._FAMILY.fullmatch(cls) and head_dim in (64, 96, 128) and value > 0
    assert set(devices.DENSE_BACKEND.values()) <= {"sdpa", "flash_attn"}


def test_auto_resolves_per_call_from_the_table(monkeypatch):
    model = tiny_model()
    config = patch_model(model, uniform(model))
    assert config.min_seq_len == "auto"
    # The CPU has no entry: the conservative fallback, and the report says so.
    records = run(model, 300)
    assert [r.path for r in records] == ["dense", "dense"]
    assert (
        records[0].reason == f"kv_len 300 < min_seq_len {devices.FALLBACK_MIN_SEQ_LEN} (fallback: no measurement "
        f"for cpu, head_dim {HEAD_DIM})"
    )
    # A measured entry for this device class and head_dim: sparse from there on.
    monkeypatch.setitem(devices.MIN_SEQ_LEN, ("cpu", HEAD_DIM), 200)
    patch_model(model, uniform(model))  # a fresh patch resolves again
    assert [r.path for r in run(model, 300)] == ["sparse", "sparse"]
    records = run(model, 150)
    assert [r.path for r in records] == ["dense", "dense"]
    assert records[0].reason == f"kv_len 150 < min_seq_len 200 (measured for cpu, head_dim {HEAD_DIM})"
    # Another head_dim on the same device class does not take that entry.
    other = tiny_model(head_dim=32)
    patch_model(other, uniform(other))
    assert "fallback" in run(other, 300)[0].reason


def test_overrides_config_then_patch_argument(monkeypatch):
    monkeypatch.setitem(devices.MIN_SEQ_LEN, ("cpu", HEAD_DIM), 200)
    model = tiny_model()
    patch_model(model, uniform(model, min_seq_len=301))  # the config's integer beats the table
    records = run(model, 300)
    assert records[0].path == "dense" and records[0].reason == "kv_len 300 < min_seq_len 301 (set)"
    patch_model(model, uniform(model, min_seq_len=301), min_seq_len=0)  # the argument beats the config
    assert run(model, 300)[0].path == "sparse"
    patch_model(model, uniform(model, min_seq_len=301), min_seq_len="auto")  # and can ask for the table again
    assert run(model, 300)[0].path == "sparse" and run(model, 150)[0].path == "dense"


def test_bad_min_seq_len_names_the_field():
    model = tiny_model()
    for bad in ("fast", -1, 2.5, True):
        with pytest.raises(ConfigError, match='min_seq_len: must be "auto" or an integer >= 0'):
            patch_model(model, uniform(model, min_seq_len=0), min_seq_len=bad)
    assert not is_patched(model)


def test_shipped_config_uses_the_table():
    path = Path(__file__).resolve().parents[1] / "configs" / "smollm2-135m-instruct.json"
    assert json.loads(path.read_text())["min_seq_len"] == "auto"
    assert load_config(path).min_seq_len == "auto"


# --- dense backend -------------------------------------------------------------------------------------------------


def fake_flash(calls: list):
    """A stand-in flash_attn module honouring flash_attn_func's contract ([B, S, H, D], GQA, causal)."""

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        calls.append(q.shape)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            dropout_p=dropout_p,
            is_causal=causal,
            scale=softmax_scale,
            enable_gqa=True,
        )
        return out.transpose(1, 2)

    return types.SimpleNamespace(flash_attn_func=flash_attn_func)


@pytest.fixture
def no_flash(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import flash_attn raises ImportError


@pytest.fixture
def with_flash(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash(calls))
    return calls


def test_dense_backend_selection_without_flash_attn(no_flash, monkeypatch):
    monkeypatch.setitem(devices.DENSE_BACKEND, ("H100", 128), "flash_attn")
    assert devices.flash_attn_error() is not None
    assert devices.dense_backend_for("auto", "H100", 128) == "sdpa"  # measured faster, but not installed
    assert devices.dense_backend_for("sdpa", "H100", 128) == "sdpa"
    with pytest.raises(ValueError, match="dense_backend: must be one of"):
        devices.dense_backend_for("cudnn", "H100", 128)


def test_dense_backend_selection_with_flash_attn(with_flash, monkeypatch):
    assert devices.flash_attn_error() is None
    assert devices.dense_backend_for("auto", "H100", 128) == "sdpa"  # installed, but not measured faster
    monkeypatch.setitem(devices.DENSE_BACKEND, ("H100", 128), "flash_attn")
    assert devices.dense_backend_for("auto", "H100", 128) == "flash_attn"
    assert devices.dense_backend_for("auto", "H100", 64) == "sdpa"
    assert devices.dense_backend_for("auto", "H200", 128) == "sdpa"
    assert devices.dense_backend_for("flash_attn", "cpu", 16) == "flash_attn"


def test_forcing_flash_attn_without_it_is_refused(no_flash):
    model = tiny_model()
    with pytest.raises(ImportError, match=r"pip install 'sparse-prefill\[flash\]'"):
        patch_model(model, uniform(model), dense_backend="flash_attn")
    assert not is_patched(model)
    with pytest.raises(ValueError, match="dense_backend: must be one of"):
        patch_model(model, uniform(model), dense_backend="cudnn")
    assert not is_patched(model)


def test_forced_flash_attn_on_an_input_it_cannot_run_stays_on_sdpa(with_flash, caplog):
    model = tiny_model()
    with torch.no_grad():
        want = model(IDS).logits
    patch_model(model, uniform(model, min_seq_len=10**6), dense_backend="flash_attn")
    with caplog.at_level(logging.WARNING, logger="sparse_prefill"), torch.no_grad():
        got = model(IDS).logits
        model(IDS)
    assert with_flash == []  # a CPU tensor: SDPA ran
    assert torch.equal(got, want)
    assert len([r for r in caplog.records if "flash-attn cannot run this input (not a CUDA tensor)" in r.message]) == 1


def test_flash_attention_adapter_matches_sdpa(with_flash):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 70, 32, generator=g)
    k, v = (torch.randn(2, 2, 70, 32, generator=g) for _ in range(2))
    module = types.SimpleNamespace(num_key_value_groups=4, is_causal=True)
    want, _ = dense_attention(module, q, k, v, None, scaling=0.3)
    got, _ = flash_attention(q, k, v, 0.0, 0.3)
    assert with_flash == [(2, 70, 8, 32)]  # flash layout: [B, S, H, D]
    assert got.shape == want.shape == (2, 70, 8, 32)
    assert_close(got, want, 1e-5, 1e-5)


def test_flash_unsupported_reasons():
    q = torch.randn(1, 4, 8, 16)
    assert flash_unsupported(q, q, None, {}) == "not a CUDA tensor"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_dense_calls_take_flash_attn_where_measured_faster(with_flash, monkeypatch):
    model = tiny_model(head_dim=64).to("cuda", torch.bfloat16)
    ids = IDS.cuda()
    with torch.no_grad():
        want = model(ids).logits
    monkeypatch.setitem(devices.DENSE_BACKEND, (devices.device_class("cuda"), 64), "flash_attn")
    patch_model(model, uniform(model, min_seq_len=10**6))
    with torch.no_grad():
        got = model(ids).logits
    assert [r.path for r in last_report(model)] == ["dense", "dense"]
    assert len(with_flash) == 2  # one call per layer
    assert_close(got, want, 2e-2, 2e-2)
    with torch.no_grad():
        mask = torch.ones_like(ids)
        mask[0, :5] = 0
        model(ids, attention_mask=mask)  # a padding mask: SDPA
    assert len(with_flash) == 2
