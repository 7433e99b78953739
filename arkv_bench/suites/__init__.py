"""Suites: turn a task definition (tasks/*.yaml) into prompts, and score answers."""

from __future__ import annotations

from typing import Any

from arkv_bench.metrics import gsm8k_score, longbench_sample_score, passkey_score
from arkv_bench.suites import gsm8k, longbench, mmlu
from arkv_bench.suites.base import DataError, Sample, SuiteOptions
from arkv_bench.suites.passkey import make_passkey_samples
from arkv_bench.tasks import TaskSpec

SUITES = ("passkey", "gsm8k", "mmlu", "longbench", "longbench_e")

__all__ = ["SUITES", "DataError", "Sample", "SuiteOptions", "build_samples", "score"]


def _passkey(spec: TaskSpec, options: SuiteOptions, tokenizer: Any, chat: bool) -> list[Sample]:
    extra = spec.extra
    made = make_passkey_samples(tokenizer, options.context_lengths or list(extra["context_lengths"]),
                                options.depths or list(extra["depths"]),
                                options.samples_per_cell or extra.get("samples_per_cell", 1), options.seed, chat)
    samples = [Sample(sample_id=s.sample_id, prompt=s.prompt, references=[s.key], max_new_tokens=spec.max_new_tokens,
                      extra={"context_length": s.context_length, "depth": s.depth,
                             "needle_token_depth": s.needle_token_depth})
               for s in made]
    return samples if options.limit is None else samples[:options.limit]


def build_samples(spec: TaskSpec, options: SuiteOptions, tokenizer: Any, chat: bool) -> list[Sample]:
    """The prompts of one task."""
    if spec.suite == "passkey":
        return _passkey(spec, options, tokenizer, chat)
    builders = {"gsm8k": gsm8k.build, "mmlu": mmlu.build, "longbench": longbench.build,
                "longbench_e": longbench.build}
    try:
        return builders[spec.suite](spec, options)
    except (KeyError, IndexError, TypeError, AttributeError) as e:  # a row that is not in the Hub schema
        where = f"--data-dir {options.data_dir}" if options.data_dir else spec.hub_id
        raise DataError(f"{spec.suite}/{spec.name}: the rows from {where} are not in the Hub schema "
                        f"({type(e).__name__}: {e}); fix the file to have the dataset's fields") from e


def score(spec: TaskSpec, sample: Sample, prediction: str) -> float:
    """One answer's score in [0, 1], with the task's official metric."""
    if spec.metric == "passkey":
        return passkey_score(prediction, sample.references[0])
    if spec.metric == "gsm8k":
        return gsm8k_score(prediction, sample.references[0])
    if spec.metric == "accuracy":
        return float(prediction.strip() == sample.references[0])
    return longbench_sample_score(spec.name, prediction, sample.references, sample.extra.get("all_classes"))
