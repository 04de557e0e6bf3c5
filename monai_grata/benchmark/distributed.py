"""The benchmark on several processes: ``torchrun --nproc_per_node N -m monai_grata.benchmark ...``.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank joins one gloo process group, takes the GPU ``LOCAL_RANK`` modulo
the machine's GPUs (so several ranks may share one GPU: at batch size 1 one process leaves a GPU idle between kernel
launches), takes its share of every method's cells still to run, and logs its cells; rank 0 then builds the
table. The group only carries the list of cells still to run and the barriers, so gloo serves GPU ranks too (nccl
refuses two ranks on one GPU).
Where the cells are logged (the store scheme) is decided in ``__main__``: a SQLite store takes one writer, so each
rank writes ``mlflow_rank{r}-{launch}.db`` and rank 0 merges them
(:func:`~monai_grata.benchmark.store.merge_rank_stores`); a tracking server takes every rank's writes directly.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Hashable, Iterator, Sequence
from datetime import timedelta
from typing import TypeVar

import ignite.distributed as idist
import torch
import torch.distributed as dist

__all__ = ["TIMEOUT", "launched_world_size", "process_group", "rank_device", "shard"]

# Ranks wait for each other at the end of their shards, which may differ by hours on a CPU (GraTa takes ten times
# as long as No Adapt); torch's default of 30 minutes would end a healthy run. torchrun ends every rank when one fails.
TIMEOUT = timedelta(days=7)
T = TypeVar("T")


def launched_world_size() -> int:
    """The number of processes ``torchrun`` started (its ``WORLD_SIZE``; 1 when started plainly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_device(device: str, world_size: int, local_rank: int) -> torch.device:
    """The device of one rank: in a multi-process run, ``cuda`` becomes ``cuda:(LOCAL_RANK mod GPUs)``.

    Args:
        device: the ``--device`` given (``cpu``, ``cuda``, ``cuda:N``).
        world_size: the number of processes.
        local_rank: this process's rank on its machine.

    Raises:
        ValueError: a GPU index given to a multi-process run, or ``cuda`` on a machine without a GPU.
    """
    dev = torch.device(device)
    if world_size < 2 or dev.type != "cuda":
        return dev
    if dev.index is not None:
        raise ValueError(f"--device {device}: under torchrun every rank takes the GPU of its LOCAL_RANK; pass cuda")
    if torch.cuda.device_count() == 0:
        raise ValueError(f"--device {device}: this machine has no GPU")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


@contextlib.contextmanager
def process_group(device: str) -> Iterator[torch.device]:
    """Join the (gloo) process group when started by ``torchrun`` with more than one process and leave it at the
    end; a plain run starts none. Yields this rank's device.

    Args:
        device: the ``--device`` given.
    """
    world_size = launched_world_size()
    dev = rank_device(device, world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if world_size < 2:
        yield dev
        return
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    # not idist.initialize: it would set the GPU of the local rank even for CPU processes (and fail on a machine
    # with fewer GPUs than processes); ignite's own set-up is collective, so every rank does it here
    dist.init_process_group("gloo", timeout=TIMEOUT)
    idist.sync()
    try:
        yield dev
    finally:
        idist.finalize()


def shard(items: Sequence[T], group: Callable[[T], Hashable] | None = None) -> list[T]:
    """This rank's share of ``items``: round-robin over the ranks, each group's items dealt in turn.

    Round-robin keeps each rank's items in the given order (so a rank still loads each target once). Dealing one
    group after another, the deal running on from where the previous group's ended, gives every rank a share of
    every group (e.g. of every method, whose costs differ tenfold), where a plain deal of a grid with as many
    methods per pair as ranks would give one rank all cells of one method. Unlike
    ``monai.data.partition_dataset`` it allows fewer items than ranks, as a resumed run often has.

    Args:
        items: the items to share, in the order each rank should run its share.
        group: the key of an item's group; ``None`` deals the items as they come.
    """
    world_size, rank = idist.get_world_size(), idist.get_rank()
    order = list(range(len(items)))
    if group is not None:
        first_seen = {key: n for n, key in enumerate(dict.fromkeys(group(item) for item in items))}
        order.sort(key=lambda i: first_seen[group(items[i])])  # stable: each group keeps the given order
    mine = sorted(order[rank::world_size])
    return [items[i] for i in mine]
