"""Hostile and awkward input (issue 16): each case ends with one line, the right exit code, and the file tree as it was.

Every case runs the command in-process (typer's CliRunner, or `arkv-lm-eval`'s main) in a fresh folder, with
$ARKV_BENCH_CACHE pointed at a folder of that tree wherever a case could write a model cache. Cases that need
the real embedded model (it loads in about a second) are marked slow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from arkv_bench.cli import app
from tests.fixtures_data import QASPER, write_fixtures, write_jsonl
from tests.fixtures_runs import build_fixture_results
from tests.test_run import BAD_INPUTS

REPO = Path(__file__).resolve().parents[1]
ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
PASSKEY = ["--suite", "passkey", "--context-lengths", "256", "--depths", "0.5", "--quant-type", "full,window",
           "--cache-size", "64", "--window-size", "8", "--quiet"]


def tree(*roots: Path) -> dict[str, tuple]:
    """Every path under the roots with its kind and content digest (what "unchanged" means here)."""
    found: dict[str, tuple] = {}
    for root in roots:
        if not root.exists():
            continue
        for path in sorted(root.rglob("*")):
            kind = "dir" if path.is_dir() else hashlib.sha1(path.read_bytes()).hexdigest()
            found[str(path)] = (kind, oct(path.stat().st_mode))
    return found


def one_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    return lines[0]


def embedded_dir() -> Path:
    from arkv_bench.models import embedded_model_dir

    return embedded_model_dir()


# Each case: how to set up the folder (returns the command's arguments), the words the line must hold.
Setup = Callable[[Path], list[str]]


def _out(tmp: Path, *args: str) -> list[str]:
    return ["run", *args, "--out", str(tmp / "out"), "--quiet"]


def _data(tmp: Path, rows: list[dict] | str, task: str = "qasper") -> Path:
    data = tmp / "data"
    if isinstance(rows, str):
        (data).mkdir(parents=True, exist_ok=True)
        (data / f"{task}.jsonl").write_text(rows)
    else:
        write_jsonl(data / f"{task}.jsonl", rows)
    return data


def _longbench(tmp: Path, rows: list[dict] | str) -> list[str]:
    return _out(tmp, "--suite", "longbench", "--tasks", "qasper", "--data-dir", str(_data(tmp, rows)),
                "--quant-type", "full", "--limit", "1")


def _summary(tmp: Path, text: str) -> Path:
    folder = tmp / "results" / "bad"
    folder.mkdir(parents=True)
    (folder / "summary.csv").write_text(text)
    return tmp / "results"


def _existing_run(tmp: Path, config: str) -> list[str]:
    folder = tmp / "out" / "r"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(config)
    return _out(tmp, *PASSKEY, "--run-name", "r")


def _fake_model_folder(tmp: Path) -> list[str]:
    folder = tmp / "model"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (embedded_dir() / name).is_file():
            shutil.copy(embedded_dir() / name, folder / name)
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!" * 10)
    return _out(tmp, *PASSKEY, "--model", str(folder))


def _file(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


CASES: dict[str, tuple[Setup, list[str]]] = {
    # 2. --run-name stays inside --out
    "run-name escapes": (lambda t: _out(t, *PASSKEY, "--run-name", "../escaped"), ["--run-name", "../escaped"]),
    "run-name absolute": (lambda t: _out(t, *PASSKEY, "--run-name", str(t / "abs")), ["--run-name", "one folder"]),
    "run-name nested": (lambda t: _out(t, *PASSKEY, "--run-name", "a/b"), ["--run-name", "a/b"]),
    "run-name dot": (lambda t: _out(t, *PASSKEY, "--run-name", "."), ["--run-name"]),
    # 3. data files checked against the suite's schema, with types
    "answers is a string": (lambda t: _longbench(t, [{**QASPER[0], "answers": "Location"}]),
                            ["qasper.jsonl", "line 1", "answers", "list of text"]),
    "context is a number": (lambda t: _longbench(t, [{**QASPER[0], "context": 12}]),
                            ["qasper.jsonl", "line 1", "context", "text"]),
    "empty data file": (lambda t: _longbench(t, ""), ["qasper.jsonl", "no rows"]),
    # 4. empty lists and zero counts
    "empty quant-type": (lambda t: _out(t, "--quant-type", ""), ["--quant-type"]),
    "only commas": (lambda t: _out(t, "--quant-type", ",,"), ["--quant-type", "names nothing"]),
    "empty cache-size": (lambda t: _out(t, "--cache-size", ""), ["--cache-size"]),
    "limit 0": (lambda t: _out(t, "--limit", "0"), ["--limit", "at least 1"]),
    "empty tasks": (lambda t: _out(t, "--tasks", ""), ["--tasks"]),
    "empty context-lengths": (lambda t: _out(t, "--context-lengths", ""), ["--context-lengths"]),
    "repeated method": (lambda t: _out(t, "--quant-type", "full,mix,full"), ["--quant-type", "repeats", "full"]),
    "repeated size": (lambda t: _out(t, "--cache-size", "512,512"), ["--cache-size", "repeats", "512"]),
    # 5. what used to be tracebacks
    "overflowing cache size": (lambda t: _out(t, "--cache-size", "99999999999999999999", "--quant-type", "mix"),
                               ["cache size", "too large"]),
    "out is a file": (lambda t: ["run", *PASSKEY, "--out", str(_file(t / "file"))], ["--out", "not a folder"]),
    "report into a file's folder": (lambda t: ["report", str(build_fixture_results(t / "r")), "--out",
                                               str(_file(t / "file") / "r.html")], ["--out", "not a folder"]),
    "compare a non-number score": (lambda t: ["compare", str(_summary(
        t, "model,suite,task,quant_type,cache_size,n,score\nm,s,t,full,,3,abc\n"))], ["score", "abc", "line 2"]),
    "report a non-number score": (lambda t: ["report", str(_summary(
        t, "model,suite,task,quant_type,cache_size,n,score\nm,s,t,full,,3,abc\n"))], ["score", "abc"]),
    "method_options a list": (lambda t: _out(t, "--config", str(_file(t / "c.yaml", "method_options: [1, 2]\n"))),
                              ["method_options", "mapping"]),
    # 7. garbage summary.csv
    "compare garbage": (lambda t: ["compare", str(_summary(t, "hello\nworld\n"))], ["summary.csv", "not a summary"]),
    "report garbage": (lambda t: ["report", str(_summary(t, "hello\nworld\n"))], ["summary.csv", "not a summary"]),
    # 8. misleading messages
    "corrupted config.json": (lambda t: _existing_run(t, '{"options": '), ["config.json", "not readable json"]),
    "empty model": (lambda t: _out(t, "--model", ""), ["--model", "non-empty"]),
}
SLOW_CASES: dict[str, tuple[Setup, list[str]]] = {
    "context beyond the model": (lambda t: _out(t, "--suite", "passkey", "--context-lengths", "9000",
                                                "--depths", "0.5", "--quant-type", "full"),
                                 ["8192 positions", "passkey"]),
    "fraction that rounds to no token": (lambda t: _out(t, "--suite", "passkey", "--context-lengths", "256",
                                                        "--depths", "0.5", "--quant-type", "mix", "--cache-size",
                                                        "0.001"), ["cache size 0.001", "no token"]),
    "fake gguf": (lambda t: _out(t, *PASSKEY, "--model", str(_file(t / "fake.gguf", "not a gguf"))),
                  ["fake.gguf", "not a gguf model"]),
    "folder with a fake gguf": (lambda t: _out(t, *PASSKEY, "--model", str(_file(t / "m" / "x.gguf", "junk").parent)),
                                ["x.gguf", "not a gguf model"]),
    "garbage safetensors": (_fake_model_folder, ["could not load model"]),
}


def run_case(setup: Setup, words: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
             cache_in_tree: bool = True) -> str:
    """Run the case's command; assert exit code 2, one line holding `words`, and the tree as it was (with
    $ARKV_BENCH_CACHE inside it unless the case needs the real model's cache)."""
    if cache_in_tree:
        monkeypatch.setenv("ARKV_BENCH_CACHE", str(tmp_path / "cache"))
    args = setup(tmp_path)
    before = tree(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (result.output, result.exception)
    line = one_line(result.output)
    for word in words:
        assert word.lower() in line.lower(), (word, line)
    assert tree(tmp_path) == before, "the command changed the file tree"
    return line


@pytest.mark.parametrize("case", list(CASES))
def test_hostile(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_case(*CASES[case], tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SLOW_CASES))
def test_hostile_after_the_model_loads(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake GGUF is converted into the cache (kept in the tree: nothing may be left there); the others load the
    real embedded model from its usual cache."""
    run_case(*SLOW_CASES[case], tmp_path, monkeypatch, cache_in_tree="gguf" in case)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_earlier_bad_inputs_leave_the_tree_as_it_was(case: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    args, words = BAD_INPUTS[case]
    run_case(lambda t: _out(t, *args), words, tmp_path, monkeypatch)


@pytest.mark.skipif(ROOT, reason="root writes into read-only folders")
def test_read_only_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        run_case(lambda t: ["run", *PASSKEY, "--out", str(folder)], ["--out", "not writable"], tmp_path, monkeypatch)
    finally:
        folder.chmod(0o755)


@pytest.mark.skipif(ROOT, reason="root writes into read-only files")
def test_read_only_run_is_refused_before_the_model_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from arkv_bench.options import build_options

    opts = build_options({k.lstrip("-").replace("-", "_"): v for k, v in zip(PASSKEY[:-1:2], PASSKEY[1:-1:2])})
    folder = tmp_path / "out" / "r"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"options": json.loads(json.dumps(opts.key(), default=str))}))
    (folder / "samples.jsonl").write_text("")
    (folder / "samples.jsonl").chmod(0o444)
    run_case(lambda t: _out(t, *PASSKEY, "--run-name", "r"), ["samples.jsonl", "not writable"], tmp_path, monkeypatch)


def test_a_run_folder_another_process_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The folder's lock is held (as by a concurrent run of the same command): exit 2 before the model loads."""
    from filelock import FileLock

    from arkv_bench.runner import LOCK_FILE

    def setup(t: Path) -> list[str]:
        folder = t / "out" / "held"
        folder.mkdir(parents=True)
        (folder / LOCK_FILE).touch()
        return _out(t, *PASSKEY, "--run-name", "held")

    args = setup(tmp_path)
    lock = FileLock(str(tmp_path / "out" / "held" / LOCK_FILE))
    lock.acquire()
    try:
        run_case(lambda t: args, ["another arkv-bench process", "resumes"], tmp_path, monkeypatch)
    finally:
        lock.release()


# --- arkv-lm-eval -------------------------------------------------------------------------------------

LM_EVAL_ARGS = {
    "unknown method": ("quant_type=nope", ["unknown quant_type 'nope'"]),
    "cache size text": ("quant_type=mix,cache_size=abc", ["cache_size", "abc"]),
    "cache size too small": ("quant_type=mix,cache_size=8,window_size=8", ["larger than window_size"]),
    "window zero": ("quant_type=mix,window_size=0", ["window_size"]),
    "unknown option": ("quant_type=mix,tau9=1", ["tau9", "tau1"]),
    "negative option": ("quant_type=mix,gamma=-1", ["gamma", "non-negative"]),
    "missing model": ("pretrained=/nonexistent/m,quant_type=full", ["/nonexistent/m", "does not exist"]),
    "not key=value": ("quant_type", ["key=value"]),
}


@pytest.mark.parametrize("case", list(LM_EVAL_ARGS) + ["unknown task"])
def test_lm_eval_command_line(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capfd: pytest.CaptureFixture) -> None:
    pytest.importorskip("lm_eval")
    from arkv_bench.lm_eval_cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["arkv-lm-eval"])
    if case == "unknown task":
        argv = ["--model", "arkv", "--model_args", "quant_type=full", "--tasks", "no_such_task_x",
                "--include_path", str(tmp_path)]
        words = ["no_such_task_x"]
    else:
        model_args, words = LM_EVAL_ARGS[case]
        argv = ["--model", "arkv", "--model_args", model_args, "--tasks", "arkv_fx_mc"]
    before = tree(tmp_path)
    log = logging.getLogger("lm_eval")
    handlers = list(log.handlers)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    log.handlers[:] = handlers  # lm-eval's setup_logging bound a handler to this test's captured stderr
    assert exit_.value.code == 2
    captured = capfd.readouterr()
    line = one_line(captured.out + captured.err)
    for word in words:
        assert word.lower() in line.lower(), (word, line)
    assert tree(tmp_path) == before


@pytest.mark.slow
def test_lm_eval_suite_without_its_data_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`run --suite lm-eval --tasks gsm8k` offline used to leave a folder holding only config.json."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_case(lambda t: _out(t, "--suite", "lm-eval", "--tasks", "gsm8k", "--quant-type", "full", "--limit", "1"),
             ["gsm8k", "offline"], tmp_path, monkeypatch, cache_in_tree=False)


