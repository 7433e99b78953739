"""Data-parallel runs on the CPU: two torchrun ranks on the gloo backend, against one process.

The model is a tiny random Llama saved with the embedded model's tokenizer, so that two processes
start in seconds; the data are the GSM8K and LongBench fixture files. What must hold: the same
samples and scores whatever the number of ranks, each rank in its own sample log, rank 0's summary
over all of them, and a kill -9 of one rank followed by a rerun (with 2 ranks, then with 1) that
loses and duplicates nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from arkv_bench.distributed import Ranks, without_gpus_option
from arkv_bench.models import load_tokenizer
from arkv_bench.results_io import read_run_samples, record_key
from tests.fixtures_data import write_fixtures

REPO = Path(__file__).resolve().parents[1]


def test_shares_cover_the_work_once_in_a_fixed_order() -> None:
    items = list(range(11))
    shares = [Ranks(rank=r, world=3).share(items) for r in range(3)]
    assert sorted(x for share in shares for x in share) == items
    assert shares[1] == [1, 4, 7, 10]
    assert Ranks().share(items) == items
    # grouped: a group (here, runs of 3) stays on one rank, the groups dealt in turn
    grouped = [Ranks(rank=r, world=2).share(items, group=lambda x: x // 3) for r in range(2)]
    assert grouped == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10]]
    assert [Ranks(r, 2).samples_file() for r in range(2)] == ["samples.rank0.jsonl", "samples.rank1.jsonl"]
    assert Ranks().samples_file() == "samples.jsonl"


def test_the_launcher_drops_its_own_option() -> None:
    argv = ["run", "--suite", "passkey", "--gpus", "2", "--limit", "3", "--gpus=4"]
    assert without_gpus_option(argv) == ["run", "--suite", "passkey", "--limit", "3"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = load_tokenizer(None)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("tiny-model")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fixtures(tmp_path_factory.mktemp("data"))


def run_args(model_dir: Path, data_dir: Path, out: Path, suite: str, tasks: str, limit: int) -> list[str]:
    return ["run", "--suite", suite, "--tasks", tasks, "--data-dir", str(data_dir), "--model", str(model_dir),
            "--limit", str(limit), "--quant-type", "full,mix,snapkv", "--cache-size", "0.5", "--num-fewshot", "1",
            "--device", "cpu", "--out", str(out), "--run-name", "dp", "--quiet"]


def launch(args: list[str], ranks: int, **popen: object) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "arkv_bench", *args] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
         "-m", "arkv_bench", *args]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen)


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-3000:]


def results(folder: Path) -> dict[tuple, tuple]:
    return {record_key(r): (r["prediction"], r["score"], r["status"]) for r in read_run_samples(folder)}


def summary_n(folder: Path) -> list[int]:
    import csv

    with (folder / "summary.csv").open(newline="", encoding="utf-8") as f:
        return sorted(int(row["n"]) for row in csv.DictReader(f))


@pytest.mark.slow
def test_two_ranks_give_the_samples_and_scores_of_one(model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    suite, tasks = "longbench", "qasper,trec"
    finish(launch(run_args(model_dir, data_dir, tmp_path / "one", suite, tasks, 4), ranks=1))
    finish(launch(run_args(model_dir, data_dir, tmp_path / "two", suite, tasks, 4), ranks=2))
    one, two = tmp_path / "one" / "dp", tmp_path / "two" / "dp"
    assert results(one) == results(two) and len(results(one)) >= 3 * 4  # 3 configurations x >= 4 samples
    ranked = sorted(p.name for p in two.glob("samples*.jsonl"))
    assert ranked == ["samples.rank0.jsonl", "samples.rank1.jsonl"]
    assert all((two / name).read_text().strip() for name in ranked), "a rank did no work"
    assert summary_n(one) == summary_n(two)
    config = json.loads((two / "config.json").read_text())
    assert "gpus" in config["provenance"] and config["provenance"]["gpus"]["count"] == torch.cuda.device_count()


@pytest.mark.slow
def test_a_killed_rank_and_a_rerun_lose_and_duplicate_nothing(model_dir: Path, data_dir: Path,
                                                              tmp_path: Path) -> None:
    args = run_args(model_dir, data_dir, tmp_path, "gsm8k", "gsm8k", 8)
    folder = tmp_path / "dp"
    proc = launch(args, ranks=2, start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while not any(p.read_bytes().count(b"\n") >= 2 for p in folder.glob("samples.rank1.jsonl")):
            assert proc.poll() is None, f"the run ended before the kill: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "rank 1 wrote nothing within 300 s"
            time.sleep(0.05)
        workers = [int(pid) for pid in subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)],
                                                      capture_output=True, text=True).stdout.split()]
        assert workers, "no rank processes found"
        os.kill(max(workers), signal.SIGKILL)  # the last-started rank
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stderr.close()
    assert proc.returncode != 0
    partial = len(read_run_samples(folder))
    assert 0 < partial < 3 * 8, "the run finished before the kill: nothing was tested"

    finish(launch(args, ranks=2))
    done = read_run_samples(folder)
    assert len(done) == 3 * 8 and len({record_key(r) for r in done}) == 3 * 8
    lines = sum(len(p.read_text().splitlines()) for p in folder.glob("samples*.jsonl"))
    assert lines == 3 * 8, "a sample was written twice"
    assert summary_n(folder) == [8, 8, 8]
    before = {p.name: p.read_text() for p in folder.glob("samples*.jsonl")}
    finish(launch(args, ranks=1))  # a different number of ranks resumes the same folder: nothing left to do
    assert {p.name: p.read_text() for p in folder.glob("samples*.jsonl")} == before
