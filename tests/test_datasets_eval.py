"""sparse-prefill-eval --dataset: small fixture files in each benchmark's own format (written here from the README's
prose, nothing downloaded), their checks before the model loads, their prompts, and a run of every format at once."""

import json
import re
from pathlib import Path

import pytest

from test_eval import no_model_load, tiny_llama, tokenizer  # noqa: F401 (fixtures)

from sparse_prefill import ModelInfo, SparseConfig, save_config
from sparse_prefill.tools.datasets_eval import benchmark_samples, read_examples
from sparse_prefill.tools.eval import main

README = (Path(__file__).parents[1] / "README.md").read_text()
# The README's prose paragraphs (no tables, code or headings): natural text for the contexts.
PARAGRAPHS = [
    " ".join(p.split())
    for p in README.split("\n\n")
    if len(p) > 200 and not p.lstrip().startswith(("|", "```", "#", "-", "!"))
]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """datasets' cache in the test's folder, and the hub offline: the tests read their own files only."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def _context(n: int, start: int = 0) -> str:
    return "\n\n".join(PARAGRAPHS[(start + i) % len(PARAGRAPHS)] for i in range(n))


def _jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _longbench(root: Path) -> Path:
    """A LongBench data folder: one jsonl per task, LongBench's fields."""

    def record(task, question, answers, **extra):
        base = {"input": question, "context": _context(3, len(question)), "answers": answers, "length": 300}
        return {
            **base,
            "dataset": task,
            "language": "en",
            "all_classes": None,
            "_id": f"{task}-{len(question)}",
            **extra,
        }

    _jsonl(
        root / "hotpotqa.jsonl",
        [
            record("hotpotqa", "Which command installs and runs the test suite?", ["make test"]),
            record("hotpotqa", "Which file format holds the embedded default model?", ["GGUF"]),
            record("hotpotqa", "What is left as it was when patching fails?", ["the model"]),
        ],
    )
    _jsonl(
        root / "trec.jsonl",
        [
            record(
                "trec",
                "Question: What does unpatch_model give back ?\nType:",
                ["Description"],
                all_classes=["Description", "Entity", "Location"],
            )
        ],
    )
    _jsonl(root / "passage_count.jsonl", [record("passage_count", "", ["3"])])
    code = "def prefill(model, ids):\n    out = model(ids)\n"
    _jsonl(root / "lcc.jsonl", [record("lcc", "", ["    return out.logits"], context=code)])
    return root


def _longbench_v2(root: Path) -> Path:
    """LongBench v2's data.json: one JSON array."""
    choices = {"choice_A": "make demo", "choice_B": "make test", "choice_C": "make install", "choice_D": "pip install"}
    records = [
        {
            "_id": f"v2-{i}",
            "domain": domain,
            "sub_domain": "README",
            "difficulty": "easy",
            "length": "short",
            "question": "Which command runs the test suite?",
            **choices,
            "answer": "B",
            "context": _context(3, i),
        }
        for i, domain in enumerate(["Single-Document QA", "Code Repository Understanding"])
    ]
    root.mkdir(parents=True)
    (root / "data.json").write_text(json.dumps(records))
    return root / "data.json"


RULER_TEMPLATE = "<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"


def _ruler(root: Path) -> Path:
    """RULER's prepared data: <task>/validation.jsonl, inputs already in the model's template, answer_prefix apart."""
    key = "7203419"
    needle = f"One of the special magic numbers for lantern is: {key}."
    body = (
        "Some special magic numbers are hidden within the following text. Make sure to memorize it. I will quiz you "
        f"about the numbers afterwards.\n{_context(2)} {needle} {_context(1, 4)}\nWhat is the special magic number "
        "for lantern mentioned in the provided text?"
    )
    prefix = " The special magic number for lantern mentioned in the provided text is"
    niah = {"index": 0, "input": RULER_TEMPLATE.format(body=body), "outputs": [key], "length": 400}
    _jsonl(root / "niah_single_1" / "validation.jsonl", [{**niah, "answer_prefix": prefix}])
    qa = {
        "index": 0,
        "input": RULER_TEMPLATE.format(
            body=f"Answer the question based on the given documents.\n{_context(2)}\n"
            "Question: Which tool checks the style?"
        ),
        "outputs": ["ruff", "make checkstyle"],
        "length": 300,
        "answer_prefix": " Answer:",
    }
    _jsonl(root / "qa_1" / "validation.jsonl", [qa])
    return root


def _infinitebench(root: Path) -> Path:
    """InfiniteBench files: <task>.jsonl (one as parquet, through datasets)."""
    from datasets import Dataset

    _jsonl(
        root / "passkey.jsonl",
        [
            {
                "id": 0,
                "context": f"{_context(2)} The pass key is 52445. Remember it. 52445 is the pass key. {_context(1)}",
                "input": "What is the pass key?",
                "answer": ["52445"],
                "options": [],
            }
        ],
    )
    options = ["make demo", "make test", "make install", "pip install"]
    choice = {"id": 0, "context": _context(3), "input": "Which command runs the tests?", "answer": ["make test"]}
    _jsonl(root / "longbook_choice_eng.jsonl", [{**choice, "options": options}])
    kv = {"id": 0, "context": json.dumps({"3f2a": "b71c", "9d04": "e5a8"}), "input": 'Key: "9d04"\nThe value:'}
    Dataset.from_list([{**kv, "answer": ["e5a8"], "options": []}]).to_parquet(root / "kv_retrieval.parquet")
    return root


