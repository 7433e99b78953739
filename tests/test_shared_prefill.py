"""One prefill per prompt for a sweep: every configuration started from the recorded prompt decodes
what its own separate run decodes, holds the same bytes and reports the same statistics."""

from __future__ import annotations

import pytest
import torch

from arkv_bench.cache import METHODS, make_cache
from arkv_bench.generation import greedy_generate, left_pad
from arkv_bench.shared_prefill import generate_from, needs_accumulated, prefill_from, record_prompt, shares_prefill
from tests.conftest import DEVICE, prompt_ids, tiny_model

W, TAIL, NEW = 16, 24, 12
SHARED = ["full", "mix", "origin", "h2o", "window", "snapkv", "pyramidkv", "adakv", "quant", "kivi"]
BUDGETS = {"compressing": 48, "roomy": 512}  # below the prompts' lengths / above prompt + generation


def build(method: str, model, budget: int):
    options = {"cache_size": budget} if METHODS[method].budgeted else {}
    return make_cache(method, model.config, window_size=W, **options)


def prompts(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = [130] if batch == 1 else [130, 95]
    return left_pad([prompt_ids(n, seed=40 + i)[0].tolist() for i, n in enumerate(lengths)], 0, DEVICE)


@pytest.fixture(scope="module")
def records(llama):
    """Each prompt's record, in the chunks a separate run with prefill_chunk=TAIL uses."""
    return {batch: record_prompt(llama, *prompts(batch), tail=TAIL, prefill_chunk=TAIL, accumulate=True)
            for batch in (1, 2)}


def assert_same_run(shared, separate):
    assert shared.tokens == separate.tokens
    assert shared.kv_bytes == separate.kv_bytes and shared.kv_bytes_full == separate.kv_bytes_full
    assert shared.stats == separate.stats


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("method,budget", [(m, b) for m in SHARED for b in BUDGETS
                                           if METHODS[m].budgeted or b == "compressing"])  # unbudgeted: one run
def test_shared_prefix_equals_a_separate_run(llama, records, method, budget, batch):
    """Same chunks, so bit for bit: the tokens, the kv bytes and every statistic (ARKV's OQ scores,
    counts per layer) of a separate greedy_generate run."""
    ids, mask = prompts(batch)
    shared = generate_from(llama, records[batch], build(method, llama, BUDGETS[budget]), NEW)
    separate = greedy_generate(llama, ids, mask, build(method, llama, BUDGETS[budget]), NEW, prefill_chunk=TAIL)
    assert_same_run(shared, separate)
    if method != "full":  # the budgets are what they say (PyramidKV's top layers get less than the mean)
        assert shared.stats["compressed"] == (budget == "compressing" or method in ("quant", "pyramidkv"))


@pytest.mark.parametrize("method", ["mix", "h2o", "snapkv", "quant", "full"])
def test_one_pass_record_equals_a_one_pass_prefill(method):
    """The default on CPU, the prompt in one pass: the separate run bit for bit (on another architecture,
    with left padding)."""
    model = tiny_model("qwen2")
    ids, mask = prompts(2)
    record = record_prompt(model, ids, mask, tail=W, accumulate=needs_accumulated([method]))
    assert_same_run(generate_from(model, record, build(method, model, BUDGETS["compressing"]), NEW),
                    greedy_generate(model, ids, mask, build(method, model, BUDGETS["compressing"]), NEW))


@pytest.mark.parametrize("method", ["mix", "h2o", "adakv", "quant"])
def test_a_row_inside_the_tail(llama, method):
    """A left-padded row whose real tokens all lie in the last chunk: the chunks before are padding only."""
    ids, mask = left_pad([prompt_ids(130, seed=1)[0].tolist(), prompt_ids(10, seed=2)[0].tolist()], 0, DEVICE)
    record = record_prompt(llama, ids, mask, tail=TAIL, prefill_chunk=TAIL, accumulate=True)
    assert_same_run(generate_from(llama, record, build(method, llama, 48), NEW),
                    greedy_generate(llama, ids, mask, build(method, llama, 48), NEW, prefill_chunk=TAIL))


def test_the_record_is_never_written(llama, records):
    record = records[2]
    before = [[t.clone() for t in (layer.keys, layer.values, layer.pos, layer.acc)] for layer in record.layers]
    for method in SHARED:
        generate_from(llama, record, build(method, llama, BUDGETS["compressing"]), NEW)
    for layer, saved in zip(record.layers, before):
        for now, then in zip((layer.keys, layer.values, layer.pos, layer.acc), saved):
            assert torch.equal(now, then)


def test_a_prompt_shorter_than_the_tail(llama):
    ids = prompt_ids(TAIL - 4)
    mask = torch.ones_like(ids)
    record = record_prompt(llama, ids, mask, tail=TAIL)
    assert record.layers[0].query.shape[2] == TAIL - 4
    assert_same_run(generate_from(llama, record, build("snapkv", llama, 17), NEW),
                    greedy_generate(llama, ids, mask, build("snapkv", llama, 17), NEW))


def test_time_split(llama, records):
    """TTFT = the shared forward + the configuration's own part; H2O's accumulation is H2O's alone."""
    record = records[1]
    assert 0 < record.accumulate_s < record.forward_s
    mix = generate_from(llama, record, build("mix", llama, 48), NEW)
    assert mix.shared_prefill_s == record.forward_s - record.accumulate_s
    assert mix.prefill_s > mix.shared_prefill_s and mix.ttft_s >= mix.prefill_s
    assert generate_from(llama, record, build("h2o", llama, 48), NEW).shared_prefill_s == record.forward_s


def test_which_methods_share():
    assert [m for m in METHODS if shares_prefill(m)] == [m for m in METHODS if m in SHARED]
    assert needs_accumulated(["mix", "h2o"]) and not needs_accumulated(["mix", "snapkv", "full"])


def test_refusals(llama):
    ids = prompt_ids(80)
    mask = torch.ones_like(ids)
    plain = record_prompt(llama, ids, mask, tail=W)
    with pytest.raises(ValueError, match="accumulate=True"):
        prefill_from(llama, plain, build("h2o", llama, 48))
    with pytest.raises(ValueError, match="tail >= 32"):
        prefill_from(llama, plain, make_cache("snapkv", llama.config, cache_size=48, window_size=32))
    with pytest.raises(ValueError, match="run it with greedy_generate"):
        prefill_from(llama, plain, make_cache("akv", llama.config))
    used = build("window", llama, 48)
    prefill_from(llama, plain, used)
    with pytest.raises(ValueError, match="fresh cache"):
        prefill_from(llama, plain, used)
    with pytest.raises(ValueError, match="tail must be"):
        record_prompt(llama, ids, mask, tail=0)


@pytest.mark.slow
def test_embedded_model_passkey_sweep():
    """SmolLM2-135M, a ~1K passkey prompt: full, mix, snapkv and h2o at cache 256 from one record decode what
    their separate one-pass runs decode."""
    from arkv_bench.models import load_model
    from arkv_bench.suites.passkey import make_passkey_samples

    model, tokenizer, _ = load_model(None, device="cpu", attn_implementation="arkv")
    sample = make_passkey_samples(tokenizer, [1024], [0.5], seed=3, chat_template=False)[0]
    ids = torch.tensor([tokenizer(sample.prompt).input_ids])
    mask = torch.ones_like(ids)
    methods = ["full", "mix", "snapkv", "h2o"]
    record = record_prompt(model, ids, mask, tail=32, accumulate=needs_accumulated(methods))
    eos = [tokenizer.eos_token_id]
    for method in methods:
        options = {"cache_size": 256} if METHODS[method].budgeted else {}
        shared = generate_from(model, record, make_cache(method, model.config, **options), 12, eos)
        separate = greedy_generate(model, ids, mask, make_cache(method, model.config, **options), 12, eos)
        assert shared.tokens == separate.tokens, method
        assert shared.kv_bytes == separate.kv_bytes, method


@pytest.mark.slow
def test_a_run_with_shared_prefill_equals_separate_runs(tmp_path):
    """`arkv-bench run` end to end on the embedded model: one prefill per prompt for the whole sweep gives the
    records (tokens, scores, bytes, states) of a prefill per configuration."""
    from typer.testing import CliRunner

    from arkv_bench.cli import app
    from arkv_bench.results_io import read_run_samples, record_key

    args = ["run", "--suite", "passkey", "--context-lengths", "300", "--depths", "0.2,0.8", "--quant-type",
            "full,mix,h2o,snapkv", "--cache-size", "96", "--device", "cpu", "--quiet"]
    runs = {}
    for name, flag in (("shared", []), ("separate", ["--no-shared-prefill"])):
        result = CliRunner().invoke(app, [*args, *flag, "--out", str(tmp_path), "--run-name", name])
        assert result.exit_code == 0, result.output
        runs[name] = {record_key(r): r for r in read_run_samples(tmp_path / name)}
    assert runs["shared"].keys() == runs["separate"].keys() and len(runs["shared"]) == 2 * 4
    for key, shared in runs["shared"].items():
        separate = runs["separate"][key]
        for field in ("prediction", "score", "kv_bytes", "kv_bytes_full", "evicted_frac", "quantized_frac"):
            assert shared[field] == separate[field], (key, field)
        assert shared["layers"] == separate["layers"], key  # ARKV's OQ statistics too: the same forward
        assert (shared["shared_prefill_s"] or 0) > 0 and separate["shared_prefill_s"] is None
