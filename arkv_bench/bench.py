"""`arkv-bench bench`: the speed and memory of each method against the full cache, in one process.

A cell is (method, batch size, context length). Each cell gets random prompt ids (speed does not
depend on content), one untimed warm-up at its exact shapes, then one timed generation of
`new_tokens` tokens with EOS ignored, so every method decodes as many tokens as the others.
Every figure is also a ratio to `full` and to `full-static` of the same cell, measured in the
same process. What a CPU cannot give (peak memory, the HBM-bandwidth ideal step) stays empty.

`bounded-static` is a baseline, not a method: `full-static` fed only the prompt's last `cache_size`
tokens, so it decodes over `cache_size + new_tokens` plain static slots with no scoring and no
quantization: the speed a cache of that budget can reach on this card, which the budgeted methods
are compared with (its prefill and KV columns are those of the cut prompt).
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from rich.table import Table

from arkv_bench.cache import METHODS, make_cache, prepare_model
from arkv_bench.cache.kernels import resolve_backend
from arkv_bench.compare import BENCH_SUITE, bench_task, ratio
from arkv_bench.generation import greedy_generate
from arkv_bench.models import load_model, resolve_device, resolve_dtype
from arkv_bench.options import ATTENTION_KERNELS
from arkv_bench.results import SUMMARY_COLUMNS, evicted_quantized, layer_vector, provenance
from arkv_bench.results_io import atomic_write, csv_text
from arkv_bench.runner import UsageError, folder_inside

# Exact shapes of real models (random weights: speed and memory do not depend on the values), and a
# tiny one for CPU tests.
RANDOM_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-3.1-8b": ("LlamaConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072)),
    "qwen3-8b": ("Qwen3Config", dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=1000000.0,
        max_position_embeddings=40960)),
    "tiny-llama": ("LlamaConfig", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096)),
}
BASELINES = ("full", "full-static")  # every ratio is to one of these, or to the faster ("best full")
BOUNDED = "bounded-static"  # full-static over the prompt's last cache_size tokens (module docstring)
MAX_BATCH_LIMIT = 1024  # --find-max-batch stops doubling here
RATIO_FIGURES = ("batch_size", "prefill_ms", "step_ms_p50", "step_ms_p99", "decode_tok_s", "steady_tok_s",
                 "kv_bytes", "peak_above_weights_bytes")
RATIO_BASES = (("full", "full"), ("full_static", "full-static"), ("best_full", None), ("bounded_static", BOUNDED))
BENCH_COLUMNS = ["kind", "context_length", "batch_size", "method", "cache_size", "window_size", "status",
                 "prefill_ms", "ttft_ms", "step_ms_p50", "step_ms_p99", "decode_steps", "decode_tok_s", "steady_tok_s",
                 "kv_bytes", "kv_bytes_full", "weights_bytes", "read_bytes_per_step", "peak_bytes",
                 "peak_above_weights_bytes", "ideal_step_ms", "step_over_ideal", "best_full"] + [
    f"{figure}_x_{suffix}" for figure in RATIO_FIGURES for suffix, _ in RATIO_BASES]


@dataclass
class BenchOptions:
    """Everything that defines a bench run (and so its results folder)."""

    methods: list[str] = field(default_factory=lambda: ["full", "mix"])  # specs: "mix" or "mix:slack=64"
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    context_lengths: list[int] = field(default_factory=lambda: [8192])
    cache_size: int = 2048
    window_size: int = 32
    new_tokens: int = 64
    model: str | None = None
    random_arch: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    compile: bool | None = None  # None: on for CUDA, off elsewhere (where the generation API has the option)
    prefill_chunk: int | None = None  # None: the generation API's default
    find_max_batch: bool = False
    seed: int = 0
    attention_kernel: str = "auto"  # the slot stores' decode attention (options.ATTENTION_KERNELS)

    def default_run_name(self) -> str:
        name = self.random_arch or (self.model or "smollm2-135m").rstrip("/").split("/")[-1]
        digest = hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:8]
        return f"bench-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}-{digest}"


@dataclass
class BenchResult:
    folder: Path
    rows: list[dict[str, Any]]
    notes: list[str]
    config: dict[str, Any]


# --- options ---------------------------------------------------------------------------------------

def int_list(text: str, option: str, minimum: int = 1) -> list[int]:
    """'1,8' -> [1, 8]; anything else is a UsageError naming the option."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values or min(values) < minimum:
        raise UsageError(f"{option} takes whole numbers >= {minimum}, comma separated; got {text!r}")
    return values


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """'mix:slack=64:gamma=100' -> ('mix', {'slack': 64, 'gamma': 100}), typed as the method declares."""
    name, *pairs = spec.split(":")
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in METHODS[name].defaults:
            raise UsageError(f"{spec!r}: {pair!r} is not KEY=VALUE with KEY one of {', '.join(METHODS[name].defaults)}")
        options[key] = _typed(METHODS[name].defaults[key], spec, key, text)
    return name, options


