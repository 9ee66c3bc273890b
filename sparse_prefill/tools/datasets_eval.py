"""Public benchmark files as eval samples: LongBench, LongBench v2, RULER, InfiniteBench and a generic JSONL format.

``--dataset FORMAT:PATH`` names a format of :data:`FORMATS` and a local json, jsonl or parquet file, a folder of them,
or (online) a hub dataset id. Files are read with ``datasets.load_dataset``; every record is checked against its
format (:func:`read_examples`, before any model loads), then turned into prompts that fit ``--max-length`` tokens
(:func:`benchmark_samples`, once the tokenizer is known). Each format follows its benchmark's conventions:

* ``longbench`` (THUDM/LongBench ``pred.py`` / ``eval.py``): fields ``context``, ``input``, ``answers``,
  ``all_classes`` (classification tasks), ``dataset`` (the task; else the file name). The task's prompt template,
  generation length and metric (``dataset2prompt`` / ``dataset2maxlen`` / ``dataset2metric``); the chat template on
  every task but the few-shot and code ones (trec, triviaqa, samsum, lsht, lcc, repobench-p), whose predictions are
  scored on their first line. LongBench-E files (``<task>_e``) take their task's rules.
* ``longbench-v2`` (THUDM/LongBench v2, no chain of thought): fields ``context``, ``question``, ``choice_A`` ..
  ``choice_D``, ``answer`` (a letter), ``domain`` (the task; else the file name); chat template; 128 new tokens;
  metric ``choice_v2``.
* ``ruler`` (NVIDIA/RULER ``validation.jsonl``): fields ``input`` (already in the model's template), ``outputs``,
  optional ``answer_prefix``. The task is the file name, or its folder's for a split name (``niah_single_1/
  validation.jsonl``); its family (niah, vt, cwe, fwe, qa) gives the generation length and the metric
  (``string_match_all``; ``string_match_part`` for qa).
* ``infinitebench`` (OpenBMB/InfiniteBench, the GPT-4 templates): fields ``context``, ``input``, ``answer``,
  ``options`` (choice tasks); the task is the file name; chat template; ``math_calc`` is not supported (its metric
  needs 30 000 generated tokens).
* ``jsonl``: fields ``prompt``, ``answers`` (a string or a list) and ``metric`` (one of
  :data:`sparse_prefill.tools.metrics.METRICS`); optional ``task`` (else the file name), ``max_new_tokens``
  (:data:`GENERIC_MAX_NEW_TOKENS`) and ``chat`` (true: apply the chat template).

Prompts longer than their budget (``--max-length`` less the task's generation length) are cut in the middle, in
tokens, before the chat template, as LongBench and InfiniteBench do; RULER's prompts are made to fit the length they
were generated for, so a ``--max-length`` at least that long leaves them whole. A tokenizer without a chat template
gets the raw prompt (with its BOS token where it adds one), as LongBench does for base models.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .metrics import LETTERS, METRICS, score
from .prompts import chat, n_tokens

FORMATS = ("longbench", "longbench-v2", "ruler", "infinitebench", "jsonl")
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}  # file suffix -> datasets builder
SPLIT_NAMES = {"train", "validation", "test"}  # file names that take their folder's name as the task
GENERIC_MAX_NEW_TOKENS = 64
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass(frozen=True)
class Rule:
    """A benchmark task's conventions: its prompt template (``str.format`` over the record's fields), generation
    length, metric, whether the chat template applies, and whether only the prediction's first line is scored."""

    template: str
    max_new_tokens: int
    metric: str
    chat: bool = True
    first_line: bool = False


_QA_PASSAGES = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\n"
    "The following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me "
    "the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
)
_QASPER_RULES = (
    "Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question "
    'cannot be answered based on the information in the article, write "unanswerable". If the question is a yes/no '
    'question, answer "yes", "no", or "unanswerable". Do not provide any explanation.'
)
_NARRATIVE_RULES = (
    "asconcisely as you can, using a single phrase if possible. Do not provide any explanation."  # sic, LongBench's
)
_CODE = "Please complete the code given below. \n{context}"

