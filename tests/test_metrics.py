"""Metric tests against hand-computed values.

Each expected number is worked out in the comment above it, from the metric's
definition (for ROUGE-L, from the `rouge` package's own formula), not by running the
code under test.
"""

from __future__ import annotations

import math

import pytest

from arkv_bench.metrics import (
    LONGBENCH_DATASET_METRIC,
    classification_score,
    code_sim_score,
    count_score,
    gsm8k_extract,
    gsm8k_normalize,
    gsm8k_score,
    longbench_bucket,
    longbench_dataset_score,
    longbench_metric_name,
    longbench_sample_score,
    mean_ci95,
    passkey_score,
    qa_f1_score,
    qa_f1_zh_score,
    retrieval_score,
    retrieval_zh_score,
    rouge_score,
    rouge_zh_score,
)

# --------------------------------------------------------------------------- English F1


def test_qa_f1_drops_articles_punctuation_and_case() -> None:
    # pred -> "cat sat on mat" (4 tokens); ref -> "cat sat on red mat" (5 tokens).
    # overlap 4: P = 1, R = 4/5, F1 = 2 * 0.8 / 1.8 = 8/9.
    assert qa_f1_score("The Cat sat, on the mat!", "a cat sat on a red mat.") == pytest.approx(8 / 9)


def test_qa_f1_counts_repeated_tokens_once_per_reference_occurrence() -> None:
    # Counter overlap of [paris, paris] and [paris] is 1: P = 1/2, R = 1, F1 = 2/3.
    assert qa_f1_score("Paris paris", "Paris") == pytest.approx(2 / 3)


def test_qa_f1_articles_only_as_whole_words() -> None:
    # "theater" keeps its "the"; the reference's article "the" is removed -> exact match.
    assert qa_f1_score("theater", "the theater") == pytest.approx(1.0)
    assert qa_f1_score("the a an", "the") == 0.0  # both normalise to no tokens


# --------------------------------------------------------------------------- Chinese F1


def test_qa_f1_zh_uses_jieba_words() -> None:
    # jieba (0.42.1, precise mode) segments:
    #   "小明在北京读书"       -> 小明 / 在 / 北京 / 读书
    #   "小明在北京大学读书。" -> 小明 / 在 / 北京大学 / 读书 / 。   ("。" normalises to "" and is dropped)
    # overlap {小明, 在, 读书} = 3: P = 3/4, R = 3/4, F1 = 0.75.
    # (A character-level F1 would give 12/15 = 0.8, so this checks word segmentation.)
    assert qa_f1_zh_score("小明在北京读书", "小明在北京大学读书。") == pytest.approx(0.75)


def test_qa_f1_zh_drops_space_and_punctuation_tokens() -> None:
    # "今天 天气很好！" -> 今天 / " " / 天气 / 很 / 好 / ！ -> after normalisation 今天 天气 很 好 (4)
    # "今天天气很好"     -> 今天天气 / 很 / 好 (3)
    # overlap {很, 好} = 2: P = 2/4, R = 2/3, F1 = 2*(1/3)/(7/6) = 4/7.
    assert qa_f1_zh_score("今天 天气很好！", "今天天气很好") == pytest.approx(4 / 7)


# --------------------------------------------------------------------------- ROUGE-L


def _rouge_pkg_f(p: float, r: float) -> float:
    """F as the `rouge` package computes it: 2PR / (P + R + 1e-8)."""
    return 2 * p * r / (p + r + 1e-8)


def test_rouge_l_matches_package_formula_with_distinct_words() -> None:
    # One sentence each (the package splits sentences on '.').
    # ref  = the cat is  on the mat    hyp = the cat sat on the mat
    # LCS = the cat on the mat (5 words), but rouge 1.0.1 defaults to exclusive=True:
    # the LCS union and the word counts are over *distinct* words.
    #   union LCS = {the, cat, on, mat} = 4
    #   m (ref distinct) = {the, cat, is, on, mat} = 5, n (hyp distinct) = 5
    # R = P = 4/5 -> F = 2*0.64/(1.6 + 1e-8) = 0.79999999500...
    # (Textbook ROUGE-L would be 5/6 = 0.8333.)
    expected = _rouge_pkg_f(4 / 5, 4 / 5)
    assert rouge_score("the cat sat on the mat", "the cat is on the mat") == pytest.approx(expected, abs=1e-6)


def test_rouge_l_identical_and_empty() -> None:
    # identical: P = R = 1 -> 2 / (2 + 1e-8), not exactly 1.
    assert rouge_score("a b c", "a b c") == pytest.approx(_rouge_pkg_f(1, 1), abs=1e-9)
    # empty hypothesis raises inside the package -> 0.
    assert rouge_score("", "a reference") == 0.0
    assert rouge_score("...", "a reference") == 0.0


