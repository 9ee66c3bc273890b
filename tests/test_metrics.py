"""The benchmarks' metrics (sparse_prefill.tools.metrics) against values computed by hand."""

import pytest

from sparse_prefill.tools.metrics import METRICS, edit_similarity, lcs_length, normalize_answer, score


@pytest.mark.parametrize(
    "metric, prediction, answers, expected",
    [
        # 4 normalised tokens (eiffel tower in paris), 2 gold, 2 shared: P 1/2, R 1, F1 2/3.
        ("qa_f1", "The Eiffel Tower, in Paris!", ["Eiffel Tower"], 2 / 3),
        ("qa_f1", "Paris", ["London", "the paris"], 1.0),  # the best answer counts
        ("qa_f1", "no idea", ["Paris"], 0.0),
        ("qa_f1_zh", "巴黎，法国。", ["巴黎"], 2 / 3),  # characters 巴黎法国 against 巴黎
        # LCS "the cat on the mat" = 5 of 6 tokens each side: F1 5/6.
        ("rouge_l", "The cat sat on the mat", ["the cat is on the mat"], 5 / 6),
        ("rouge_l", "", ["anything"], 0.0),
        ("rouge_l_zh", "我爱北京", ["我爱上海"], 0.5),
        ("retrieval", "Paragraph 3, or maybe paragraph 5", ["Paragraph 3"], 0.5),
        ("retrieval", "I do not know", ["Paragraph 3"], 0.0),
        ("retrieval_zh", "段落2", ["段落2"], 1.0),
        ("count", "There are 12 unique paragraphs, not 13", ["12"], 0.5),
        ("count", "12", ["12"], 1.0),
        # The fenced first line is skipped; "    return a + b" (16) against "return a + b" (12): 2·12/28 -> 86%.
        ("code_sim", "```python\n    return a + b\n```", ["return a + b"], 0.86),
        ("code_sim", "# a comment\n", ["x = 1"], 0.0),
        ("choice_v2", "**The correct answer is (B)**", ["B"], 1.0),
        ("choice_v2", "The correct answer is C.", ["B"], 0.0),
        ("choice_v2", "B", ["B"], 0.0),  # not in the asked format
        ("string_match_all", " QWERT and ASDFG", ["qwert", "asdfg", "zxcvb", "poiuy"], 0.5),
        ("string_match_part", " QWERT and ASDFG", ["qwert", "asdfg", "zxcvb", "poiuy"], 1.0),
        ("string_match_part", "nothing", ["qwert", "asdfg"], 0.0),
        ("first_int", "The pass key is 71432. Remember", ["71432"], 1.0),
        ("first_int", "The pass key is 7143 2", ["71432"], 0.0),
        ("last_int", "The return value is: -12.", ["-12"], 1.0),
        ("last_int", "-12 is not the value, 5 is", ["-12"], 0.0),
        ("first_number", "The largest number is 3.50 of them", ["3.5"], 1.0),
        ("word_match", 'The value is: "a1b2".', ["a1b2"], 1.0),
        ("word_match", "a1b2c3", ["a1b2"], 0.0),
        ("contains", "I think it is ALICE", ["Alice"], 1.0),
        ("choice", "B. The tower", ["The tower", "B"], 1.0),
        ("choice", "The answer is: C", ["the well", "C"], 1.0),
        ("choice", "I would pick D here", ["the well", "C"], 0.0),
        ("choice", "", ["the well", "C"], 0.0),
    ],
)
def test_metric(metric, prediction, answers, expected):
    assert score(metric, prediction, answers) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize(
    "prediction, answer, expected",
    [
        ("Date of birth", "Date of birth", 1.0),  # "Date" is inside the gold class name: not counted
        ("City or Date of birth", "Date of birth", 0.5),  # two classes named, the gold one among them
        ("City", "Date of birth", 0.0),
    ],
)
def test_classification(prediction, answer, expected):
    assert score("classification", prediction, [answer], classes=["Date", "Date of birth", "City"]) == expected


def test_helpers():
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert lcs_length("kitten", "sitting") == 4  # i t t n
    assert edit_similarity("kitten", "sitting") == pytest.approx(8 / 13)
    assert edit_similarity("", "") == 1.0


def test_every_metric_scores_its_own_answer_one():
    for metric in METRICS:
        answer = {"retrieval": "Paragraph 4", "retrieval_zh": "段落4", "count": "4", "choice_v2": "A"}.get(metric, "4")
        prediction = {"choice_v2": "The correct answer is (A)"}.get(metric, answer)
        assert score(metric, prediction, [answer], classes=["4"]) == 1.0, metric