def _generic(root: Path) -> Path:
    records = [
        {"prompt": f"{_context(2)}\nWhich command builds the demo?", "answers": ["make demo"], "metric": "qa_f1"},
        {"prompt": f"{_context(1)}\nName a pattern.", "answers": ["a_shape", "vertical_slash"], "metric": "qa_f1"},
    ]
    _jsonl(root / "readme_qa.jsonl", [{**r, "max_new_tokens": 8} for r in records])
    return root / "readme_qa.jsonl"


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    return {
        "longbench": _longbench(root / "LongBench" / "data"),
        "longbench-v2": _longbench_v2(root / "LongBench-v2"),
        "ruler": _ruler(root / "ruler" / "data"),
        "infinitebench": _infinitebench(root / "InfiniteBench"),
        "jsonl": _generic(root / "generic"),
    }


EXPECTED = {  # format -> {task: metric}
    "longbench": {"hotpotqa": "qa_f1", "lcc": "code_sim", "passage_count": "count", "trec": "classification"},
    "longbench-v2": {"Single-Document QA": "choice_v2", "Code Repository Understanding": "choice_v2"},
    "ruler": {"niah_single_1": "string_match_all", "qa_1": "string_match_part"},
    "infinitebench": {"kv_retrieval": "word_match", "longbook_choice_eng": "choice", "passkey": "first_int"},
    "jsonl": {"readme_qa": "qa_f1"},
}


@pytest.mark.parametrize("fmt", list(EXPECTED))
def test_read_every_format(fixtures, fmt):
    examples = read_examples(fmt, str(fixtures[fmt]), limit=2)
    assert {e.task: e.rule.metric for e in examples} == EXPECTED[fmt]
    if fmt == "longbench":
        assert [e.task for e in examples].count("hotpotqa") == 2  # --limit: the first two of three
        (trec,) = [e for e in examples if e.task == "trec"]
        assert trec.classes == ["Description", "Entity", "Location"] and not trec.rule.chat


def test_prompts_follow_the_benchmarks(fixtures, tokenizer):  # noqa: F811
    by_task = {}  # the first sample of each task
    for fmt in EXPECTED:
        for s in benchmark_samples(tokenizer, read_examples(fmt, str(fixtures[fmt])), 4096):
            by_task.setdefault(s.task, s)
    hotpot = by_task["hotpotqa"]
    assert hotpot.prompt.startswith("<|im_start|>") and hotpot.max_new_tokens == 32  # chat template, dataset2maxlen
    assert "Question: Which command installs and runs the test suite?\nAnswer:" in hotpot.prompt
    assert by_task["trec"].prompt.startswith("Please determine the type")  # few-shot: no chat template
    niah = by_task["niah_single_1"]
    assert niah.prompt.count("<|im_start|>user") == 1  # RULER's input has its template already
    assert niah.prompt.endswith("assistant\n The special magic number for lantern mentioned in the provided text is")
    assert niah.max_new_tokens == 128
    choice = by_task["longbook_choice_eng"]
    assert "B. make test\nC. make install" in choice.prompt and choice.answers == ["make test", "B"]
    assert '(C) make install\n(D) pip install\n\nFormat your response as follows: "The correct answer is' in (
        by_task["Single-Document QA"].prompt
    )
    assert by_task["readme_qa"].max_new_tokens == 8


def test_long_prompts_are_cut_in_the_middle(fixtures, tokenizer):  # noqa: F811
    examples = read_examples("longbench", str(fixtures["longbench"]), limit=1)
    (full,) = [s for s in benchmark_samples(tokenizer, examples, 4096) if s.task == "hotpotqa"]
    (cut,) = [s for s in benchmark_samples(tokenizer, examples, 300) if s.task == "hotpotqa"]
    assert len(tokenizer(cut.prompt, add_special_tokens=False).input_ids) <= 300 - 32
    assert len(cut.prompt) < len(full.prompt)
    head, tail = full.prompt[:150], full.prompt[-150:]
    assert cut.prompt.startswith(head) and cut.prompt.endswith(tail)  # both ends kept, the middle dropped


def test_scores_use_the_task_metric(fixtures, tokenizer):  # noqa: F811
    samples = {
        s.task: s for s in benchmark_samples(tokenizer, read_examples("longbench", str(fixtures["longbench"]), 1), 4096)
    }
    assert samples["trec"].score("\nDescription\nEntity") == 1.0  # few-shot tasks: the first line only
    assert samples["passage_count"].score("3 or 4") == 0.5
    # qa_f1: "run make test" against "make test": P 2/3, R 1, F1 0.8.
    assert samples["hotpotqa"].score("Run make test.") == pytest.approx(0.8)


