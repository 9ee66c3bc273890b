"""sparse-prefill-eval: task generators, the scorer, bad arguments, and a tiny end-to-end run (CPU, seconds)."""

import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import tiny_model

from sparse_prefill import ModelInfo, SparseConfig, save_config
from sparse_prefill.tools.eval import main
from sparse_prefill.tools.prompts import n_tokens
from sparse_prefill.tools.tasks import TASKS, Haystack, make_samples, score

NEEDLE_TASKS = ["niah", "passkey", "multikey", "kv", "vt"]
SMOLLM2_SHAPE = ModelInfo("SmolLM2-135M-Instruct", "llama", num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64)


@pytest.fixture(scope="module")
def tokenizer():
    """The SmolLM2 tokenizer alone, read from the embedded GGUF file (no weights)."""
    from transformers import AutoTokenizer

    from sparse_prefill.tools.models import SMOLLM2_GGUF, smollm2_dir

    try:
        folder = smollm2_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)


def _save(tmp_path_factory, name, model, tokenizer):
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tokenizer):
    """A random 2-layer Llama with the SmolLM2 tokenizer, saved as a --model folder (context 2048)."""
    model = tiny_model(
        vocab_size=len(tokenizer),
        intermediate_size=128,
        head_dim=16,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _save(tmp_path_factory, "tiny-llama", model, tokenizer)


def _depth_in_context(prompt: str, text: str) -> float:
    """Where ``text`` first occurs in the context, as a fraction of its characters. The context is the prompt's
    longest line (its filler sentences are joined by spaces), or the JSON body for ``kv``."""
    context = (
        prompt[prompt.index("{\n") : prompt.index("\n}")] if "JSON data" in prompt else max(prompt.split("\n"), key=len)
    )
    return context.index(text) / len(context)


@pytest.mark.parametrize("task", NEEDLE_TASKS)
def test_needle_sits_at_its_depth(tokenizer, task):
    length = 2048
    for depth in (0.0, 0.5, 1.0):
        sample = TASKS[task].make(tokenizer, length, depth, random.Random(7), Haystack())
        assert sample.task == task and sample.depth == depth
        assert 0.9 * length <= n_tokens(tokenizer, sample.prompt) <= 1.02 * length
        for answer in sample.answers:
            assert answer in sample.prompt
        assert _depth_in_context(sample.prompt, sample.answers[0]) == pytest.approx(depth, abs=0.02)


def test_common_words_are_the_most_frequent(tokenizer):
    (sample,) = make_samples(tokenizer, ["cwe"], [1024], [0.5], 1, seed=1)
    listing = sample.prompt.split("Memorize the ones that appear most often.\n")[1].split("\nQuestion")[0]
    counts = Counter(re.findall(r"\d+\. ([a-z]+)", listing))
    assert sample.depth is None and len(sample.answers) == 10
    assert min(counts[w] for w in sample.answers) > max(c for w, c in counts.items() if w not in sample.answers)


def test_prompt_and_answer_fit_the_length(tokenizer):
    for sample in make_samples(tokenizer, list(TASKS), [1024], [0.5], 1, seed=2):
        total = n_tokens(tokenizer, sample.prompt) + TASKS[sample.task].max_new_tokens
        assert sample.length == 1024 and 0.9 * 1024 <= total <= 1.02 * 1024  # passkey_prompt's length is approximate


def test_samples_are_deterministic_in_the_seed(tokenizer):
    def prompts(seed):
        return [s.prompt for s in make_samples(tokenizer, list(TASKS), [512], [0.0, 1.0], 2, seed)]

    assert prompts(3) == prompts(3)
    assert all(a != b for a, b in zip(prompts(3), prompts(4)))


def test_user_haystack_fills_the_context(tokenizer, tmp_path):
    path = tmp_path / "hay.txt"
    path.write_text("Zebras cross the road at noon. " * 5 + "Owls read maps by moonlight. " * 5)
    (sample,) = make_samples(tokenizer, ["niah"], [512], [0.5], 1, seed=0, haystack=Haystack(path))
    assert "Zebras cross the road at noon." in sample.prompt and "Owls read maps" in sample.prompt
    assert _depth_in_context(sample.prompt, sample.answers[0]) == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        (" 1234567.", ["1234567"], 1.0),
        ("The number is 7654321", ["1234567"], 0.0),
        ("abcde-FGH", ["abcde-fgh"], 1.0),  # case-insensitive
        (" QWERT, ASDFG and ZXCVB", ["QWERT", "ASDFG", "ZXCVB", "POIUY"], 0.75),  # RULER partial credit
        ("1. lantern 2. river", ["lantern", "river", "harbor", "bell"], 0.5),
        ("", ["x"], 0.0),
    ],
)
def test_score(prediction, answers, expected):
    assert score(prediction, answers) == expected