LONGBENCH: dict[str, Rule] = {
    "narrativeqa": Rule(
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        f"{_NARRATIVE_RULES}\n\nStory: {{context}}\n\nNow, answer the question based on the story {_NARRATIVE_RULES}"
        "\n\nQuestion: {input}\n\nAnswer:",
        128,
        "qa_f1",
    ),
    "qasper": Rule(
        f"You are given a scientific article and a question. {_QASPER_RULES}\n\nArticle: {{context}}\n\n Answer the "
        f"question based on the above article as concisely as you can, using a single phrase or sentence if possible. "
        f"{_QASPER_RULES.split('possible. ', 1)[1]}\n\nQuestion: {{input}}\n\nAnswer:",
        128,
        "qa_f1",
    ),
    "multifieldqa_en": Rule(
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the "
        "above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
        64,
        "qa_f1",
    ),
    "multifieldqa_zh": Rule(
        "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。"
        "\n\n问题：{input}\n回答：",
        64,
        "qa_f1_zh",
    ),
    "hotpotqa": Rule(_QA_PASSAGES, 32, "qa_f1"),
    "2wikimqa": Rule(_QA_PASSAGES, 32, "qa_f1"),
    "musique": Rule(_QA_PASSAGES, 32, "qa_f1"),
    "dureader": Rule(
        "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
        128,
        "rouge_l_zh",
    ),
    "gov_report": Rule(
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}"
        "\n\nNow, write a one-page summary of the report.\n\nSummary:",
        512,
        "rouge_l",
    ),
    "qmsum": Rule(
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one "
        "or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript "
        "in one or more sentences.\n\nQuery: {input}\nAnswer:",
        512,
        "rouge_l",
    ),
    "multi_news": Rule(
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, "
        "write a one-page summary of all the news.\n\nSummary:",
        512,
        "rouge_l",
    ),
    "vcsum": Rule(
        "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
        512,
        "rouge_l_zh",
    ),
    "trec": Rule(
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
        64,
        "classification",
        chat=False,
        first_line=True,
    ),
    "triviaqa": Rule(
        "Answer the question based on the given passage. Only give me the answer and do not output any other words. "
        "The following are some examples.\n\n{context}\n\n{input}",
        32,
        "qa_f1",
        chat=False,
        first_line=True,
    ),
    "samsum": Rule(
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
        128,
        "rouge_l",
        chat=False,
        first_line=True,
    ),
    "lsht": Rule(
        "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
        64,
        "classification",
        chat=False,
        first_line=True,
    ),
    "passage_count": Rule(
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read "
        "these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other "
        "words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of "
        "unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, "
        "3, and so on.\n\nThe final answer is: ",
        32,
        "count",
    ),
    "passage_retrieval_en": Rule(
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract "
        "is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the "
        'paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", etc.\n\n'
        "The answer is: ",
        32,
        "retrieval",
    ),
    "passage_retrieval_zh": Rule(
        "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n"
        '请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：',
        32,
        "retrieval_zh",
    ),
    "lcc": Rule(_CODE + "Next line of code:\n", 64, "code_sim", chat=False),
    "repobench-p": Rule(_CODE + "{input}Next line of code:\n", 64, "code_sim", chat=False),
}

LONGBENCH_V2 = Rule(
    "Please read the following text and answer the question below.\n\n<text>\n{context}\n</text>\n\nWhat is the "
    "correct answer to this question: {question}\nChoices:\n(A) {choice_A}\n(B) {choice_B}\n(C) {choice_C}\n"
    '(D) {choice_D}\n\nFormat your response as follows: "The correct answer is (insert answer here)".',
    128,
    "choice_v2",
)

RULER: dict[str, tuple[int, str]] = {  # task family -> (tokens to generate, metric)
    "niah": (128, "string_match_all"),
    "vt": (30, "string_match_all"),
    "cwe": (120, "string_match_all"),
    "fwe": (50, "string_match_all"),
    "qa": (32, "string_match_part"),
}