def test_rouge_zh_over_jieba_words() -> None:
    # hyp: 我 / 爱 / 北京 / 天安门                                    -> 4 distinct words
    # ref: 我 / 爱 / 北京 / 天安门 / ， / 天安门 / 上 / 太阳升 / 。  -> 8 distinct words
    # ("。" is not '.', so it is one sentence.) union LCS = {我, 爱, 北京, 天安门} = 4.
    # P = 4/4, R = 4/8 -> F = 2*0.5/(1.5 + 1e-8) = 0.666666662...
    expected = _rouge_pkg_f(1.0, 0.5)
    assert rouge_zh_score("我爱北京天安门", "我爱北京天安门，天安门上太阳升。") == pytest.approx(expected, abs=1e-6)


# --------------------------------------------------------------------------- classification


CLASSES = ["sport", "sport news", "finance"]


def test_classification_drops_matches_that_are_substrings_of_reference() -> None:
    # matches: sport, sport news; "sport" is inside the reference -> dropped -> 1/1.
    assert classification_score("This is sport news.", "sport news", CLASSES) == 1.0


def test_classification_two_matches_score_half() -> None:
    # matches: sport, sport news, finance; "sport" dropped -> [sport news, finance] -> 1/2.
    assert classification_score("sport news or finance", "sport news", CLASSES) == 0.5


def test_classification_reference_not_found() -> None:
    assert classification_score("finance", "sport news", CLASSES) == 0.0


def test_classification_reproduces_official_skip_after_removal() -> None:
    # Official code removes from the list while iterating over it: after "New" is
    # removed, "York" slides into its slot and is never checked, so it stays.
    # matches [New, York, New York] -> [York, New York] -> 1/2 (a clean filter gives 1).
    assert classification_score("New York", "New York", ["New", "York", "New York"]) == 0.5


# --------------------------------------------------------------------------- retrieval / count


def test_retrieval_en() -> None:
    # numbers in pred: 12, 3 -> one equals the id 12 -> 1/2.
    assert retrieval_score("Paragraph 12, or maybe Paragraph 3", "Paragraph 12") == 0.5
    assert retrieval_score("Paragraph 12", "Paragraph 12") == 1.0
    # whole digit runs, not substrings: "1" != "12".
    assert retrieval_score("Paragraph 1", "Paragraph 12") == 0.0
    assert retrieval_score("I do not know", "Paragraph 12") == 0.0


def test_retrieval_zh() -> None:
    # numbers: 5, 15 -> 1/2.
    assert retrieval_zh_score("答案是段落5，不是段落15", "段落5") == 0.5
    assert retrieval_zh_score("段落5", "段落5") == 1.0


def test_count() -> None:
    # numbers: 7, 30 -> 1/2; integer or string reference alike.
    assert count_score("There are 7 unique paragraphs among 30.", 7) == 0.5
    assert count_score("There are 7 unique paragraphs among 30.", "7") == 0.5
    assert count_score("seven", "7") == 0.0


# --------------------------------------------------------------------------- code similarity


def test_code_sim_uses_first_line_without_fence_or_comment() -> None:
    # Leading newlines stripped; "```python" and "# comment" are skipped; the compared
    # line is "return x + 1" (12 chars) vs "return x+1" (10 chars).
    # difflib matching blocks: "return x" (8) + "+" (1) + "1" (1) = 10 chars,
    # ratio = 2*10/22 = 0.909 -> fuzz.ratio rounds to 91 -> 0.91.
    pred = "\n\n```python\n# comment\nreturn x + 1\nfoo()"
    assert code_sim_score(pred, "return x+1") == pytest.approx(0.91)


def test_code_sim_skips_slash_comments_and_handles_no_code_line() -> None:
    assert code_sim_score("y = 2  // note\nreturn x+1", "return x+1") == 1.0
    assert code_sim_score("```\n# only comments\n```", "return x+1") == 0.0


# --------------------------------------------------------------------------- per-sample LongBench


def test_metric_map_covers_21_datasets_and_e_names() -> None:
    assert len(LONGBENCH_DATASET_METRIC) == 21
    assert longbench_metric_name("qasper_e") == "qa_f1"
    assert longbench_metric_name("repobench-p_e") == "code_sim"
    assert longbench_metric_name("dureader") == "rouge_zh"
    with pytest.raises(ValueError, match="unknown LongBench dataset"):
        longbench_metric_name("not_a_dataset")


