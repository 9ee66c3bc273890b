"""The public long-context benchmarks' answer metrics, restated: one function per metric, all returning a float in
[0, 1] (the benchmarks print them × 100).

Every metric takes ``(prediction, answers, classes)``: the generated text, the gold answers (non-empty) and, for
``classification`` only, the task's class names. Metrics that judge one gold answer at a time score the best of them,
as LongBench and InfiniteBench do; RULER's two string matches read all answers together.

LongBench (``dataset2metric``):

* ``qa_f1``: token F1 after SQuAD normalisation (lower case, no punctuation, no articles a/an/the, single spaces).
* ``qa_f1_zh``: the same over characters after removing Chinese and ASCII punctuation and spaces (LongBench cuts words
  with jieba; characters need no dependency and score a little higher).
* ``rouge_l``: ROUGE-L F1 over lower-cased whitespace tokens (LongBench calls the ``rouge`` package, whose
  summary-level LCS over sentences split at '.' can differ slightly); ``rouge_l_zh``: the same over characters.
* ``classification``: 1 / (the number of class names found in the prediction) if the gold class is among them, else 0;
  a class name contained in the gold one does not count.
* ``retrieval`` / ``retrieval_zh``: the fraction of numbers in the prediction that equal the gold paragraph's number
  (``Paragraph N`` / ``段落N``).
* ``count``: the fraction of numbers in the prediction equal to the gold count.
* ``code_sim``: the first prediction line that has no '`', '#' or '//' against the gold line, by the Levenshtein
  (indel) ratio 2·LCS / (|a| + |b|), rounded to whole percent (``fuzz.ratio``).

LongBench v2: ``choice_v2``: the letter of "The correct answer is (X)" (or without parentheses) equals the gold one.

RULER: ``string_match_all``: the fraction of gold answers contained in the prediction (case-insensitive);
``string_match_part``: 1 if any is.

InfiniteBench: ``first_int`` (the first digit run equals the answer), ``last_int`` (the last word, as an integer),
``first_number`` (the first number, integer or decimal, equals the answer's value), ``word_match`` (the answer is one
of the words after punctuation becomes spaces), ``contains`` (case-insensitive), ``choice`` (the option letter or text
the prediction names, see :func:`choice`).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable

ZH_PUNCTUATION = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～"
    "｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
LETTERS = "ABCD"


# --------------------------------------------------------------------------------------------------- helpers


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation (LongBench's ``normalize_answer``): lower case, drop punctuation and the articles a, an,
    the, and collapse whitespace."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def normalize_zh_answer(text: str) -> str:
    """LongBench's Chinese normalisation: lower case, no Chinese or ASCII punctuation, no whitespace."""
    drop = set(string.punctuation) | set(ZH_PUNCTUATION)
    return "".join(c for c in text.lower() if c not in drop and not c.isspace())


def lcs_length(a, b) -> int:
    """Length of the longest common subsequence of two sequences (O(|a|·|b|) time, O(|b|) memory)."""
    row = [0] * (len(b) + 1)
    for x in a:
        diag = 0
        for j, y in enumerate(b, 1):
            diag, row[j] = row[j], diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def _f1(common: int, n_pred: int, n_gold: int) -> float:
    if common == 0:
        return 0.0
    precision, recall = common / n_pred, common / n_gold
    return 2 * precision * recall / (precision + recall)


def _token_f1(pred: list, gold: list) -> float:
    return _f1(sum((Counter(pred) & Counter(gold)).values()), len(pred), len(gold))


def _numbers(text: str) -> list[str]:
    return re.findall(r"\d+", text)


def _fraction_equal(numbers: list[str], target: str) -> float:
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


# --------------------------------------------------------------------------------------------------- one answer


def qa_f1(prediction: str, answer: str) -> float:
    return _token_f1(normalize_answer(prediction).split(), normalize_answer(answer).split())


def qa_f1_zh(prediction: str, answer: str) -> float:
    return _token_f1(list(normalize_zh_answer(prediction)), list(normalize_zh_answer(answer)))


def rouge_l(prediction: str, answer: str) -> float:
    pred, gold = prediction.lower().split(), answer.lower().split()
    return _f1(lcs_length(pred, gold), len(pred), len(gold))


def rouge_l_zh(prediction: str, answer: str) -> float:
    pred, gold = list(normalize_zh_answer(prediction)), list(normalize_zh_answer(answer))
    return _f1(lcs_length(pred, gold), len(pred), len(gold))


def classification(prediction: str, answer: str, classes: list[str]) -> float:
    found = [c for c in classes if c in prediction and not (c in answer and c != answer)]
    return 1 / len(found) if answer in found else 0.0


