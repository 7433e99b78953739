"""Loading a task's rows through `datasets`: from a local JSONL/Parquet file or from the Hub.

Local files follow the Hub schema. With `--data-dir D`, a split is read from
`D/<task>/<split>.jsonl` (or .parquet), or, for the evaluation split, from `D/<task>.jsonl`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arkv_bench.models import hub_offline, hub_reachable
from arkv_bench.suites.base import DataError
from arkv_bench.tasks import TaskSpec

SUFFIXES = (".jsonl", ".json", ".parquet")
_LOADED: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}  # rows read once per run


@dataclass(frozen=True)
class Field:
    """What a row's field must hold: `check` tells, `what` says it in the error message."""

    check: Callable[[Any], bool]
    what: str
    required: bool = True


TEXT = Field(lambda v: isinstance(v, str), "text")
WHOLE = Field(lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number")
TEXTS = Field(lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of text")


def optional(kind: Field) -> Field:
    return Field(lambda v: v is None or kind.check(v), f"{kind.what} or null", required=False)


def check_rows(rows: list[dict[str, Any]], schema: dict[str, Field], where: Callable[[int], str]) -> None:
    """Every row holds each field of `schema` with the right type; DataError naming the row and field otherwise."""
    for i, row in enumerate(rows):
        for name, kind in schema.items():
            if name not in row:
                if kind.required:
                    raise DataError(f"{where(i)}: not in the Hub schema: field {name!r} is missing (it must hold "
                                    f"{kind.what}); fix the file")
            elif not kind.check(row[name]):
                value = repr(row[name])
                raise DataError(f"{where(i)}: not in the Hub schema: field {name!r} must hold {kind.what}, got "
                                f"{type(row[name]).__name__} {value[:40] + '...' if len(value) > 40 else value}; "
                                f"fix the file")


def _candidates(spec: TaskSpec, split: str, data_dir: Path) -> list[Path]:
    paths = [data_dir / spec.name / f"{split}{s}" for s in SUFFIXES]
    if split == spec.split:
        paths += [data_dir / f"{spec.name}{s}" for s in SUFFIXES]
    return paths


def load_rows(spec: TaskSpec, split: str, data_dir: str | Path | None, schema: dict[str, Field] | None = None
              ) -> list[dict[str, Any]]:
    """The rows of one split, as dicts, each checked against `schema` (read once per process)."""
    key = (spec.suite, spec.name, split, str(data_dir))
    if key not in _LOADED:
        rows, where = _read_rows(spec, split, Path(data_dir).expanduser() if data_dir else None)
        if not rows:
            raise DataError(f"{where(0).rsplit(',', 1)[0]} holds no rows: it needs one JSON object per line in the "
                            f"dataset's schema")
        check_rows(rows, schema or {}, where)
        _LOADED[key] = rows
    return _LOADED[key]


def _read_rows(spec: TaskSpec, split: str, data_dir: Path | None) -> tuple[list[dict[str, Any]], Callable[[int], str]]:
    """The rows and how to name the i-th one in a message (file and line, or dataset and row)."""
    import datasets

    datasets.utils.logging.disable_progress_bar()
    if data_dir is not None:
        found = [p for p in _candidates(spec, split, data_dir) if p.is_file()]
        if not found:
            raise DataError(f"no local file for {spec.suite}/{spec.name} split {split!r}: expected "
                            f"{data_dir / spec.name / (split + '.jsonl')} (or .parquet)")
        path = found[0]
        kind = "parquet" if path.suffix == ".parquet" else "json"
        unit = "row" if kind == "parquet" else "line"
        if not path.read_bytes().strip():
            return [], lambda i: f"{path}, {unit} {i + 1}"
        level = datasets.utils.logging.get_verbosity()
        datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)  # no logged traceback: one line
        try:
            rows = list(datasets.load_dataset(kind, data_files=str(path), split="train"))
        except Exception as e:  # noqa: BLE001 - any reader failure is a bad input file
            raise DataError(f"cannot read {path} ({_root_cause(e)}): fix the file or pass another --data-dir") from e
        finally:
            datasets.utils.logging.set_verbosity(level)
        return rows, lambda i: f"{path}, {unit} {i + 1}"
    hint = (f"dataset {spec.hub_id} ({spec.config or 'default'}, {split}) is not available offline; "
            f"download it where the Hub is reachable, or pass --data-dir with {spec.name}/{split}.jsonl in the Hub schema")
    offline = hub_offline("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    if not _in_cache(spec.hub_id) and (offline or not hub_reachable()):
        # fail in seconds, not after huggingface_hub's 25-second retry loop
        why = "is not available offline" if offline else "cannot be downloaded (the Hub cannot be reached)"
        raise DataError(hint.replace("is not available offline", why))
    try:
        rows = list(datasets.load_dataset(spec.hub_id, spec.config, split=split))
    except Exception as e:  # noqa: BLE001 - network, missing config, script-based repo...
        raise DataError(f"{hint} ({type(e).__name__})") from e
    return rows, lambda i: f"{spec.hub_id} ({spec.config or 'default'}, {split}), row {i + 1}"


def _root_cause(e: BaseException) -> str:
    """The first line of the innermost error (datasets wraps the reader's in a generic one)."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _in_cache(hub_id: str | None) -> bool:
    """Whether `datasets` may have this dataset cached locally."""
    import datasets

    cache = Path(datasets.config.HF_DATASETS_CACHE)
    return hub_id is not None and any(cache.glob(hub_id.replace("/", "___") + "*"))