def _fails(argv, capsys, argument):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert f"argument {argument}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, argument",
    [
        (["--tasks", "niah,bogus"], "--tasks"),
        (["--lengths", "1k,abc"], "--lengths"),
        (["--lengths", "256"], "--lengths"),
        (["--depths", "0,1.5"], "--depths"),
        (["--samples", "0"], "--samples"),
        (["--haystack", "{tmp}/missing.txt"], "--haystack"),
        (["--haystack", "{tmp}/empty.txt"], "--haystack"),
        (["--config", "{tmp}/missing.json"], "--config"),
        (["--config", "uniform-bogus", "--model", "{llama}"], "--config"),
        (["--model", "{tmp}/no-such-model"], "--model"),
        (["--mode", "adaptive", "--config", "uniform-vs"], "--mode"),
        (["--mode", "flex"], "--mode"),
        (["--mode", "adaptive", "--gamma", "1.5"], "--gamma"),
        (["--mode", "adaptive", "--tau", "x"], "--tau"),
        (["--gamma", "0.9"], "--gamma"),
        (["--tau", "0.2", "--config", "uniform-vs", "--model", "{llama}"], "--tau"),
    ],
)
def test_bad_arguments_exit_2_and_write_nothing(args, argument, tmp_path, capsys, request):
    llama = request.getfixturevalue("tiny_llama") if "{llama}" in args else ""
    (tmp_path / "empty.txt").write_text(" \n")
    out = tmp_path / "out"
    _fails([a.format(tmp=tmp_path, llama=llama) for a in args] + ["--out", str(out)], capsys, argument)
    assert not out.exists()


def test_model_that_cannot_be_patched(tmp_path_factory, tokenizer, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_head=2, n_embd=32, n_positions=1024))
    folder = _save(tmp_path_factory, "gpt2", gpt2, tokenizer)
    out = tmp_path_factory.mktemp("out")
    (out / "results.json").write_text("old")  # an earlier run's
    _fails(["--model", str(folder), "--out", str(out), "--lengths", "512"], capsys, "--model")
    assert [p.name for p in out.iterdir()] == ["results.json"] and (out / "results.json").read_text() == "old"


def test_config_or_length_that_does_not_fit_the_model(tiny_llama, tmp_path, capsys):
    config = tmp_path / "smollm2.json"
    save_config(SparseConfig.uniform(SMOLLM2_SHAPE), config)
    out = tmp_path / "out"
    _fails(["--model", str(tiny_llama), "--config", str(config), "--out", str(out)], capsys, "--config")
    _fails(["--model", str(tiny_llama), "--lengths", "4k", "--out", str(out)], capsys, "--lengths")
    assert not out.exists()


def test_end_to_end_tiny_model(tiny_llama, tmp_path, capsys):
    # Budgets as fractions of the keys, so the tiny prompts really run sparse.
    config = tmp_path / "tiny.json"
    info = ModelInfo(tiny_llama.name, "llama", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
    save_config(SparseConfig.uniform(info, "vertical_slash", vertical=0.1, slash=0.1), config)
    out = tmp_path / "out"
    argv = [
        "--model",
        str(tiny_llama),
        "--config",
        str(config),
        "--tasks",
        "niah,kv,cwe",
        "--lengths",
        "512,1k",
        "--depths",
        "0,1",
        "--samples",
        "1",
        "--batch-size",
        "2",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["needle_grid.png", "patterns.png", "results.json", "summary.md"]

    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"meta", "summary", "samples"}
    assert set(results["summary"]) >= {"accuracy", "needle_grid", "per_length", "head_density"}
    assert len(results["samples"]) == 2 * 2 + 2 + 2  # niah: depths × lengths; kv and cwe: one per length
    for record in results["samples"]:
        assert set(record) >= {
            "task",
            "length",
            "depth",
            "answers",
            "dense",
            "patched",
            "top1",
            "kl",
            "attn_rel_err",
            "density",
            "sparse_layers",
        }
        assert record["sparse_layers"] == 2 and len(record["attn_rel_err"]) == 2
        assert 0 <= record["top1"] <= 1 and record["kl"] >= -1e-6
        assert set(record["dense"]) == {"prediction", "score", "prefill_s"}
    per_length = results["summary"]["per_length"]
    assert set(per_length) == {"512", "1024"} and per_length["1024"]["density"] < 1.0
    grid = results["summary"]["needle_grid"]
    assert grid["depths"] == [0.0, 1.0] and len(grid["patched"]) == 2 and len(grid["patched"][0]) == 2

    for png in ("needle_grid.png", "patterns.png"):
        with Image.open(out / png) as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) > 100
    summary = (out / "summary.md").read_text()
    assert "## Accuracy (dense / patched)" in summary
    for row in ("| task | 512 | 1k |", "| niah |", "| kv |", "| cwe |", "| 1k | 4 |"):
        assert row in summary


