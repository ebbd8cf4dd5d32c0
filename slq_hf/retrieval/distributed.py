"""The few torch.distributed pieces corpus encoding needs: who am I, share one decision, wait for everyone.

Under ``torchrun`` (``WORLD_SIZE`` > 1) a process group is started on first use: gloo on CPU, nccl when each
rank has a GPU. Run in a single process, everything degrades to no-ops.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if self.world_size == 1:
            return value
        box = [value if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


@contextlib.contextmanager
def distributed_context() -> Iterator[Context]:
    """The current rank/world; starts (and afterwards ends) a process group when torchrun launched us."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Context()
        return
    dist = torch.distributed
    started = False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # Ranks wait for each other at the end of encoding and while rank 0 builds the index: hours on big corpora.
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=12))
        started = True
    try:
        yield Context(dist.get_rank(), dist.get_world_size())
    finally:
        if started:
            dist.destroy_process_group()


def rank_device() -> str:
    """This rank's device: its local GPU if there is one, else the CPU."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return "cpu"
