"""LongBench v1 / LongBench-E: the official templates, lengths, truncation and metrics."""

from __future__ import annotations

from typing import Any

from arkv_bench.metrics import longbench_bucket
from arkv_bench.suites.base import Sample, SuiteOptions, limited
from arkv_bench.suites.data import load_rows
from arkv_bench.tasks import TaskSpec


def build(spec: TaskSpec, options: SuiteOptions) -> list[Sample]:
    rows = limited(load_rows(spec, spec.split, options.data_dir), options.limit)
    return [Sample(sample_id=str(row.get("_id", i)), prompt=spec.prompt_template.format(**row),
                   references=list(row["answers"]), max_new_tokens=spec.max_new_tokens,
                   extra={"all_classes": row.get("all_classes"), "length": row.get("length"),
                          "bucket": longbench_bucket(row["length"]) if row.get("length") is not None else None})
            for i, row in enumerate(rows)]


def truncate_middle(tokenizer: Any, text: str, max_length: int) -> str:
    """LongBench's rule: a prompt over `max_length` tokens keeps its first and last halves."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) <= max_length:
        return text
    half = max_length // 2
    return tokenizer.decode(ids[:half], skip_special_tokens=True) + tokenizer.decode(ids[-half:], skip_special_tokens=True)