_OPTIONS = "A. {option_A}\nB. {option_B}\nC. {option_C}\nD. {option_D}"
_HIDDEN = "There is an important info hidden inside a lot of irrelevant text. Find it{}. I will quiz you about the "
INFINITEBENCH: dict[str, Rule] = {
    "passkey": Rule(
        _HIDDEN.format(" and memorize them") + "important information there.\n\n{context}\n\n{input}", 6, "first_int"
    ),
    "number_string": Rule(_HIDDEN.format("") + "important information there.\n\n{context}\n\n{input}", 12, "first_int"),
    "kv_retrieval": Rule(
        "Extract the value corresponding to the specified key in the JSON object below.\n\n{context}\n\n{input}",
        50,
        "word_match",
    ),
    "longbook_sum_eng": Rule("Summarize the following book.\n\n{context}", 1200, "rouge_l"),
    "longbook_choice_eng": Rule(
        "Read the book and answer the question.\n\n{context}\n\nQuestion: {input}\n\nOnly one of the following "
        "options is correct, tell me the answer using one single letter (A, B, C, or D). Don't say anything else.\n"
        + _OPTIONS,
        40,
        "choice",
    ),
    "longbook_qa_eng": Rule(
        "Read the book below and answer a question.\n\n{context}\n\nQuestion: {input}\n\nBe very concise.", 40, "qa_f1"
    ),
    "longbook_qa_chn": Rule(
        "请根据以下书籍回答我的问题。\n\n{context}\n\n问题：{input}\n请尽量简短地回答。", 40, "qa_f1_zh"
    ),
    "longdialogue_qa_eng": Rule(
        'Below is a dialogue script where one random occurrence of a character name is replaced with "$$MASK$$", and '
        "you should try to guess who that character is.\n\nThe dialogue:\n\n---\n\n{context}\n\n---\n\nEnd of "
        'dialogue.\n\nWhich character is most likely "$$MASK$$"? Just say the name used by the scriptwriter (before '
        "the colon marks) of one single character and nothing else.",
        40,
        "contains",
    ),
    "math_find": Rule("{prefix}\n\n{context}\n\n{input}", 3, "first_number"),
    "code_run": Rule(
        "Following is a set of Python functions. There is a function called named {func}.\n\n{context}\n\nPlease give "
        "me the exact number of the return value of {func_call}. Be concise. Your response must end with the final "
        "returned value.",
        5,
        "last_int",
    ),
    "code_debug": Rule(
        "There is ONLY ONE function in the large project that is deliberately made to include an obvious error. "
        "Please find the function that contains the most obvious errors. I will give you four options to narrow your "
        "scope. You can inspect the options and think. Eventually, tell me the answer using one single letter (A, B, "
        "C, or D).\n\n{context}\n\nWhich funtion has deliberate error?\n" + _OPTIONS + "\n\nYou should first find "
        "the functions in the options. Repeat their content, inspect through code, and at last give me your answer "
        "for the function that has the deliberate and obvious error in A, B, C, or D.",
        5,
        "choice",
    ),
}


@dataclass
class Example:
    """One checked record, before tokenization: ``body`` is the filled template (cut in the middle if too long),
    ``answer_prefix`` follows it (after the chat template's assistant turn, if any)."""

    task: str
    body: str
    answers: list[str]
    rule: Rule
    answer_prefix: str = ""
    classes: list[str] | None = None


@dataclass
class BenchmarkSample:
    """An :class:`Example` as a prompt of at most ``length - max_new_tokens`` tokens; runs in
    :func:`sparse_prefill.tools.eval.evaluate` like a built-in :class:`sparse_prefill.tools.tasks.Sample`."""

    task: str
    length: int  # --max-length: prompt + answer tokens
    prompt: str
    answers: list[str]
    metric: str
    max_new_tokens: int
    first_line: bool
    classes: list[str] | None
    depth: None = None

    def score(self, prediction: str) -> float:
        if self.first_line:
            prediction = prediction.lstrip("\n").split("\n")[0]
        return score(self.metric, prediction, self.answers, self.classes)


# --------------------------------------------------------------------------------------------------- arguments


def dataset_arg(text: str) -> tuple[str, str]:
    """argparse type of ``--dataset``: ``FORMAT:PATH`` -> (format, path). The path must exist, unless it has the
    shape of a hub id (``owner/name``)."""
    fmt, sep, path = text.partition(":")
    if not sep or fmt not in FORMATS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FORMAT:PATH with FORMAT one of {', '.join(FORMATS)}")
    if not Path(path).exists() and not HUB_ID.fullmatch(path):
        raise argparse.ArgumentTypeError(f"{text!r}: no such file or folder {path!r}")
    if Path(path).is_file() and Path(path).suffix not in BUILDERS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a {', '.join(BUILDERS)} file or a folder of them")
    return fmt, path


# --------------------------------------------------------------------------------------------------- reading


