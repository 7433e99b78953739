"""The Python API: stream() and generate() give the same tokens, `full` gives transformers' greedy tokens,
the state counts add up, bad input is rejected, and the README example runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from arkv_bench import generate, stream
from arkv_bench.api import Detokenizer
from arkv_bench.cache import METHODS
from tests.conftest import tiny_model

README = Path(__file__).resolve().parents[1] / "README.md"
MESSAGES = [{"role": "user", "content": "Name three uses of a paper clip."}]
N = 20
CASES = {  # method -> options small enough to compress the ~40-token chat prompt
    "full": {},
    "mix": {"cache_size": 24, "window_size": 8},
    "h2o": {"cache_size": 24, "window_size": 8},
    "kivi": {"residual_length": 32},
    "akv": {"hot_budget": 16, "warm_budget": 8, "n_anchors": 4, "window_size": 8},
}


@pytest.fixture(scope="module")
def tokenizer():
    from arkv_bench.models import load_tokenizer
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def model(tokenizer):
    """A tiny random Llama over the real tokenizer's vocabulary: real chat template, multi-byte tokens, fast."""
    return tiny_model("llama", vocab_size=len(tokenizer))


@pytest.mark.parametrize("method", list(CASES))
def test_stream_and_generate_give_the_same_tokens_and_text(model, tokenizer, method):
    items = list(stream(model, tokenizer, MESSAGES, method=method, max_new_tokens=N, **CASES[method]))
    result = generate(model, tokenizer, MESSAGES, method=method, max_new_tokens=N, **CASES[method])
    assert [item.token_id for item in items] == result.token_ids and len(result.token_ids) == N
    assert "".join(item.text for item in items) == result.text == tokenizer.decode(result.token_ids)
    assert result.finish_reason == "length" and result.ttft_s > 0 and result.decode_tok_s > 0
    assert result.stats["compressed"] == (method != "full")
    assert result.kv_bytes == result.stats["kv_bytes"] and result.kv_bytes_full == result.stats["kv_bytes_full"]
    assert (result.kv_bytes < result.kv_bytes_full) == (method != "full")


def test_full_equals_transformers_greedy_generate(model, tokenizer):
    prompt = "The capital of France is"
    ids = torch.tensor([tokenizer(prompt).input_ids], device=model.device)
    reference = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=N,
                               pad_token_id=0)[0, ids.shape[1]:].tolist()
    result = generate(model, tokenizer, prompt, method="full", max_new_tokens=N)
    assert result.token_ids == reference and result.prompt_tokens == ids.shape[1]
    chat = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert generate(model, tokenizer, MESSAGES, method="full", max_new_tokens=1).prompt_tokens == len(chat["input_ids"])


@pytest.mark.parametrize("method", ["mix", "akv"])
def test_state_counts_add_up_per_layer_and_per_token(model, tokenizer, method):
    items = list(stream(model, tokenizer, MESSAGES, method=method, max_new_tokens=N, **CASES[method]))
    parts = ("hot", "warm", "cold", "evicted") if method == "akv" else ("original", "quantized", "evicted")
    prompt = generate(model, tokenizer, MESSAGES, method="full", max_new_tokens=1).prompt_tokens
    for step, item in enumerate(items):
        assert item.state["seen"] == prompt + step  # the token just yielded is not in the cache yet
        assert sum(item.state[p] for p in parts) == pytest.approx(item.state["seen"])
    assert any(item.state["evicted"] > 0 for item in items) == (method == "mix")
    result = generate(model, tokenizer, MESSAGES, method=method, max_new_tokens=N, **CASES[method])
    for layer in result.layers:
        assert layer["original"] + layer["quantized"] + layer["evicted"] == pytest.approx(layer["seen"])
        assert layer["seen"] == prompt + N - 1
    assert sum(layer["quantized"] for layer in result.layers) > 0


@pytest.mark.parametrize("call", [stream, generate])
@pytest.mark.parametrize("args, message", [
    ({"method": "nope"}, "unknown method 'nope'; valid methods: " + ", ".join(METHODS)),
    ({"method": "mix", "cache_size": 8}, "cache_size must be an integer larger than window_size (32)"),
    ({"method": "h2o", "cache_size": 64, "bits": 4}, "no option bits"),
    ({"method": "full", "max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
    ({"method": "full", "prompt_or_messages": 42}, "must be a string or a list of chat messages"),
    ({"method": "full", "prompt_or_messages": ""}, "the prompt is empty"),
])
def test_bad_input_raises_before_any_work(model, tokenizer, call, args, message):
    args = {"prompt_or_messages": MESSAGES, **args}
    with pytest.raises(ValueError, match=re.escape(message)):
        call(model, tokenizer, **args)


def test_detokenizer_streams_characters_split_over_tokens_whole(tokenizer):
    text = "Hi 🙂 café 日本語 ok"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some character spans several tokens
    detok = Detokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # held back while incomplete


@pytest.mark.slow
def test_readme_example_runs(capsys):
    section = README.read_text().split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, str(README), "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"\d+ original, \d+ quantized, \d+ evicted of \d+", out)
    assert re.search(r"TTFT \d+ ms, [\d.]+ tok/s, KV \d+ of \d+ bytes", out) and "'demotions'" in out