def _typed(default: Any, spec: str, key: str, text: str) -> Any:
    if isinstance(default, bool):
        if text.lower() not in ("true", "false"):
            raise UsageError(f"{spec!r}: {key} takes true or false")
        return text.lower() == "true"
    if isinstance(default, str):
        return text
    try:
        number = float(text)
    except ValueError:
        raise UsageError(f"{spec!r}: {key} takes a number, got {text!r}") from None
    return int(number) if number.is_integer() and not isinstance(default, float) else number


def check(opts: BenchOptions) -> list[str]:
    """Reject impossible options before anything loads or is written; return notes for the user."""
    if opts.model and opts.random_arch:
        raise UsageError("give --model or --random-arch, not both")
    if opts.random_arch is not None and opts.random_arch not in RANDOM_ARCHS:
        raise UsageError(f"unknown --random-arch {opts.random_arch!r}; choose one of {', '.join(RANDOM_ARCHS)}")
    if opts.attention_kernel not in ATTENTION_KERNELS:
        raise UsageError(f"--attention-kernel must be one of {', '.join(ATTENTION_KERNELS)}, got {opts.attention_kernel!r}")
    try:  # "triton" where it cannot run
        resolve_backend(opts.attention_kernel, torch.device(resolve_device(opts.device)))
    except ValueError as e:
        raise UsageError(f"--attention-kernel: {e}") from None
    if opts.new_tokens < 2:
        raise UsageError(f"--new-tokens must be at least 2 (the first token comes from prefill), got {opts.new_tokens}")
    if opts.prefill_chunk is not None and opts.prefill_chunk < 0:
        raise UsageError(f"--prefill-chunk takes 0 (one pass) or a positive token count, got {opts.prefill_chunk}")
    for values, option in ((opts.batch_sizes, "--batch-size"), (opts.context_lengths, "--context-lengths")):
        if not values or min(values) < 1:
            raise UsageError(f"{option} takes whole numbers >= 1, got {','.join(map(str, values))}")
    # a whole config (head sizes and all), so a method that sizes its store when built can be built here too
    config = arch_config(opts.random_arch) if opts.random_arch else transformers.LlamaConfig(num_hidden_layers=1)
    for spec in method_specs(opts):
        name, options, _ = spec_method(spec, opts)
        try:
            make_cache(name, config, **options)
        except ValueError as e:
            raise UsageError(f"{spec}: {e}") from e
    if opts.random_arch:
        check_positions(opts, opts.random_arch, config.max_position_embeddings)
    if opts.find_max_batch and not resolve_device(opts.device).startswith("cuda"):
        raise UsageError("--find-max-batch needs --device cuda: elsewhere nothing runs out of memory before the "
                         "machine swaps")
    notes = []
    if "full-static" not in METHODS:
        notes.append("full-static is not in this version's methods: not run, its ratio columns are empty")
    return notes


def spec_method(spec: str, opts: BenchOptions) -> tuple[str, dict[str, Any], int | None]:
    """(method, its options, the prompt tokens it is fed: None = all) of a method spec or of BOUNDED."""
    if spec == BOUNDED:
        return "full-static", {}, opts.cache_size
    name, options = parse_method(spec)
    return name, cache_options(opts, name, options), None


def check_positions(opts: BenchOptions, model: str, positions: int | None) -> None:
    """The longest prompt plus the generated tokens must fit the model's positions."""
    longest = max(opts.context_lengths) + opts.new_tokens
    if positions and longest > positions:
        raise UsageError(f"{model} takes {positions} positions; the longest context + --new-tokens is {longest}: "
                         "lower --context-lengths")


def cache_options(opts: BenchOptions, name: str, extra: dict[str, Any]) -> dict[str, Any]:
    """make_cache options of one method spec: the run's budget and window, then the spec's own options."""
    cls = METHODS[name]
    base = {"cache_size": opts.cache_size} if cls.budgeted else {}
    if "window_size" in cls.defaults:
        base["window_size"] = opts.window_size
    return {**base, **extra}


