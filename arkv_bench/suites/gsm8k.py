"""GSM8K: few-shot from the train split, scored by exact match of the final number."""

from __future__ import annotations

import random

from arkv_bench.metrics import gsm8k_extract
from arkv_bench.suites.base import RowSuite, Sample, limited
from arkv_bench.options import RunOptions
from arkv_bench.suites.data import TEXT, load_rows
from arkv_bench.tasks import TaskSpec


class GSM8K(RowSuite):
    name = "gsm8k"
    description = "grade-school math, few-shot, exact match of the final number"

    def samples(self, spec: TaskSpec, opts: RunOptions) -> list[Sample]:
        return build(spec, opts.num_fewshot, opts.limit, opts.data_dir)


SUITE = GSM8K()
ROW = {"question": TEXT, "answer": TEXT}


def build(spec: TaskSpec, num_fewshot: int | None, limit: int | None, data_dir: str | None) -> list[Sample]:
    """Prompts = k solved train questions, then the test question."""
    k = spec.num_fewshot if num_fewshot is None else num_fewshot
    rows = limited(load_rows(spec, spec.split, data_dir, ROW), limit)
    shots = list(load_rows(spec, spec.fewshot_split, data_dir, ROW)) if k else []
    random.Random(spec.extra.get("fewshot_seed", 1234)).shuffle(shots)
    sep, target = spec.extra.get("fewshot_delimiter", "\n\n"), spec.extra.get("target_delimiter", " ")
    context = "".join(spec.prompt_template.format(**s) + target + s["answer"] + sep for s in shots[:k])
    return [Sample(sample_id=str(i), prompt=context + spec.prompt_template.format(**row),
                   question=spec.prompt_template.format(**row), references=[row["answer"]],
                   max_new_tokens=spec.max_new_tokens,
                   extra={"gold": gsm8k_extract(row["answer"])}) for i, row in enumerate(rows)]
