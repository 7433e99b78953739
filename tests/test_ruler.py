"""RULER-style prompts: deterministic, sized in tokens of the real tokenizer, split into context and
question, and scored by RULER's string match."""

from __future__ import annotations

import pytest
import torch

from arkv_bench.suites import ruler
from arkv_bench.options import RunOptions
from arkv_bench.tasks import load_task_specs

SPECS = load_task_specs("ruler")
NEEDLE_TASKS = [name for name, spec in SPECS.items() if spec.extra["kind"] != "cwe"]
LENGTH = 1024
CWE_LENGTH = 2560  # its 300 frequent entries alone take about 1.8K tokens


@pytest.fixture(scope="module")
def tokenizer():
    from arkv_bench.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def samples(tokenizer):
    """Every task's prompts at one length, depths 0.1 and 0.5."""
    out = {}
    for name, spec in SPECS.items():
        length = CWE_LENGTH if name == "cwe" else LENGTH
        out[name] = ruler.build(spec, RunOptions(context_lengths=[length], depths=[0.1, 0.5], seed=5), tokenizer,
                                False)
    return out


def test_yaml_defines_rulers_tasks():
    assert set(SPECS) == {"niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
                          "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe"}
    tasks = {name: ruler.RulerTask.from_extra(name, spec.extra) for name, spec in SPECS.items()}
    multi = tasks["niah_multikey_1"].keys, tasks["niah_multivalue"].values, tasks["niah_multiquery"].queries
    assert multi == (4, 4, 4)
    assert (tasks["vt"].hops, tasks["cwe"].common, tasks["cwe"].freq_common, tasks["cwe"].freq_rare) == (4, 10, 30, 3)
    assert all(spec.metric == "ruler" for spec in SPECS.values())


@pytest.mark.parametrize("extra, message", [({"kind": "nope"}, "kind must be one of"),
                                            ({"kind": "niah", "keys": 2, "queries": 3}, "queries must not exceed"),
                                            ({"kind": "niah", "haystack": "essay"}, "haystack must be one of"),
                                            ({"kind": "vt", "hops": 0}, "hops must be an integer")])
def test_bad_definitions_are_rejected(extra, message):
    with pytest.raises(ValueError, match=message):
        ruler.RulerTask.from_extra("t", extra)


def test_score_is_the_share_of_expected_strings():
    refs = ["1234567", "ABCDE", "apple"]
    assert ruler.ruler_score("1234567, abcde and APPLE", refs) == 1.0
    assert ruler.ruler_score("1234567 and apple", refs) == pytest.approx(2 / 3)
    assert ruler.ruler_score("123456", refs) == 0.0


@pytest.mark.slow
def test_same_seed_same_prompts(tokenizer, samples):
    spec = SPECS["niah_multikey_1"]
    again = ruler.build(spec, RunOptions(context_lengths=[LENGTH], depths=[0.1, 0.5], seed=5), tokenizer, False)
    assert [(s.sample_id, s.prompt, s.references) for s in again] == \
           [(s.sample_id, s.prompt, s.references) for s in samples["niah_multikey_1"]]
    other = ruler.build(spec, RunOptions(context_lengths=[LENGTH], depths=[0.1, 0.5], seed=6), tokenizer, False)
    assert [s.prompt for s in other] != [s.prompt for s in again]
    # a cell does not depend on the other cells asked for
    alone = ruler.build(spec, RunOptions(context_lengths=[LENGTH], depths=[0.5], seed=5), tokenizer, False)
    assert alone[0].prompt == samples["niah_multikey_1"][1].prompt


@pytest.mark.slow
def test_lengths_within_five_percent(tokenizer, samples):
    for name, made in samples.items():
        length = CWE_LENGTH if name == "cwe" else LENGTH
        assert len(made) == (2 * SPECS[name].extra.get("queries", 1)), name
        for s in made:
            tokens = len(tokenizer(s.prompt).input_ids)
            assert tokens == s.extra["prompt_tokens"], s.sample_id
            assert abs(tokens - length) <= 0.05 * length, (s.sample_id, tokens)


@pytest.mark.slow
def test_too_short_for_cwe_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="could not fit a 1024-token cwe prompt"):
        ruler.build(SPECS["cwe"], RunOptions(context_lengths=[1024], depths=[0.5]), tokenizer, False)


@pytest.mark.slow
def test_verbatim_answers_score_one_and_missing_parts_less(samples):
    for name, made in samples.items():
        spec = SPECS[name]
        for s in made:
            context, _ = ruler.context_and_question(s)
            assert all(r in context for r in s.references), s.sample_id  # the answers are in the context
            assert ruler.SUITE.score(spec, s, " ".join(s.references)) == 1.0
            assert ruler.SUITE.score(spec, s, " ".join(s.references[1:])) == (len(s.references) - 1) / len(s.references)
    assert [len(samples[n][0].references) for n in ("niah_single_1", "niah_multivalue", "vt", "cwe")] == [1, 4, 5, 10]


@pytest.mark.slow
def test_context_and_question_split(tokenizer, samples):
    for made in samples.values():
        for s in made:
            context, question = ruler.context_and_question(s)
            assert context + question == s.prompt and question.startswith("\n\n") and not context.endswith("\n")
            # tokenizing the parts apart gives the prompt's tokens: the split falls on a token boundary
            ids = tokenizer(context).input_ids + tokenizer(question, add_special_tokens=False).input_ids
            assert ids == tokenizer(s.prompt).input_ids, s.sample_id
    queries = samples["niah_multiquery"][:4]
    assert len({s.extra["context_id"] for s in queries}) == 1
    assert len({ruler.context_and_question(s)[0] for s in queries}) == 1
    assert len({tuple(s.references) for s in queries}) == 4
    single = samples["niah_single_1"]
    assert len({s.extra["context_id"] for s in single}) == len(single)


@pytest.mark.slow
def test_needles_at_their_depth_and_chains_in_order(samples):
    for name in ("niah_single_1", "niah_single_2", "niah_multikey_2"):
        for s in samples[name]:
            assert abs(s.extra["needle_token_depths"][0] - s.extra["depth"]) <= 0.03, s.sample_id
    for s in samples["vt"]:
        depths = s.extra["needle_token_depths"]
        assert depths == sorted(depths) and abs(depths[0] - s.extra["depth"]) <= 0.03


@pytest.mark.slow
def test_embedded_model_finds_a_single_needle_with_the_full_cache(tokenizer):
    from arkv_bench.cache import make_cache
    from arkv_bench.generation import greedy_generate
    from arkv_bench.models import load_model

    model, tok, _ = load_model(None, device="cpu", attn_implementation="arkv")
    spec = SPECS["niah_single_1"]
    (s,) = ruler.build(spec, RunOptions(context_lengths=[1000], depths=[0.5], seed=1), tok, False)
    ids = torch.tensor([tok(s.prompt).input_ids])
    gen = greedy_generate(model, ids, torch.ones_like(ids), make_cache("full", model.config), 12, [tok.eos_token_id])
    assert ruler.SUITE.score(spec, s, tok.decode(gen.tokens[0], skip_special_tokens=True)) == 1.0
