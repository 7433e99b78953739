"""The run options, declared once.

`RunOptions` is the one schema: each field's metadata gives its command-line / YAML name, its
help, how a value is parsed and checked, and whether `tune` writes it into its best config.
From it come the typer options of `run` and `tune` (`command_parameters`), the keys a
`--config` YAML file may hold (`CONFIG_KEYS`), the options every suite reads (suites get the
`RunOptions` itself) and tune's written config (`config_mapping`). A new option is one field here.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

CHAT_CHOICES = ("auto", "on", "off")
ATTENTION_KERNELS = ("auto", "triton", "torch")
ATTENTION_KERNEL_HELP = ("decode attention over the slot stores: auto (the Triton kernel on CUDA where it applies, "
                         "reading FP8 slots as stored), triton, or torch (the reference path)")
# query-aware: the prompt with its question is prefilled and compressed (the ARKV paper's protocol);
# query-agnostic: the context alone is compressed, the question comes after (arkv_bench/protocols.py)
PROTOCOLS = ("query-aware", "query-agnostic")


class UsageError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""


def parse_cache_size(text: Any) -> int | float:
    """'1024' -> 1024 tokens per layer; '0.2' -> a fifth of each prompt."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise UsageError(f"cache size {text!r} is not a number: use token counts like 512 or fractions like 0.2")
    if value.is_integer() and value > 1:
        if value > 2 ** 31:
            raise UsageError(f"cache size {text!r} is too large: use a token count below 2**31 or a fraction")
        return int(value)
    if 0 < value <= 1:
        return value
    raise UsageError(f"cache size {text!r} must be a token count > 1 or a fraction in (0, 1]")


def split_list(value: Any) -> list[str]:
    """A comma list from the command line, or a YAML list, as strings."""
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [t.strip() for t in str(value).split(",") if t.strip()]


# --- one parser per kind of value -------------------------------------------------------------------

def _text(flag: str, value: Any) -> str:
    if isinstance(value, (dict, list)) or not str(value).strip():
        raise UsageError(f"{flag} takes a non-empty text value, got {value!r}")
    return str(value).strip()


