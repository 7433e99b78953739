"""Loading a task's rows through `datasets`: from a local JSONL/Parquet file or from the Hub.

Local files follow the Hub schema. With `--data-dir D`, a split is read from
`D/<task>/<split>.jsonl` (or .parquet), or, for the evaluation split, from `D/<task>.jsonl`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from arkv_bench.models import hub_offline, hub_reachable
from arkv_bench.suites.base import DataError
from arkv_bench.tasks import TaskSpec

SUFFIXES = (".jsonl", ".json", ".parquet")


def _candidates(spec: TaskSpec, split: str, data_dir: Path) -> list[Path]:
    paths = [data_dir / spec.name / f"{split}{s}" for s in SUFFIXES]
    if split == spec.split:
        paths += [data_dir / f"{spec.name}{s}" for s in SUFFIXES]
    return paths


def load_rows(spec: TaskSpec, split: str, data_dir: str | Path | None) -> list[dict[str, Any]]:
    """The rows of one split, as dicts."""
    import datasets

    data_dir = Path(data_dir).expanduser() if data_dir else None

    datasets.utils.logging.disable_progress_bar()
    if data_dir is not None:
        found = [p for p in _candidates(spec, split, data_dir) if p.is_file()]
        if not found:
            raise DataError(f"no local file for {spec.suite}/{spec.name} split {split!r}: expected "
                            f"{data_dir / spec.name / (split + '.jsonl')} (or .parquet)")
        path = found[0]
        kind = "parquet" if path.suffix == ".parquet" else "json"
        level = datasets.utils.logging.get_verbosity()
        datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)  # no logged traceback: one line
        try:
            return list(datasets.load_dataset(kind, data_files=str(path), split="train"))
        except Exception as e:  # noqa: BLE001 - any reader failure is a bad input file
            raise DataError(f"cannot read {path} ({_root_cause(e)}): fix the file or pass another --data-dir") from e
        finally:
            datasets.utils.logging.set_verbosity(level)
    hint = (f"dataset {spec.hub_id} ({spec.config or 'default'}, {split}) is not available offline; "
            f"download it where the Hub is reachable, or pass --data-dir with {spec.name}/{split}.jsonl in the Hub schema")
    offline = hub_offline("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    if not _in_cache(spec.hub_id) and (offline or not hub_reachable()):
        # fail in seconds, not after huggingface_hub's 25-second retry loop
        why = "is not available offline" if offline else "cannot be downloaded (the Hub cannot be reached)"
        raise DataError(hint.replace("is not available offline", why))
    try:
        return list(datasets.load_dataset(spec.hub_id, spec.config, split=split))
    except Exception as e:  # noqa: BLE001 - network, missing config, script-based repo...
        raise DataError(f"{hint} ({type(e).__name__})") from e


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