def method_specs(opts: BenchOptions) -> list[str]:
    """The baselines that exist in this version first (every ratio needs them), then the asked methods."""
    baselines = [b for b in BASELINES if b in METHODS] + ([BOUNDED] if "full-static" in METHODS else [])
    return baselines + [m for m in dict.fromkeys(opts.methods) if m not in baselines and m not in (*BASELINES, BOUNDED)]


# --- model and hardware ------------------------------------------------------------------------------

def arch_config(arch: str) -> transformers.PretrainedConfig:
    """The transformers config of a RANDOM_ARCHS shape."""
    config_name, shape = RANDOM_ARCHS[arch]
    return getattr(transformers, config_name)(**shape)


def load_bench_model(opts: BenchOptions) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model to time: a real one (load_model) or a random one of an exact architecture's shape."""
    if not opts.random_arch:
        model, _, info = load_model(opts.model, opts.device, opts.dtype, attn_implementation="arkv")
        return prepare_model(model), info
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    config = arch_config(opts.random_arch)
    torch.manual_seed(opts.seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    info = {"model": f"{opts.random_arch} (random weights)", "source": "random", "device": device,
            "dtype": str(dtype).removeprefix("torch."), "attn_implementation": "arkv",
            "max_positions": config.max_position_embeddings}
    return prepare_model(model), info


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameter bytes, the bytes a decode step reads: all but an untied input embedding table,
    of which a step reads one row per sequence)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    table = 0 if tied else embed.weight.numel() * embed.weight.element_size()
    return total, total - table


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float | None:
    """Bytes per second (read + write) of a large device-to-device copy; None off CUDA (not measured)."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes * repeats / seconds


def kernel_used(model: torch.nn.Module, opts: BenchOptions) -> str:
    """What --attention-kernel resolves to for a decode step of this model (FP8 slots, one query)."""
    text = model.config.get_text_config()
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return resolve_backend(opts.attention_kernel, model.device, model.dtype, heads // kv_heads, head_dim, 8)


def generation_options(opts: BenchOptions, device: torch.device) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(keywords for greedy_generate, what was used, notes): `compile` and `prefill_chunk` are passed only
    where this version of the generation API accepts them."""
    params = inspect.signature(greedy_generate).parameters
    kwargs: dict[str, Any] = {}
    notes = []
    want_compile = device.type == "cuda" if opts.compile is None else opts.compile
    if "compile" in params:
        kwargs["compile"] = want_compile
    elif opts.compile:
        notes.append("this version's decode loop has no compile option: it ran eagerly")
    if "prefill_chunk" in params:
        if opts.prefill_chunk is not None:
            kwargs["prefill_chunk"] = opts.prefill_chunk
        chunk = kwargs.get("prefill_chunk", params["prefill_chunk"].default)
    else:
        chunk = 0
        if opts.prefill_chunk:
            notes.append("this version's prefill has no prefill_chunk option: the whole prompt ran in one pass")
    used = {"compile": kwargs.get("compile", False) if "compile" in params else False, "prefill_chunk": chunk}
    return kwargs, used, notes


# --- measuring -----------------------------------------------------------------------------------------

def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def _unless_oom(run: Callable[[], Any]) -> Any | None:
    """run(), or None when the device ran out of memory (any other error propagates). The exception, and the
    tensors its frames hold, are gone once this returns, so the caller can free the device."""
    try:
        return run()
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
        if not _is_oom(e):
            raise
        return None


def _quantile(values: list[float], q: float) -> float:
    return float(torch.tensor(values, dtype=torch.float64).quantile(q))


