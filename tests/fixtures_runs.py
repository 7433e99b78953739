"""Small hand-made result folders for the compare/report tests.

The numbers are chosen so that every ratio the tests check can be worked out by hand,
e.g. mix@256 on qasper scores 36 against the full cache's 40: 90 % of the baseline.

Run `python tests/fixtures_runs.py out.png` for a screenshot of a report built from these fixtures.
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

SUMMARY_COLUMNS = [
    "model", "suite", "task", "quant_type", "cache_size", "window_size", "n", "score", "score_ci95",
    "prefill_tok_s", "decode_tok_s", "ttft_ms", "itl_ms_p50", "itl_ms_p99", "kv_bytes",
    "kv_bytes_full", "kv_ratio", "peak_mem_bytes", "compressed_frac", "evicted_frac",
    "quantized_frac", "device", "dtype", "status",
]
LAYER_COLUMNS = [
    "task", "quant_type", "cache_size", "layer", "oq_score", "oq_ratio", "original_frac",
    "quantized_frac", "evicted_frac",
]

LLAMA = "meta-llama/Llama-3.2-1B-Instruct"
QWEN = "Qwen/Qwen2.5-0.5B-Instruct"
HOSTILE_PREDICTION = "<script>alert(1)</script>"
HOSTILE_REFERENCE = 'see https://evil.example/x.js and <img src=x onerror="alert(2)">'
HOSTILE_DEVICE = "<b onmouseover=alert(3)>H100</b>"


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: ("" if row.get(key) is None else row[key]) for key in columns})


def summary_row(model: str, suite: str, task: str, quant_type: str, cache_size: Any, **values: Any) -> dict:
    """A summary.csv row; columns not given stay empty (= not measured)."""
    row: dict[str, Any] = dict(model=model, suite=suite, task=task, quant_type=quant_type,
                               cache_size=cache_size, n=values.pop("n", 10), status="ok",
                               device="cuda", dtype="bfloat16")
    row.update(values)
    if row.get("kv_bytes") is not None and row.get("kv_bytes_full"):
        row["kv_ratio"] = row["kv_bytes"] / row["kv_bytes_full"]
    return row


def write_run(
    root: Path,
    name: str,
    *,
    config: dict[str, Any],
    summary: list[dict[str, Any]],
    samples: list[dict[str, Any]] | None = None,
    layer_stats: list[dict[str, Any]] | None = None,
) -> Path:
    """Write one results/<name>/ folder in the documented format."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"run_name": name, **config}, indent=2))
    _write_csv(folder / "summary.csv", SUMMARY_COLUMNS, summary)
    if samples:
        with (folder / "samples.jsonl").open("w", encoding="utf-8") as handle:
            for record in samples:
                handle.write(json.dumps(record) + "\n")
    if layer_stats:
        _write_csv(folder / "layer_stats.csv", LAYER_COLUMNS, layer_stats)
    return folder


def _config(model: str, suite: str, tasks: list[str], quant_types: list[str], cache_sizes: list[Any],
            device: str = "cuda", dtype: str = "bfloat16", device_name: str = "NVIDIA H100") -> dict:
    return {
        "suite": suite, "tasks": tasks, "quant_types": quant_types, "cache_sizes": cache_sizes,
        "window_size": 32, "method_options": {}, "model": model, "limit": 10, "batch_size": 1,
        "seed": 0, "device": device, "dtype": dtype, "attn_implementation": "sdpa",
        "chat_template": True,
        "provenance": {"arkv_bench": "0.1.0", "torch": "2.6.0", "transformers": "5.17.0",
                       "python": "3.11.7", "git_commit": "0123abc", "device_name": device_name,
                       "date": "2025-11-25T12:00:00Z"},
    }


# (task, quant_type, cache_size) -> score, kv_bytes, decode_tok_s, ttft_ms, peak_mem_bytes, compressed_frac
LONGBENCH = {
    ("qasper", "full", "full"): (40.0, 1000, 50.0, 100.0, 4000, 0.0),
    ("qasper", "mix", 256): (36.0, 250, 45.0, 110.0, 3000, 0.8),
    ("qasper", "mix", 512): (39.0, 500, 48.0, 105.0, 3500, 0.5),
    ("qasper", "h2o", 256): (30.0, 200, 55.0, 90.0, 3600, 1.0),
    ("qasper", "h2o", 512): (34.0, 400, 52.0, 95.0, 3800, 1.0),
    ("hotpotqa", "full", "full"): (50.0, 2000, 40.0, 200.0, 6000, 0.0),
    ("hotpotqa", "mix", 256): (45.0, 400, 30.0, 220.0, 4800, 0.9),
    ("hotpotqa", "mix", 512): (49.0, 800, 36.0, 210.0, 5400, 0.6),
    ("hotpotqa", "h2o", 256): (25.0, 500, 44.0, 190.0, 6600, 1.0),
    ("hotpotqa", "h2o", 512): (40.0, 1000, 42.0, 195.0, 6300, 1.0),
}


