"""The shared argument checks (sparse_prefill.tools.cli), and the demo's and check_config's use of them: every bad
argument exits 2 with one line naming it, before any model loads. Nothing here loads a model."""

import argparse

import pytest
import torch

from sparse_prefill import ModelInfo, SparseConfig
from sparse_prefill.tools import demo
from sparse_prefill.tools.cli import output_problem, parse_lengths


def test_lengths_rule():
    assert parse_lengths("4096,4k,4K, 6000 ") == [4096, 4096, 4096, 6000]
    assert parse_lengths("256", minimum=256) == [256]
    for bad in (
        "infk",
        "inf",
        "nan",
        "0",
        "-1",
        "-4k",
        "4.5k",
        "1e3",
        "4096.0",
        "",
        "4k,",
        "4kk",
        "2147483648",
        "99999999k",
    ):
        with pytest.raises(argparse.ArgumentTypeError, match="bad length"):
            parse_lengths(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="from 256 to 2147483647"):
        parse_lengths("255", minimum=256)


def test_output_problem(tmp_path):
    (tmp_path / "file").write_text("x")
    assert output_problem(tmp_path / "new" / "deeper" / "c.json", folder=False) is None
    assert output_problem(tmp_path / "file", folder=False) is None  # replaced
    assert output_problem(tmp_path, folder=True) is None
    assert "is a folder; expected a file" in output_problem(tmp_path, folder=False)
    assert "is a file; expected a folder" in output_problem(tmp_path / "file", folder=True)
    assert "which is a file" in output_problem(tmp_path / "file" / "c.json", folder=False)


@pytest.fixture
def no_model_load(monkeypatch):
    """load_model, made to fail the test if a command line reaches it (in the demo and in check_config)."""

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(demo, "load_model", load)
    monkeypatch.setattr(check_config(), "load_model", load)


def check_config():
    from sparse_prefill.tools import check_config

    return check_config


def _exits_2(main, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.fixture
def bad_config(tmp_path):
    path = tmp_path / "bad.json"
    path.write_bytes(b'{"format": "sparse_prefill/1", "name": "caf\xe9"}')
    return str(path)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tokens", "infk"], "argument --tokens: bad length 'infk'"),
        (["--tokens", "0"], "argument --tokens: bad length '0'"),
        (["--tokens", "4k,8k"], "argument --tokens: expected one length"),
        (["--depth", "nan"], "argument --depth: must be a number in [0, 1], got 'nan'"),
        (["--depth", "1.5"], "argument --depth: must be a number in [0, 1]"),
        (["--config", "{bad}"], "argument --config: {bad}: not UTF-8 text"),
        (["--config", "/no/such.json"], "argument --config: /no/such.json: cannot read the config"),
        (["--device", "gpu"], "argument --device: 'gpu' is not a torch device"),
    ],
)
def test_demo_bad_arguments_exit_2_before_the_model_loads(argv, message, bad_config, no_model_load, capsys):
    _exits_2(demo.main, [a.format(bad=bad_config) for a in argv], message.format(bad=bad_config), capsys)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--length", "infk"], "argument --length: bad length 'infk'"),
        (["--length=-5"], "argument --length: bad length '-5'"),
        (["--length", "1k", "--last", "2000"], "argument --last: 2000 exceeds --length 1024"),
        (["--last", "0"], "argument --last: must be an integer from 1"),
        (["--samples", "1" + "0" * 30], "argument --samples: must be an integer from 1 to 2147483647"),
        (["--config", "{bad}"], "argument --config: {bad}: not UTF-8 text"),
        (["--uniform", "a_shape:local=1e400"], "argument --uniform: layers[0][0].local: must be a positive integer"),
        (["--uniform", "a_shape:local=2147483648"], "argument --uniform: layers[0][0].local: must be at most"),
        (["--uniform", "a_shape:window=8"], "argument --uniform: layers[0][0].window: unknown parameter"),
        (["--uniform", "a_shape:local=0.2.3"], "argument --uniform: layers[0][0].local: must be a positive integer"),
        (["--uniform", "star"], "argument --uniform: layers[0][0].pattern: unknown pattern 'star'"),
        (["--text", "{bad}"], "argument --text: cannot read {bad} as UTF-8 text"),
        (["--model", "/no/such/model"], "argument --model: '/no/such/model' is neither 'smollm2' nor a local model"),
        (["--device", "gpu"], "argument --device: 'gpu' is not a torch device"),
    ],
)
def test_check_config_bad_arguments_exit_2_before_the_model_loads(argv, message, bad_config, no_model_load, capsys):
    _exits_2(check_config().main, [a.format(bad=bad_config) for a in argv], message.format(bad=bad_config), capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("which", ["demo", "check_config"])
def test_cuda_without_cuda_exits_2_before_the_model_loads(which, no_model_load, capsys):
    main = demo.main if which == "demo" else check_config().main
    _exits_2(main, ["--device", "cuda"], "argument --device: 'cuda': CUDA is not available", capsys)


@pytest.mark.parametrize("which", ["demo", "check_config"])
def test_beyond_the_context_or_for_another_shape_exits_2_before_any_run(which, tmp_path, monkeypatch, capsys):
    from conftest import tiny_model

    from sparse_prefill import save_config

    def run(*args, **kwargs):
        raise AssertionError("the model ran")

    model = tiny_model()  # context 1024
    monkeypatch.setattr(model, "forward", run)
    module, argument = (demo, "--tokens") if which == "demo" else (check_config(), "--length")
    monkeypatch.setattr(module, "load_model", lambda *args, **kwargs: (model, None))
    _exits_2(module.main, [argument, "2k"], f"argument {argument}: 2048 exceeds the model's context of 1024", capsys)
    path = tmp_path / "smollm2.json"
    save_config(SparseConfig.uniform(ModelInfo("SmolLM2-135M-Instruct", "llama", 30, 9, 3, 64)), path)
    _exits_2(module.main, [argument, "1k", "--config", str(path)], "argument --config: model.num_layers", capsys)