def _whole(least: int | None) -> Callable[[str, Any], int]:
    def parse(flag: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
                value = int(value)
            else:
                raise UsageError(f"{flag} must be a whole number, got {value!r}")
        if least is not None and value < least:
            raise UsageError(f"{flag} must be {'at least 1' if least else 'zero or more'}, got {value}")
        return value
    return parse


def _items(kind: Callable[[str], Any], what: str) -> Callable[[str, Any], list[Any]]:
    def parse(flag: str, value: Any) -> list[Any]:
        items = split_list(value)
        if not items:
            raise UsageError(f"{flag} {value!r} names nothing: give at least one value ({what}) or leave it out")
        try:
            parsed = [kind(item) for item in items]
        except (TypeError, ValueError) as e:
            if isinstance(e, UsageError):
                raise
            raise UsageError(f"{flag} takes {what}, comma separated; got {value!r}") from None
        repeated = sorted({str(p) for p in parsed if parsed.count(p) > 1})
        if repeated:
            raise UsageError(f"{flag} repeats {', '.join(repeated)}: give each value once")
        return parsed
    return parse


def _choice(choices: tuple[str, ...]) -> Callable[[str, Any], str]:
    def parse(flag: str, value: Any) -> str:
        if value not in choices:
            raise UsageError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
        return str(value)
    return parse


def _flag(flag: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"{flag} takes true or false, got {value!r}")
    return value


def _folder(flag: str, value: Any) -> str:
    text = _text(flag, value)
    if not Path(text).expanduser().is_dir():
        raise UsageError(f"{flag} {text} is not a folder")
    return text


def _file(flag: str, value: Any) -> str:
    text = _text(flag, value)
    if not Path(text).expanduser().is_file():
        raise UsageError(f"{flag} {text} is not a file: pass the path of a UTF-8 text file")
    return text


def _protocol(text: str) -> str:
    if text not in PROTOCOLS:
        raise UsageError(f"unknown protocol {text!r}; valid protocols: {', '.join(PROTOCOLS)}")
    return text


def _int_item(text: str) -> int:
    if not re.fullmatch(r"\d+", text):
        raise ValueError(text)
    return int(text)


def _depth(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise UsageError(f"depth {text} must be in [0, 1]")
    return value


def option(default: Any, help: str, parse: Callable[[str, Any], Any], *, name: str | None = None,
           kind: type = str, tune_config: bool = True, keyed_when_default: bool = True) -> Any:
    """A RunOptions field: `name` is its command-line and YAML name (default: the field's), `kind`
    the type typer reads from the command line, `parse` turns a CLI or YAML value into the field's
    value (raising UsageError), `tune_config` whether tune's best config repeats it.
    `keyed_when_default=False` (options added after runs were written) leaves the option out of the
    run's key while it has its default, so folders written before it existed still resume."""
    meta = {"name": name, "help": help, "parse": parse, "kind": kind, "tune_config": tune_config,
            "keyed_when_default": keyed_when_default}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunOptions:
    """Everything that defines a run (and so its results folder); the one schema of run options."""

    suite: str = option("passkey", "suite (see `arkv-bench list`)", _text, tune_config=False)
    tasks: list[str] | None = option(None, "comma list of tasks (globs allowed, e.g. '*_e')",
                                     _items(str, "task names"))
    quant_types: list[str] = option(["full", "mix"], "comma list of methods (see `arkv-bench list`)",
                                    _items(str, "method names"), name="quant_type", tune_config=False)
    cache_sizes: list[int | float] = option([1024], "comma list: tokens per layer (512) or prompt fractions (0.2)",
                                            _items(parse_cache_size, "cache sizes"), name="cache_size",
                                            tune_config=False)
    window_size: int = option(32, "recent tokens always kept at full precision", _whole(1), kind=int)
    method_options: dict[str, Any] = option({}, "KEY=VALUE method option, repeatable", lambda _, v: v,
                                            name="method_option", tune_config=False)
    model: str | None = option(None, "Hub id, folder, .gguf file or 'smollm2-135m' (default)", _text)
    limit: int | None = option(None, "samples per task", _whole(1), kind=int, tune_config=False)
    batch_size: int = option(1, "prompts per batch (left padding)", _whole(1), kind=int)
    seed: int = option(0, "seeds the data (and tune's sampler)", _whole(0), kind=int)
    device: str = option("auto", "auto, cpu or cuda", _text, tune_config=False)
    dtype: str = option("auto", "auto, bfloat16, float16 or float32", _text)
    device_map: str | None = option(None, "auto: spread the model's layers over every visible GPU (accelerate), "
                                          "for a model larger than one card", _choice(("auto",)), tune_config=False,
                                  keyed_when_default=False)
    chat_template: str = option("auto", "auto (the task decides), on or off", _choice(CHAT_CHOICES))
    attention_kernel: str = option("auto", ATTENTION_KERNEL_HELP, _choice(ATTENTION_KERNELS), tune_config=False,
                                   keyed_when_default=False)
    trust_remote_code: bool = option(False, "allow the model's own code from the Hub", _flag, kind=bool,
                                     tune_config=False)
    data_dir: str | None = option(None, "folder of local data files in the Hub schema (lm-eval: task YAMLs)",
                                  _folder)
    num_fewshot: int | None = option(None, "few-shot examples per prompt", _whole(0), kind=int)
    context_lengths: list[int] | None = option(None, "passkey: comma list of prompt lengths in tokens",
                                               _items(_int_item, "whole numbers of tokens"))
    depths: list[float] | None = option(None, "passkey: comma list of needle depths in [0, 1]",
                                        _items(_depth, "numbers in [0, 1]"))
    samples_per_cell: int | None = option(None, "passkey: prompts per (length, depth)", _whole(1), kind=int)
    max_length: int | None = option(None, "LongBench: truncate prompts to this many tokens", _whole(1), kind=int)
    text_file: str | None = option(None, "ppl: score this UTF-8 text file", _file, keyed_when_default=False)
    ppl_chunk: int | None = option(None, "ppl: tokens fed through the cache at a time (default 512)", _whole(1),
                                   kind=int, keyed_when_default=False)
    protocols: list[str] = option(["query-aware"], "comma list: query-aware (the question is compressed with the "
                                  "context) or query-agnostic (the context alone is)",
                                  _items(_protocol, "query-aware or query-agnostic"), name="protocol",
                                  tune_config=False, keyed_when_default=False)
    shared_prefill: bool = option(True, "one forward pass of each prompt serves every configuration of the sweep "
                                        "(--no-shared-prefill: a separate prefill per configuration)", _flag,
                                  kind=bool, tune_config=False, keyed_when_default=False)
    compile: bool = option(True, "replay decode steps from CUDA graphs on CUDA (--no-compile: eager)", _flag,
                           kind=bool, tune_config=False, keyed_when_default=False)
    prefill_chunk: int | None = option(None, "prompt tokens per prefill pass, 0 = the whole prompt at once "
                                             "(default: 4096 on CUDA, 0 on CPU)", _whole(0), kind=int,
                                       tune_config=False, keyed_when_default=False)

    def key(self) -> dict[str, Any]:
        """The options that decide the results (and so must match to resume)."""
        return {f.name: value for f, value in zip(fields(self), asdict(self).values())
                if f.metadata["keyed_when_default"] or value != _default(f)}

    def default_run_name(self) -> str:
        model = re.sub(r"[^A-Za-z0-9_.-]+", "_", (self.model or "smollm2-135m").rstrip("/").split("/")[-1])
        digest = hashlib.sha1(json.dumps(self.key(), sort_keys=True, default=str).encode()).hexdigest()[:8]
        return f"{self.suite}-{model}-{digest}"


def _default(f: Any) -> Any:
    return f.default_factory() if callable(getattr(f, "default_factory", None)) else f.default


def _name(f: Any) -> str:
    return f.metadata["name"] or f.name


SCHEMA = {_name(f): f for f in fields(RunOptions)}
# keys of a --config YAML file: every run option (method options as a mapping) and where to write
CONFIG_KEYS = frozenset([*SCHEMA, "method_options", "out", "run_name"]) - {"method_option"}


def _typed_method_option(quant_types: list[str], key: str, value: str) -> Any:
    """Type a --method-option value as the selected methods that declare it do."""
    from arkv_bench.cache import METHODS

    kinds = {type(METHODS[m].defaults[key]) for m in quant_types
             if m in METHODS and METHODS[m].defaults.get(key) is not None}
    if bool in kinds:
        flags = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
        if value.lower() not in flags:
            raise UsageError(f"--method-option {key}={value}: {key} takes true or false")
        return flags[value.lower()]
    for kind in (int, float):
        if kind in kinds:
            try:
                return kind(value)
            except ValueError:
                if kind is int and float in kinds:
                    continue
                raise UsageError(f"--method-option {key}={value}: {key} takes a "
                                 f"{'number' if kind is float else 'whole number'}") from None
    if not kinds and value.isdigit():  # an option whose default is None (e.g. akv's protect_recent): a count
        return int(value)
    return value


def build_options(given: dict[str, Any], config: dict[str, Any] | None = None, method_option: list[str] = (),
                  defaults: dict[str, Any] | None = None) -> RunOptions:
    """RunOptions from a --config mapping, overridden by the command line's values (`given`, by
    option name), each parsed and checked by its schema; raises UsageError naming the option."""
    config = config or {}
    values = {**(defaults or {}), **config, **given}
    opts = RunOptions()
    for name, f in SCHEMA.items():
        if name not in values or f.name == "method_options":
            continue
        flag = f"--{name.replace('_', '-')}"
        try:
            setattr(opts, f.name, f.metadata["parse"](flag, values[name]))
        except UsageError as e:
            from_file = name in config and name not in given
            raise UsageError(f"{e}: fix it in the config file" if from_file else str(e)) from None
    options = config.get("method_options") or {}
    if not isinstance(options, dict):
        raise UsageError(f"method_options in the config file must be a mapping of option: value, got {options!r}")
    options = dict(options)
    for item in method_option:
        if "=" not in item:
            raise UsageError(f"--method-option {item!r} must look like KEY=VALUE")
        key, value = item.split("=", 1)
        options[key.strip()] = _typed_method_option(opts.quant_types, key.strip(), value.strip())
    opts.method_options = options
    return opts


def command_parameters() -> list[inspect.Parameter]:
    """One typer option per run option (default None: "not given", so a --config value stands)."""
    import typer

    params = []
    for name, f in SCHEMA.items():
        flag = f"--{name.replace('_', '-')}"
        if f.name == "method_options":
            default, annotation = typer.Option([], flag, help=f.metadata["help"]), list[str]
        else:
            shown = _default(f)
            help_text = f.metadata["help"] + ("" if shown is None or shown is False else f" (default: {_shown(shown)})")
            decls = [f"{flag}/--no-{name.replace('_', '-')}"] if f.metadata["kind"] is bool else [flag]
            default, annotation = typer.Option(None, *decls, help=help_text), Optional[f.metadata["kind"]]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=annotation))
    return params


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def given_options(values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Split a command's keyword arguments into (the run options given, by option name; method options)."""
    method_options = list(values.pop("method_options", None) or [])
    given = {}
    for name, f in SCHEMA.items():
        value = values.pop(f.name, None)
        if value is not None:
            given[name] = value
    return given, method_options


def config_mapping(opts: RunOptions) -> dict[str, Any]:
    """The options tune repeats in its best config: those marked so whose value is not the default
    (window_size always: the tuned values depend on it)."""
    base = RunOptions()
    return {name: getattr(opts, f.name) for name, f in SCHEMA.items() if f.metadata["tune_config"]
            and (getattr(opts, f.name) != getattr(base, f.name) or f.name == "window_size")}
