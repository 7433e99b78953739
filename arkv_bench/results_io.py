"""Read benchmark result folders (see docs/results-format.md).

Everything that consumes results (`compare`, `report`) goes through this module so that
the on-disk contract is parsed in exactly one place: numbers become numbers, and a value
that was not measured (an empty CSV cell) becomes ``None`` instead of ``0`` or ``""``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUMMARY_FILE = "summary.csv"
CONFIG_FILE = "config.json"
SAMPLES_FILE = "samples.jsonl"
LAYER_STATS_FILE = "layer_stats.csv"

# Columns that stay text; every other column of summary.csv / layer_stats.csv is numeric.
TEXT_COLUMNS = frozenset(
    {"model", "suite", "task", "quant_type", "device", "dtype", "status", "run_name"}
)


def parse_number(text: str | None) -> int | float | None:
    """Turn a CSV cell into int/float, or None when it is empty (= not measured)."""
    if text is None:
        return None
    text = text.strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None
    return None if math.isnan(value) else value  # NaN carries no measurement either


def atomic_write(path: Path, text: str) -> Path:
    """Write `text` to `path` so that a reader (or a kill) sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def csv_text(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """A CSV document; a missing or None value is an empty cell (= not measured)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    return buffer.getvalue()


@dataclass
class JsonLines:
    """What a JSONL file holds: its records (JSON objects), their lines, and the lines that are not one."""

    records: list[dict[str, Any]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    unreadable: int = 0
    torn_end: bool = False  # the last line has no newline (a write killed halfway)

    @property
    def needs_repair(self) -> bool:
        return bool(self.unreadable) or self.torn_end


def iter_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """(line, its JSON object or None when the line is not one) for every non-blank line."""
    if not path.is_file():
        return
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            yield line, record if isinstance(record, dict) else None


def read_jsonl(path: Path) -> JsonLines:
    """Every JSON object of a JSONL file (the one reader of samples.jsonl)."""
    out = JsonLines()
    for line, record in iter_jsonl(path):
        if record is None:
            out.unreadable += 1
        else:
            out.records.append(record)
            out.lines.append(line)
    if path.is_file() and path.stat().st_size:
        with path.open("rb") as handle:
            handle.seek(-1, os.SEEK_END)
            out.torn_end = handle.read(1) != b"\n"
    return out


def _cache_size_cell(text: str | None) -> int | float | str | None:
    """A cache size is a token budget (int), a fraction of the prompt (float) or 'full'."""
    if text is None or not text.strip():
        return None
    try:
        return parse_number(text)
    except ValueError:
        return text.strip()


def _parse_row(row: dict[str, str | None]) -> dict[str, Any]:
    """Type one CSV row: text columns stay str ('' -> None), the rest become numbers."""
    parsed: dict[str, Any] = {}
    for key, value in row.items():
        if key is None:  # surplus cells of a malformed line; nothing to name them by
            continue
        if key == "cache_size":
            parsed[key] = _cache_size_cell(value)
        elif key in TEXT_COLUMNS:
            parsed[key] = value.strip() if value and value.strip() else None
        else:
            try:
                parsed[key] = parse_number(value)
            except ValueError:
                parsed[key] = value  # unknown text column added later: keep it verbatim
    return parsed


def read_csv_rows(path: Path) -> list[dict[str, Any]]:
    """Typed rows of a results CSV; a missing file simply has no rows."""
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return [_parse_row(row) for row in csv.DictReader(handle)]


@dataclass
class Run:
    """One result folder: its config, summary rows, per-layer stats and (lazily) samples."""

    path: Path
    name: str
    config: dict[str, Any] = field(default_factory=dict)
    summary: list[dict[str, Any]] = field(default_factory=list)
    layer_stats: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> Run:
        """Read a run folder; config.json and layer_stats.csv are optional."""
        config_path = path / CONFIG_FILE
        config: dict[str, Any] = {}
        if config_path.is_file():
            try:
                loaded = json.loads(config_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{config_path}: invalid JSON ({exc.msg}, line {exc.lineno})") from None
            config = loaded if isinstance(loaded, dict) else {}
        return cls(
            path=path,
            name=path.name,
            config=config,
            summary=read_csv_rows(path / SUMMARY_FILE),
            layer_stats=read_csv_rows(path / LAYER_STATS_FILE),
        )

    @property
    def provenance(self) -> dict[str, Any]:
        """config.json's provenance block, or {} when the run did not record one."""
        value = self.config.get("provenance")
        return value if isinstance(value, dict) else {}

    def iter_samples(self) -> Iterator[dict[str, Any]]:
        """Stream samples.jsonl one record at a time (it can be large).

        Lines that are not a JSON object are skipped: samples are appended as each one
        finishes, so a run killed mid-write leaves a truncated last line behind.
        """
        for _, record in iter_jsonl(self.path / SAMPLES_FILE):
            if record is not None:
                yield record


def _run_dirs_under(path: Path) -> list[Path]:
    """Folders at or below `path` that hold a summary.csv."""
    if path.is_file():
        return [path.parent] if path.name == SUMMARY_FILE else []
    return [summary.parent for summary in path.rglob(SUMMARY_FILE)]


def find_runs(paths: list[Path]) -> list[Run]:
    """Every run folder (one with a summary.csv) at or below the given paths.

    A path that does not exist is an error rather than an empty result, so that a typo
    on the command line is not mistaken for "no results".
    """
    seen: set[Path] = set()
    runs: list[Run] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ValueError(f"results path does not exist: {path}")
        for run_dir in sorted(_run_dirs_under(path)):
            key = run_dir.resolve()
            if key in seen:
                continue
            seen.add(key)
            runs.append(Run.load(run_dir))
    return runs
