"""`arkv-bench run` end to end: every suite on fixture files, resume (also after kill -9), bad inputs.

The real embedded model (SmolLM2-135M) runs every suite on the tiny Hub-schema files of
tests/fixtures_data.py. Generation lengths are cut to a few tokens by pointing
ARKV_BENCH_TASKS at a copy of tasks/ (same templates and metrics, smaller max_new_tokens), so
the whole file stays well under a few minutes on two CPU cores.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from arkv_bench.cli import app
from arkv_bench.metrics import gsm8k_score, longbench_sample_score
from tests.fixtures_data import GSM8K_TEST, MMLU_SUBJECT, MMLU_TEST, MULTIFIELDQA_ZH, QASPER, TREC, write_fixtures

REPO = Path(__file__).resolve().parents[1]
MAX_NEW_TOKENS = 4

# docs/results-format.md, copied here on purpose: these names are a public interface.
SUMMARY_COLUMNS = ["model", "suite", "task", "quant_type", "cache_size", "window_size", "n", "score", "score_ci95",
                   "prefill_tok_s", "decode_tok_s", "ttft_ms", "itl_ms_p50", "itl_ms_p99", "kv_bytes",
                   "kv_bytes_full", "kv_ratio", "peak_mem_bytes", "compressed_frac", "evicted_frac",
                   "quantized_frac", "device", "dtype", "status", "host_bytes", "weights_bytes", "protocol"]
SAMPLE_FIELDS = {"suite", "task", "sample_id", "quant_type", "cache_size", "window_size", "status", "prompt_tokens",
                 "prediction", "references", "score", "prefill_s", "ttft_ms", "itl_ms", "decode_tokens", "kv_bytes",
                 "kv_bytes_full", "compressed", "evicted_frac", "quantized_frac", "extra", "budget", "decode_steps",
                 "decode_s", "batch_id", "batch_rows", "batch_row", "host_bytes", "peak_mem_bytes", "weights_bytes",
                 "layers"}
CONFIG_FIELDS = {"run_name", "suite", "tasks", "quant_types", "cache_sizes", "window_size", "method_options", "model",
                 "limit", "batch_size", "seed", "device", "dtype", "attn_implementation", "chat_template",
                 "provenance"}
PROVENANCE_FIELDS = {"arkv_bench", "torch", "transformers", "python", "git_commit", "device_name", "date"}

runner = CliRunner()


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fixtures(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module", autouse=True)
def short_tasks(tmp_path_factory: pytest.TempPathFactory):
    """tasks/*.yaml with max_new_tokens capped, so generation takes a few tokens."""
    folder = tmp_path_factory.mktemp("tasks")
    for path in (REPO / "tasks").glob("*.yaml"):
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        for entry in [doc.get("defaults") or {}, *(doc.get("tasks") or {}).values()]:
            if isinstance(entry, dict) and entry.get("max_new_tokens"):
                entry["max_new_tokens"] = min(entry["max_new_tokens"], MAX_NEW_TOKENS)
        (folder / path.name).write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ARKV_BENCH_TASKS", str(folder))
        yield folder




def cli(*args: str, env: dict[str, str | None] | None = None):
    return runner.invoke(app, ["run", *args], env=env, catch_exceptions=False)


def read_samples(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "samples.jsonl").read_text(encoding="utf-8").splitlines()]


def read_summary(folder: Path) -> tuple[list[str], list[dict]]:
    with (folder / "summary.csv").open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def key(record: dict) -> tuple:
    return record["task"], record["sample_id"], record["quant_type"], record["cache_size"]


def check_run(folder: Path, suite: str, tasks: dict[str, int], rescore) -> list[dict]:
    """The three documented files, consistent with each other; every score recomputed by `rescore`."""
    config = json.loads((folder / "config.json").read_text())
    assert CONFIG_FIELDS <= set(config), CONFIG_FIELDS - set(config)
    assert PROVENANCE_FIELDS <= set(config["provenance"])
    assert config["suite"] == suite and sorted(config["tasks"]) == sorted(tasks)
    assert config["quant_types"] == ["full", "mix"] and config["cache_sizes"] == [0.5]
    assert config["model"] == "SmolLM2-135M-Instruct" and config["device"] == "cpu"

    samples = read_samples(folder)
    assert len(samples) == 2 * sum(tasks.values())  # every sample x (full, mix@0.5)
    assert len({key(s) for s in samples}) == len(samples), "duplicate samples"
    for s in samples:
        assert SAMPLE_FIELDS <= set(s), SAMPLE_FIELDS - set(s)
        assert s["suite"] == suite and s["status"] == "ok" and s["window_size"] == 32
        assert (s["quant_type"], s["cache_size"]) in (("full", None), ("mix", 0.5))
        assert 0.0 <= s["score"] <= 1.0
        assert s["score"] == pytest.approx(rescore(s)), s
        assert s["prompt_tokens"] > 0 and s["kv_bytes"] > 0 and s["kv_bytes_full"] > 0
        assert s["decode_tokens"] <= MAX_NEW_TOKENS and isinstance(s["itl_ms"], list)
        assert s["decode_tokens"] - 1 <= s["decode_steps"] <= s["decode_tokens"] and s["decode_s"] >= 0
        assert isinstance(s["compressed"], bool) and isinstance(s["extra"], dict)
        if s["quant_type"] == "full":
            assert s["kv_bytes"] == s["kv_bytes_full"] and not s["compressed"] and s["evicted_frac"] == 0
        else:
            assert s["compressed"] and s["kv_bytes"] < s["kv_bytes_full"]

    columns, rows = read_summary(folder)
    assert columns == SUMMARY_COLUMNS
    assert sorted((r["task"], r["quant_type"], r["cache_size"]) for r in rows) == sorted(
        (t, m, c) for t in tasks for m, c in (("full", ""), ("mix", "0.5")))
    for r in rows:
        group = [s for s in samples if s["task"] == r["task"] and s["quant_type"] == r["quant_type"]]
        assert r["model"] == "SmolLM2-135M-Instruct" and r["suite"] == suite and r["status"] == "ok"
        assert r["window_size"] == "32" and r["device"] == "cpu" and r["dtype"] == "float32"
        assert int(r["n"]) == tasks[r["task"]] == len(group)
        assert 0 <= float(r["score"]) <= 100
        assert float(r["score"]) == pytest.approx(100 * sum(s["score"] for s in group) / len(group), abs=1e-3)
        assert float(r["score_ci95"]) >= 0
        assert r["peak_mem_bytes"] == ""  # not measured on CPU: left empty
        assert int(r["weights_bytes"]) > 100e6  # SmolLM2-135M in fp32
        ratio = float(r["kv_ratio"])
        assert ratio == pytest.approx(float(r["kv_bytes"]) / float(r["kv_bytes_full"]))
        assert ratio == pytest.approx(1.0) if r["quant_type"] == "full" else 0 < ratio < 1
        for col in ("compressed_frac", "evicted_frac", "quantized_frac"):
            assert 0 <= float(r[col]) <= 1
    return samples


def gsm8k_args(data_dir: Path, out: Path, limit: int = 2, name: str = "gsm8k") -> list[str]:
    return ["--suite", "gsm8k", "--data-dir", str(data_dir), "--num-fewshot", "1", "--limit", str(limit),
            "--quant-type", "full,mix", "--cache-size", "0.5", "--out", str(out), "--run-name", name, "--quiet"]


@pytest.fixture(scope="module")
def gsm8k_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    """One finished gsm8k run: (its arguments, its results root); copied by the resume tests."""
    out = tmp_path_factory.mktemp("gsm8k-out")
    args = gsm8k_args(data_dir, out)
    result = cli(*args)
    assert result.exit_code == 0, result.output
    return args, out


# --- every suite end to end -----------------------------------------------------------------------

@pytest.mark.slow
def test_gsm8k_end_to_end(gsm8k_run: tuple[list[str], Path]) -> None:
    _, out = gsm8k_run
    answers = [row["answer"] for row in GSM8K_TEST]
    samples = check_run(out / "gsm8k", "gsm8k", {"gsm8k": 2},
                        lambda s: gsm8k_score(s["prediction"], s["references"][0]))
    for s in samples:
        assert s["references"] == [answers[int(s["sample_id"])]]
    assert (out / "gsm8k" / "layer_stats.csv").is_file()


@pytest.mark.slow
def test_mmlu_end_to_end(data_dir: Path, tmp_path: Path) -> None:
    result = cli("--suite", "mmlu", "--tasks", MMLU_SUBJECT, "--data-dir", str(data_dir), "--num-fewshot", "1",
                 "--limit", "2", "--quant-type", "full,mix", "--cache-size", "0.5", "--out", str(tmp_path),
                 "--run-name", "mmlu", "--quiet")
    assert result.exit_code == 0, result.output
    samples = check_run(tmp_path / "mmlu", "mmlu", {MMLU_SUBJECT: 2},
                        lambda s: float(s["prediction"] == s["references"][0]))
    for s in samples:
        assert s["prediction"] in ("A", "B", "C", "D")
        assert s["references"] == ["ABCD"[MMLU_TEST[int(s["sample_id"])]["answer"]]]
        assert s["decode_tokens"] == 0  # log-likelihood: nothing generated


@pytest.mark.slow
def test_longbench_end_to_end(data_dir: Path, tmp_path: Path) -> None:
    """Three datasets: qasper (flat .jsonl), trec (classification, all_classes) and multifieldqa_zh (Parquet)."""
    rows = {r["_id"]: r for r in QASPER + TREC + MULTIFIELDQA_ZH}
    result = cli("--suite", "longbench", "--tasks", "qasper,trec,multifieldqa_zh", "--data-dir", str(data_dir),
                 "--limit", "2", "--quant-type", "full,mix", "--cache-size", "0.5", "--out", str(tmp_path),
                 "--run-name", "lb", "--quiet")
    assert result.exit_code == 0, result.output
    samples = check_run(tmp_path / "lb", "longbench", {"qasper": 2, "trec": 2, "multifieldqa_zh": 2},
                        lambda s: longbench_sample_score(s["task"], s["prediction"], s["references"],
                                                         rows[s["sample_id"]]["all_classes"]))
    for s in samples:
        assert s["references"] == rows[s["sample_id"]]["answers"]  # sample ids are the rows' _id
        assert s["extra"]["length"] == rows[s["sample_id"]]["length"]
    config = json.loads((tmp_path / "lb" / "config.json").read_text())
    assert config["chat_template"] == {"qasper": True, "trec": False, "multifieldqa_zh": True}


# --- resume -----------------------------------------------------------------------------------------

def _copy_run(gsm8k_run: tuple[list[str], Path], tmp_path: Path) -> tuple[list[str], Path]:
    args, out = gsm8k_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    args = list(args)
    args[args.index("--out") + 1] = str(copy)
    return args, copy / "gsm8k"


@pytest.mark.slow
def test_resume_recomputes_a_deleted_sample_only(gsm8k_run: tuple[list[str], Path], tmp_path: Path) -> None:
    args, folder = _copy_run(gsm8k_run, tmp_path)
    lines = (folder / "samples.jsonl").read_text(encoding="utf-8").splitlines()
    (folder / "samples.jsonl").write_text("".join(line + "\n" for line in lines[:-1]), encoding="utf-8")
    assert cli(*args).exit_code == 0
    after = (folder / "samples.jsonl").read_text(encoding="utf-8").splitlines()
    assert after[:-1] == lines[:-1]  # the finished samples were skipped, not rerun
    redone, deleted = json.loads(after[-1]), json.loads(lines[-1])
    assert key(redone) == key(deleted) and redone["prediction"] == deleted["prediction"]
    check_run(folder, "gsm8k", {"gsm8k": 2}, lambda s: gsm8k_score(s["prediction"], s["references"][0]))
    # a complete run reruns nothing
    before = (folder / "samples.jsonl").read_bytes()
    assert cli(*args).exit_code == 0
    assert (folder / "samples.jsonl").read_bytes() == before


@pytest.mark.slow
def test_resume_drops_a_torn_line(gsm8k_run: tuple[list[str], Path], tmp_path: Path) -> None:
    args, folder = _copy_run(gsm8k_run, tmp_path)
    lines = (folder / "samples.jsonl").read_text(encoding="utf-8").splitlines()
    torn = lines[-1][:len(lines[-1]) // 2]  # the last sample, killed halfway through its write
    (folder / "samples.jsonl").write_text("".join(line + "\n" for line in lines[:-1]) + torn, encoding="utf-8")
    assert cli(*args).exit_code == 0
    after = (folder / "samples.jsonl").read_text(encoding="utf-8")
    assert after.endswith("\n") and torn not in after.splitlines()
    samples = check_run(folder, "gsm8k", {"gsm8k": 2}, lambda s: gsm8k_score(s["prediction"], s["references"][0]))
    assert sorted(map(key, samples), key=str) == sorted((key(json.loads(line)) for line in lines), key=str)


@pytest.mark.slow
def test_resume_after_kill_9(data_dir: Path, tmp_path: Path) -> None:
    args = gsm8k_args(data_dir, tmp_path, limit=4, name="killed")
    log = tmp_path / "killed" / "samples.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # ARKV_BENCH_TASKS (short generations) is in os.environ
    proc = subprocess.Popen([sys.executable, "-m", "arkv_bench.cli", "run", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 240
        while not (log.is_file() and log.read_bytes().count(b"\n") >= 1):
            assert proc.poll() is None, f"run ended before it was killed: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no sample written within 240 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    partial = [line for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert 1 <= len(partial) < 8, "the run finished before the kill: nothing was tested"

    assert cli(*args).exit_code == 0
    samples = read_samples(tmp_path / "killed")
    assert len(samples) == 8 and len({key(s) for s in samples}) == 8
    assert {key(s) for s in samples} == {("gsm8k", str(i), m, c) for i in range(4) for m, c in
                                         (("full", None), ("mix", 0.5))}
    _, rows = read_summary(tmp_path / "killed")
    assert sorted(int(r["n"]) for r in rows) == [4, 4]


# --- bad input: one line, exit code 2, nothing written ------------------------------------------------

def assert_refused(result, out: Path, *words: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr  # --quiet: nothing else
    assert result.stdout == ""
    message = lines[0].lower()
    for word in words:
        assert word.lower() in message, (word, message)
    assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))
    return message


def quick_args(tmp_path: Path) -> list[str]:
    return ["--out", str(tmp_path / "out"), "--quiet"]


BAD_INPUTS = {
    "unknown suite": (["--suite", "nosuch"], ["unknown suite", "nosuch", "passkey"]),
    "unknown task": (["--suite", "gsm8k", "--tasks", "gsm8k,nosuch"], ["unknown task", "nosuch", "valid"]),
    "unknown method": (["--quant-type", "full,nosuch"], ["unknown method", "nosuch", "mix"]),
    "cache size <= window": (["--quant-type", "mix", "--cache-size", "32", "--window-size", "32"],
                             ["cache size 32", "window size 32"]),
    "fraction above 1": (["--cache-size", "1.5"], ["1.5", "(0, 1]"]),
    "fraction zero": (["--cache-size", "0"], ["'0'", "(0, 1]"]),
    "fraction negative": (["--cache-size=-0.2"], ["-0.2", "(0, 1]"]),
    "negative limit": (["--limit=-1"], ["--limit", "-1"]),
    "zero batch size": (["--batch-size", "0"], ["--batch-size", "at least 1"]),
    "unknown method option": (["--quant-type", "full,mix", "--method-option", "nosuch=1"],
                              ["no selected method has option nosuch", "arkv-bench list"]),
    "option of an unselected method": (["--quant-type", "full,h2o", "--method-option", "gamma=2"], ["gamma"]),
    "badly typed method option": (["--quant-type", "mix", "--method-option", "gamma=abc"],
                                  ["gamma=abc", "takes a number"]),
    "method option out of range": (["--quant-type", "mix", "--method-option", "pooling=median"],
                                   ["pooling", "avg"]),
    "method option without =": (["--quant-type", "mix", "--method-option", "gamma"], ["key=value"]),
    "badly typed flag": (["--quant-type", "snapkv", "--method-option", "decode_compress=maybe"],
                         ["decode_compress=maybe", "true or false"]),
    "budget as a method option": (["--quant-type", "mix", "--method-option", "cache_size=64"],
                                  ["cache_size", "--cache-size"]),
    "unknown model": (["--model", "/nonexistent/arkv-model"], ["/nonexistent/arkv-model", "does not exist"]),
    "missing data folder": (["--suite", "gsm8k", "--data-dir", "/nonexistent/arkv-data"],
                            ["--data-dir", "not a folder"]),
    "bad chat-template": (["--chat-template", "maybe"], ["--chat-template", "auto"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(case: str, tmp_path: Path) -> None:
    args, words = BAD_INPUTS[case]
    started = time.perf_counter()
    result = cli(*args, *quick_args(tmp_path))
    assert_refused(result, tmp_path / "out", *words)
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize("content, words", [
    ("suite: gsm8k\nquant_typ: mix\n", ["{config}", "unknown keys quant_typ", "valid keys"]),
    ("suite: gsm8k\nlimit: many\n", ["limit", "many", "whole number", "config file"]),
    ("suite: [gsm8k\n", ["{config}", "cannot read config"]),
    ("- gsm8k\n", ["{config}", "must be a mapping"]),
])
def test_bad_config_file(content: str, words: list[str], tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(content)
    words = [w.format(config=config) for w in words]
    assert_refused(cli("--config", str(config), *quick_args(tmp_path)), tmp_path / "out", *words)


def test_config_file_values_and_command_line_precedence(tmp_path: Path) -> None:
    """The config is read (its bad value is reported), but an option on the command line wins over it."""
    config = tmp_path / "run.yaml"
    config.write_text("suite: gsm8k\nquant_type: [full, mix]\ncache_size: 16\nwindow_size: 32\n")
    assert_refused(cli("--config", str(config), *quick_args(tmp_path)), tmp_path / "out", "cache size 16")
    result = cli("--config", str(config), "--cache-size", "8", "--window-size", "64", *quick_args(tmp_path))
    assert_refused(result, tmp_path / "out", "cache size 8", "window size 64")


def test_another_runs_folder_is_refused_before_the_model_loads(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    folder = out / "same-name"
    folder.mkdir(parents=True)
    config = json.dumps({"run_name": "same-name", "options": {"suite": "mmlu", "limit": 99}})
    (folder / "config.json").write_text(config)
    started = time.perf_counter()
    result = cli(*gsm8k_args(data_dir, out, name="same-name"))
    assert time.perf_counter() - started < 5
    assert_refused(result, tmp_path / "nothing-here", "different run", "--run-name", str(folder))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    assert (folder / "config.json").read_text() == config


@pytest.mark.slow
@pytest.mark.parametrize("content, words", [
    ('{"question": "What is 1 + 1?", "answer": "#### 2"}\n{"question": "broken\n', ["cannot read", "test.jsonl"]),
    ('{"prompt": "What is 1 + 1?", "target": "2"}\n', ["not in the hub schema", "question"]),
])
def test_unreadable_data_file(content: str, words: list[str], tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_fixtures(data)
    (data / "gsm8k" / "test.jsonl").write_text(content)
    out = tmp_path / "out"
    assert_refused(cli(*gsm8k_args(data, out)), out, "gsm8k", *words)


@pytest.mark.slow
def test_missing_dataset_offline_fails_fast(tmp_path: Path) -> None:
    out = tmp_path / "out"
    started = time.perf_counter()
    result = cli("--suite", "gsm8k", "--limit", "1", "--quant-type", "full", "--out", str(out), "--quiet",
                 env={"HF_HUB_OFFLINE": "1"})
    assert time.perf_counter() - started < 10
    assert_refused(result, out, "openai/gsm8k", "--data-dir", "offline")


@pytest.mark.slow
@pytest.mark.skipif(any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")),
                    reason="behind a proxy the Hub cannot be probed")
def test_missing_dataset_without_network_fails_fast(tmp_path: Path) -> None:
    """No HF_HUB_OFFLINE, but the Hub endpoint refuses connections: an error in seconds, not a retry loop."""
    out = tmp_path / "out"
    started = time.perf_counter()
    result = cli("--suite", "gsm8k", "--limit", "1", "--quant-type", "full", "--out", str(out), "--quiet",
                 env={"HF_HUB_OFFLINE": None, "HF_DATASETS_OFFLINE": None, "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert time.perf_counter() - started < 10
    assert_refused(result, out, "openai/gsm8k", "--data-dir")


def test_typed_method_options_reach_the_cache() -> None:
    """--method-option values are typed as the method declares them (bool, int, float, str)."""
    from arkv_bench.options import build_options

    opts = build_options({"quant_type": "mix,snapkv,kivi"}, None, ["gamma=2", "decode_compress=false", "bits=2",
                                                                   "pooling=max"])
    assert opts.method_options == {"gamma": 2.0, "decode_compress": False, "bits": 2, "pooling": "max"}
    assert isinstance(opts.method_options["gamma"], float) and opts.method_options["decode_compress"] is False


# --- every figure defined once (issue 11) -------------------------------------------------------------

TIMINGS = {"prefill_s", "ttft_ms", "itl_ms", "decode_s", "peak_mem_bytes", "shared_prefill_s", "context_prefill_s"}


def _tiny_ctx(**options):
    from arkv_bench.runner import Context, RunOptions
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    opts = RunOptions(**options)
    return Context(model=model, tokenizer=None, opts=opts, info={"max_positions": 2048}, eos=[])


@pytest.mark.parametrize("method, size, option", [("mix", 1024, {"slack": 64}), ("h2o", 256, {"slack": 64}),
                                                  ("window", 256, {"n_sink": 100}), ("mix", 0.2, {"slack": 8})])
def test_warm_up_takes_the_run_s_method_options(method: str, size, option: dict) -> None:
    """The warm-up runs on every device (here the CPU) with the user's options: it used to build a 33-token
    cache that rejected slack=64 or a large n_sink, on CUDA only."""
    from arkv_bench.runner import check_caches, warm_up

    ctx = _tiny_ctx(quant_types=[method], cache_sizes=[size], method_options=option)
    check_caches(ctx.opts)
    gen = warm_up(ctx, method, size)
    assert gen is not None and gen.stats["compressed"] and gen.kv_bytes < gen.kv_bytes_full
    assert len(gen.itl_s) == 3  # it decoded too


def test_fraction_budgets_are_checked_with_the_smallest_budget_they_can_get() -> None:
    """--cache-size 0.2 --method-option slack=8 was refused: a fraction was checked with a budget of window + 1."""
    from arkv_bench.budgets import budget_for, check_cache
    from arkv_bench.runner import RunOptions, UsageError, validate

    validate(RunOptions(quant_types=["full", "mix"], cache_sizes=[0.2], method_options={"slack": 8}))
    assert budget_for(0.2, 100, "mix", 32, {"slack": 8}) == 41  # slack must stay below budget - window
    assert budget_for(0.2, 1000, "mix", 32, {"slack": 8}) == 200
    check_cache("mix", 41, 32, {"slack": 8})
    with pytest.raises(UsageError, match="pooling"):  # options wrong at any budget are still refused
        validate(RunOptions(quant_types=["mix"], cache_sizes=[0.2], method_options={"pooling": "median"}))


def test_one_eos_rule() -> None:
    """The generation config's EOS ids (one or a list) and the tokenizer's, everywhere (the CLI and tune used to
    drop the tokenizer's when the generation config held a list)."""
    from types import SimpleNamespace

    from arkv_bench.measures import eos_ids

    tok = SimpleNamespace(eos_token_id=3)
    for config_eos, expected in (([1, 2], [1, 2, 3]), (2, [2, 3]), (None, [3]), ([3], [3])):
        model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=config_eos))
        assert eos_ids(model, tok) == expected


def test_decode_steps_are_timed_without_host_side_stop_handling() -> None:
    """The stop-string check (decoding text on the host) is not inside a timed decode step."""
    from arkv_bench.cache import make_cache
    from arkv_bench.generation import greedy_generate
    from tests.conftest import prompt_ids, tiny_model

    model = tiny_model("llama")
    ids = prompt_ids(16)

    def slow_stop(tokens: list[int]) -> bool:
        time.sleep(0.2)
        return False

    gen = greedy_generate(model, ids, torch.ones_like(ids), make_cache("full", model.config), 4, (), slow_stop)
    assert len(gen.itl_s) == 3 and max(gen.itl_s) < 0.2 and gen.ttft_s < 0.2
    assert gen.generated == [4]


def test_decode_rate_per_row_then_per_batch() -> None:
    """Two rows decoded together: one ends at its second token (EOS), one runs 5 tokens, each step 1 s. Each row
    makes 1 token/s, so the batch makes 2 token/s (the old rate, 4 tokens over 4 s, mixed speed with length)."""
    from arkv_bench.measures import row_decode
    from arkv_bench.results import SampleRecord, summarise

    steps = [1.0, 1.0, 1.0, 1.0]
    records = []
    for row, generated in enumerate((2, 5)):
        n, seconds = row_decode(steps, generated)
        records.append(SampleRecord(suite="s", task="t", sample_id=str(row), quant_type="full", cache_size=None,
                                    window_size=32, decode_tokens=generated - 1, decode_steps=n, decode_s=seconds,
                                    itl_ms=[1000.0] * 4 if row == 0 else [], batch_id="0", batch_rows=2,
                                    batch_row=row, prefill_s=1.0, prompt_tokens=10, kv_bytes=1, kv_bytes_full=1,
                                    weights_bytes=123).to_json())
    # a later batch of one row: 3 tokens after the first in 1.5 s
    records.append({**records[0], "sample_id": "2", "batch_id": "2", "batch_rows": 1, "decode_steps": 3,
                    "decode_s": 1.5, "itl_ms": [500.0] * 3})
    (row,) = summarise(records, {"model": "m", "device": "cpu", "dtype": "float32"}, 32)
    assert row["decode_tok_s"] == pytest.approx((2.0 * 4 + 2.0 * 1.5) / (4 + 1.5))
    assert row["itl_ms_p50"] == pytest.approx(1000.0) and row["weights_bytes"] == 123


def test_weights_bytes_counts_each_tensor_once() -> None:
    from arkv_bench.measures import PeakMemory, weights_bytes
    from tests.conftest import tiny_model

    model = tiny_model("llama", tie_word_embeddings=True)
    expected = sum(t.numel() * t.element_size() for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
    assert weights_bytes(model) == expected
    assert PeakMemory(torch.device("cpu")).read() is None  # not measured on the CPU: no figure


@pytest.mark.slow
def test_same_seed_and_config_twice_gives_identical_results(tmp_path: Path) -> None:
    args = ["--suite", "passkey", "--context-lengths", "256", "--depths", "0.2,0.8", "--quant-type", "full,mix,window",
            "--cache-size", "64", "--window-size", "8", "--batch-size", "2", "--seed", "3", "--quiet"]
    for name in ("a", "b"):
        result = cli(*args, "--out", str(tmp_path), "--run-name", name)
        assert result.exit_code == 0, result.output
    first, second = (read_samples(tmp_path / name) for name in ("a", "b"))
    assert len(first) == 6
    assert [{k: v for k, v in s.items() if k not in TIMINGS} for s in first] == \
        [{k: v for k, v in s.items() if k not in TIMINGS} for s in second]
    scores = [[(r["task"], r["quant_type"], r["score"]) for r in read_summary(tmp_path / name)[1]] for name in "ab"]
    assert scores[0] == scores[1]
