"""PyramidKV: SnapKV's scoring with per-layer budgets that shrink linearly with depth.

Lower layers attend broadly, upper layers to a few tokens, so the budget of the tokens
outside the window, `room = cache_size - window_size` on average, is spread as a pyramid
(PyramidKV's schedule): the last layer gets `room / beta`, the first `2 room - room / beta`,
and the layers between decrease linearly. The mean over the layers is exactly `room`, so
the whole cache holds as many tokens as SnapKV's at the same `cache_size`; each layer adds
the window to its share.
"""

from __future__ import annotations

import math

from arkv_bench.cache.store import SlotLayer
from arkv_bench.cache.snapkv import SnapKVCache


def pyramid_budgets(cache_size: int, window_size: int, num_layers: int, beta: float) -> list[int]:
    """Per-layer token budgets (window included): non-increasing with depth, mean exactly `cache_size`.

    The linear schedule is floored to integers; the tokens the floors lose (fewer than
    `num_layers`) go one each to the first layers, which keeps the budgets non-increasing.
    """
    room = cache_size - window_size
    if num_layers == 1:
        return [cache_size]
    low = room / beta
    high = 2 * room - low
    step = (high - low) / (num_layers - 1)
    shares = [math.floor(high - i * step + 1e-9) for i in range(num_layers)]
    missing = room * num_layers - sum(shares)
    return [window_size + share + (i < missing) for i, share in enumerate(shares)]


class PyramidKVCache(SnapKVCache):
    method = "pyramidkv"
    defaults = {**SnapKVCache.defaults, "beta": 20}

    def _new_layers(self) -> list[SlotLayer]:
        opts = self.options
        budgets = pyramid_budgets(opts["cache_size"], opts["window_size"], self.num_layers, opts["beta"])
        return [self.layer_class(layer_idx=i, **{**opts, "cache_size": budget}) for i, budget in enumerate(budgets)]
