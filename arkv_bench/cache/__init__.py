"""KV-cache methods as transformers caches: one registry, one factory.

    cache = make_cache("mix", model.config, cache_size=1024)
    prepare_model(model)                       # route attention through the shared hook
    model.generate(input_ids, past_key_values=cache, do_sample=False)
    cache.kv_bytes(), cache.stats()
"""

from __future__ import annotations

import math
from typing import Any

from transformers import PretrainedConfig

from arkv_bench.cache.adakv import AdaKVCache
from arkv_bench.cache.akv import AKVCache
from arkv_bench.cache.arkv import ArkvCache, OriginCache
from arkv_bench.cache.attention import ATTN_NAME, prepare_model
from arkv_bench.cache.base import BenchCache
from arkv_bench.options import ATTENTION_KERNELS
from arkv_bench.cache.full import FullCache, FullStaticCache
from arkv_bench.cache.h2o import H2OCache
from arkv_bench.cache.kivi import KiviCache
from arkv_bench.cache.pyramidkv import PyramidKVCache
from arkv_bench.cache.quant import FP8Cache
from arkv_bench.cache.snapkv import SnapKVCache
from arkv_bench.cache.window import WindowCache

METHODS: dict[str, type[BenchCache]] = {
    cls.method: cls for cls in (FullCache, ArkvCache, OriginCache, FP8Cache, KiviCache, H2OCache, WindowCache,
                                SnapKVCache, PyramidKVCache, AdaKVCache, AKVCache, FullStaticCache)
}

__all__ = ["METHODS", "ATTN_NAME", "BenchCache", "make_cache", "method_options", "prepare_model"]


def method_options(name: str) -> dict[str, Any]:
    """The options a method takes, with their defaults (their types are the defaults' types)."""
    return dict(_method(name).defaults)


def make_cache(name: str, config: PretrainedConfig, attention_kernel: str = "auto", **options: Any) -> BenchCache:
    """Build the cache of method `name` for a model with this config; `attention_kernel` picks the slot
    stores' decode attention (auto: the Triton kernel on CUDA where it applies; triton; torch)."""
    if attention_kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel must be one of {', '.join(ATTENTION_KERNELS)}, got {attention_kernel!r}")
    cls = _method(name)
    unknown = sorted(set(options) - set(cls.defaults))
    if unknown:
        raise ValueError(f"method {name!r} has no option {', '.join(unknown)}; its options: {', '.join(cls.defaults)}")
    opts = {**cls.defaults, **options}
    _validate(cls, opts)
    text = config.get_text_config()
    other = sorted({t for t in (getattr(text, "layer_types", None) or []) if t != "full_attention"})
    if other:
        raise ValueError(f"layer types {other} are not supported: arkv-bench caches full-attention layers only")
    return cls(num_layers=text.num_hidden_layers, attention_kernel=attention_kernel, **opts)


def _method(name: str) -> type[BenchCache]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


def _validate(cls: type[BenchCache], opts: dict[str, Any]) -> None:
    """Reject impossible options with a message that says what is valid."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"{cls.method}: {message}")

    for key, valid in cls.choices.items():
        need(opts[key] in valid, f"{key} must be one of {', '.join(map(str, valid))}, got {opts[key]!r}")
    for key, value in opts.items():
        default = cls.defaults[key]
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            need(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0,
                 f"{key} must be a non-negative number, got {value!r}")
    window = opts["window_size"]
    need(isinstance(window, int) and window >= 1, f"window_size must be a positive integer, got {window!r}")
    size = opts["cache_size"]
    if cls.budgeted:
        need(isinstance(size, int) and size > window,
             f"cache_size must be an integer larger than window_size ({window}), got {size!r}")
    if opts.get("slack"):
        need(isinstance(opts["slack"], int) and opts["slack"] < size - window,
             f"slack must be an integer below cache_size - window_size ({size - window})")
    if "n_sink" in opts:
        need(isinstance(opts["n_sink"], int) and opts["n_sink"] < size, "n_sink must be an integer below cache_size")
    if "kernel_size" in opts:
        need(isinstance(opts["kernel_size"], int) and opts["kernel_size"] % 2 == 1,
             f"kernel_size must be an odd positive integer, got {opts['kernel_size']!r}")
    for tau in ("tau1", "tau2", "tau3"):
        if tau in opts:
            need(opts[tau] > 0, f"{tau} must be positive, got {opts[tau]!r}")
    if "group_size" in opts:
        need(isinstance(opts["group_size"], int) and opts["group_size"] >= 1, "group_size must be a positive integer")
    if "residual_length" in opts:
        need(isinstance(opts["residual_length"], int) and opts["residual_length"] >= opts["group_size"],
             f"residual_length must be an integer >= group_size ({opts['group_size']})")
    if "beta" in opts:
        need(opts["beta"] >= 1, f"beta must be at least 1 (the last layer's share is room / beta), got {opts['beta']!r}")
    if "alpha" in opts:
        need(opts["alpha"] <= 1, f"alpha must be in [0, 1], got {opts['alpha']!r}")
    if "hot_budget" in opts:
        _validate_akv(opts, need)


def _validate_akv(opts: dict[str, Any], need: Any) -> None:
    for key in ("hot_budget", "warm_budget", "n_anchors", "promote_interval"):
        need(isinstance(opts[key], int), f"{key} must be an integer, got {opts[key]!r}")
    recent = opts["window_size"] if opts["protect_recent"] is None else opts["protect_recent"]
    need(isinstance(recent, int) and recent >= 0, f"protect_recent must be a token count or None, got {recent!r}")
    need(opts["hot_budget"] >= opts["n_anchors"] + recent,
         f"hot_budget must be at least n_anchors + protect_recent ({opts['n_anchors'] + recent})")
    need(opts["cold_budget"] == math.inf or float(opts["cold_budget"]).is_integer(),
         f"cold_budget must be a token count or inf (unbounded), got {opts['cold_budget']!r}")
    need(opts["decay"] <= 1, f"decay must be in [0, 1], got {opts['decay']!r}")
    need(opts["promote_interval"] >= 1, "promote_interval must be at least 1")
