"""arkv-bench: how much KV memory can you save, at what accuracy and speed?"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Result", "StreamItem", "generate", "stream"]


def __getattr__(name: str) -> Any:
    """The Python API (`arkv_bench.generate`, `arkv_bench.stream`), imported on first use so that the
    CLI starts without loading torch."""
    if name in __all__:
        from arkv_bench import api
        return getattr(api, name)
    raise AttributeError(f"module 'arkv_bench' has no attribute {name!r}")
