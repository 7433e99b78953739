"""lm-evaluation-harness model type `arkv`: any arkv-bench KV-cache method inside lm-eval.

    arkv-lm-eval --model arkv --model_args pretrained=MODEL,quant_type=mix,cache_size=1024,window_size=32 \
        --tasks gsm8k --device cuda

lm-eval 0.4.13 finds models only in its own registry, so this module must be imported
before lm-eval resolves `--model arkv`:

- ``arkv-lm-eval ...`` (or ``python -m arkv_bench.lm_eval_cli ...``) takes exactly the
  arguments of ``lm_eval`` / ``lm-eval run`` and imports this module first;
- in Python: ``import arkv_bench.lm_eval_model`` and then ``lm_eval.simple_evaluate(model="arkv", ...)``;
- lm-eval releases with entry-point plugins (the ``lm_eval.models`` group) find it with no
  wrapper through the entry point that arkv-bench declares.

``pretrained`` takes everything ``arkv-bench run --model`` takes (a local folder, a ``.gguf``
file, a Hub id in the local cache, ``smollm2-135m`` / ``embedded`` or nothing for the embedded
model) or an already loaded model (then pass ``tokenizer``). Every other unknown key is a
method option of ``make_cache`` (``tau1``, ``gamma``, ``bits``, ...), checked against the method.
``cache_size`` is a token budget or a fraction of each prompt (``0.2``). The device comes from
lm-eval's ``--device`` (its CLI always passes one, ``cuda:0`` by default, so do not repeat it in
``--model_args``); like the ``hf`` model, an unavailable CUDA device falls back to the CPU.

How each request type uses the cache (a fresh cache per prompt or batch):

- ``generate_until``: greedy decoding with the tool's own loop (left padding, stop strings,
  ``batch_size`` rows per batch). Sampling is not supported: it decodes greedily and warns.
- ``loglikelihood``: the context is prefilled through the cache (which compresses it), then
  the continuation is fed after it with the same cache and its log-probabilities summed; the
  first continuation token is scored from the last context position. Requests that share a
  context (the choices of a multiple-choice question) share one prefill: each continuation
  extends its own copy of the prefilled cache. One request at a time.
- ``loglikelihood_rolling``: lm-eval's rolling windows. A window's context is a single token,
  so the window is fed in chunks of ``score_chunk_size`` tokens (default: ``window_size``):
  each chunk attends to what the cache kept of the earlier ones, so the method matters
  (``score_chunk_size=1`` scores token by token, as streaming perplexity does).
  ``loglikelihood`` feeds its continuation in one piece unless ``score_chunk_size`` is given.

Every request's cost is appended to ``request_log`` (timings, kv bytes, the cache's
statistics), which the `lm-eval` suite turns into arkv-bench's samples.jsonl records.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from arkv_bench.budgets import budget_for, cache_options, check_cache, smallest_budget
from arkv_bench.cache import METHODS, make_cache, prepare_model
from arkv_bench.generation import clock, extend, greedy_generate, prefill
from arkv_bench.measures import PeakMemory, eos_ids, row_decode, weights_bytes

logger = logging.getLogger(__name__)

MODEL_NAME = "arkv"
# Keyword arguments lm-eval itself may hand every model; anything else unknown must be a method option.
_OWN_ARGS = ("pretrained", "quant_type", "method", "cache_size", "window_size", "device", "dtype", "batch_size",
             "max_batch_size", "max_length", "max_gen_toks", "trust_remote_code", "tokenizer", "truncation",
             "add_bos_token", "prefix_token_id", "score_chunk_size", "think_end_token", "progress_bars")


class _Quiet(logging.Filter):
    """Drops HFLM's warnings about being handed an already loaded model (that is how we use it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("pretrained" in text and ("already-initialized" in text or "not of type `str`" in text))


@contextmanager
def _quiet_hflm():
    log = logging.getLogger("lm_eval.models.huggingface")
    quiet = _Quiet()
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)


