"""Declarative task definitions: one YAML file per suite under the repo's ``tasks/``.

A suite file (``tasks/<suite>.yaml``) has two top-level keys:

``defaults``
    Field values shared by every task of the suite (optional).
``tasks``
    A mapping from task name to that task's fields, which override the defaults. The
    ``extra`` mapping is merged key by key (task keys win) rather than replaced.

Fields are those of :class:`TaskSpec` except ``name`` and ``suite``, which come from the
task's key and the file's name. Keeping prompts, lengths and metrics as data (not code)
lets reviewers diff them against the benchmark's official definitions. Any key not
listed is rejected, so a typo cannot silently fall back to a default.

The folder is ``<repo>/tasks`` unless the ``ARKV_BENCH_TASKS`` environment variable
names another one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from arkv_bench.metrics import METRIC_NAMES

__all__ = ["TaskSpec", "available_suites", "load_task_specs", "tasks_dir"]

TASKS_ENV_VAR = "ARKV_BENCH_TASKS"


@dataclass(frozen=True)
class TaskSpec:
    """Everything needed to build prompts for one task and score its outputs."""

    name: str
    suite: str
    hub_id: str | None  # Hugging Face dataset repo; None for generated tasks (passkey)
    config: str | None  # dataset config (subset) name
    split: str | None  # evaluation split
    prompt_template: str  # str.format template over the dataset row's fields
    max_new_tokens: int  # generation budget; 0 for log-likelihood tasks
    metric: str  # a name in arkv_bench.metrics.METRIC_NAMES
    chat_template: bool = True  # wrap the prompt in the model's chat template (if any)
    fewshot_split: str | None = None
    num_fewshot: int = 0
    stop: tuple[str, ...] = ()  # generation stops at the first of these strings
    extra: dict[str, Any] = field(default_factory=dict, hash=False)  # suite-specific data


_REQUIRED = ("prompt_template", "max_new_tokens", "metric")
_OPTIONAL_DEFAULTS: dict[str, Any] = {
    "hub_id": None,
    "config": None,
    "split": None,
    "chat_template": True,
    "fewshot_split": None,
    "num_fewshot": 0,
    "stop": (),
    "extra": {},
}
_TASK_KEYS = frozenset(_REQUIRED) | frozenset(_OPTIONAL_DEFAULTS)
_FILE_KEYS = frozenset({"defaults", "tasks"})

# Expected Python type of each field after YAML parsing (None is allowed where the
# default is None).
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "hub_id": str,
    "config": str,
    "split": str,
    "prompt_template": str,
    "max_new_tokens": int,
    "metric": str,
    "chat_template": bool,
    "fewshot_split": str,
    "num_fewshot": int,
    "stop": (list, tuple),
    "extra": dict,
}


def tasks_dir() -> Path:
    """The folder holding the suite YAML files (``$ARKV_BENCH_TASKS`` or ``<repo>/tasks``)."""
    override = os.environ.get(TASKS_ENV_VAR)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[1] / "tasks"


def available_suites() -> list[str]:
    """Suite names: the stems of the ``*.yaml`` files in :func:`tasks_dir`."""
    return sorted(path.stem for path in tasks_dir().glob("*.yaml"))


def load_task_specs(suite: str) -> dict[str, TaskSpec]:
    """All tasks of ``suite``, by task name, in file order.

    Raises ValueError for an unknown suite (listing the valid ones), for a key the
    schema does not know (naming the key and the file), and for a missing or
    mistyped field.
    """
    path = tasks_dir() / f"{suite}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown suite {suite!r}; valid suites: {', '.join(available_suites())}")
    document = _read_yaml_mapping(path)
    _reject_unknown(document, _FILE_KEYS, path, where="top level")
    defaults = document.get("defaults") or {}
    tasks = document.get("tasks") or {}
    if not isinstance(defaults, dict) or not isinstance(tasks, dict):
        raise ValueError(f"{path}: 'defaults' and 'tasks' must be mappings")
    _reject_unknown(defaults, _TASK_KEYS, path, where="defaults")
    if not tasks:
        raise ValueError(f"{path}: no tasks defined")
    return {
        str(name): _build_spec(str(name), suite, defaults, entry, path)
        for name, entry in tasks.items()
    }


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as handle:
        document = yaml.safe_load(handle)
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return document


def _reject_unknown(mapping: dict[str, Any], allowed: frozenset[str], path: Path, where: str) -> None:
    for key in mapping:
        if key not in allowed:
            raise ValueError(
                f"{path}: unknown key {key!r} in {where}; allowed keys: {', '.join(sorted(allowed))}"
            )


def _build_spec(
    name: str, suite: str, defaults: dict[str, Any], entry: Any, path: Path
) -> TaskSpec:
    """Merge defaults and one task entry, then validate and freeze it."""
    if entry is None:
        entry = {}
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: task {name!r} must be a mapping")
    _reject_unknown(entry, _TASK_KEYS, path, where=f"task {name!r}")

    fields: dict[str, Any] = {**_OPTIONAL_DEFAULTS, **defaults, **entry}
    fields["extra"] = {**(defaults.get("extra") or {}), **(entry.get("extra") or {})}
    for key in _REQUIRED:
        if key not in fields:
            raise ValueError(f"{path}: task {name!r} is missing required key {key!r}")
    for key, value in fields.items():
        _check_type(key, value, path, name)
    if fields["metric"] not in METRIC_NAMES:
        raise ValueError(
            f"{path}: task {name!r} has unknown metric {fields['metric']!r}; "
            f"known: {', '.join(sorted(METRIC_NAMES))}"
        )
    fields["stop"] = tuple(fields["stop"])
    return TaskSpec(name=name, suite=suite, **fields)


def _check_type(key: str, value: Any, path: Path, task: str) -> None:
    if value is None and _OPTIONAL_DEFAULTS.get(key, ...) is None:
        return
    expected = _FIELD_TYPES[key]
    # bool is a subclass of int; "max_new_tokens: true" must not pass as 1.
    wrong_bool = isinstance(value, bool) and expected is int
    if wrong_bool or not isinstance(value, expected):
        raise ValueError(f"{path}: task {task!r} key {key!r} has a value of the wrong type: {value!r}")
    if key == "stop" and not all(isinstance(s, str) for s in value):
        raise ValueError(f"{path}: task {task!r} key 'stop' must be a list of strings")
