"""Scoring metrics for every suite arkv-bench runs.

LongBench v1 scores here reproduce the official LongBench scorer sample by sample
(same normalisation, same tokenisation, same third-party ROUGE and fuzzy-match
packages), because published LongBench tables are only comparable when the scorer is
identical. Its quirks are kept on purpose and are pointed out where they occur.

All per-sample scores are floats in [0, 1]; suites report ``100 * mean``.
"""

from __future__ import annotations

import math
import re
import string
import warnings
from collections import Counter
from collections.abc import Callable, Sequence

from functools import cache


@cache
def _jieba():
    """jieba, imported on first use (it is slow to import and only the Chinese metrics need it)."""
    import jieba

    jieba.setLogLevel(60)  # silence "Building prefix dict ..." on first use
    return jieba


@cache
def _rouge():
    from rouge import Rouge

    return Rouge()


@cache
def _fuzz():
    with warnings.catch_warnings():
        # fuzzywuzzy warns when python-Levenshtein is absent. The pure-python difflib
        # backend is what LongBench's own requirements install, so it is the one we want.
        warnings.simplefilter("ignore", UserWarning)
        from fuzzywuzzy import fuzz
    return fuzz

__all__ = [
    "LONGBENCH_DATASET_METRIC",
    "LONGBENCH_FIRST_LINE_DATASETS",
    "METRIC_NAMES",
    "classification_score",
    "code_sim_score",
    "count_score",
    "gsm8k_extract",
    "gsm8k_normalize",
    "gsm8k_score",
    "longbench_bucket",
    "longbench_dataset_score",
    "longbench_metric_name",
    "longbench_sample_score",
    "mean_ci95",
    "passkey_score",
    "qa_f1_score",
    "qa_f1_zh_score",
    "retrieval_score",
    "retrieval_zh_score",
    "rouge_score",
    "rouge_zh_score",
]

# --------------------------------------------------------------------------- #
# Text normalisation (LongBench / SQuAD style)
# --------------------------------------------------------------------------- #

_EN_PUNCTUATION = frozenset(string.punctuation)
# Full-width and CJK punctuation that LongBench's Chinese normaliser removes, plus '.'.
_ZH_EXTRA_PUNCTUATION = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】"
    "〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_ZH_PUNCTUATION = frozenset(string.punctuation + _ZH_EXTRA_PUNCTUATION)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _normalize_en(text: str) -> str:
    """Lowercase, drop ASCII punctuation, drop articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _EN_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _normalize_zh(text: str) -> str:
    """Lowercase, drop Chinese and ASCII punctuation, drop all whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _ZH_PUNCTUATION)
    return "".join(text.split())


def _jieba_tokens(text: str) -> list[str]:
    """jieba's precise-mode segmentation (the mode LongBench uses)."""
    return list(_jieba().cut(text, cut_all=False))


def _token_f1(pred_tokens: Sequence[str], ref_tokens: Sequence[str]) -> float:
    """Bag-of-tokens F1: overlap counted with multiplicity (Counter intersection)."""
    overlap = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------- #
# LongBench v1 metrics
# --------------------------------------------------------------------------- #


def qa_f1_score(prediction: str, reference: str) -> float:
    """English QA token F1 after SQuAD-style normalisation (LongBench ``qa_f1_score``)."""
    return _token_f1(_normalize_en(prediction).split(), _normalize_en(reference).split())


def qa_f1_zh_score(prediction: str, reference: str) -> float:
    """Chinese QA token F1 over jieba words (LongBench ``qa_f1_zh_score``).

    Segmentation happens before normalisation, so a punctuation token becomes empty
    and is dropped rather than merging its neighbours.
    """

    def tokens(text: str) -> list[str]:
        normalised = (_normalize_zh(tok) for tok in _jieba_tokens(text))
        return [tok for tok in normalised if tok]

    return _token_f1(tokens(prediction), tokens(reference))


def rouge_score(prediction: str, reference: str) -> float:
    """ROUGE-L F from the ``rouge`` package, exactly as LongBench calls it.

    Note the package's own behaviour (kept, since it defines the official number):
    text is split into sentences on '.', ROUGE-L is the summary-level union-LCS over
    *distinct* words (``exclusive=True`` counts each word type once), and
    F = 2PR / (P + R + 1e-8). Any exception scores 0: an empty prediction, and also a
    RecursionError from the package's recursive LCS walk once a '.'-free stretch of
    prediction plus reference reaches roughly 1000 words (Python's default recursion
    limit), which the official scorer shares.
    """
    try:
        scores = _rouge().get_scores([prediction], [reference], avg=True)
    except Exception:  # noqa: BLE001 - the official scorer maps every failure to 0
        return 0.0
    return float(scores["rouge-l"]["f"])