# --- records keyed by (configuration, sample) ---------------------------------------------------------

@pytest.fixture(scope="module")
def passkey_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("passkey")
    result = CliRunner().invoke(app, ["run", *PASSKEY, "--out", str(out), "--run-name", "p"])
    assert result.exit_code == 0, result.output
    return out


def _rerun(out: Path) -> tuple[object, list[dict], list[dict]]:
    import csv

    result = CliRunner().invoke(app, ["run", *PASSKEY, "--out", str(out), "--run-name", "p"])
    folder = out / "p"
    samples = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    with (folder / "summary.csv").open() as f:
        return result, samples, list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["duplicate", "conflicting duplicate", "garbage line"])
def test_each_sample_counts_once(damage: str, passkey_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(passkey_run, out)
    log = out / "p" / "samples.jsonl"
    lines = log.read_text().splitlines()
    first = json.loads(lines[0])
    extra = {"duplicate": lines[0], "conflicting duplicate": json.dumps({**first, "score": 1 - first["score"]}),
             "garbage line": "{not json"}[damage]
    log.write_text("\n".join([*lines, extra]) + "\n")
    result, samples, rows = _rerun(out)
    assert result.exit_code == 0, result.output
    note = one_line(result.output)
    assert "left out 1" in note and ("duplicate" in note if "duplicate" in damage else "unreadable" in note)
    assert [json.dumps(s) for s in samples] == [json.dumps(json.loads(line)) for line in lines]
    assert sorted(int(r["n"]) for r in rows) == [1, 1]
    assert {r["quant_type"]: float(r["score"]) for r in rows}[first["quant_type"]] == 100 * first["score"]


@pytest.mark.slow
def test_two_concurrent_runs_leave_one_record_per_sample(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "arkv_bench.cli", "run", *PASSKEY, "--out", str(tmp_path), "--run-name", "c"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes in ([0, 0], [0, 2]), outputs
    if codes == [0, 2]:
        assert "another arkv-bench process" in "".join(o[1] for o in outputs)
    samples = [json.loads(line) for line in (tmp_path / "c" / "samples.jsonl").read_text().splitlines()]
    keys = [(s["quant_type"], s["sample_id"]) for s in samples]
    assert len(keys) == len(set(keys)) == 2


@pytest.mark.slow
def test_sigint_says_what_was_kept(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "arkv_bench.cli", "run", "--suite", "passkey", "--context-lengths", "256,300,350",
            "--depths", "0.1,0.5,0.9", "--quant-type", "full", "--out", str(tmp_path), "--run-name", "i", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "i" / "samples.jsonl"
    deadline = time.monotonic() + 300
    while not (log.is_file() and log.read_text().count("\n") >= 1):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 130, (out, err)
    line = one_line(out + err)
    assert "interrupted" in line and str(tmp_path / "i") in line and "resumes" in line


# --- the error boundary -------------------------------------------------------------------------------

@pytest.mark.parametrize("debug", [False, True])
def test_an_unexpected_error_is_one_line_and_a_saved_traceback(debug: bool, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from arkv_bench import runner

    def broken(*args, **kwargs):
        raise RuntimeError("a bug\nwith a second line")

    monkeypatch.setattr(runner, "prepare", broken)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    result = CliRunner().invoke(app, [*(["--debug"] if debug else []), *_out(tmp_path, *PASSKEY)])
    assert result.exit_code == 1, result.output
    saved = next(tmp_path.glob("arkv-bench-error-*.txt"))
    assert "RuntimeError: a bug" in saved.read_text() and "Traceback" in saved.read_text()
    if debug:
        assert "Traceback" in result.output and str(saved) in result.output.splitlines()[-1]
    else:
        line = one_line(result.output)
        assert line.startswith("unexpected error: RuntimeError: a bug (traceback: ") and str(saved) in line


@pytest.mark.slow
def test_a_fraction_below_the_smallest_budget_is_said(tmp_path: Path) -> None:
    """--cache-size 0.01 used to be shown as 0.0 and silently raised to 33 tokens."""
    from rich.console import Console

    from arkv_bench.cli import summary_table

    result = CliRunner().invoke(app, _out(tmp_path, "--suite", "passkey", "--context-lengths", "256", "--depths",
                                          "0.5", "--quant-type", "mix", "--cache-size", "0.01"))
    assert result.exit_code == 0, result.output
    note = one_line(result.output)
    assert note.startswith("note: cache size 0.01 with mix: 1 of 1 prompts get the smallest budget mix accepts (33")
    (folder,) = (tmp_path / "out").iterdir()
    assert [json.loads(line)["budget"] for line in (folder / "samples.jsonl").read_text().splitlines()] == [33]
    console = Console(width=200, record=True)
    console.print(summary_table([{"task": "passkey", "quant_type": "mix", "cache_size": 0.01, "n": 1, "score": None,
                                  "score_ci95": None, "kv_ratio": None, "decode_tok_s": None, "ttft_ms": None,
                                  "compressed_frac": None, "evicted_frac": None, "quantized_frac": None,
                                  "status": "ok"}]))
    assert " 0.01 " in console.export_text()