def read_examples(fmt: str, path: str, limit: int | None = None) -> list[Example]:
    """Every record of ``path`` (a file, a folder searched recursively, or a hub id) as a checked :class:`Example`,
    the first ``limit`` of each task, grouped by task in order of first appearance.

    Raises:
        ValueError: naming the file and record of a missing or malformed field, an unknown task, or no records.
    """
    examples: list[Example] = []
    for name, records in _tables(path):
        for i, record in enumerate(records):
            try:
                example = PARSERS[fmt](record, name)
                score(example.rule.metric, example.answers[0], example.answers, example.classes)  # well-formed gold
            except KeyError as e:
                raise ValueError(f"task {name!r} record {i}: no field {e.args[0]!r}, which {fmt} needs") from None
            except (TypeError, ValueError, IndexError) as e:
                raise ValueError(f"task {name!r} record {i}: {e}") from None
            examples.append(example)
    if not examples:
        raise ValueError(f"{path}: no records")
    tasks = list(dict.fromkeys(e.task for e in examples))
    per_task = {t: [e for e in examples if e.task == t][:limit] for t in tasks}
    return [e for t in tasks for e in per_task[t]]


def _tables(path: str):
    """(task name from the file, records) per file: local files through ``datasets``' json / parquet builders, or
    each split of a hub dataset (InfiniteBench's splits are its tasks). ``datasets``' progress bars and logs stay
    quiet; a file it cannot read raises ValueError."""
    import datasets

    local = Path(path)
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.suffix in BUILDERS)
    if local.is_dir() and not files:
        raise ValueError(f"no {', '.join(BUILDERS)} files")
    bars, verbosity = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        if not local.exists():
            try:
                loaded = datasets.load_dataset(path)
            except OSError as e:  # offline, or no such dataset
                raise ValueError(f"no such local file or folder, nor a hub dataset ({e})") from None
            yield from ((split, loaded[split]) for split in loaded)
        for file in files:
            try:
                table = datasets.load_dataset(BUILDERS[file.suffix], data_files=str(file), split="train")
            except datasets.exceptions.DatasetsError as e:
                where = file.relative_to(local) if local.is_dir() else file.name
                raise ValueError(f"{where}: cannot read it ({e.__cause__ or e})") from None
            yield file.parent.name if file.stem in SPLIT_NAMES else file.stem, table
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _answers(value) -> list[str]:
    """Gold answers as a non-empty list of strings (a lone string or number is one answer)."""
    answers = [value] if isinstance(value, (str, int, float)) else list(value)
    if not answers or not all(isinstance(a, (str, int, float)) for a in answers):
        raise ValueError(f"answers must be a string or a non-empty list of strings, got {value!r}")
    return [str(a) for a in answers]


def _text(record: dict, field: str) -> str:
    value = record[field]
    if not isinstance(value, str):
        raise TypeError(f"field {field!r} must be a string, got {type(value).__name__}")
    return value


def _longbench(record: dict, name: str) -> Example:
    task = record.get("dataset") or name
    rule = LONGBENCH.get(task) or LONGBENCH.get(task.removesuffix("_e"))
    if rule is None:
        raise ValueError(f"unknown LongBench task {task!r}; known: {', '.join(LONGBENCH)}")
    body = rule.template.format(context=_text(record, "context"), input=_text(record, "input"))
    classes = None
    if rule.metric == "classification":
        if not isinstance(record["all_classes"], list) or not record["all_classes"]:
            raise ValueError(f"all_classes must list {task}'s class names, got {record['all_classes']!r}")
        classes = [str(c) for c in record["all_classes"]]
    return Example(task, body, _answers(record["answers"]), rule, classes=classes)


def _longbench_v2(record: dict, name: str) -> Example:
    fields = {f: _text(record, f) for f in ("context", "question", *(f"choice_{c}" for c in LETTERS))}
    if record["answer"] not in LETTERS:
        raise ValueError(f"answer must be one of A, B, C, D, got {record['answer']!r}")
    task = record.get("domain") or name
    return Example(task, LONGBENCH_V2.template.format(**fields), [record["answer"]], LONGBENCH_V2)


def _ruler(record: dict, name: str) -> Example:
    family = next((f for f in RULER if name == f or name.startswith(f + "_")), None)
    if family is None:
        raise ValueError(f"task {name!r} is not of a RULER family ({', '.join(RULER)}); name the file or folder so")
    steps, metric = RULER[family]
    body, prefix = _text(record, "input"), record.get("answer_prefix") or ""
    body = body.removesuffix(prefix)  # some RULER versions keep the prefix inside the input too
    return Example(name, body, _answers(record["outputs"]), Rule("{input}", steps, metric, chat=False), prefix)


