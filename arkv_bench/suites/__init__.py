"""The suite registry: every module of this package that defines `SUITE` (a `Suite`) is one suite.

Adding a suite is adding one file here (and its tasks/<name>.yaml where it has declared tasks).
"""

from __future__ import annotations

import importlib
import pkgutil

from arkv_bench.options import UsageError
from arkv_bench.suites.base import Batch, Context, DataError, PromptSuite, Sample, Suite, Task

__all__ = ["Batch", "Context", "DataError", "PromptSuite", "Sample", "Suite", "Task", "get_suite", "higher_is_better",
           "suites"]

_REGISTRY: dict[str, Suite] = {}


def suites() -> dict[str, Suite]:
    """Every suite by name (modules are imported on first use)."""
    if not _REGISTRY:
        for module in pkgutil.iter_modules(__path__):
            suite = getattr(importlib.import_module(f"{__name__}.{module.name}"), "SUITE", None)
            if isinstance(suite, Suite):
                _REGISTRY[suite.name] = suite
    return _REGISTRY


def higher_is_better(name: str | None) -> bool:
    """Whether a higher score is better for the suite called `name` (unknown names: yes)."""
    found = suites().get(str(name))
    return True if found is None else found.higher_is_better


def get_suite(name: str) -> Suite:
    """The suite called `name`; UsageError listing the valid ones otherwise."""
    found = suites().get(name)
    if found is None:
        raise UsageError(f"unknown suite {name!r}; valid suites: {', '.join(sorted(suites()))}")
    return found
