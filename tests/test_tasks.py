"""Task definitions: the YAML files must carry LongBench's official templates and
lengths unchanged, and the loader must reject anything it does not understand."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from arkv_bench.metrics import LONGBENCH_DATASET_METRIC
from arkv_bench.tasks import TaskSpec, available_suites, load_task_specs

REPO = Path(__file__).resolve().parents[1]

LONGBENCH_DATASETS = [
    "narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh", "hotpotqa", "2wikimqa",
    "musique", "dureader", "gov_report", "qmsum", "multi_news", "vcsum", "trec", "triviaqa",
    "samsum", "lsht", "passage_count", "passage_retrieval_en", "passage_retrieval_zh", "lcc",
    "repobench-p",
]
NO_CHAT_TEMPLATE = {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
LONGBENCH_E_DATASETS = [
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec",
    "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
]


def _reference_dir() -> Path | None:
    """LongBench's dataset2prompt/maxlen JSONs: $ARKV_BENCH_LONGBENCH_REF, or shared/longbench
    inside or beside the repo."""
    candidates = [os.environ.get("ARKV_BENCH_LONGBENCH_REF")]
    candidates += [str(REPO / "shared" / "longbench"), str(REPO.parent / "shared" / "longbench")]
    for candidate in candidates:
        if candidate and (Path(candidate) / "dataset2prompt.json").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="module")
def official() -> tuple[dict[str, str], dict[str, int]]:
    ref = _reference_dir()
    if ref is None:
        pytest.skip("LongBench reference JSONs (shared/longbench) not found")
    prompts = json.loads((ref / "dataset2prompt.json").read_text(encoding="utf-8"))
    maxlens = json.loads((ref / "dataset2maxlen.json").read_text(encoding="utf-8"))
    return prompts, maxlens


@pytest.fixture(autouse=True)
def _default_tasks_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ARKV_BENCH_TASKS", raising=False)


# --------------------------------------------------------------------------- LongBench


def test_longbench_has_all_21_datasets_with_official_templates(official) -> None:
    prompts, maxlens = official
    specs = load_task_specs("longbench")
    assert list(specs) == LONGBENCH_DATASETS
    assert set(prompts) == set(LONGBENCH_DATASETS) == set(maxlens)
    for name, spec in specs.items():
        assert spec.prompt_template == prompts[name], name
        assert spec.max_new_tokens == maxlens[name], name


def test_longbench_sources_metrics_and_chat_template() -> None:
    specs = load_task_specs("longbench")
    for name, spec in specs.items():
        assert (spec.suite, spec.hub_id, spec.config, spec.split) == ("longbench", "THUDM/LongBench", name, "test")
        assert spec.metric == LONGBENCH_DATASET_METRIC[name]
        assert "{context}" in spec.prompt_template
    assert {name for name, spec in specs.items() if not spec.chat_template} == NO_CHAT_TEMPLATE
    # spot checks typed by hand from LongBench's dataset2maxlen.json
    assert specs["gov_report"].max_new_tokens == 512
    assert specs["hotpotqa"].max_new_tokens == 32
    assert specs["lcc"].prompt_template.endswith("Next line of code:\n")


def test_longbench_e_uses_e_configs_and_base_templates(official) -> None:
    prompts, maxlens = official
    specs = load_task_specs("longbench_e")
    assert list(specs) == [f"{name}_e" for name in LONGBENCH_E_DATASETS]
    for base in LONGBENCH_E_DATASETS:
        spec = specs[f"{base}_e"]
        assert spec.config == f"{base}_e" and spec.hub_id == "THUDM/LongBench" and spec.split == "test"
        assert spec.prompt_template == prompts[base]
        assert spec.max_new_tokens == maxlens[base]
        assert spec.metric == LONGBENCH_DATASET_METRIC[base]
        assert spec.chat_template == (base not in NO_CHAT_TEMPLATE)


def test_longbench_yaml_attribution_and_license() -> None:
    for name in ("longbench.yaml", "longbench_e.yaml"):
        first_line = (REPO / "tasks" / name).read_text(encoding="utf-8").splitlines()[0]
        assert "THUDM/LongBench" in first_line and "LONGBENCH_LICENSE" in first_line
    assert "MIT License" in (REPO / "tasks" / "LONGBENCH_LICENSE").read_text(encoding="utf-8")


# --------------------------------------------------------------------------- other suites


def test_gsm8k_spec() -> None:
    spec = load_task_specs("gsm8k")["gsm8k"]
    assert (spec.hub_id, spec.config, spec.split) == ("openai/gsm8k", "main", "test")
    assert (spec.fewshot_split, spec.num_fewshot, spec.max_new_tokens) == ("train", 8, 256)
    assert spec.stop == ("Question:", "</s>", "<|im_end|>")
    assert spec.metric == "gsm8k"


def test_mmlu_has_57_subjects() -> None:
    specs = load_task_specs("mmlu")
    assert len(specs) == 57
    assert {spec.config for spec in specs.values()} == set(specs)
    for subject in ("abstract_algebra", "high_school_government_and_politics", "world_religions"):
        assert subject in specs
    spec = specs["anatomy"]
    assert (spec.hub_id, spec.split, spec.fewshot_split, spec.num_fewshot) == ("cais/mmlu", "test", "dev", 5)
    assert spec.metric == "accuracy"
    assert spec.extra["scoring"] == "loglikelihood"
    assert spec.extra["choices"] == ["A", "B", "C", "D"]


def test_passkey_defaults() -> None:
    spec = load_task_specs("passkey")["passkey"]
    assert spec.hub_id is None and spec.metric == "passkey" and spec.max_new_tokens == 16
    assert spec.extra["context_lengths"] == [1024, 2048]
    assert spec.extra["depths"] == [0.1, 0.5, 0.9]
    assert spec.extra["samples_per_cell"] == 1


def test_taskspec_is_frozen_and_hashable() -> None:
    spec = load_task_specs("gsm8k")["gsm8k"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.max_new_tokens = 1  # type: ignore[misc]
    assert isinstance(hash(spec), int)
    assert {f.name for f in dataclasses.fields(TaskSpec)} == {
        "name", "suite", "hub_id", "config", "split", "prompt_template", "max_new_tokens",
        "metric", "chat_template", "fewshot_split", "num_fewshot", "stop", "extra",
    }


# --------------------------------------------------------------------------- loader errors


def _write_suite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> Path:
    path = tmp_path / "mini.yaml"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setenv("ARKV_BENCH_TASKS", str(tmp_path))
    return path


def test_env_override_and_merge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_suite(
        tmp_path,
        monkeypatch,
        "defaults: {metric: passkey, max_new_tokens: 4, extra: {a: 1, b: 2}}\n"
        "tasks:\n  t1: {prompt_template: 'x {context}', extra: {b: 3}}\n",
    )
    assert available_suites() == ["mini"]
    spec = load_task_specs("mini")["t1"]
    assert spec.extra == {"a": 1, "b": 3}
    assert spec.chat_template is True and spec.stop == ()


def test_unknown_key_names_key_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_suite(
        tmp_path,
        monkeypatch,
        "tasks:\n  t1: {prompt_template: x, max_new_tokens: 4, metric: passkey, max_tokens: 9}\n",
    )
    with pytest.raises(ValueError) as err:
        load_task_specs("mini")
    assert "max_tokens" in str(err.value) and str(path) in str(err.value)


def test_unknown_top_level_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_suite(tmp_path, monkeypatch, "defualts: {}\ntasks: {t1: {}}\n")
    with pytest.raises(ValueError, match="defualts"):
        load_task_specs("mini")


def test_missing_and_mistyped_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_suite(tmp_path, monkeypatch, "tasks:\n  t1: {prompt_template: x, metric: passkey}\n")
    with pytest.raises(ValueError, match="max_new_tokens"):
        load_task_specs("mini")
    _write_suite(tmp_path, monkeypatch, "tasks:\n  t1: {prompt_template: x, max_new_tokens: '4', metric: passkey}\n")
    with pytest.raises(ValueError, match="wrong type"):
        load_task_specs("mini")
    _write_suite(tmp_path, monkeypatch, "tasks:\n  t1: {prompt_template: x, max_new_tokens: 4, metric: bleu}\n")
    with pytest.raises(ValueError, match="unknown metric"):
        load_task_specs("mini")


def test_unknown_suite_lists_valid_ones() -> None:
    with pytest.raises(ValueError) as err:
        load_task_specs("longbench_v9")
    message = str(err.value)
    for suite in ("gsm8k", "longbench", "longbench_e", "mmlu", "passkey"):
        assert suite in message