def _infinitebench(record: dict, name: str) -> Example:
    rule = INFINITEBENCH.get(name)
    if rule is None:
        raise ValueError(f"unknown InfiniteBench task {name!r}; supported: {', '.join(INFINITEBENCH)}")
    question = _text(record, "input")
    fields = {"context": _text(record, "context"), "input": question}
    answers = _answers(record["answer"])
    if rule.metric == "choice":
        options = [str(o) for o in record["options"]]
        if len(options) != len(LETTERS) or answers[0] not in options:
            raise ValueError(f"options must be 4 and hold the answer {answers[0]!r}, got {options!r}")
        fields |= {f"option_{c}": o for c, o in zip(LETTERS, options)}
        answers = [answers[0], LETTERS[options.index(answers[0])]]
    if name == "math_find":
        target = re.findall(r"The .+ of", question)[0].lower()[: -len(" of")]
        fields["prefix"] = f"What is {target} in the following list?"
    if name == "code_run":
        fields["func_call"] = re.findall(r"func_[0-9]+\(-?[0-9]+\)", question)[0]
        fields["func"] = fields["func_call"].split("(")[0]
    return Example(name, rule.template.format(**fields), answers, rule)


def _jsonl(record: dict, name: str) -> Example:
    metric = record["metric"]
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if metric == "classification":
        raise ValueError("classification needs class names: use the longbench format")
    steps = record.get("max_new_tokens")
    steps = GENERIC_MAX_NEW_TOKENS if steps is None else steps
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {steps!r}")
    rule = Rule("{input}", steps, metric, chat=record.get("chat") is not False)
    return Example(record.get("task") or name, _text(record, "prompt"), _answers(record["answers"]), rule)


PARSERS: dict[str, Callable[[dict, str], Example]] = {
    "longbench": _longbench,
    "longbench-v2": _longbench_v2,
    "ruler": _ruler,
    "infinitebench": _infinitebench,
    "jsonl": _jsonl,
}


# --------------------------------------------------------------------------------------------------- prompts


def benchmark_samples(tokenizer, examples: list[Example], max_length: int) -> list[BenchmarkSample]:
    """Each example as a prompt of at most ``max_length`` minus its task's generation length tokens.

    Raises:
        ValueError: a task whose template, chat template and answer prefix alone do not fit.
    """
    out = []
    for ex in examples:
        limit = max_length - ex.rule.max_new_tokens
        out.append(
            BenchmarkSample(
                task=ex.task,
                length=max_length,
                prompt=_fit(tokenizer, ex.body, _wrapper(tokenizer, ex), limit, ex.task),
                answers=ex.answers,
                metric=ex.rule.metric,
                max_new_tokens=ex.rule.max_new_tokens,
                first_line=ex.rule.first_line,
                classes=ex.classes,
            )
        )
    return out


def _wrapper(tokenizer, ex: Example) -> Callable[[str], str]:
    """body -> full prompt: the chat template (if the task uses it and the tokenizer has one) and the answer prefix;
    else the raw body, after the BOS token where the tokenizer adds one."""
    if ex.rule.chat and tokenizer.chat_template:
        return lambda body: chat(tokenizer, body, ex.answer_prefix)
    bos = tokenizer.bos_token if tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id] else ""
    return lambda body: ("" if body.startswith(bos) else bos) + body + ex.answer_prefix


def _fit(tokenizer, body: str, wrap: Callable[[str], str], limit: int, task: str) -> str:
    """``wrap(body)``, with the body cut in the middle (first and last halves of its tokens kept) until the whole
    prompt has at most ``limit`` tokens."""
    ids = tokenizer(body, add_special_tokens=False).input_ids
    keep, text = len(ids), wrap(body)
    while (over := n_tokens(tokenizer, text) - limit) > 0:
        keep -= over
        if keep <= 0:
            raise ValueError(f"task {task}: the prompt's template alone exceeds {limit} tokens")
        head, tail = ids[: keep // 2], ids[len(ids) - (keep - keep // 2) :]
        text = wrap(tokenizer.decode(head, skip_special_tokens=True) + tokenizer.decode(tail, skip_special_tokens=True))
    return text