def rouge_zh_score(prediction: str, reference: str) -> float:
    """Chinese ROUGE-L: jieba words joined by spaces, then :func:`rouge_score`."""
    return rouge_score(" ".join(_jieba_tokens(prediction)), " ".join(_jieba_tokens(reference)))


def classification_score(prediction: str, reference: str, all_classes: Sequence[str]) -> float:
    """Few-shot classification score (LongBench ``classification_score``; trec, lsht).

    Every class name occurring in the prediction is a match; matches that are a proper
    substring of the reference are dropped (so "Date" does not compete with
    "Other date"). Score = 1/len(matches) when the reference is among them, else 0.

    The official code removes items from the list it is iterating over, which skips the
    element right after each removed one. We reproduce that walk so that per-sample
    scores match the official ones even in that corner case.
    """
    matches = [name for name in all_classes if name in prediction]
    i = 0
    while i < len(matches):
        if matches[i] in reference and matches[i] != reference:
            del matches[i]  # the next element slides into slot i and is skipped below
        i += 1
    return 1.0 / len(matches) if reference in matches else 0.0


def _fraction_equal(prediction: str, target: str) -> float:
    """Fraction of the digit runs in ``prediction`` that equal ``target`` (0 if none)."""
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(number == target for number in numbers) / len(numbers)


def _retrieval(prediction: str, reference: str, pattern: str) -> float:
    found = re.findall(pattern, reference)
    if not found:
        raise ValueError(f"reference {reference!r} has no paragraph id matching {pattern!r}")
    return _fraction_equal(prediction, found[0])


def retrieval_score(prediction: str, reference: str) -> float:
    """passage_retrieval_en: share of numbers in the prediction equal to the "Paragraph N" id."""
    return _retrieval(prediction, reference, r"Paragraph (\d+)")


def retrieval_zh_score(prediction: str, reference: str) -> float:
    """passage_retrieval_zh: as :func:`retrieval_score` with the "段落N" id."""
    return _retrieval(prediction, reference, r"段落(\d+)")


def count_score(prediction: str, reference: str | int) -> float:
    """passage_count: share of numbers in the prediction equal to the reference count."""
    return _fraction_equal(prediction, str(reference))


def code_sim_score(prediction: str, reference: str) -> float:
    """Code completion similarity (lcc, repobench-p): ``fuzz.ratio / 100``.

    Only the first line of the prediction that holds none of '`', '#', '//' is compared,
    which skips markdown fences and comments a chat model tends to emit first. If no
    line qualifies the prediction is the empty string.
    """
    lines = prediction.lstrip("\n").split("\n")
    first_code_line = next(
        (line for line in lines if "`" not in line and "#" not in line and "//" not in line), ""
    )
    return _fuzz().ratio(first_code_line, reference) / 100


# --------------------------------------------------------------------------- #
# LongBench dataset -> metric
# --------------------------------------------------------------------------- #

# Uniform call signature (prediction, reference, all_classes) for every LongBench metric.
_LongBenchMetric = Callable[[str, str, Sequence[str]], float]

_LONGBENCH_METRIC_FNS: dict[str, _LongBenchMetric] = {
    "qa_f1": lambda p, r, c: qa_f1_score(p, r),
    "qa_f1_zh": lambda p, r, c: qa_f1_zh_score(p, r),
    "rouge": lambda p, r, c: rouge_score(p, r),
    "rouge_zh": lambda p, r, c: rouge_zh_score(p, r),
    "classification": classification_score,
    "retrieval": lambda p, r, c: retrieval_score(p, r),
    "retrieval_zh": lambda p, r, c: retrieval_zh_score(p, r),
    "count": lambda p, r, c: count_score(p, r),
    "code_sim": lambda p, r, c: code_sim_score(p, r),
}

LONGBENCH_DATASET_METRIC: dict[str, str] = {
    "narrativeqa": "qa_f1",
    "qasper": "qa_f1",
    "multifieldqa_en": "qa_f1",
    "multifieldqa_zh": "qa_f1_zh",
    "hotpotqa": "qa_f1",
    "2wikimqa": "qa_f1",
    "musique": "qa_f1",
    "dureader": "rouge_zh",
    "gov_report": "rouge",
    "qmsum": "rouge",
    "multi_news": "rouge",
    "vcsum": "rouge_zh",
    "trec": "classification",
    "triviaqa": "qa_f1",
    "samsum": "rouge",
    "lsht": "classification",
    "passage_count": "count",
    "passage_retrieval_en": "retrieval",
    "passage_retrieval_zh": "retrieval_zh",
    "lcc": "code_sim",
    "repobench-p": "code_sim",
}
"""LongBench v1 dataset name -> metric name (the keys of the official ``dataset2metric``)."""

LONGBENCH_FIRST_LINE_DATASETS: frozenset[str] = frozenset({"trec", "triviaqa", "samsum", "lsht"})
"""Few-shot datasets whose prediction is cut to its first line: models tend to keep
writing further few-shot examples after the answer."""

