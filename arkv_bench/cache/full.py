"""`full`: the model's own dynamic cache, everything at full precision: the reference point.
It never marks itself pending, so the attention hook goes straight to SDPA."""

from __future__ import annotations

from arkv_bench.cache.base import BenchCache, FullLayer


class FullCache(BenchCache):
    method = "full"
    layer_class = FullLayer
    budgeted = False
    defaults = {"cache_size": None, "window_size": 32}