@dataclass
class Bench:
    """What every cell shares: the model, its weights' bytes, the card's bandwidth, generation keywords."""

    model: torch.nn.Module
    opts: BenchOptions
    generate_kwargs: dict[str, Any]
    bandwidth: float | None
    weights: int
    weights_read: int

    def measure(self, spec: str, batch: int, context: int, kind: str = "cell") -> dict[str, Any]:
        """One cell: an untimed warm-up, then a timed generation; an out-of-memory gives an `oom` row."""
        name, options, tokens = spec_method(spec, self.opts)
        row: dict[str, Any] = {"kind": kind, "context_length": context, "batch_size": batch, "method": spec,
                               "cache_size": options.get("cache_size") if METHODS[name].budgeted else tokens,
                               "window_size": options.get("window_size"), "status": "oom"}
        device = self.model.device
        ids = self._ids(batch, context, tokens)

        def timed() -> tuple[Any, int | None, int | None]:
            self._generate(name, options, ids)  # warm-up at the cell's exact shapes
            _free(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
            gen = self._generate(name, options, ids)
            return gen, before, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

        result = _unless_oom(timed)
        _free(device)
        if result is not None:
            gen, before, peak = result
            row.update(self._figures(gen, batch, before, peak))
        return row

    def fits(self, spec: str, batch: int, context: int) -> bool:
        """Whether a batch runs at all: its prefill and a first decode step (the peak of every method is in
        its prefill or its first steps), eagerly (a captured step would compile for every batch size tried),
        without the warm-up and timing of a measured cell."""
        name, options, tokens = spec_method(spec, self.opts)
        ids = self._ids(batch, context, tokens)
        ok = _unless_oom(lambda: self._generate(name, options, ids, new_tokens=2, eager=True)) is not None
        _free(self.model.device)
        return ok

    def _ids(self, batch: int, context: int, tokens: int | None = None) -> torch.Tensor:
        """The cell's random prompt ids (speed does not depend on content), the same for every method; only
        the last `tokens` of them for a spec fed a cut prompt (spec_method)."""
        vocab = self.model.config.get_text_config().vocab_size
        generator = torch.Generator().manual_seed(self.opts.seed * 1_000_003 + context * 1009 + batch)
        ids = torch.randint(min(100, vocab // 2), vocab, (batch, context), generator=generator)
        return ids[:, -(tokens or context):].to(self.model.device)

    def _generate(self, name: str, options: dict[str, Any], ids: torch.Tensor, new_tokens: int | None = None,
                  eager: bool = False) -> Any:
        cache = make_cache(name, self.model.config, attention_kernel=self.opts.attention_kernel, **options)
        kwargs = {**self.generate_kwargs, "compile": False} if eager and "compile" in self.generate_kwargs \
            else self.generate_kwargs
        return greedy_generate(self.model, ids, torch.ones_like(ids), cache, new_tokens or self.opts.new_tokens,
                               **kwargs)

    def _figures(self, gen: Any, batch: int, before: int | None, peak: int | None) -> dict[str, Any]:
        steps = [1000 * s for s in gen.itl_s]
        p50 = _quantile(steps, 0.5)
        read = self.weights_read + gen.kv_bytes
        ideal = None if self.bandwidth is None else 1000 * read / self.bandwidth
        per_layer = [layer_vector(layer) for layer in gen.stats.get("layers", [])]
        evicted, quantized = evicted_quantized(per_layer) if per_layer else (None, None)
        return {"status": "ok", "prefill_ms": 1000 * gen.prefill_s, "ttft_ms": 1000 * gen.ttft_s,
                "step_ms_p50": p50, "step_ms_p99": _quantile(steps, 0.99), "decode_steps": len(steps),
                "decode_tok_s": batch * len(steps) / (sum(steps) / 1000), "steady_tok_s": batch * 1000 / p50,
                "kv_bytes": gen.kv_bytes,
                "kv_bytes_full": gen.kv_bytes_full, "host_bytes": gen.host_bytes, "weights_bytes": self.weights,
                "read_bytes_per_step": read, "peak_bytes": peak,
                "peak_above_weights_bytes": None if peak is None else peak - before,
                "ideal_step_ms": ideal, "step_over_ideal": None if ideal is None else p50 / ideal,
                "compressed": bool(gen.stats.get("compressed")), "evicted_frac": evicted, "quantized_frac": quantized}

    def max_batch(self, spec: str, context: int) -> dict[str, Any]:
        """The largest batch that fits at `context` (doubling, then bisection on out-of-memory, each try a
        prefill and one eager step), then measured as a cell; if the measured run (warm-up, captured steps)
        does not fit, the next smaller batch is measured (an `oom` row if not even 1 fits)."""
        batch = max(largest_fitting(lambda n: self.fits(spec, n, context), MAX_BATCH_LIMIT), 1)
        row = self.measure(spec, batch, context, kind="max-batch")
        while row["status"] == "oom" and batch > 1:
            batch -= 1
            row = self.measure(spec, batch, context, kind="max-batch")
        return row


def largest_fitting(fits: Callable[[int], bool], limit: int) -> int:
    """The largest n in [1, limit] with fits(n), for a monotone `fits`: double until a miss, then bisect.
    0 when not even 1 fits."""
    good, bad, trial = 0, limit + 1, 1
    while trial < bad and fits(trial):
        good, trial = trial, min(2 * trial, limit + 1)
    bad = min(bad, trial)
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each figure over the same cell's `full`, `full-static`, and the faster of the two ("best full")."""
    cells: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        batch = row["batch_size"] if row["kind"] == "cell" else None
        cells.setdefault((row["kind"], row["context_length"], batch), []).append(row)
    for cell in cells.values():
        ok = {r["method"]: r for r in cell if r["status"] == "ok"}
        fulls = [ok[b] for b in BASELINES if b in ok]
        best = max(fulls, key=lambda r: r["decode_tok_s"], default=None)
        for row in cell:
            row["best_full"] = None if best is None else best["method"]
            for suffix, method in RATIO_BASES:
                base = best if method is None else ok.get(method)
                for figure in RATIO_FIGURES:
                    value = row.get(figure) if row["status"] == "ok" else None
                    row[f"{figure}_x_{suffix}"] = ratio(value, None if base is None else base.get(figure))


# --- results ---------------------------------------------------------------------------------------------

def summary_row(row: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """A bench row in summary.csv's columns: task 'b8 x 32768' (or 'max batch x 32768'), n = batch size,
    no score; kv bytes per sequence, as in every suite."""
    ok, batch = row["status"] == "ok", row["batch_size"]
    per_seq = (lambda key: row[key] / batch) if ok else (lambda key: None)
    return {"model": info["model"], "suite": BENCH_SUITE,
            "task": bench_task(batch if row["kind"] == "cell" else None, row["context_length"]),
            "quant_type": row["method"], "cache_size": row["cache_size"], "window_size": row["window_size"],
            "n": batch if ok else 0,
            "prefill_tok_s": batch * row["context_length"] / (row["prefill_ms"] / 1000) if ok else None,
            "decode_tok_s": row.get("decode_tok_s"), "ttft_ms": row.get("ttft_ms"),
            "itl_ms_p50": row.get("step_ms_p50"), "itl_ms_p99": row.get("step_ms_p99"),
            "kv_bytes": per_seq("kv_bytes"), "kv_bytes_full": per_seq("kv_bytes_full"),
            "kv_ratio": ratio(row.get("kv_bytes"), row.get("kv_bytes_full")), "peak_mem_bytes": row.get("peak_bytes"),
            "compressed_frac": float(row["compressed"]) if ok else None, "evicted_frac": row.get("evicted_frac"),
            "quantized_frac": row.get("quantized_frac"), "device": info["device"], "dtype": info["dtype"],
            "status": row["status"], "host_bytes": per_seq("host_bytes")}


def results_folder(opts: BenchOptions, out: Path, run_name: str | None) -> Path:
    """The folder to write; a folder holding another run's results is a UsageError (nothing written).
    The same bench options measure again into their own folder."""
    folder = folder_inside(out, run_name or opts.default_run_name())
    config_path = folder / "config.json"
    if config_path.exists():
        try:
            previous = json.loads(config_path.read_text())
        except (OSError, ValueError):
            previous = None
        if not isinstance(previous, dict) or previous.get("options") != asdict(opts):
            raise UsageError(f"{folder} holds a different run's results: choose another --run-name or remove it")
    elif folder.is_dir() and any(folder.iterdir()):
        raise UsageError(f"{folder} holds other files: choose another --run-name or remove it")
    return folder


def _write(folder: Path, rows: list[dict[str, Any]], info: dict[str, Any]) -> None:
    add_ratios(rows)
    atomic_write(folder / "bench.csv", csv_text(BENCH_COLUMNS, rows))
    atomic_write(folder / "summary.csv", csv_text(SUMMARY_COLUMNS, [summary_row(r, info) for r in rows]))


def cells(opts: BenchOptions) -> Iterator[tuple[str, int, int]]:
    """(method spec, batch, context) in the order they run: per context and batch, the baselines first."""
    for context in opts.context_lengths:
        for batch in opts.batch_sizes:
            for spec in method_specs(opts):
                yield spec, batch, context


def run_bench(model: torch.nn.Module, info: dict[str, Any], opts: BenchOptions, folder: Path,
              notes: list[str], progress: Callable[[str], None] = lambda label: None) -> BenchResult:
    """Measure every cell (and, with find_max_batch, each method's largest batch per context) into `folder`."""
    device = model.device
    check_positions(opts, info["model"], info.get("max_positions"))
    kwargs, used, api_notes = generation_options(opts, device)
    notes = notes + api_notes
    bandwidth = copy_bandwidth(device)
    weights, weights_read = weight_bytes(model)
    bench = Bench(model, opts, kwargs, bandwidth, weights, weights_read)
    config = {"run_name": folder.name, "suite": BENCH_SUITE,
              "tasks": list(dict.fromkeys(bench_task(b, c) for _, b, c in cells(opts))),
              "quant_types": method_specs(opts), "cache_sizes": [opts.cache_size], "window_size": opts.window_size,
              "model": info["model"], "batch_sizes": opts.batch_sizes, "context_lengths": opts.context_lengths,
              "new_tokens": opts.new_tokens, "seed": opts.seed, "device": info["device"], "dtype": info["dtype"],
              "attn_implementation": "arkv (SDPA inside)", "compile": used["compile"],
              "prefill_chunk": used["prefill_chunk"], "find_max_batch": opts.find_max_batch,
              "attention_kernel": opts.attention_kernel, "attention_kernel_used": kernel_used(model, opts),
              "hbm_copy_bytes_per_s": bandwidth, "weights_bytes": weights, "weights_read_bytes_per_step": weights_read,
              "notes": notes, "options": asdict(opts), "provenance": provenance(info)}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "config.tmp"
    tmp.write_text(json.dumps(config, indent=2, default=str))
    tmp.replace(folder / "config.json")
    rows: list[dict[str, Any]] = []
    for spec, batch, context in cells(opts):
        progress(f"{spec} b{batch} x {context}")
        rows.append(bench.measure(spec, batch, context))
        _write(folder, rows, info)  # after every cell: a crash keeps what was measured
    if opts.find_max_batch:
        for context in opts.context_lengths:
            for spec in (s for s in method_specs(opts) if s != BOUNDED):  # a short prompt's batch says nothing
                progress(f"{spec}: largest batch at {context}")
                rows.append(bench.max_batch(spec, context))
                _write(folder, rows, info)
    return BenchResult(folder=folder, rows=rows, notes=notes, config=config)


# --- the table -------------------------------------------------------------------------------------------

TABLE_COLUMNS = (  # header, bench.csv column, format, divisor
    ("prefill ms", "prefill_ms", "{:.1f}", 1), ("step p50 ms", "step_ms_p50", "{:.2f}", 1),
    ("step p99 ms", "step_ms_p99", "{:.2f}", 1), ("tok/s", "decode_tok_s", "{:.1f}", 1),
    ("×full", "decode_tok_s_x_full", "{:.2f}", 1), ("×full-static", "decode_tok_s_x_full_static", "{:.2f}", 1),
    ("×best full", "decode_tok_s_x_best_full", "{:.2f}", 1),
    ("×bounded", "decode_tok_s_x_bounded_static", "{:.2f}", 1),
    ("p50 ×best full", "steady_tok_s_x_best_full", "{:.2f}", 1), ("KV MiB", "kv_bytes", "{:.1f}", 2**20),
    ("KV ×full", "kv_bytes_x_full", "{:.3f}", 1), ("peak>weights MiB", "peak_above_weights_bytes", "{:.0f}", 2**20),
    ("peak ×full", "peak_above_weights_bytes_x_full", "{:.3f}", 1), ("ideal ms", "ideal_step_ms", "{:.2f}", 1),
    ("step/ideal", "step_over_ideal", "{:.2f}", 1),
)


def render_table(result: BenchResult) -> Table:
    """Every row with its ratios to full and to the best full; '—' = not measured."""
    config = result.config
    title = (f"arkv-bench bench: {config['model']}, {config['dtype']}, {config['new_tokens']} new tokens, "
             f"cache {config['cache_sizes'][0]}, window {config['window_size']}, compile {config['compile']}, "
             f"prefill chunk {config['prefill_chunk']}")
    table = Table(title=title)
    for header in ("cell", "method", "status"):
        table.add_column(header)
    for header, *_ in TABLE_COLUMNS:
        table.add_column(header, justify="right")
    for r in result.rows:
        cell = bench_task(r["batch_size"] if r["kind"] == "cell" else None, r["context_length"])
        if r["kind"] != "cell":
            cell += f" (b{r['batch_size']})"
        figures = ["—" if r.get(key) is None else pattern.format(r[key] / scale)
                   for _, key, pattern, scale in TABLE_COLUMNS]
        table.add_row(cell, r["method"], r["status"], *figures)
    return table