def test_adaptive_mode_reports_the_patterns_it_ran(tiny_llama, tmp_path):
    out = tmp_path / "out"
    argv = ["--model", str(tiny_llama), "--mode", "adaptive", "--gamma", "1", "--tasks", "niah", "--lengths", "512"]
    assert main(argv + ["--depths", "0.5", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["config"]["source"] == "patch_model(mode='adaptive', gamma=1)"
    assert results["meta"]["config"]["patterns"] == {"adaptive": 8}
    (record,) = results["samples"]
    assert len(record["patterns"]) == 2 and all(
        p.startswith("adaptive:") for layer in record["patterns"] for p in layer
    )
    run = results["summary"]["per_length"]["512"]["patterns_run"]
    assert sum(run.values()) == 8 and all(p.startswith("adaptive:") for p in run)
    assert record["top1"] == 1.0  # gamma 1 keeps every key with attention mass
    assert "Patterns run" in (out / "summary.md").read_text()


@pytest.fixture
def no_model_load(monkeypatch):
    """The model loader, made to fail the test if the command line reaches it."""

    def load(*args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("sparse_prefill.tools.eval.load_model", load)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--out", "{tmp}/file.txt/out"],
            "--out: {tmp}/file.txt/out is under {tmp}/file.txt, which is a file",
        ),
        (["--out", "{tmp}/file.txt"], "argument --out: {tmp}/file.txt is a file; expected a folder"),
        (["--out", "{tmp}"], "argument --out: {tmp} holds files this tool did not write (bad.json, file.txt)"),
        (["--lengths", "infk"], "argument --lengths: bad length 'infk'"),
        (["--lengths", "1k,0"], "argument --lengths: bad length '0'"),
        (["--lengths=-2k"], "argument --lengths: bad length '-2k'"),
        (["--lengths", "99999999999k"], "argument --lengths: bad length '99999999999k'"),
        (["--samples", "1" + "0" * 30], "argument --samples: must be an integer from 1 to 2147483647"),
        (["--min-seq-len", "2147483648"], "argument --min-seq-len: must be an integer from 0 to 2147483647"),
        (["--config", "{tmp}/bad.json"], "argument --config: min_seq_length: unknown key"),
        (["--config", "uniform-star"], "argument --config: 'uniform-star': unknown pattern"),
        (["--device", "gpu"], "argument --device: 'gpu' is not a torch device"),
        pytest.param(  # not a chmod-ed folder: the tests may run as root, who can write there anyway
            ["--out", "/proc/sparse-prefill-eval"],
            "argument --out: cannot write /proc/sparse-prefill-eval: cannot create files in /proc",
            marks=pytest.mark.skipif(sys.platform != "linux", reason="/proc takes no new files on Linux only"),
        ),
    ],
)
def test_bad_arguments_exit_2_before_the_model_loads(args, message, tmp_path, no_model_load, capsys):
    (tmp_path / "file.txt").write_text("a file")
    raw = SparseConfig.uniform(SMOLLM2_SHAPE).to_dict()
    (tmp_path / "bad.json").write_text(json.dumps({**raw, "min_seq_length": 0}))
    with pytest.raises(SystemExit) as e:
        main([a.format(tmp=tmp_path) for a in args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_exits_2_before_the_model_loads(no_model_load, capsys):
    _fails(["--device", "cuda"], capsys, "--device")


def _earlier_run(out):
    """A folder as an earlier run with ``niah`` left it."""
    out.mkdir()
    for name in ("results.json", "summary.md", "needle_grid.png", "patterns.png"):
        (out / name).write_text(f"old {name}")


TINY_RUN = ["--tasks", "kv", "--lengths", "512", "--samples", "1", "--no-progress", "--config", "uniform-vs"]


def test_rerun_replaces_the_earlier_run(tiny_llama, tmp_path):
    out = tmp_path / "out"
    _earlier_run(out)
    assert main(["--model", str(tiny_llama), "--out", str(out), *TINY_RUN]) == 0
    # No niah this time: the earlier heatmap must not stay beside results it does not belong to.
    assert sorted(p.name for p in out.iterdir()) == ["patterns.png", "results.json", "summary.md"]
    assert json.loads((out / "results.json").read_text())["meta"]["tasks"] == ["kv"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


@pytest.mark.parametrize("calls", [1, 2])
def test_interrupted_write_leaves_the_earlier_run(tiny_llama, tmp_path, monkeypatch, calls):
    """Interrupted at the first or the second rename of the outputs into place: the earlier run stays whole."""
    import os

    out = tmp_path / "out"
    _earlier_run(out)
    rename, count = os.rename, []

    def interrupted(src, dst):
        if Path(src).parent == tmp_path:  # the outputs' renames, not those of any library
            count.append(src)
            if len(count) == calls:
                raise KeyboardInterrupt
        rename(src, dst)

    monkeypatch.setattr(os, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["--model", str(tiny_llama), "--out", str(out), *TINY_RUN])
    assert {p.name: p.read_text() for p in out.iterdir()} == {
        name: f"old {name}" for name in ("results.json", "summary.md", "needle_grid.png", "patterns.png")
    }
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
