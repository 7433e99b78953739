"""Data-parallel runs: one process per GPU, started by torchrun, each doing a fixed share of the work.

    torchrun --nproc-per-node 2 -m arkv_bench run ...      (or: arkv-bench run --gpus 2 ...)

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK. Every rank reads what the run folder already
holds (all ranks' sample files), agrees on the same ordered list of remaining work, and takes
every WORLD_SIZE-th item of it starting at its RANK. Each rank appends to its own sample file,
so no two processes write one file; rank 0 builds summary.csv from all of them at the end.
The process group (gloo) is used for barriers only: the model runs on the rank's own GPU.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
# A rank may wait for slower ranks for the whole run: barriers must not time out before the work is done.
BARRIER_TIMEOUT = datetime.timedelta(days=7)


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel run (rank 0 of 1 when not started by torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T], group: Callable[[T], Hashable] | None = None) -> list[T]:
        """This rank's items: every `world`-th one, starting at `rank` (the same split on every rank). With
        `group`, items of one group stay on one rank (every `world`-th group, in order of first appearance):
        the configurations that share a prompt's forward pass run where it was recorded."""
        if group is None:
            return list(items[self.rank::self.world])
        index: dict[Hashable, int] = {}
        for item in items:
            index.setdefault(group(item), len(index))
        return [item for item in items if index[group(item)] % self.world == self.rank]

    def samples_file(self) -> str:
        """The sample file this rank appends to."""
        return "samples.jsonl" if self.world == 1 else f"samples.rank{self.rank}.jsonl"

    def device(self, requested: str) -> str:
        """The rank's own GPU when CUDA is used; the requested device otherwise."""
        if self.world > 1 and requested in ("auto", "cuda") and torch.cuda.is_available():
            if self.local_rank >= torch.cuda.device_count():
                raise RuntimeError(f"rank {self.rank} has LOCAL_RANK {self.local_rank} but only "
                                   f"{torch.cuda.device_count()} GPUs are visible: lower --nproc-per-node")
            torch.cuda.set_device(self.local_rank)
            return f"cuda:{self.local_rank}"
        return requested


def init(ranks: Ranks) -> None:
    """Join the process group (gloo: barriers only) when more than one rank runs."""
    if ranks.world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1 and dist.is_initialized():
        dist.barrier()


def finish(ranks: Ranks) -> None:
    if ranks.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def launch(n_procs: int, argv: Sequence[str]) -> int:
    """Start `n_procs` ranks of `arkv-bench <argv>` through torch.distributed.run; return its exit code."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n_procs}",
               "-m", "arkv_bench", *argv]
    return subprocess.call(command)


def without_gpus_option(argv: Sequence[str]) -> list[str]:
    """The command line minus `--gpus N` / `--gpus=N` (the launched ranks must not launch again)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--gpus":
            skip = True
        elif not arg.startswith("--gpus="):
            out.append(arg)
    return out