METRIC_NAMES: frozenset[str] = frozenset(_LONGBENCH_METRIC_FNS) | {"gsm8k", "passkey", "accuracy", "ruler", "perplexity"}
"""Every metric name a task definition may use."""


def _longbench_base_name(dataset: str) -> str:
    """LongBench-E configs are named ``<dataset>_e`` and are scored like ``<dataset>``."""
    base = dataset[:-2] if dataset.endswith("_e") else dataset
    if base not in LONGBENCH_DATASET_METRIC:
        raise ValueError(
            f"unknown LongBench dataset {dataset!r}; known: {sorted(LONGBENCH_DATASET_METRIC)}"
        )
    return base


def longbench_metric_name(dataset: str) -> str:
    """Metric name of a LongBench or LongBench-E (``*_e``) dataset."""
    return LONGBENCH_DATASET_METRIC[_longbench_base_name(dataset)]


def longbench_sample_score(
    dataset: str,
    prediction: str,
    answers: Sequence[str],
    all_classes: Sequence[str] | None = None,
) -> float:
    """Official per-sample LongBench score: the best score over all reference answers.

    For trec, triviaqa, samsum and lsht only the first line of the prediction (after
    leading newlines are stripped) is scored. ``all_classes`` is needed by trec/lsht.
    """
    base = _longbench_base_name(dataset)
    metric = _LONGBENCH_METRIC_FNS[LONGBENCH_DATASET_METRIC[base]]
    if base in LONGBENCH_FIRST_LINE_DATASETS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    classes = list(all_classes or [])
    return max((metric(prediction, answer, classes) for answer in answers), default=0.0)


def longbench_dataset_score(scores: Sequence[float]) -> float:
    """Official per-dataset number: ``round(100 * mean, 2)`` (0.0 for no samples)."""
    if not scores:
        return 0.0
    return round(100 * sum(scores) / len(scores), 2)


def longbench_bucket(length: int) -> str:
    """LongBench-E length bucket of a sample's ``length`` field: "0-4k", "4-8k" or "8k+"."""
    if length < 4000:
        return "0-4k"
    if length < 8000:
        return "4-8k"
    return "8k+"


# --------------------------------------------------------------------------- #
# GSM8K
# --------------------------------------------------------------------------- #

# A number as written in GSM8K answers and model output: an optional minus sign (not
# a hyphen glued to a preceding word or number, as in "3-5"), an optional '$', digits
# with optional thousands separators, optional decimals: "-$1,234.50", "18", ".5".
_NUMBER = re.compile(r"(?:(?<!\w)-)?\$?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<!\d)\.\d+)")


def _numbers(text: str) -> list[str]:
    """Every number in ``text``, in order, as written."""
    return _NUMBER.findall(text)


def gsm8k_extract(text: str) -> str | None:
    """The final answer in a GSM8K solution: the number after "####", else the last number.

    GSM8K references always end in "#### N"; models prompted with 8 shots usually copy
    that marker, and otherwise the last number they write is their answer.
    """
    marker = text.find("####")
    if marker != -1:
        after = _numbers(text[marker + 4 :])
        if after:
            return after[0]
    found = _numbers(text)
    return found[-1] if found else None


def gsm8k_normalize(num: str) -> str:
    """Canonical string form so that "1,000.50", "$1000.5" and "1000.50" compare equal."""
    num = num.strip().replace(",", "").replace("$", "").lstrip("+")
    if num.startswith("-."):
        num = "-0" + num[1:]
    elif num.startswith("."):
        num = "0" + num
    if "." in num:
        num = num.rstrip("0").rstrip(".")
    return "0" if num == "-0" else num


def gsm8k_score(prediction: str, reference_answer_text: str) -> float:
    """1.0 if the prediction's final number equals the reference's "#### N" number."""
    predicted = gsm8k_extract(prediction)
    expected = gsm8k_extract(reference_answer_text)
    if predicted is None or expected is None:
        return 0.0
    return float(gsm8k_normalize(predicted) == gsm8k_normalize(expected))


# --------------------------------------------------------------------------- #
# passkey and aggregation
# --------------------------------------------------------------------------- #


def passkey_score(prediction: str, key: str | int) -> float:
    """1.0 if the pass key's digits appear anywhere in the prediction."""
    return float(str(key) in prediction)


def mean_ci95(scores: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% normal-approximation confidence interval.

    Half-width = 1.96 * sample standard deviation (n - 1) / sqrt(n); 0.0 when n < 2
    because one sample says nothing about spread. The mean of no scores is NaN so that
    an empty configuration is never mistaken for a score of 0.
    """
    n = len(scores)
    if n == 0:
        return math.nan, 0.0
    mean = sum(scores) / n
    if n < 2:
        return mean, 0.0
    variance = sum((s - mean) ** 2 for s in scores) / (n - 1)
    return mean, 1.96 * math.sqrt(variance) / math.sqrt(n)
