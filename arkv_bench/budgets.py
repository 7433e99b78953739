"""A method's cache options and token budget for one prompt, shared by every pipeline (runner, lm-eval, tune)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

from arkv_bench.cache import METHODS, make_cache

_LARGEST = 2 ** 31  # beyond any context length: a budget this large is an input error


class _ProbeConfig:
    """Just enough of a model config for make_cache to check options before a model is loaded."""

    num_hidden_layers = 1

    def get_text_config(self) -> "_ProbeConfig":
        return self


def cache_options(method: str, budget: int | None, window: int, method_options: dict[str, Any]) -> dict[str, Any]:
    """make_cache options of one method: its budget, the window, and the method options it declares."""
    cls = METHODS[method]
    mine = {k: v for k, v in method_options.items() if k in cls.defaults and k not in ("cache_size", "window_size")}
    return {**mine, **({"cache_size": budget} if cls.budgeted else {}), "window_size": window}


def check_cache(method: str, budget: int | None, window: int, method_options: dict[str, Any],
                config: Any = None) -> None:
    """Build the cache once, so impossible options fail before anything runs (ValueError)."""
    make_cache(method, config or _ProbeConfig(), **cache_options(method, budget, window, method_options))


def smallest_budget(method: str, window: int, method_options: dict[str, Any]) -> int:
    """The smallest token budget the method accepts with these options (e.g. window + 1 + slack)."""
    return _smallest(method, window, json.dumps(method_options, sort_keys=True, default=str))


@lru_cache(maxsize=256)
def _smallest(method: str, window: int, options_json: str) -> int:
    options = json.loads(options_json)

    def ok(budget: int) -> bool:
        try:
            check_cache(method, budget, window, options)
        except ValueError:
            return False
        return True

    low, high = window + 1, _LARGEST
    if not ok(high):  # no budget works: let the caller's check report the option that is wrong
        return low
    while low < high:  # the checks are monotonic in the budget
        mid = (low + high) // 2
        low, high = (low, mid) if ok(mid) else (mid + 1, high)
    return low


def budget_for(size: int | float | None, prompt_tokens: int, method: str, window: int,
               method_options: dict[str, Any]) -> int | None:
    """A token count as given; a fraction of the prompt, at least the smallest budget the method accepts."""
    if size is None or not METHODS[method].budgeted:
        return None
    if isinstance(size, int):
        return size
    return max(round(size * prompt_tokens), smallest_budget(method, window, method_options))


def configurations(quant_types: list[str], cache_sizes: list[int | float]) -> Iterator[tuple[str, int | float | None]]:
    """(method, cache size) pairs; methods without a budget run once."""
    for method in quant_types:
        for size in (cache_sizes if METHODS[method].budgeted else [None]):
            yield method, size
