"""``--rope-scaling TYPE:FACTOR`` of sparse-prefill-eval and sparse-prefill-calibrate: the shared parser, the config
it writes (transformers' ``rope_parameters``), and the context check of both command lines. Only tiny random models
are built."""

import argparse

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

from sparse_prefill.tools import calibrate, eval as evaluate
from sparse_prefill.tools.cli import rope_scaling
from sparse_prefill.tools.models import context_length, scale_rope


@pytest.mark.parametrize(
    "text, parsed", [("yarn:4", ("yarn", 4.0)), ("linear:2.5", ("linear", 2.5)), ("dynamic:1.01", ("dynamic", 1.01))]
)
def test_good_values_parse(text, parsed):
    assert rope_scaling(text) == parsed


@pytest.mark.parametrize(
    "text", ["yarn", "yarn:", "yarn:1", "yarn:0.5", "linear:-2", "yarn:inf", "yarn:nan", "ntk:4", "4"]
)
def test_bad_values_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="TYPE:FACTOR"):
        rope_scaling(text)


@pytest.mark.parametrize("kind", ["yarn", "linear", "dynamic"])
def test_a_scaled_tiny_model_has_the_scaled_rope_and_context(kind):
    config = tiny_model().config  # context 1024, rope theta 10000
    scale_rope(config, kind, 4.0)
    model = AutoModelForCausalLM.from_config(config)
    assert config.rope_parameters["rope_type"] == kind and config.rope_parameters["factor"] == 4.0
    assert model.model.rotary_emb.rope_type == kind
    assert context_length(model.config) == 4096
    if kind == "yarn":
        assert config.rope_parameters["original_max_position_embeddings"] == 1024
    if kind == "linear":  # positions are divided by the factor: the frequencies too
        plain = AutoModelForCausalLM.from_config(tiny_model().config).model.rotary_emb.inv_freq
        torch.testing.assert_close(model.model.rotary_emb.inv_freq, plain / 4)


class Reached(Exception):
    """Raised where the command line would start its long work: the checks before it all passed."""


def _scaled_loader(seen):
    def load(name, dtype, device, rope):
        seen.append(rope)
        config = tiny_model().config
        if rope is not None:
            scale_rope(config, *rope)
        return AutoModelForCausalLM.from_config(config).eval(), None

    return load


def _stop(*args, **kwargs):
    raise Reached


@pytest.mark.parametrize("which", ["eval", "calibrate"])
def test_lengths_up_to_the_scaled_context_pass_the_check(which, tmp_path, monkeypatch, capsys):
    seen = []
    if which == "eval":
        monkeypatch.setattr(evaluate, "load_model", _scaled_loader(seen))
        monkeypatch.setattr(evaluate, "make_samples", _stop)
        main, out = evaluate.main, ["--out", str(tmp_path / "out")]
    else:
        monkeypatch.setattr("sparse_prefill.tools.models.load_model", _scaled_loader(seen))
        monkeypatch.setattr(calibrate, "calibrate", _stop)
        main, out = calibrate.main, ["--out", str(tmp_path / "c.json")]
    with pytest.raises(SystemExit) as e:  # the tiny model's own context is 1024
        main([*out, "--lengths", "2k"])
    assert e.value.code == 2 and "2048 exceeds the model's context of 1024" in capsys.readouterr().err
    with pytest.raises(Reached):
        main([*out, "--lengths", "2k", "--rope-scaling", "linear:2"])
    assert seen == [None, ("linear", 2.0)]


@pytest.mark.parametrize("which", ["eval", "calibrate"])
def test_a_bad_value_exits_2_before_the_model_loads(which, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "load_model", _stop)
    monkeypatch.setattr("sparse_prefill.tools.models.load_model", _stop)
    main = evaluate.main if which == "eval" else calibrate.main
    with pytest.raises(SystemExit) as e:
        main(["--rope-scaling", "yarn:1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --rope-scaling: expected TYPE:FACTOR" in err and "Traceback" not in err
