"""Writing a run's results (docs/results-format.md): the sample log, summary.csv, layer_stats.csv."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from arkv_bench.measures import decode_tok_s, percentile
from arkv_bench.metrics import mean_ci95
from arkv_bench.results_io import atomic_write, csv_text, read_run_samples, read_samples, record_key

SUMMARY_COLUMNS = ["model", "suite", "task", "quant_type", "cache_size", "window_size", "n", "score", "score_ci95",
                   "prefill_tok_s", "decode_tok_s", "ttft_ms", "itl_ms_p50", "itl_ms_p99", "kv_bytes", "kv_bytes_full",
                   "kv_ratio", "peak_mem_bytes", "compressed_frac", "evicted_frac", "quantized_frac", "device", "dtype",
                   "status", "host_bytes", "weights_bytes", "protocol"]
LAYER_COLUMNS = ["task", "quant_type", "cache_size", "layer", "oq_score", "oq_ratio", "original_frac",
                 "quantized_frac", "evicted_frac"]


@dataclass
class SampleRecord:
    """One line of samples.jsonl: one sample under one (method, cache size); written by every suite."""

    suite: str
    task: str
    sample_id: str
    quant_type: str
    cache_size: int | float | None
    window_size: int
    status: str = "ok"  # ok | oom
    budget: int | None = None  # the token budget this sample got (a fraction applied to its prompt)
    prompt_tokens: int = 0
    prediction: str = ""
    references: list[str] = field(default_factory=list)
    score: float | None = None  # 0..1; None where the metric exists only for a corpus
    prefill_s: float = 0.0
    ttft_ms: float | None = None
    itl_ms: list[float] = field(default_factory=list)  # the batch's decode steps (row 0 of a batch holds them)
    decode_tokens: int = 0  # tokens of the answer (EOS excluded)
    decode_steps: int = 0  # tokens generated after the first, EOS included: the decode rate's count
    decode_s: float = 0.0  # time of the decode steps that produced them
    batch_id: str = ""  # the same for every row of one batch
    batch_rows: int = 1
    batch_row: int = 0
    kv_bytes: float = 0.0
    kv_bytes_full: float = 0.0
    host_bytes: float = 0.0
    compressed: bool = False
    evicted_frac: float = 0.0
    quantized_frac: float = 0.0
    peak_mem_bytes: int | None = None  # above the memory allocated before the prefill; None on CPU
    weights_bytes: int | None = None
    layers: list[list[float | None]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    protocol: str = "query-aware"  # query-agnostic: the context was compressed before the question came
    context_tokens: int | None = None  # query-agnostic: the prompt's first context_tokens tokens are its context
    # query-agnostic: seconds to compress the context, on the record that paid it (0 where a previous prompt's
    # compressed context was copied); also inside its prefill_s and ttft_ms
    context_prefill_s: float | None = None
    shared_prefill_s: float | None = None  # the part of prefill_s spent in the prompt's forward pass shared by the sweep

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class SampleLog:
    """samples.jsonl: one line per finished sample, flushed to disk at once.

    Opening it (under the run folder's lock) keeps one record per (configuration, sample) and
    drops a torn last line (a run killed mid-write) or any unreadable line, so a resumed run
    neither loses nor duplicates a sample; `note` says what was dropped.
    """

    def __init__(self, path: Path):
        self.path = path
        contents = read_samples(path)
        self.records = contents.records
        self.note = contents.dropped(path)
        if contents.needs_repair:  # rewrite without those lines, atomically: a kill now must not lose good lines
            atomic_write(path, "".join(line + "\n" for line in contents.lines))
        self.done = {record_key(r) for r in self.records}

    def include(self, paths: list[Path]) -> None:
        """Also count the records of other logs of the run (other ranks' files) as done; only this log is written."""
        for path in paths:
            if path != self.path:
                for record in read_samples(path).records:
                    if record_key(record) not in self.done:
                        self.records.append(record)
                        self.done.add(record_key(record))

    @property
    def written(self) -> bool:
        """Whether the log file holds anything (also a line whose append was interrupted before it returned)."""
        return self.path.is_file() and self.path.stat().st_size > 0

    def has(self, task: str, sample_id: str, method: str, size: Any, protocol: str = "query-aware") -> bool:
        return (task, str(sample_id), method, "" if size is None else str(size), protocol) in self.done

    def append(self, record: SampleRecord | dict[str, Any]) -> None:
        data = record.to_json() if isinstance(record, SampleRecord) else record
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(data, ensure_ascii=False, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(data)
        self.done.add(record_key(data))


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


def _decode_rate(ok: list[dict[str, Any]]) -> float | None:
    """decode_tok_s (arkv_bench.measures): per row, then per batch, then weighted by batch decode time.
    Records written before decode_steps existed count their answer tokens after the first."""
    batches: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in ok:
        batches[str(r.get("batch_id") or r["sample_id"])].append(r)
    timed = []
    for rows in batches.values():
        head = next((r for r in rows if r.get("batch_row", 0) == 0), rows[0])
        step_s = sum(head.get("itl_ms") or []) / 1000
        timed.append((step_s, [(r.get("decode_steps", max(r.get("decode_tokens", 0) - 1, 0)),
                                r.get("decode_s", step_s)) for r in rows]))
    return decode_tok_s(timed)


def record_protocol(record: dict[str, Any]) -> str:
    """A record's protocol; records written before protocols existed are query-aware."""
    return str(record.get("protocol") or "query-aware")


def _summary_score(suite: str, ok: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """(score, score_ci95) as the suite defines them: a mean in percent unless it says otherwise."""
    from arkv_bench.suites import suites

    found = suites().get(suite)
    if found is not None:
        return found.summary_score(ok)
    scored = [r["score"] for r in ok if r.get("score") is not None]
    mean, half = mean_ci95(scored)
    return (round(100 * mean, 4), round(100 * half, 4)) if scored else (None, None)


def summarise(records: list[dict[str, Any]], info: dict[str, Any], window_size: int) -> list[dict[str, Any]]:
    """One summary row per (suite, task, method, cache size, protocol)."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["suite"], r["task"], r["quant_type"], "" if r["cache_size"] is None else r["cache_size"],
                record_protocol(r))].append(r)
    rows = []
    for (suite, task, method, size, protocol), group in groups.items():
        ok = [r for r in group if r["status"] == "ok"]
        heads = [r for r in ok if r.get("batch_row", 0) == 0]
        score, score_ci95 = _summary_score(suite, ok)
        itl = [t for r in heads for t in r.get("itl_ms") or []]
        prefill_s = sum(r["prefill_s"] for r in heads)
        kv, kv_full = mean_of([r["kv_bytes"] for r in ok]), mean_of([r["kv_bytes_full"] for r in ok])
        peaks = [r["peak_mem_bytes"] for r in ok if r.get("peak_mem_bytes") is not None]
        weights = [r["weights_bytes"] for r in ok if r.get("weights_bytes") is not None]
        rows.append({
            "model": info["model"], "suite": suite, "task": task, "quant_type": method, "cache_size": size,
            "window_size": window_size, "n": len(ok),
            "score": score, "score_ci95": score_ci95,
            "prefill_tok_s": sum(r["prompt_tokens"] for r in ok) / prefill_s if prefill_s else None,
            "decode_tok_s": _decode_rate(ok),
            "ttft_ms": mean_of([r["ttft_ms"] for r in ok if r.get("ttft_ms") is not None]),
            "itl_ms_p50": percentile(itl, 50), "itl_ms_p99": percentile(itl, 99), "kv_bytes": kv,
            "kv_bytes_full": kv_full, "kv_ratio": kv / kv_full if kv is not None and kv_full else None,
            "peak_mem_bytes": max(peaks) if peaks else None,
            "compressed_frac": mean_of([float(r["compressed"]) for r in ok]),
            "evicted_frac": mean_of([r["evicted_frac"] for r in ok]),
            "quantized_frac": mean_of([r["quantized_frac"] for r in ok]),
            "device": info["device"], "dtype": info["dtype"],
            "status": "oom" if any(r["status"] == "oom" for r in group) else "ok",
            "host_bytes": mean_of([r.get("host_bytes", 0) for r in ok]),
            "weights_bytes": max(weights) if weights else None, "protocol": protocol,
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


def write_summaries(folder: Path, info: dict[str, Any]) -> list[dict[str, Any]]:
    """Rebuild summary.csv and layer_stats.csv from the sample logs; return the summary rows."""
    config = json.loads((folder / "config.json").read_text())
    records = read_run_samples(folder)  # read only: rewriting here could lose lines on a kill
    rows = summarise(records, info, config["options"]["window_size"])
    atomic_write(folder / "summary.csv", csv_text(SUMMARY_COLUMNS, rows))
    atomic_write(folder / "layer_stats.csv", csv_text(LAYER_COLUMNS, layer_rows(records)))
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
    from arkv_bench.measures import gpu_inventory

    device_name = torch.cuda.get_device_name() if info["device"].startswith("cuda") else platform.processor() or "cpu"
    return {"arkv_bench": arkv_bench.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "git_commit": commit, "device_name": device_name,
            "gpus": gpu_inventory(), "model_devices": info.get("devices"),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
