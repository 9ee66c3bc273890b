"""Explicit state: the backend a call decides reaches its estimation, a patch owns (and unpatch frees) what it
allocated, and resolve_config gives patch_model's config without patching."""

import gc
import weakref

import pytest
import torch
from conftest import spec, tiny_model

from sparse_prefill import SparseConfig, is_patched, last_report, patch_model, resolve_config, unpatch_model
from sparse_prefill import kernels
from sparse_prefill.backend import Backend
from sparse_prefill.patch import patch_module, unpatch_module
from sparse_prefill.patches import adapter_for
from sparse_prefill.plan import LayerPlan, build_index
from sparse_prefill.state import LAYERS, MODELS

VS = dict(pattern="vertical_slash", vertical=8, slash=4, last_q=16, force_vertical=2, force_slash=4)
IDS = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(1))


class TritonRan(Exception):
    pass


class FakeScoresKernel:
    """Stands in for kernels.vs_scores: says it takes every input, and raises when launched."""

    def supports(self, q, rows):
        return None

    def vertical_slash_scores_triton(self, *args, **kwargs):
        raise TritonRan


def config_for(model):
    return SparseConfig.uniform(adapter_for(model).model_info(model), **{k: v for k, v in VS.items() if k != "pattern"})


def test_the_backend_of_the_call_reaches_estimation(monkeypatch):
    """backend="torch" runs torch estimation even where a Triton estimation kernel would take the input (before,
    estimation chose Triton by is_cuda alone); the Triton backend uses that kernel."""
    monkeypatch.setattr(kernels, "vs_scores", FakeScoresKernel())
    q, k = torch.randn(1, 4, 256, 16), torch.randn(1, 2, 256, 16)
    heads = [spec("vertical_slash", vertical=8, slash=64, last_q=16)] * 4
    build_index(q, k, heads, 0.25, [0], Backend.TORCH)
    with pytest.raises(TritonRan):
        build_index(q, k, heads, 0.25, [0], Backend.TRITON)

    seen = []
    index = LayerPlan.index
    monkeypatch.setattr(LayerPlan, "index", lambda self, *a: seen.append(a[-1]) or index(self, *a))
    model = tiny_model()
    patch_model(model, config_for(model), min_seq_len=0, backend="torch")
    with torch.no_grad():
        model(IDS)
    assert [r.path for r in last_report(model)] == ["sparse"] * 2
    assert seen == [Backend.TORCH] * 2


def test_unpatch_releases_what_the_patch_allocated():
    model = tiny_model()
    patch_model(model, config_for(model), min_seq_len=0)
    state = MODELS[model].state
    plans = {id(LAYERS[m].plan): LAYERS[m].plan for m in MODELS[model].modules}.values()
    with torch.no_grad():
        model(IDS)
    assert len(state.resources) > 0 and all(p._static for p in plans)
    resources, state = state.resources, weakref.ref(state)
    unpatch_model(model)
    gc.collect()
    assert len(resources) == 0 and not any(p._static for p in plans)
    assert state() is None  # nothing keeps the patch alive: not the model, its modules or a registry
    assert not any(m in LAYERS for m in model.modules())

    patch_model(model, config_for(model), min_seq_len=0)  # patching again releases the previous patch
    with torch.no_grad():
        model(IDS)
    first = MODELS[model].state.resources
    patch_model(model, config_for(model), min_seq_len=0)
    assert len(first) == 0 and MODELS[model].state.resources is not first
    unpatch_model(model)


def test_patch_module_routes_one_module_and_unpatch_module_frees_it():
    from sparse_prefill.dispatch import sparse_prefill_attention

    module = torch.nn.Module()
    patch = patch_module(module, [spec("vertical_slash", vertical=8, slash=64, last_q=16)] * 4)
    q, k = torch.randn(1, 4, 256, 16), torch.randn(1, 2, 256, 16)
    out, _ = sparse_prefill_attention(module, q, k, k, None, scaling=0.25)
    assert out.shape == (1, 256, 4, 16) and patch.records[0].path == "sparse"
    unpatch_module(module)
    assert module not in LAYERS and len(patch.resources) == 0


def test_resolve_config_is_the_config_patch_model_uses_and_patches_nothing():
    model = tiny_model()
    for kwargs in (dict(), dict(mode="adaptive", gamma=0.8), dict(config=config_for(model), slash_select="token")):
        resolved = resolve_config(model, **kwargs)
        assert not is_patched(model)
        assert resolved.to_dict() == patch_model(model, **kwargs).to_dict()
        unpatch_model(model)