def _exits_2(argv, capsys, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert re.search(message, err[-1]), err[-1]
    assert "Traceback" not in "\n".join(err)


def _bad(tmp_path, fmt, record, name="hotpotqa.jsonl"):
    _jsonl(tmp_path / "bad" / name, [record])
    return f"{fmt}:{tmp_path / 'bad' / name}"


def _broken(path: Path) -> str:
    path.write_text('{"prompt": "p", "answers": ["a"], "metric": "qa_f1"}\n{"prompt": \n')
    return f"jsonl:{path}"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda t: "longbench:{t}/missing.jsonl".format(t=t), r"--dataset: .*no such file or folder"),
        (lambda t: "helmet:{t}".format(t=t), r"--dataset: .*FORMAT one of longbench, longbench-v2, ruler"),
        (lambda t: str(t), r"--dataset: .*expected FORMAT:PATH"),
        (lambda t: _bad(t, "longbench", {"input": "q", "answers": ["a"]}), r"record 0: no field 'context'"),
        (
            lambda t: _bad(t, "longbench", {"input": "q", "context": "c", "answers": []}),
            r"record 0: answers must be a string or a non-empty list",
        ),
        (
            lambda t: _bad(t, "longbench", {"input": "q", "context": "c", "answers": ["a"]}, "summaries.jsonl"),
            r"unknown LongBench task 'summaries'",
        ),
        (
            lambda t: _bad(
                t, "longbench", {"input": "q", "context": "c", "answers": ["a"], "all_classes": None}, "trec.jsonl"
            ),
            r"task 'trec' record 0: all_classes must list trec's class names",
        ),
        (lambda t: _bad(t, "longbench-v2", {"question": "q", "context": "c"}), r"no field 'choice_A'"),
        (lambda t: _bad(t, "ruler", {"input": "x"}, "niah_single_1.jsonl"), r"no field 'outputs'"),
        (lambda t: _bad(t, "ruler", {"input": "x", "outputs": ["y"]}, "summary.jsonl"), r"not of a RULER family"),
        (lambda t: _bad(t, "infinitebench", {"context": "c", "answer": "a"}, "passkey.jsonl"), r"no field 'input'"),
        (
            lambda t: _bad(t, "infinitebench", {"context": "c", "input": "q", "answer": "a"}, "math_calc.jsonl"),
            r"unknown InfiniteBench task 'math_calc'",
        ),
        (lambda t: _bad(t, "jsonl", {"prompt": "p", "answers": ["a"]}), r"no field 'metric'"),
        (lambda t: _broken(t / "broken.jsonl"), r"broken.jsonl: cannot read it \(JSON parse error"),
        (lambda t: f"ruler:{(t / 'empty').mkdir() or t / 'empty'}", r"ruler:.*empty: no .json, .jsonl, .parquet files"),
        (lambda t: _bad(t, "jsonl", {"prompt": "p", "answers": ["a"], "metric": "bleu"}), r"unknown metric 'bleu'"),
    ],
)
def test_bad_datasets_exit_2_before_the_model_loads(make, message, tmp_path, no_model_load, capsys):  # noqa: F811
    _exits_2(["--dataset", make(tmp_path), "--out", str(tmp_path / "out")], capsys, message)
    assert not (tmp_path / "out").exists()


def test_limit_without_dataset_exits_2(tmp_path, no_model_load, capsys):  # noqa: F811
    _exits_2(["--limit", "3", "--out", str(tmp_path / "out")], capsys, r"argument --limit: applies to --dataset runs")


def test_every_format_runs_dense_and_patched(fixtures, tiny_llama, tmp_path):  # noqa: F811
    # Budgets as fractions of the keys, so the short prompts really run sparse.
    config = tmp_path / "tiny.json"
    info = ModelInfo(tiny_llama.name, "llama", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
    save_config(SparseConfig.uniform(info, "vertical_slash", vertical=0.1, slash=0.1), config)
    out = tmp_path / "out"
    argv = ["--model", str(tiny_llama), "--config", str(config), "--limit", "1", "--max-length", "1k"]
    for fmt, path in fixtures.items():
        argv += ["--dataset", f"{fmt}:{path}"]
    assert main(argv + ["--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    per_task = results["summary"]["per_task"]
    expected = {task: metric for tasks in EXPECTED.values() for task, metric in tasks.items()}
    assert {task: t["metric"] for task, t in per_task.items()} == expected
    for t in per_task.values():
        assert 0 <= t["dense"] <= 1 and 0 <= t["patched"] <= 1 and 0 <= t["agree"] <= 1
        assert 0 <= t["top1_first"] <= 1 and t["kl_first"] >= -1e-6 and t["density"] <= 1 and t["samples"] == 1
    assert min(t["density"] for t in per_task.values()) < 1
    assert results["meta"]["lengths"] == [1024] and len(results["meta"]["datasets"]) == 5
    assert all(r["tokens"] <= 1024 for r in results["samples"])
    summary = (out / "summary.md").read_text()
    assert "## Per task" in summary and "| hotpotqa | qa_f1 | 1 |" in summary
    assert "- datasets: longbench:" in summary and "1 examples per task; prompts cut to 1k tokens" in summary
