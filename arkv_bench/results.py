"""Writing a run's results (docs/results-format.md): the sample log, summary.csv, layer_stats.csv."""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

from arkv_bench.metrics import mean_ci95

SUMMARY_COLUMNS = ["model", "suite", "task", "quant_type", "cache_size", "window_size", "n", "score", "score_ci95",
                   "prefill_tok_s", "decode_tok_s", "ttft_ms", "itl_ms_p50", "itl_ms_p99", "kv_bytes", "kv_bytes_full",
                   "kv_ratio", "peak_mem_bytes", "compressed_frac", "evicted_frac", "quantized_frac", "device", "dtype",
                   "status", "host_bytes"]
LAYER_COLUMNS = ["task", "quant_type", "cache_size", "layer", "oq_score", "oq_ratio", "original_frac",
                 "quantized_frac", "evicted_frac"]


def _key(task: str, sample_id: str, method: str, size: Any) -> tuple[str, str, str, str]:
    return task, str(sample_id), method, "" if size is None else str(size)


def read_records(path: Path) -> tuple[list[dict[str, Any]], list[str], bool]:
    """The complete records of a sample log, their lines, and whether the file needs repair
    (a torn line from a killed write, or a last line without its newline)."""
    if not path.exists():
        return [], [], False
    text = path.read_text(encoding="utf-8")
    records: list[dict[str, Any]] = []
    good: list[str] = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
            good.append(line)
    return records, good, (len(good) != len(text.splitlines()) or bool(text) and not text.endswith("\n"))


class SampleLog:
    """samples.jsonl: one line per finished sample, flushed to disk at once.

    Opening it drops a torn last line (a run killed mid-write), so a resumed run neither
    loses nor duplicates a sample.
    """

    def __init__(self, path: Path):
        self.path = path
        self.records, good, repair = read_records(path)
        if repair:  # rewrite without the torn line, atomically: a kill now must not lose the good lines
            tmp = path.with_suffix(".tmp")
            with tmp.open("w", encoding="utf-8") as f:
                f.write("".join(g + "\n" for g in good))
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)
        self.done = {_key(r["task"], r["sample_id"], r["quant_type"], r["cache_size"]) for r in self.records}

    def has(self, task: str, sample_id: str, method: str, size: Any) -> bool:
        return _key(task, sample_id, method, size) in self.done

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)
        self.done.add(_key(record["task"], record["sample_id"], record["quant_type"], record["cache_size"]))


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def mean_of(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def layer_vector(layer: dict[str, Any]) -> list[float | None]:
    """One layer of `cache.stats()` as [oq_score, oq_ratio, original, quantized, evicted] (fractions of seen)."""
    seen = max(layer["seen"], 1e-9)
    return [layer.get("oq_score"), layer.get("oq_ratio"), layer["original"] / seen, layer["quantized"] / seen,
            layer["evicted"] / seen]


def column_means(vectors: list[list[float | None]]) -> list[float | None]:
    """Mean of each position over the vectors, ignoring missing values."""
    return [mean_of([v for v in col if v is not None]) for col in zip(*vectors)]


def evicted_quantized(per_layer: list[list[float | None]]) -> tuple[float, float]:
    """Evicted and quantized fractions, averaged over the layers."""
    n = max(len(per_layer), 1)
    return sum(p[4] for p in per_layer) / n, sum(p[3] for p in per_layer) / n


def summarise(records: list[dict[str, Any]], info: dict[str, Any], window_size: int) -> list[dict[str, Any]]:
    """One summary row per (suite, task, method, cache size)."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["suite"], r["task"], r["quant_type"], "" if r["cache_size"] is None else r["cache_size"])].append(r)
    rows = []
    for (suite, task, method, size), group in groups.items():
        ok = [r for r in group if r["status"] == "ok"]
        batches = {(r["sample_id"], r["batch_row"]): r for r in ok if r["batch_row"] == 0}.values()
        scored = [r["score"] for r in ok if r.get("score") is not None]  # lm-eval corpus metrics have none
        mean, half = mean_ci95(scored)
        itl = [t for r in batches for t in r["itl_ms"]]
        decode_s = sum(itl) / 1000
        decoded = sum(max(r["decode_tokens"] - 1, 0) for r in ok)
        prefill_s = sum(r["prefill_s"] for r in batches)
        kv, kv_full = mean_of([r["kv_bytes"] for r in ok]), mean_of([r["kv_bytes_full"] for r in ok])
        peaks = [r["peak_mem_bytes"] for r in ok if r.get("peak_mem_bytes") is not None]
        rows.append({
            "model": info["model"], "suite": suite, "task": task, "quant_type": method, "cache_size": size,
            "window_size": window_size, "n": len(ok),
            "score": round(100 * mean, 4) if scored else None, "score_ci95": round(100 * half, 4) if scored else None,
            "prefill_tok_s": sum(r["prompt_tokens"] for r in ok) / prefill_s if prefill_s else None,
            "decode_tok_s": decoded / decode_s if decode_s and decoded else None,
            "ttft_ms": mean_of([r["ttft_ms"] for r in ok]), "itl_ms_p50": _percentile(itl, 50),
            "itl_ms_p99": _percentile(itl, 99), "kv_bytes": kv, "kv_bytes_full": kv_full,
            "kv_ratio": kv / kv_full if kv is not None and kv_full else None,
            "peak_mem_bytes": max(peaks) if peaks else None,
            "compressed_frac": mean_of([float(r["compressed"]) for r in ok]),
            "evicted_frac": mean_of([r["evicted_frac"] for r in ok]),
            "quantized_frac": mean_of([r["quantized_frac"] for r in ok]),
            "device": info["device"], "dtype": info["dtype"],
            "status": "oom" if any(r["status"] == "oom" for r in group) else "ok",
            "host_bytes": mean_of([r.get("host_bytes", 0) for r in ok]),
        })
    return rows


def layer_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-layer means over samples: OQ score and ratio, Original / Quantized / Evicted fractions."""
    sums: dict[tuple, list[list[float | None]]] = defaultdict(list)
    for r in records:
        if r["status"] != "ok":
            continue
        for i, values in enumerate(r.get("layers", [])):
            sums[(r["task"], r["quant_type"], "" if r["cache_size"] is None else r["cache_size"], i)].append(values)
    rows = []
    for (task, method, size, layer), values in sums.items():
        rows.append(dict(zip(LAYER_COLUMNS, [task, method, size, layer, *column_means(values)])))
    return rows


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    tmp.replace(path)


def write_summaries(folder: Path, info: dict[str, Any]) -> list[dict[str, Any]]:
    """Rebuild summary.csv and layer_stats.csv from samples.jsonl; return the summary rows."""
    config = json.loads((folder / "config.json").read_text())
    records = read_records(folder / "samples.jsonl")[0]  # read only: rewriting here could lose lines on a kill
    rows = summarise(records, info, config["options"]["window_size"])
    _write_csv(folder / "summary.csv", SUMMARY_COLUMNS, rows)
    _write_csv(folder / "layer_stats.csv", LAYER_COLUMNS, layer_rows(records))
    return rows


def provenance(info: dict[str, Any]) -> dict[str, Any]:
    """Versions, commit, device and date: what someone needs to trust or reproduce the numbers."""
    import torch
    import transformers

    import arkv_bench

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    device_name = torch.cuda.get_device_name() if info["device"].startswith("cuda") else platform.processor() or "cpu"
    return {"arkv_bench": arkv_bench.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "git_commit": commit, "device_name": device_name,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
