"""Passkey prompts hit their token budget and needle depth with the real embedded tokenizer."""

from __future__ import annotations

import pytest

from arkv_bench.suites.passkey import NEEDLE, QUESTION, PasskeySample, make_passkey_samples

LENGTHS = [256, 1024, 1500, 4096]
DEPTHS = [0.1, 0.25, 0.5, 0.75, 0.9]
NEEDLE_SLACK_TOKENS = 8  # about half a filler sentence: the needle sits on a sentence boundary


@pytest.fixture(scope="module")
def tokenizer():
    from arkv_bench.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


def _reachable(depth: float, sample: PasskeySample) -> bool:
    """Depths inside the intro or the question/template tail cannot be hit exactly at short lengths."""
    return 64 <= depth * sample.prompt_tokens <= sample.prompt_tokens - 48


@pytest.mark.slow
@pytest.mark.parametrize("chat_template", [True, False])
def test_length_and_needle_depth(tokenizer, chat_template):
    samples = make_passkey_samples(tokenizer, LENGTHS, DEPTHS, chat_template=chat_template)
    assert len(samples) == len(LENGTHS) * len(DEPTHS)
    checked = 0
    for s in samples:
        assert abs(s.prompt_tokens - s.context_length) <= 0.05 * s.context_length, s.sample_id
        if _reachable(s.depth, s):
            offset = abs(s.needle_token_depth - s.depth) * s.prompt_tokens
            assert offset <= NEEDLE_SLACK_TOKENS, (s.sample_id, offset)
            checked += 1
    assert checked >= len(samples) - 3  # only the shortest prompt's extreme depths are exempt


@pytest.mark.slow
def test_prompt_tokens_match_the_chat_template(tokenizer):
    (s,) = make_passkey_samples(tokenizer, [1024], [0.5], seed=3)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": s.prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert len(ids) == s.prompt_tokens
    # the needle really starts where needle_token_depth says
    start = round(s.needle_token_depth * s.prompt_tokens)
    assert tokenizer.decode(ids[start : start + 12]).strip().startswith("The pass key is " + s.key)


@pytest.mark.slow
def test_sample_contents_and_ids(tokenizer):
    samples = make_passkey_samples(tokenizer, [512, 1024], [0.1, 0.5], samples_per_cell=2, seed=7)
    expected_ids = ["len512-d0.10-s0", "len512-d0.10-s1", "len512-d0.50-s0", "len512-d0.50-s1"]
    assert [s.sample_id for s in samples[:4]] == expected_ids
    for s in samples:
        assert len(s.key) == 5 and s.key.isdigit()
        assert NEEDLE.format(key=s.key) in s.prompt
        assert s.prompt.endswith(QUESTION)
        assert s.prompt.count(s.key) == 2  # only the needle mentions it


@pytest.mark.slow
def test_deterministic_by_seed(tokenizer):
    a = make_passkey_samples(tokenizer, [512, 1024], [0.25, 0.75], samples_per_cell=2, seed=11)
    b = make_passkey_samples(tokenizer, [512, 1024], [0.25, 0.75], samples_per_cell=2, seed=11)
    c = make_passkey_samples(tokenizer, [512, 1024], [0.25, 0.75], samples_per_cell=2, seed=12)
    assert a == b
    assert [s.key for s in a] != [s.key for s in c]


@pytest.mark.slow
def test_fast_even_for_long_prompts(tokenizer):
    import time

    t0 = time.perf_counter()
    make_passkey_samples(tokenizer, [8000], [0.1, 0.5, 0.9], samples_per_cell=2)
    assert time.perf_counter() - t0 < 10


@pytest.mark.slow
@pytest.mark.parametrize(
    "kwargs",
    [
        {"context_lengths": [1024], "depths": [1.5]},
        {"context_lengths": [1024], "depths": [-0.1]},
        {"context_lengths": [100], "depths": [0.5]},
        {"context_lengths": [], "depths": [0.5]},
        {"context_lengths": [1024], "depths": [0.5], "samples_per_cell": 0},
    ],
)
def test_validation(tokenizer, kwargs):
    with pytest.raises(ValueError):
        make_passkey_samples(tokenizer, **kwargs)
