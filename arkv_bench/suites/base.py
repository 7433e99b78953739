"""What a suite hands the runner: prompts with their references, and how to score an answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any



class DataError(ValueError):
    """A dataset that cannot be read: the message says which and how to provide it."""


@dataclass
class Sample:
    """One prompt. `prompt` is the user text before any chat template.

    Generation tasks compare the output with `references`. Log-likelihood tasks (`choices`
    set) feed `tail` through the cache after the prompt and pick the likeliest choice.
    """

    sample_id: str
    prompt: str
    references: list[str]
    max_new_tokens: int
    choices: list[str] | None = None
    tail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SuiteOptions:
    """Suite options from the command line (each suite uses the ones it knows)."""

    data_dir: Path | None = None
    limit: int | None = None
    num_fewshot: int | None = None
    context_lengths: list[int] | None = None
    depths: list[float] | None = None
    samples_per_cell: int | None = None
    seed: int = 0
    max_length: int | None = None  # prompt tokens a LongBench prompt is truncated to


def limited(rows: list[Any], limit: int | None) -> list[Any]:
    return rows if limit is None else rows[:limit]
