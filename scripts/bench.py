"""Speed and memory of every method against the full cache, measured in the same process.

    python scripts/bench.py --model smollm2-135m --device cuda --dtype bfloat16 \
        --prompt-tokens 2048,8000 --new-tokens 128 --cache-size 256 --batch-size 1

`--random-arch llama-3.1-8b` (or qwen3-8b) times a randomly initialised model of that exact shape
instead: the speed and memory of an 8B model without its weights (the scores would be meaningless).

Prints, per (prompt length, method): prefill ms, TTFT ms, decode tok/s, ITL p50/p99, the cache's
kv_bytes, peak GPU memory, and each as a ratio to the best full cache (the faster of `full` and
`full-static`) at the same prompt length. Prompts are
random token ids (speed does not depend on content); EOS is ignored so every method decodes the
same number of tokens.
"""

from __future__ import annotations

import argparse
import gc
import statistics

import torch

from arkv_bench.cache import METHODS, make_cache, prepare_model
from arkv_bench.generation import greedy_generate
from arkv_bench.models import load_model


RANDOM_ARCHS = {
    "llama-3.1-8b": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072)),
    "qwen3-8b": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=1000000.0,
        max_position_embeddings=40960)),
}


def random_model(arch: str, device: str, dtype: str) -> tuple[torch.nn.Module, dict]:
    """A model of a real architecture's exact shape with random weights (for timing only)."""
    import transformers

    config_name, model_name, shape = RANDOM_ARCHS[arch]
    config = getattr(transformers, config_name)(**shape)
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(dtype, torch.bfloat16)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device("cuda" if device in ("auto", "cuda") else device):
            model = getattr(transformers, model_name)(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.requires_grad_(False)
    return model, {"model": f"{arch} (random weights)", "device": str(model.device), "dtype": str(torch_dtype)}


def measure(model, ids, method: str, cache_size: int, window: int, new_tokens: int, repeats: int,
            extra: dict, compile: bool, prefill_chunk: int | None) -> dict:
    device = ids.device
    options = {"cache_size": cache_size, "window_size": window} if METHODS[method].budgeted else {}
    options.update(extra)
    runs = []
    for _ in range(repeats + 1):  # the first run warms up and is dropped
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        cache = make_cache(method, model.config, **options)
        gen = greedy_generate(model, ids, torch.ones_like(ids), cache, new_tokens, compile=compile,
                              prefill_chunk=prefill_chunk)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        runs.append((gen, peak))
    gens = runs[1:]
    itl = sorted(t for g, _ in gens for t in g.itl_s)
    decode_s = statistics.median(sum(g.itl_s) for g, _ in gens)
    return {"prefill_ms": 1000 * statistics.median(g.prefill_s for g, _ in gens),
            "ttft_ms": 1000 * statistics.median(g.ttft_s for g, _ in gens),
            "decode_tok_s": ids.shape[0] * (new_tokens - 1) / decode_s,
            "itl_p50_ms": 1000 * itl[len(itl) // 2], "itl_p99_ms": 1000 * itl[min(len(itl) - 1, int(0.99 * len(itl)))],
            "kv_bytes": gens[-1][0].kv_bytes, "peak_bytes": gens[-1][1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--random-arch", choices=sorted(RANDOM_ARCHS), default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma list; a method may carry options: mix:slack=32")
    parser.add_argument("--prompt-tokens", default="2048")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--cache-size", type=int, default=256)
    parser.add_argument("--window-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="decode eagerly (no CUDA graphs)")
    parser.add_argument("--prefill-chunk", type=int, default=None, help="tokens per prefill chunk (0: one pass)")

    args = parser.parse_args()

    if args.random_arch:
        model, info = random_model(args.random_arch, args.device, args.dtype)
    else:
        model, _, info = load_model(args.model, args.device, args.dtype)
    prepare_model(model)
    device = model.device
    methods = args.methods.split(",")
    print(f"model {info['model']} on {info['device']} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}),"
          f" {info['dtype']}, batch {args.batch_size}, {args.new_tokens} new tokens, cache {args.cache_size},"
          f" window {args.window_size}, median of {args.repeats} runs after a warm-up")
    header = ("prompt", "method", "prefill ms", "TTFT ms", "decode tok/s", "x full", "ITL p50", "ITL p99",
              "kv MiB", "x full", "peak MiB", "x full")  # x full: ratio to the best full cache
    print(" | ".join(header))
    for length in (int(n) for n in args.prompt_tokens.split(",")):
        generator = torch.Generator().manual_seed(length)
        ids = torch.randint(100, 40000 if model.config.vocab_size > 40000 else model.config.vocab_size - 1,
                            (args.batch_size, length), generator=generator).to(device)
        results = {}
        for spec in methods:  # "mix" or "mix:slack=32:gamma=100"; full and full-static first, for the ratios
            name, *pairs = spec.split(":")
            extra = {k: float(v) if "." in v else int(v) for k, v in (p.split("=", 1) for p in pairs)}
            try:
                results[spec] = measure(model, ids, name, args.cache_size, args.window_size, args.new_tokens,
                                        args.repeats, extra, not args.no_compile, args.prefill_chunk)
            except torch.OutOfMemoryError:
                print(f"{length} | {spec} | OOM", flush=True)
                continue
            finally:
                gc.collect()
                torch.cuda.empty_cache() if device.type == "cuda" else None
            fulls = [results[m] for m in ("full", "full-static") if m in results]
            base = max(fulls, key=lambda r: r["decode_tok_s"]) if fulls else None  # "best full" so far
            r = results[spec]

            def ratio(key: str) -> str:
                return "n/a" if base is None or not base[key] or r[key] is None else f"{r[key] / base[key]:.3f}"
            peak = "not measured" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}"
            print(" | ".join([str(length), spec, f"{r['prefill_ms']:.1f}", f"{r['ttft_ms']:.1f}",
                              f"{r['decode_tok_s']:.1f}", ratio("decode_tok_s"), f"{r['itl_p50_ms']:.2f}",
                              f"{r['itl_p99_ms']:.2f}", f"{r['kv_bytes'] / 2**20:.2f}", ratio("kv_bytes"), peak,
                              ratio("peak_bytes") if r["peak_bytes"] is not None else "n/a"]), flush=True)

if __name__ == "__main__":
    main()
