"""Every measured figure defined once (docs/results-format.md says the same in words).

- decode tok/s of one row: the tokens it generated after the first (its EOS included: the model
  produced it), over the time of the decode steps that produced them. A batch's rate is the sum
  of its rows' rates; a summary's rate is the batches' rates averaged with their decode time as
  weight, which for one row per batch is simply all tokens over all decode time.
- decode step (ITL): one forward of the whole batch plus the greedy pick, timed with the device
  synchronised and nothing host-side (no stop strings, no .tolist()) inside.
- peak memory: the device memory allocated at the peak of a sample above what was allocated before
  its prefill (the weights and anything else resident), so it is what the method's cache and the
  activations add; the weights' own bytes are recorded beside it.
- EOS: the union of the generation config's EOS ids and the tokenizer's EOS id.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any

import torch


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """The token ids that end an answer: the generation config's (one id or a list) and the tokenizer's."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    return sorted({int(e) for e in [*ids, getattr(tokenizer, "eos_token_id", None)] if e is not None})


def weights_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each tensor counted once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


class PeakMemory:
    """Peak device memory since construction, above what was allocated then (CUDA only; None elsewhere),
    summed over the given devices (a model spread over several GPUs with --device-map)."""

    def __init__(self, devices: torch.device | Sequence[torch.device]):
        devices = [devices] if isinstance(devices, torch.device) else list(devices)
        self.devices = [d for d in devices if d.type == "cuda"]
        self.start: dict[torch.device, int] = {}
        for device in self.devices:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.start[device] = torch.cuda.memory_allocated(device)

    def by_device(self) -> dict[str, int]:
        """Bytes of the peak so far above the start, per device."""
        out = {}
        for device in self.devices:
            torch.cuda.synchronize(device)
            out[str(device)] = torch.cuda.max_memory_allocated(device) - self.start[device]
        return out

    def read(self) -> int | None:
        """Bytes of the peak so far above the start, summed over the devices; None where not measured."""
        return sum(self.by_device().values()) if self.devices else None


def row_decode(step_s: Sequence[float], generated: int) -> tuple[int, float]:
    """(tokens after the first, seconds of the steps that produced them) of a row that generated
    `generated` tokens (its EOS included) while the batch took steps of `step_s` seconds."""
    steps = max(generated - 1, 0)
    return steps, float(sum(step_s[:steps]))


def decode_tok_s(batches: Sequence[tuple[float, Sequence[tuple[int, float]]]]) -> float | None:
    """The summary's decode rate from (batch decode seconds, [(row tokens, row seconds), ...]) per batch."""
    weighted = total = 0.0
    for batch_s, rows in batches:
        rate = sum(n / s for n, s in rows if n and s)
        if batch_s and rate:
            weighted += rate * batch_s
            total += batch_s
    return weighted / total if total else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def gpu_inventory() -> dict[str, Any]:
    """GPU count, names and how they are connected (nvidia-smi topo -m when there is one)."""
    if not torch.cuda.is_available():
        return {"count": 0, "names": [], "topology": None}
    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    topology, source = None, "torch device properties (nvidia-smi not found)"
    if shutil.which("nvidia-smi"):
        try:
            done = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=20)
            text = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout).strip()  # it underlines its header for terminals
            topology, source = text or None, "nvidia-smi topo -m"
        except (OSError, subprocess.SubprocessError) as e:
            source = f"nvidia-smi topo -m failed: {e}"
    devices = [{"name": p.name, "total_memory_bytes": p.total_memory, "multiprocessors": p.multi_processor_count,
                "compute_capability": f"{p.major}.{p.minor}"} for p in props]
    return {"count": len(props), "names": [p.name for p in props], "topology": topology, "topology_source": source,
            "devices": devices}
