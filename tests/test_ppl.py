"""Perplexity through a cache in chunks: exact with the full cache, unchanged by a method that keeps
everything, changed by one that evicts; texts from a file, a local dataset file or the offline package."""

from __future__ import annotations

import json
import math

import pytest
import torch

from arkv_bench.cache import make_cache
from arkv_bench.suites import ppl
from arkv_bench.options import RunOptions
from arkv_bench.suites.base import DataError
from arkv_bench.tasks import load_task_specs
from tests.conftest import prompt_ids

N = 300
SPECS = load_task_specs("ppl")


def one_pass_nll(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        logits = model(ids).logits[0].float()
    return torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:]).item()


@pytest.fixture(scope="module")
def text_ids() -> torch.Tensor:
    return prompt_ids(N, seed=4)


@pytest.mark.parametrize("chunk", [1, 7, 64, N, 1000])
def test_full_cache_in_chunks_is_the_one_pass_perplexity(llama, text_ids, chunk):
    result = ppl.perplexity(llama, text_ids, make_cache("full", llama.config), chunk)
    assert abs(result.nll - one_pass_nll(llama, text_ids)) < 1e-4
    assert result.tokens == N - 1 and result.ppl == pytest.approx(math.exp(result.nll))
    first = min(chunk, N) - 1
    assert result.chunk_tokens[0] == first and len(result.chunk_tokens) == math.ceil(N / chunk)


@pytest.mark.parametrize("method", ["mix", "snapkv", "window", "h2o"])
def test_a_budget_larger_than_the_text_changes_nothing(llama, text_ids, method):
    full = ppl.perplexity(llama, text_ids, make_cache("full", llama.config), 64)
    cache = make_cache(method, llama.config, cache_size=N + 16)
    kept = ppl.perplexity(llama, text_ids, cache, 64)
    assert not cache.compressed
    assert abs(kept.nll - full.nll) < 1e-4
    assert kept.chunk_nll == pytest.approx(full.chunk_nll, abs=1e-3)


@pytest.mark.parametrize("method", ["mix", "window", "h2o"])
def test_a_small_budget_changes_the_perplexity(llama, text_ids, method):
    full = ppl.perplexity(llama, text_ids, make_cache("full", llama.config), 32)
    cache = make_cache(method, llama.config, cache_size=48, window_size=8)
    small = ppl.perplexity(llama, text_ids, cache, 32)
    assert cache.compressed and cache.kv_bytes() < cache.full_kv_bytes() / 3
    assert abs(small.nll - full.nll) > 1e-3
    assert small.chunk_nll[0] == pytest.approx(full.chunk_nll[0], abs=1e-4)  # the first chunk has no past to lose


def test_bad_input_is_rejected(llama, text_ids):
    with pytest.raises(ValueError, match="ppl_chunk"):
        ppl.perplexity(llama, text_ids, make_cache("full", llama.config), 0)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        ppl.perplexity(llama, text_ids[:, :1], make_cache("full", llama.config), 8)


def test_corpus_perplexity_weighs_tokens():
    records = [{"chunk_nll": [1.0, 1.0], "ppl_tokens": 2}, {"chunk_nll": [6.0], "ppl_tokens": 2}]
    assert ppl.corpus_perplexity(records) == pytest.approx(math.exp(2.0))


def test_offline_default_is_hamlet_as_plain_text():
    text = ppl.offline_text(SPECS["hamlet"].extra["play"])
    assert text.startswith("Hamlet\n\nACT I\n") and "To be, or not to be" in text
    assert "**" not in text and "#" not in text and len(text) > 150_000


def test_texts_from_a_file_and_a_local_dataset_file(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text("Once upon a time.\n")
    sample_id, text = ppl.load_text(SPECS["file"], path, None)
    assert text == "Once upon a time.\n" and sample_id.startswith("story-")
    (tmp_path / "wikitext2").mkdir()
    rows = [{"text": " = Title = \n"}, {"text": " Some words .\n"}]
    (tmp_path / "wikitext2" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert ppl.load_text(SPECS["wikitext2"], None, tmp_path) == ("wikitext2", " = Title = \n\n\n Some words .\n")


def test_missing_text_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="needs --text-file"):
        ppl.load_text(SPECS["file"], None, None)
    with pytest.raises(DataError, match="cannot read --text-file"):
        ppl.load_text(SPECS["file"], tmp_path / "absent.txt", None)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="is empty"):
        ppl.load_text(SPECS["file"], tmp_path / "empty.txt", None)
    assert ppl.default_tasks(None) == ["hamlet"] and ppl.default_tasks(tmp_path / "x.txt") == ["file"]


@pytest.mark.slow
def test_embedded_model_on_hamlet():
    from arkv_bench.cache import prepare_model
    from arkv_bench.models import load_model

    model, tok, _ = load_model(None, device="cpu", attn_implementation="arkv")
    prepare_model(model)
    (sample,) = ppl.build(SPECS["hamlet"], RunOptions(max_length=384, ppl_chunk=96), tok)
    assert sample.sample_id == "hamlet" and sample.extra["text_tokens"] == 384
    full = ppl.evaluate(model, tok, sample, make_cache("full", model.config))
    assert full["ppl_tokens"] == 383 and full["chunk_tokens"] == [95, 96, 96, 96]
    ids = ppl.input_ids(tok, sample, model)
    assert full["nll"] == pytest.approx(one_pass_nll(model, ids), abs=1e-4)
    window = ppl.evaluate(model, tok, sample, make_cache("window", model.config, cache_size=64, window_size=16))
    # the store holds the budget plus room for one 96-token chunk: (64 + 96) / 384 of the full cache, and a position each
    assert window["ppl"] > full["ppl"] and window["compressed"] and window["kv_bytes"] < full["kv_bytes"] * 0.45
