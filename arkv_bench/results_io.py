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
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arkv_bench.options import UsageError

SUMMARY_FILE = "summary.csv"
CONFIG_FILE = "config.json"
SAMPLES_FILE = "samples.jsonl"
LAYER_STATS_FILE = "layer_stats.csv"

# Columns that stay text; every other column of summary.csv / layer_stats.csv is numeric.
TEXT_COLUMNS = frozenset(
    {"model", "suite", "task", "quant_type", "device", "dtype", "status", "run_name", "protocol"}
)
# Columns every summary.csv has had since the first release, and the numeric ones a reader relies on
# (a later column that is not listed here is kept verbatim).
SUMMARY_REQUIRED = ("model", "suite", "task", "quant_type", "cache_size", "n", "score")
NUMERIC_COLUMNS = frozenset(
    {"window_size", "n", "score", "score_ci95", "prefill_tok_s", "decode_tok_s", "ttft_ms", "itl_ms_p50",
     "itl_ms_p99", "kv_bytes", "kv_bytes_full", "kv_ratio", "peak_mem_bytes", "compressed_frac", "evicted_frac",
     "quantized_frac", "host_bytes", "weights_bytes", "layer", "oq_score", "oq_ratio", "original_frac"}
)


def check_writable_folder(path: Path, what: str) -> None:
    """`path` is (or can be made) a folder this process may write into; UsageError (a ValueError) otherwise."""
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{what} {path}: {existing} is a file, not a folder; choose another {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path}: {existing} is not writable; choose another {what} or fix its permissions")


def check_writable_file(path: Path, what: str) -> Path:
    """`path` can be written as a file (its folder is or can be made a folder we may write); UsageError otherwise."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder: name a file")
    check_writable_folder(path.parent, what)
    return path


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
    duplicates: int = 0  # records whose key an earlier line already had (read_samples only)
    torn_end: bool = False  # the last line has no newline (a write killed halfway)

    @property
    def needs_repair(self) -> bool:
        return bool(self.unreadable or self.duplicates) or self.torn_end

    def dropped(self, path: Path) -> str | None:
        """A note on what reading left out, or None when nothing was."""
        parts = [f"{n} {what}" for n, what in ((self.duplicates, "duplicate record(s) (same configuration and "
                                                                "sample; the first is kept)"),
                                               (self.unreadable, "unreadable line(s)")) if n]
        return f"{path}: left out {' and '.join(parts)}" if parts else None


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


def record_key(record: dict[str, Any]) -> tuple[str, str, str, str, str]:
    """What identifies a sample record: (task, sample id, method, cache size, protocol); records written
    before protocols existed are query-aware."""
    size = record.get("cache_size")
    return (str(record.get("task")), str(record.get("sample_id")), str(record.get("quant_type")),
            "" if size is None else str(size), str(record.get("protocol") or "query-aware"))


def read_samples(path: Path) -> JsonLines:
    """samples.jsonl: one record per (configuration, sample), the first of each; the others are counted,
    so no figure can be inflated by a line written twice."""
    contents = read_jsonl(path)
    seen: set[tuple[str, str, str, str]] = set()
    kept = JsonLines(unreadable=contents.unreadable, torn_end=contents.torn_end)
    for record, line in zip(contents.records, contents.lines):
        key = record_key(record)
        if key in seen:
            kept.duplicates += 1
            continue
        seen.add(key)
        kept.records.append(record)
        kept.lines.append(line)
    return kept


def sample_files(folder: Path) -> list[Path]:
    """A run's sample logs: samples.jsonl, then one per rank of a data-parallel run (samples.rankN.jsonl)."""
    ranked = sorted(folder.glob("samples.rank*.jsonl"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    return [p for p in (folder / SAMPLES_FILE, *ranked) if p.is_file()]


def read_run_samples(folder: Path) -> list[dict[str, Any]]:
    """Every sample record of a run, over all its sample logs, one per (configuration, sample)."""
    seen: set[tuple[str, str, str, str]] = set()
    records = []
    for path in sample_files(folder):
        for record in read_samples(path).records:
            if record_key(record) not in seen:
                seen.add(record_key(record))
                records.append(record)
    return records


def _cache_size_cell(text: str | None) -> int | float | str | None:
    """A cache size is a token budget (int), a fraction of the prompt (float) or 'full'."""
    if text is None or not text.strip():
        return None
    try:
        return parse_number(text)
    except ValueError:
        return text.strip()


def _parse_row(row: dict[str, str | None], where: str) -> dict[str, Any]:
    """Type one CSV row: text columns stay str ('' -> None), the rest become numbers (ValueError naming the
    file, line and column when a known numeric column holds text)."""
    parsed: dict[str, Any] = {}
    for key, value in row.items():
        if key is None:
            raise ValueError(f"{where}: more cells than columns; fix or remove the file")
        if key == "cache_size":
            parsed[key] = _cache_size_cell(value)
        elif key in TEXT_COLUMNS:
            parsed[key] = value.strip() if value and value.strip() else None
        else:
            try:
                parsed[key] = parse_number(value)
            except ValueError:
                if key in NUMERIC_COLUMNS:
                    raise ValueError(f"{where}: column {key} holds {value!r}, not a number; fix or remove the "
                                     f"file") from None
                parsed[key] = value  # unknown text column added later: keep it verbatim
    return parsed


def read_csv_rows(path: Path, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Typed rows of a results CSV; a missing file simply has no rows. ValueError for a header without the
    `required` columns or a cell of the wrong type."""
    if not path.is_file():
        return []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path} is not a summary.csv of arkv-bench (no column {', '.join(missing)}); "
                                 f"remove it or rerun the run")
            return [_parse_row(row, f"{path}, line {reader.line_num}") for row in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path} cannot be read as CSV ({e}); remove it or rerun the run") from None


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
            summary=read_csv_rows(path / SUMMARY_FILE, SUMMARY_REQUIRED),
            layer_stats=read_csv_rows(path / LAYER_STATS_FILE),
        )

    @property
    def provenance(self) -> dict[str, Any]:
        """config.json's provenance block, or {} when the run did not record one."""
        value = self.config.get("provenance")
        return value if isinstance(value, dict) else {}

    def iter_samples(self) -> Iterator[dict[str, Any]]:
        """The sample logs' records (all ranks' files), one per (configuration, sample).

        Lines that are not a JSON object are skipped: samples are appended as each one
        finishes, so a run killed mid-write leaves a truncated last line behind.
        """
        yield from read_run_samples(self.path)


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