def test_multi_reference_takes_max() -> None:
    # vs "London": 0; vs "Paris, France": pred [paris], ref [paris, france]
    # -> P = 1, R = 1/2, F1 = 2/3.
    assert longbench_sample_score("hotpotqa", "Paris", ["London", "Paris, France"]) == pytest.approx(2 / 3)
    assert longbench_sample_score("hotpotqa", "Paris", []) == 0.0


def test_first_line_rule_for_triviaqa() -> None:
    pred = "\nParis\nQuestion: capital of England?\nAnswer: London"
    # Only "Paris" is scored.
    assert longbench_sample_score("triviaqa", pred, ["London"]) == 0.0
    assert longbench_sample_score("triviaqa", pred, ["Paris"]) == 1.0
    assert longbench_sample_score("triviaqa_e", pred, ["Paris"]) == 1.0
    # hotpotqa has no such rule: pred tokens [paris, question, capital, of, england,
    # answer, london] (7), ref [london]: P = 1/7, R = 1 -> F1 = 2/8 = 0.25.
    assert longbench_sample_score("hotpotqa", pred, ["London"]) == pytest.approx(0.25)


def test_first_line_rule_for_trec() -> None:
    classes = ["Date", "Location", "Number"]
    pred = "\n\nLocation\nQuestion: When was it built?\nType: Date"
    assert longbench_sample_score("trec", pred, ["Date"], classes) == 0.0
    assert longbench_sample_score("trec", pred, ["Location"], classes) == 1.0


def test_dataset_score_and_buckets() -> None:
    assert longbench_dataset_score([1.0, 0.5, 0.0]) == 50.0
    assert longbench_dataset_score([1 / 3]) == 33.33
    assert [longbench_bucket(n) for n in (0, 3999, 4000, 7999, 8000, 30000)] == [
        "0-4k", "0-4k", "4-8k", "4-8k", "8k+", "8k+",
    ]


# --------------------------------------------------------------------------- GSM8K


def test_gsm8k_extract_prefers_marker_over_last_number() -> None:
    assert gsm8k_extract("She sold 48/2 = 24 clips.\n#### 72") == "72"
    assert gsm8k_extract("The answer is 42.\n#### 40\nQuestion: 7 apples?") == "40"


def test_gsm8k_extract_last_number_with_commas_dollars_decimals() -> None:
    assert gsm8k_extract("5 apples cost $1,234.50.") == "$1,234.50"
    assert gsm8k_extract("Add 3, 4 and 5") == "5"
    assert gsm8k_extract("no digits here") is None


def test_gsm8k_extract_negative_but_not_hyphen_ranges() -> None:
    assert gsm8k_extract("The temperature fell to -5 degrees") == "-5"
    assert gsm8k_extract("#### -12") == "-12"
    assert gsm8k_extract("It takes 3-5 days") == "5"


def test_gsm8k_normalize() -> None:
    assert gsm8k_normalize("1,000.50") == "1000.5"
    assert gsm8k_normalize("3.00") == "3"
    assert gsm8k_normalize("$1,000") == "1000"
    assert gsm8k_normalize("100") == "100"  # integer zeros are kept
    assert gsm8k_normalize("10.") == "10"
    assert gsm8k_normalize("-2.50") == "-2.5"


def test_gsm8k_score() -> None:
    reference = "Janet has 16 eggs...\n#### 18"
    assert gsm8k_score("So she makes $18.00 every day.", reference) == 1.0
    assert gsm8k_score("Reasoning...\n#### 18\n\nQuestion: next", reference) == 1.0
    assert gsm8k_score("#### 17", reference) == 0.0
    assert gsm8k_score("I cannot tell.", reference) == 0.0
    assert gsm8k_score("it was -1,200 dollars", "#### -1200") == 1.0


# --------------------------------------------------------------------------- passkey / CI


def test_passkey() -> None:
    assert passkey_score("The pass key is 12345.", 12345) == 1.0
    assert passkey_score("The pass key is 1234.", "12345") == 0.0


def test_mean_ci95() -> None:
    # [1, 0, 1, 0]: mean 0.5; sample variance = 4 * 0.25 / 3 = 1/3;
    # half-width = 1.96 * sqrt(1/3) / sqrt(4) = 0.5658032...
    mean, half = mean_ci95([1.0, 0.0, 1.0, 0.0])
    assert mean == 0.5
    assert half == pytest.approx(1.96 * math.sqrt(1 / 3) / 2)
    assert half == pytest.approx(0.565803, abs=1e-6)
    assert mean_ci95([0.7]) == (0.7, 0.0)
    empty_mean, empty_half = mean_ci95([])
    assert math.isnan(empty_mean) and empty_half == 0.0
