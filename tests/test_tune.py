"""`arkv-bench tune`: Optuna search of ARKV's tau1..gamma, resumable, writing a `run --config` file.

The study logic runs on a stub objective (instant); two real searches of 3 trials run the
embedded model on a short passkey suite and on an lm-eval fixture task.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

pytest.importorskip("optuna")

import yaml  # noqa: E402

from arkv_bench.runner import RunOptions  # noqa: E402
from arkv_bench.tune import (DEFAULT_RANGES, TuneError, TuneOptions, check, parse_range, run_tune,  # noqa: E402
                             search_space)

PAPER = {"tau1": 7.7744, "tau2": 5.4070, "tau3": 5.5277, "gamma": 263.81}




def _trials(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _config_keys() -> set[str]:
    from arkv_bench.options import CONFIG_KEYS

    return set(CONFIG_KEYS)


def test_ranges_and_checks():
    for name, value in PAPER.items():
        low, high = DEFAULT_RANGES[name]
        assert low < value < high
    assert parse_range("tau1=1:20") == ("tau1", (1.0, 20.0))
    assert parse_range("gamma=10,1000") == ("gamma", (10.0, 1000.0))
    for bad in ("tau1", "tau1=5:1", "tau1=a:b"):
        with pytest.raises(TuneError):
            parse_range(bad)
    assert set(search_space("mix", {})) == set(PAPER)
    assert search_space("origin", {"alpha": (0.0, 0.5)})["alpha"] == (0.0, 0.5)
    with pytest.raises(TuneError, match="no numeric option 'tau9'"):
        search_space("mix", {"tau9": (1.0, 2.0)})
    with pytest.raises(TuneError, match="none of tau1"):
        check(TuneOptions(run=RunOptions(quant_types=["h2o"])))
    with pytest.raises(TuneError, match="one method"):
        check(TuneOptions(run=RunOptions(quant_types=["mix", "origin"])))
    with pytest.raises(TuneError, match="--metric"):
        check(TuneOptions(run=RunOptions(quant_types=["mix"]), metric="nope"))
    with pytest.raises(TuneError, match="both searched and fixed"):
        check(TuneOptions(run=RunOptions(quant_types=["mix"], method_options={"gamma": 3.0})))


def test_study_is_seeded_resumable_and_starts_at_the_paper(tmp_path):
    """A stub objective (score = -(tau1 - 3)^2): TPE, the paper's point first, resume, refusal of other options."""
    calls = []

    def evaluate(params):
        calls.append(params)
        return [{"task": "t", "score": -(params["tau1"] - 3.0) ** 2, "kv_ratio": 0.5, "decode_tok_s": 10.0}]

    run = RunOptions(suite="passkey", quant_types=["mix"], cache_sizes=[512], seed=7)
    opts = TuneOptions(run=run, trials=6, out=tmp_path)
    seen = []
    first = run_tune(opts, progress=lambda done, total, best: seen.append((done, total)), evaluator=evaluate)
    assert first.complete == 6 and len(calls) == 6 and seen[-1] == (6, 6)
    assert calls[0] == PAPER
    rows = _trials(first.csv_path)
    assert [r["state"] for r in rows] == ["COMPLETE"] * 6 and "task:t" in rows[0]
    assert first.best_value == max(float(r["value"]) for r in rows)
    # same options and seed in a fresh folder: the same trials
    again = run_tune(TuneOptions(run=run, trials=6, out=tmp_path / "again"), evaluator=evaluate)
    assert [r["tau1"] for r in _trials(again.csv_path)] == [r["tau1"] for r in rows]
    # resume: nothing left to do, then 2 more
    calls.clear()
    assert run_tune(opts, evaluator=evaluate).complete == 6 and calls == []
    assert run_tune(TuneOptions(run=run, trials=8, out=tmp_path), evaluator=evaluate).complete == 8
    assert len(calls) == 2 and PAPER not in calls
    # the same study name with other options is refused
    with pytest.raises(TuneError, match="other options"):
        run_tune(TuneOptions(run=RunOptions(suite="passkey", quant_types=["mix"], cache_sizes=[256], seed=7),
                             trials=8, out=tmp_path, study_name=first.study_name), evaluator=evaluate)
    config = yaml.safe_load(first.config_path.read_text())
    assert set(config) <= _config_keys()
    assert config["quant_type"] == "mix" and config["cache_size"] == 512 and set(config["method_options"]) == set(PAPER)


def test_tune_passkey_writes_a_config_that_run_accepts(tmp_path):
    """3 real trials on a one-prompt passkey suite, then `arkv-bench run --config best.yaml`."""
    from typer.testing import CliRunner

    from arkv_bench.cli import app

    run = RunOptions(suite="passkey", quant_types=["mix"], cache_sizes=[64], window_size=8, context_lengths=[256],
                     depths=[0.5], samples_per_cell=1)
    result = run_tune(TuneOptions(run=run, trials=3, out=tmp_path / "tune", storage=f"sqlite:///{tmp_path}/t.db"))
    rows = _trials(result.csv_path)
    assert len(rows) == 3 and all(r["state"] == "COMPLETE" for r in rows)
    assert all(0 < float(r["kv_ratio"]) < 0.5 for r in rows)  # the 256-token prompt is compressed to 64 tokens
    assert (tmp_path / "t.db").exists()
    config = yaml.safe_load(result.config_path.read_text())
    assert set(config) <= _config_keys() and config["suite"] == "passkey" and config["context_lengths"] == [256]
    assert config["method_options"] == {k: pytest.approx(v, rel=1e-5) for k, v in result.best_params.items()}
    out = CliRunner().invoke(app, ["run", "--config", str(result.config_path), "--out", str(tmp_path / "runs"),
                                   "--quiet"])
    assert out.exit_code == 0, out.output
    summary = next((tmp_path / "runs").glob("*/summary.csv")).read_text()
    assert "passkey,passkey,mix,64,8,1," in summary


def test_tune_lm_eval_suite(tmp_path):
    """3 trials on an lm-eval fixture task; the config parses into run options of the lm-eval suite."""
    pytest.importorskip("lm_eval")
    from fixtures_lm_eval import write_tasks

    from arkv_bench.cli import read_config
    from arkv_bench.options import build_options
    from arkv_bench.suites.lm_eval_suite import check_tasks

    tasks = write_tasks(tmp_path / "tasks")
    run = RunOptions(suite="lm-eval", tasks=["arkv_fx_mc"], quant_types=["mix"], cache_sizes=[24], window_size=8,
                     limit=1, data_dir=str(tasks))
    result = run_tune(TuneOptions(run=run, trials=3, out=tmp_path / "tune", ranges={"gamma": (10.0, 500.0)}))
    rows = _trials(result.csv_path)
    assert len(rows) == 3 and all(r["state"] == "COMPLETE" and r["task:arkv_fx_mc"] for r in rows)
    assert all(10.0 <= float(r["gamma"]) <= 500.0 for r in rows)
    opts = build_options({}, read_config(result.config_path))
    assert opts.suite == "lm-eval" and opts.quant_types == ["mix"] and opts.cache_sizes == [24]
    assert set(opts.method_options) == set(PAPER) and opts.limit is None  # the tuning subset is not kept
    assert check_tasks(opts.tasks, opts.data_dir) == ["arkv_fx_mc"]