def retrieval(prediction: str, answer: str) -> float:
    return _fraction_equal(_numbers(prediction), re.findall(r"Paragraph (\d+)", answer)[0])


def retrieval_zh(prediction: str, answer: str) -> float:
    return _fraction_equal(_numbers(prediction), re.findall(r"段落(\d+)", answer)[0])


def count(prediction: str, answer: str) -> float:
    return _fraction_equal(_numbers(prediction), str(answer))


def edit_similarity(a: str, b: str) -> float:
    """The Levenshtein ratio with substitutions costing 2 (an insertion and a deletion): 2·LCS / (|a| + |b|)."""
    return 2 * lcs_length(a, b) / (len(a) + len(b)) if a or b else 1.0


def code_sim(prediction: str, answer: str) -> float:
    lines = [line for line in prediction.lstrip("\n").split("\n") if not any(m in line for m in ("`", "#", "//"))]
    return round(100 * edit_similarity(lines[0] if lines else "", answer)) / 100


def choice_v2(prediction: str, answer: str) -> float:
    text = prediction.replace("*", "")
    found = re.search(r"The correct answer is \(([A-D])\)", text) or re.search(r"The correct answer is ([A-D])", text)
    return float(found is not None and found[1] == answer)


def first_int(prediction: str, answer: str) -> float:
    numbers = _numbers(prediction)
    return float(bool(numbers) and numbers[0] == answer)


def last_int(prediction: str, answer: str) -> float:
    words = re.sub(r"[\n.`'\":]", " ", prediction).split()
    return float(bool(words) and re.fullmatch(r"-?\d+", words[-1]) is not None and int(words[-1]) == int(answer))


def first_number(prediction: str, answer: str) -> float:
    numbers = re.findall(r"-?\d+(?:\.\d+)?", prediction)
    return float(bool(numbers) and float(numbers[0]) == float(answer))


def word_match(prediction: str, answer: str) -> float:
    return float(answer in re.sub(r"[\n:\"'.,?!{}]", " ", prediction).split())


def contains(prediction: str, answer: str) -> float:
    return float(answer.upper() in prediction.upper())


def choice(prediction: str, answer: str) -> float:
    """InfiniteBench's multiple choice, one gold answer at a time (the gold answers are the option's text and its
    letter): a prediction that starts with a letter names it; else one that equals the gold text, or where the text
    after "answer is:", "answer:", "answer is" or "option is" starts with the gold one; else the first word that is a
    single letter A-D."""
    pred = prediction.strip()
    if not pred:
        return 0.0
    if pred[0] in LETTERS:
        return float(pred[0] == answer)
    if pred == answer:
        return 1.0
    pred = " ".join(re.sub(r"[\n\"'.,?!{}]", " ", pred).split())
    for prefix in ("answer is:", "answer:", "answer is", "option is"):
        if prefix in pred:
            return float(pred[pred.index(prefix) + len(prefix) :].strip().startswith(answer))
    letter = next((w for w in pred.split() if len(w) == 1 and w in LETTERS), None)
    return float(letter == answer)


# --------------------------------------------------------------------------------------------------- all answers


def string_match_all(prediction: str, answers: list[str]) -> float:
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def string_match_part(prediction: str, answers: list[str]) -> float:
    pred = prediction.lower()
    return float(any(a.lower() in pred for a in answers))


PER_ANSWER: dict[str, Callable[[str, str], float]] = {
    f.__name__: f
    for f in (
        qa_f1,
        qa_f1_zh,
        rouge_l,
        rouge_l_zh,
        retrieval,
        retrieval_zh,
        count,
        code_sim,
        choice_v2,
        first_int,
        last_int,
        first_number,
        word_match,
        contains,
        choice,
    )
}
ALL_ANSWERS: dict[str, Callable[[str, list[str]], float]] = {
    f.__name__: f for f in (string_match_all, string_match_part)
}
METRICS = (*PER_ANSWER, "classification", *ALL_ANSWERS)  # every name :func:`score` takes


def score(metric: str, prediction: str, answers: list[str], classes: list[str] | None = None) -> float:
    """``prediction`` scored by ``metric`` (one of :data:`METRICS`) against the gold ``answers``: the best single-answer
    score, or the all-answers score of RULER's string matches. ``classes``: the class names, for ``classification``."""
    if metric in ALL_ANSWERS:
        return ALL_ANSWERS[metric](prediction, answers)
    if metric == "classification":
        return max(classification(prediction, a, classes) for a in answers)
    return max(PER_ANSWER[metric](prediction, a) for a in answers)
