"""MMLU: 5-shot from the dev split; the answer letter is picked by log-likelihood.

The question and its choices are prefilled through the method's (compressed) cache; the
final "Answer:" is then fed through that cache, so compression affects the letter's odds.
"""

from __future__ import annotations

from arkv_bench.suites.base import RowSuite, Sample, limited
from arkv_bench.options import RunOptions
from arkv_bench.suites.data import TEXT, TEXTS, WHOLE, load_rows
from arkv_bench.tasks import TaskSpec

TAIL = "Answer:"


def _question(spec: TaskSpec, row: dict) -> str:
    a, b, c, d = row["choices"]
    return spec.prompt_template.format(question=row["question"], choice_a=a, choice_b=b, choice_c=c, choice_d=d)


class MMLU(RowSuite):
    name = "mmlu"
    description = "multiple choice, 5-shot, the answer letter picked by log-likelihood through the cache"

    def samples(self, spec: TaskSpec, opts: RunOptions) -> list[Sample]:
        return build(spec, opts.num_fewshot, opts.limit, opts.data_dir)


SUITE = MMLU()
ROW = {"question": TEXT, "choices": TEXTS, "answer": WHOLE}


def build(spec: TaskSpec, num_fewshot: int | None, limit: int | None, data_dir: str | None) -> list[Sample]:
    k = spec.num_fewshot if num_fewshot is None else num_fewshot
    letters = list(spec.extra.get("choices", ["A", "B", "C", "D"]))
    target, sep = spec.extra.get("target_delimiter", " "), spec.extra.get("fewshot_delimiter", "\n\n")
    rows = limited(load_rows(spec, spec.split, data_dir, ROW), limit)
    shots = load_rows(spec, spec.fewshot_split, data_dir, ROW)[:k] if k else []
    header = spec.extra.get("description", "").format(subject=(spec.config or spec.name).replace("_", " "))
    context = header + "".join(_question(spec, s) + target + letters[s["answer"]] + sep for s in shots)
    samples = []
    for i, row in enumerate(rows):
        full = context + _question(spec, row)
        if not full.endswith(TAIL):
            raise ValueError(f"mmlu prompt_template must end with {TAIL!r}")
        samples.append(Sample(sample_id=str(i), prompt=full[:-len(TAIL)], tail=TAIL,
                              question=_question(spec, row)[:-len(TAIL)],
                              references=[letters[row["answer"]]], max_new_tokens=0,
                              choices=[target + letter for letter in letters]))
    return samples