@register_model(MODEL_NAME)
class ArkvLM(HFLM):
    """lm-eval's `hf` model with arkv-bench's cache methods and decode loop."""

    def __init__(self, pretrained: Any = None, quant_type: str | None = None, cache_size: int | float | None = None,
                 window_size: int | None = None, device: str | None = "auto", dtype: str | None = "auto",
                 batch_size: int | str | None = 1, max_batch_size: int | None = None, max_length: int | None = None,
                 max_gen_toks: int = 256, trust_remote_code: bool = False, tokenizer: Any = None,
                 truncation: bool = False, add_bos_token: bool | None = None, prefix_token_id: int | None = None,
                 score_chunk_size: int | None = None, think_end_token: str | int | None = None,
                 method: str | None = None, info: dict[str, Any] | None = None, progress_bars: bool = True,
                 **method_options: Any) -> None:
        from arkv_bench.models import ModelError, load_model

        self.quant_type, self.window_size, self.cache_size = method_settings(quant_type or method, cache_size,
                                                                             window_size, method_options)
        self.method_options = dict(method_options)
        self.score_chunk_size = int(score_chunk_size) if score_chunk_size else None
        self.progress_bars = bool(progress_bars)
        self.request_log: list[dict[str, Any]] = []
        self._active: list[Any] | None = None
        self._warned_sampling = False

        if isinstance(pretrained, str) or pretrained is None:
            device = _device(device)
            try:
                model, tok, loaded = load_model(pretrained, device, dtype or "auto", bool(trust_remote_code),
                                                attn_implementation="arkv")
            except ModelError as e:
                raise ValueError(f"arkv: {e}") from e
            tokenizer, info = tok, loaded
        else:
            model = pretrained
            if tokenizer is None:
                raise ValueError("arkv: pass `tokenizer` together with an already loaded model")
        self.info = dict(info or {"model": getattr(model, "name_or_path", type(model).__name__),
                                  "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch.")})
        if str(batch_size).startswith("auto"):
            logger.warning("arkv: batch_size=auto is not supported; using 1")
            batch_size = 1
        with _quiet_hflm():
            super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=int(batch_size or 1),
                             max_batch_size=max_batch_size or 64, max_length=max_length, truncation=truncation,
                             add_bos_token=add_bos_token, prefix_token_id=prefix_token_id, logits_cache=False,
                             think_end_token=think_end_token)
        self._max_gen_toks = int(max_gen_toks)
        if self.quant_type != "full":
            prepare_model(self.model)
        self.eos_ids = eos_ids(self.model, self.tokenizer)
        self.weights_bytes = weights_bytes(self.model)

    # --- configuration -----------------------------------------------------------------------
    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    def budget(self, prompt_tokens: int) -> int | None:
        """This prompt's token budget: the cache size, or its fraction of the prompt."""
        return budget_for(self.cache_size, prompt_tokens, self.quant_type, self.window_size, self.method_options)

    def new_cache(self, prompt_tokens: int) -> tuple[Any, int | None]:
        budget = self.budget(prompt_tokens)
        options = cache_options(self.quant_type, budget, self.window_size, self.method_options)
        return make_cache(self.quant_type, self.model.config, **options), budget

    def get_model_info(self) -> dict[str, Any]:
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(self.model.dtype), "model_name": self.info.get("model"),
                "arkv_quant_type": self.quant_type, "arkv_cache_size": self.cache_size,
                "arkv_window_size": self.window_size, "arkv_method_options": dict(self.method_options)}

    def reset_log(self) -> list[dict[str, Any]]:
        """Return the request log so far and start a new one."""
        log, self.request_log = self.request_log, []
        return log

    # --- log-likelihood ------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self._active = list(requests)
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress_bars)
        finally:
            self._active = None

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        active = self._active if self._active is not None and len(self._active) == len(requests) else None
        metas = [_meta(r, "loglikelihood") for r in active] if active else [{} for _ in requests]
        items = [(ctx, cont) for _, ctx, cont in requests]
        results = self._score(items, metas, disable_tqdm)
        for (request_str, _, _), answer in zip(requests, results):
            if request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        totals = []
        quiet = disable_tqdm or not self.progress_bars or self.rank != 0
        for request in tqdm(requests, disable=quiet, desc="arkv loglikelihood_rolling"):
            (string,) = request.args
            windows = list(map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)))
            meta = _meta(request, "loglikelihood_rolling")
            scored = self._score(windows, [dict(meta, window=i) for i in range(len(windows))], disable_tqdm=True,
                                 chunk=self.score_chunk_size or self.window_size)
            total = sum(ll for ll, _ in scored)
            totals.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return totals

    def _score(self, items: Sequence[tuple[list[int], list[int]]], metas: Sequence[dict[str, Any]],
               disable_tqdm: bool = False, chunk: int | None = None) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (sum of log-probs, whether greedy), through the cache.

        Requests with the same (truncated) context share one prefill."""
        results: list[tuple[float, bool] | None] = [None] * len(items)
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = defaultdict(list)
        for i, (ctx, cont) in enumerate(items):
            if not cont:
                raise ValueError("arkv: a loglikelihood request has an empty continuation")
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
            head = whole[:len(whole) - len(cont)]
            if not head:
                raise ValueError("arkv: the continuation leaves no context within max_length")
            groups[tuple(head)].append((i, list(cont)))
        bar = tqdm(total=len(items), disable=disable_tqdm or not self.progress_bars or self.rank != 0,
                   desc="arkv loglikelihood")
        for group_id, (head, members) in enumerate(groups.items()):
            memory = PeakMemory(self.device)
            base, budget, first, prefill_s = self._prefill(list(head))
            for n, (i, cont) in enumerate(members):
                cache = base if n == len(members) - 1 else _copy(base)
                t0 = clock(self.device)
                logprobs, greedy = self._continue(cache, len(head), first, cont, chunk or self.score_chunk_size)
                score_s = clock(self.device) - t0
                results[i] = (logprobs, greedy)
                stats = cache.stats()
                self.request_log.append({
                    **metas[i], "prompt_tokens": len(head), "continuation_tokens": len(cont), "budget": budget,
                    "prefill_group": group_id, "prefill_s": prefill_s, "score_s": score_s, "ttft_s": None,
                    "itl_s": [], "decode_tokens": 0, "batch_rows": 1, "batch_row": 0,
                    "kv_bytes": stats["kv_bytes"], "kv_bytes_full": stats["kv_bytes_full"],
                    "compressed": stats["compressed"], "layers": stats["layers"],
                    "peak_mem_bytes": memory.read(),
                    "loglikelihood": logprobs, "is_greedy": greedy})
                bar.update(1)
        bar.close()
        return [r for r in results if r is not None]

    def _prefill(self, head: list[int]) -> tuple[Any, int | None, torch.Tensor, float]:
        cache, budget = self.new_cache(len(head))
        ids = torch.tensor([head], dtype=torch.long, device=self.device)
        t0 = clock(self.device)
        logits = prefill(self.model, ids, torch.ones_like(ids), cache)
        prefill_s = clock(self.device) - t0
        return cache, budget, logits[0].float(), prefill_s

    @torch.inference_mode()
    def _continue(self, cache: Any, n_head: int, first: torch.Tensor, cont: list[int], chunk: int | None
                  ) -> tuple[float, bool]:
        """Score `cont` after the prefilled context: `first` predicts cont[0], the extension the rest."""
        rows = [first[None]]
        mask = torch.ones((1, n_head), dtype=torch.long, device=self.device)
        feed = cont[:-1]
        step = chunk or max(len(feed), 1)
        for start in range(0, len(feed), step):
            chunk = torch.tensor([feed[start:start + step]], dtype=torch.long, device=self.device)
            logits, mask = extend(self.model, chunk, mask, cache)
            rows.append(logits[0].float())
        logits = torch.cat(rows, dim=0)
        logprobs = F.log_softmax(logits, dim=-1)
        target = torch.tensor(cont, dtype=torch.long, device=logprobs.device)
        total = float(logprobs.gather(1, target[:, None]).sum())
        greedy = bool((logits.argmax(-1) == target).all())
        return total, greedy

    # --- generation ------------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(i)
        bar = tqdm(total=len(requests), disable=disable_tqdm or not self.progress_bars or self.rank != 0,
                   desc="arkv generate_until")
        eos_text = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1] or {})
            until, max_gen = self._generation_settings(kwargs, eos_text)
            lengths = {i: len(self.tok_encode(requests[i].args[0])) for i in members}
            order = sorted(members, key=lambda i: (-lengths[i], requests[i].args[0]))
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                texts = self._generate_batch([requests[i] for i in batch], until, max_gen)
                for i, text in zip(batch, texts):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return [r if r is not None else "" for r in results]

    def _generation_settings(self, kwargs: dict[str, Any], eos_text: str) -> tuple[list[str], int]:
        until = kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        if eos_text and eos_text not in until:
            until.append(eos_text)
        max_gen = next((kwargs.pop(k) for k in ("max_gen_toks", "max_new_tokens", "max_tokens",
                                                 "max_completion_tokens") if kwargs.get(k) is not None),
                       self.max_gen_toks)
        sampling = kwargs.get("do_sample") is True or (kwargs.get("do_sample") is None
                                                        and float(kwargs.get("temperature") or 0) > 0)
        if sampling and not self._warned_sampling:
            logger.warning("arkv: sampling (%s) is not supported; decoding greedily", kwargs)
            self._warned_sampling = True
        return until, int(max_gen)

    def _generate_batch(self, requests: list[Any], until: list[str], max_gen: int) -> list[str]:
        contexts = [r.args[0] for r in requests]
        max_ctx = self.max_length - max_gen
        if max_ctx <= 0:
            raise ValueError(f"arkv: max_gen_toks ({max_gen}) must be below the model's max length ({self.max_length})")
        input_ids, mask = self.tok_batch_encode(contexts, left_truncate_len=max_ctx, truncation=self.truncation)
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        lengths = mask.sum(-1).tolist()
        cache, budget = self.new_cache(int(max(lengths)))
        memory = PeakMemory(self.device)
        gen = greedy_generate(self.model, input_ids, mask, cache, max_gen, self.eos_ids, self._stopper(until))
        peak = memory.read()
        head = _meta(requests[0], "generate_until")
        rows = len(requests)
        texts = []
        for row, (request, tokens) in enumerate(zip(requests, gen.tokens)):
            text = self.tok_decode(tokens)
            texts.append(_postprocess(text, until, self.think_end_token))
            self.request_log.append({
                **_meta(request, "generate_until"), "prompt_tokens": int(lengths[row]), "budget": budget,
                "prefill_s": gen.prefill_s, "ttft_s": gen.ttft_s, "itl_s": list(gen.itl_s),
                "decode_tokens": len(tokens), "batch_rows": rows, "batch_row": row,
                **dict(zip(("decode_steps", "decode_s"), row_decode(gen.itl_s, gen.generated[row]))),
                "batch_id": f"{head['task']}/{head['doc_id']}/{head['request_idx']}",
                "kv_bytes": gen.kv_bytes / rows, "kv_bytes_full": gen.kv_bytes_full / rows,
                "compressed": bool(gen.stats.get("compressed")), "layers": gen.stats.get("layers", []),
                "peak_mem_bytes": peak, "generation": texts[-1]})
        return texts

    def _stopper(self, until: list[str]):
        stops = [s for s in until if s]
        if not stops:
            return None
        tail = max(len(self.tokenizer.encode(s, add_special_tokens=False)) for s in stops) + 4

        def should_stop(ids: list[int]) -> bool:
            text = self.tokenizer.decode(ids[-tail:], skip_special_tokens=False)
            return any(s in text for s in stops)

        return should_stop


def method_settings(quant_type: str | None, cache_size: Any, window_size: Any, method_options: dict[str, Any]
                    ) -> tuple[str, int, int | float | None]:
    """(method, window, cache size) from model arguments, checked as make_cache checks them, before any model
    loads; ValueError naming the argument otherwise."""
    name = quant_type or "full"
    if name not in METHODS:
        raise ValueError(f"arkv: unknown quant_type {name!r}; valid methods: {', '.join(METHODS)}")
    cls = METHODS[name]
    unknown = sorted(k for k in method_options if k not in cls.defaults)
    if unknown:
        options = [k for k in cls.defaults if k not in ("cache_size", "window_size")]
        raise ValueError(f"arkv: unknown model argument(s) {', '.join(unknown)}; method {name!r} takes "
                         f"{', '.join(options) or 'no options'} besides cache_size and window_size, and the "
                         f"model takes {', '.join(a for a in _OWN_ARGS if a != 'method')}")
    window = window_size if window_size is not None else cls.defaults["window_size"]
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"arkv: window_size must be a positive whole number, got {window!r}")
    size = cache_size if cache_size is not None else cls.defaults.get("cache_size")
    size = _check_size(size, window) if cls.budgeted else None
    probe = size if not isinstance(size, float) else smallest_budget(name, window, method_options)
    check_cache(name, probe, window, method_options)  # bad options fail now, not at the first request
    return name, window, size


def check_model_args(args: dict[str, Any]) -> None:
    """`--model_args` of `--model arkv`, checked before lm-eval loads anything (ValueError naming the problem)."""
    from arkv_bench.models import _looks_like_path

    pretrained = args.get("pretrained")
    if isinstance(pretrained, str) and _looks_like_path(pretrained) and not Path(pretrained).expanduser().exists():
        raise ValueError(f"arkv: pretrained={pretrained} does not exist; pass a model folder, a .gguf file, a Hub "
                         f"id or smollm2-135m")
    options = {k: v for k, v in args.items() if k not in _OWN_ARGS}
    method_settings(args.get("quant_type") or args.get("method"), args.get("cache_size"), args.get("window_size"),
                    options)


def _device(device: str | None) -> str:
    """lm-eval's CLI hands every model `--device` (default cuda:0); like its `hf` model, fall back to
    the best device there is when that one does not exist."""
    if not device:
        return "auto"
    text = str(device).strip().lower()
    if text.startswith("cuda"):
        index = int(text.split(":")[1]) if ":" in text and text.split(":")[1].isdigit() else 0
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            logger.warning("arkv: device %s is not available; using %s", device,
                           "cuda" if torch.cuda.is_available() else "cpu")
            return "auto"
    return str(device)


def _check_size(size: Any, window: int) -> int | float:
    if isinstance(size, bool) or not isinstance(size, (int, float)) or not math.isfinite(size) or size > 2 ** 31:
        raise ValueError(f"arkv: cache_size must be a token count or a fraction in (0, 1], got {size!r}")
    if isinstance(size, float) and size.is_integer() and size > 1:
        size = int(size)
    if isinstance(size, float):
        if not 0 < size <= 1:
            raise ValueError(f"arkv: cache_size {size} must be a token count > window_size or a fraction in (0, 1]")
        return size
    if size <= window:
        raise ValueError(f"arkv: cache_size ({size}) must be larger than window_size ({window})")
    return size


def _meta(request: Any, kind: str) -> dict[str, Any]:
    return {"task": getattr(request, "task_name", None), "doc_id": getattr(request, "doc_id", None),
            "request_type": kind, "request_idx": getattr(request, "idx", None)}


def _copy(cache: Any) -> Any:
    with torch.inference_mode():
        return copy.deepcopy(cache)


def _postprocess(text: str, until: list[str], think_end_token: Any) -> str:
    if isinstance(think_end_token, str) and think_end_token:
        text = text.split(think_end_token)[-1].lstrip()
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text