def longbench_run(root: Path) -> Path:
    """Llama on two LongBench tasks: full, mix (ARKV) and h2o at budgets 256 and 512."""
    summary = []
    for (task, method, size), (score, kv, tok_s, ttft, peak, comp) in LONGBENCH.items():
        full_kv = LONGBENCH[(task, "full", "full")][1]
        summary.append(summary_row(LLAMA, "longbench", task, method, size, score=score, score_ci95=4.0,
                                   kv_bytes=kv, kv_bytes_full=full_kv, decode_tok_s=tok_s, ttft_ms=ttft,
                                   peak_mem_bytes=peak, compressed_frac=comp))
    samples = []
    for method, size in (("full", "full"), ("mix", 256), ("h2o", 256)):
        for sample_id in range(3):
            prediction = HOSTILE_PREDICTION if (method, sample_id) == ("mix", 0) else f"answer {sample_id}"
            samples.append({"suite": "longbench", "task": "qasper", "sample_id": sample_id,
                            "quant_type": method, "cache_size": size, "status": "ok",
                            "prediction": prediction, "references": [HOSTILE_REFERENCE, "answer"],
                            "score": 1.0 if prediction.startswith("answer") else 0.0, "extra": {}})
    layers = []
    for size, quantized in ((256, 0.5), (512, 0.3)):
        for layer in range(4):
            evicted = 0.1 * layer
            layers.append({"task": "qasper", "quant_type": "mix", "cache_size": size, "layer": layer,
                           "oq_score": 0.5 + 0.1 * layer, "oq_ratio": 1.0 + 0.25 * layer,
                           "original_frac": round(1 - quantized - evicted, 3),
                           "quantized_frac": quantized, "evicted_frac": round(evicted, 3)})
    config = _config(LLAMA, "longbench", ["qasper", "hotpotqa"], ["full", "mix", "h2o"], [256, 512],
                     device_name=HOSTILE_DEVICE)
    return write_run(root, "llama-longbench", config=config, summary=summary, samples=samples,
                     layer_stats=layers)


# passkey retrieval per method: (depth, context_length) cells that FAIL; every other cell is found
PASSKEY_FAILS = {
    ("full", "full"): set(),
    ("mix", 128): {(0.5, 2048)},
    ("window", 128): {(0.0, 1024), (0.0, 2048), (0.5, 1024), (0.5, 2048)},
}


def passkey_run(root: Path) -> Path:
    """Llama passkey on CPU (no peak memory): depth x context grid of 3 x 2 cells."""
    samples, summary, layers = [], [], []
    for (method, size), fails in PASSKEY_FAILS.items():
        sample_id = 0
        for depth in (0.0, 0.5, 1.0):
            for length in (1024, 2048):
                found = (depth, length) not in fails
                samples.append({"suite": "passkey", "task": "passkey", "sample_id": sample_id,
                                "quant_type": method, "cache_size": size, "status": "ok",
                                "prediction": "71432" if found else "12345", "references": ["71432"],
                                "score": 1.0 if found else 0.0,
                                "extra": {"depth": depth, "context_length": length}})
                sample_id += 1
        score = 100.0 * (6 - len(fails)) / 6
        kv = {"full": 4096, "mix": 768, "window": 512}[method]
        summary.append(summary_row(LLAMA, "passkey", "passkey", method, size, n=6, score=score,
                                   kv_bytes=kv, kv_bytes_full=4096, decode_tok_s=None, ttft_ms=None,
                                   device="cpu", compressed_frac=0.0 if method == "full" else 1.0))
    for layer in range(2):  # ARKV fractions recorded, OQ statistics not (left empty)
        layers.append({"task": "passkey", "quant_type": "mix", "cache_size": 128, "layer": layer,
                       "original_frac": 0.5, "quantized_frac": 0.25, "evicted_frac": 0.25})
    config = _config(LLAMA, "passkey", ["passkey"], ["full", "mix", "window"], [128], device="cpu",
                     device_name="cpu")
    return write_run(root, "llama-passkey", config=config, summary=summary, samples=samples,
                     layer_stats=layers)


def qwen_run(root: Path) -> Path:
    """Qwen on GSM8K without a full-cache row: its ratios must stay empty."""
    summary = [
        summary_row(QWEN, "gsm8k", "gsm8k", "mix", 512, score=30.0, kv_bytes=300, decode_tok_s=20.0,
                    ttft_ms=80.0, peak_mem_bytes=2000, compressed_frac=0.7),
        summary_row(QWEN, "gsm8k", "gsm8k", "kivi", 512, score=28.0, kv_bytes=250, decode_tok_s=18.0,
                    ttft_ms=85.0, peak_mem_bytes=1900, compressed_frac=1.0),
    ]
    config = _config(QWEN, "gsm8k", ["gsm8k"], ["mix", "kivi"], [512])
    return write_run(root, "qwen-gsm8k", config=config, summary=summary)


def build_fixture_results(root: Path) -> Path:
    """All fixture runs under root/results; returns that folder."""
    results = root / "results"
    longbench_run(results)
    passkey_run(results)
    qwen_run(results)
    return results


def main(argv: list[str]) -> int:
    """Rebuild the README screenshot from fixture data: fixtures_runs.py OUT.png."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from arkv_bench.report import write_report
    from headless_chromium import Chromium, find_chromium

    out = Path(argv[1] if len(argv) > 1 else "fixture-report.png")
    binary = find_chromium()
    if binary is None:
        print("chromium not found", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        report = write_report([build_fixture_results(Path(tmp))], Path(tmp) / "report.html")
        with Chromium(binary, Path(tmp) / "profile", width=1600, height=1100) as browser:
            browser.open(report)
            out.write_bytes(browser.screenshot(full_page=False))
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
