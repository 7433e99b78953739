"""LongBench v1 / LongBench-E: the official templates, lengths, truncation and metrics."""

from __future__ import annotations

from typing import Any

from arkv_bench.metrics import longbench_bucket
from arkv_bench.suites.base import Context, PromptSuite, Sample, limited
from arkv_bench.options import RunOptions
from arkv_bench.suites.data import TEXT, TEXTS, WHOLE, load_rows, optional
from arkv_bench.tasks import TaskSpec

# what the prompt leaves for the answer and the template below the model's positions
ROOM = 64


class LongBench(PromptSuite):
    name = "longbench"
    description = "LongBench v1 (21 tasks by default) and LongBench-E (the *_e tasks)"
    extra_files = ("longbench_e",)

    def default_tasks(self, specs: dict[str, TaskSpec]) -> list[TaskSpec]:
        return [s for name, s in specs.items() if not name.endswith("_e")]

    def load(self, spec: TaskSpec, opts: RunOptions) -> None:
        build(spec, opts.limit, opts.data_dir)

    def build(self, spec: TaskSpec, ctx: Context, chat: bool) -> list[Sample]:
        samples = build(spec, ctx.opts.limit, ctx.opts.data_dir)
        limit = ctx.opts.max_length or (ctx.info.get("max_positions") or 8192) - spec.max_new_tokens - ROOM
        for s in samples:
            s.prompt = truncate_middle(ctx.tokenizer, s.prompt, limit)
        return samples


SUITE = LongBench()
# LongBench's schema (https://huggingface.co/datasets/THUDM/LongBench): the fields a prompt or a score reads
ROW = {"input": TEXT, "context": TEXT, "answers": TEXTS, "length": optional(WHOLE), "all_classes": optional(TEXTS),
       "_id": optional(TEXT)}


def build(spec: TaskSpec, limit: int | None, data_dir: str | None) -> list[Sample]:
    rows = limited(load_rows(spec, spec.split, data_dir, ROW), limit)
    return [Sample(sample_id=str(row.get("_id", i)), prompt=spec.prompt_template.format(**row),
                   question=question(spec.prompt_template, row), references=list(row["answers"]),
                   max_new_tokens=spec.max_new_tokens,
                   extra={"all_classes": row.get("all_classes"), "length": row.get("length"),
                          "bucket": longbench_bucket(row["length"]) if row.get("length") is not None else None})
            for i, row in enumerate(rows)]


def question(template: str, row: dict[str, Any]) -> str:
    """The template's text after the context, filled in: the question part of a prompt (kept whole by
    truncate_middle's last half unless it is longer than half the length)."""
    return template.split("{context}", 1)[-1].format(**row) if "{context}" in template else ""


def truncate_middle(tokenizer: Any, text: str, max_length: int) -> str:
    """LongBench's rule: a prompt over `max_length` tokens keeps its first and last halves."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) <= max_length:
        return text
    half = max_length // 2
    return tokenizer.decode(ids[:half], skip_special_tokens=True) + tokenizer.decode(ids[-half:], skip_special_tokens=True)
