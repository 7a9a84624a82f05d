"""Splitting a heavy pass over the processes of an ``accelerate launch``: each takes a contiguous share.

    accelerate launch --num_processes 4 -m mmfuse caption IMAGES --out captions.csv             # 4 GPUs
    accelerate launch --multi_gpu --num_processes 2 -m mmfuse caption IMAGES --out captions.csv  # 2 CPU processes

Outside a launch everything here is a no-op for one process, and nothing starts a process group.
"""

from __future__ import annotations

import os


def launched() -> bool:
    """Whether this process is one of several started by ``accelerate launch`` (or torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def main_process() -> bool:
    """Not one of the other processes of a launch (RANK: set for each process by the launcher): the one that prints,
    writes shared files and takes locks."""
    return int(os.environ.get("RANK", "0")) == 0


def launch_state():
    """Accelerate's ``PartialState`` of a multi-process launch, joining its process group if no Accelerator has yet
    (gloo on a machine without CUDA); None for a single process."""
    if not launched():
        return None
    import torch  # deferred, as is all of this: nothing here is needed outside a launch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def share(n: int, rank: int, world: int, chunk: int = 1) -> range:
    """The contiguous rows ``rank`` of ``world`` processes takes of ``n``, in whole ``chunk``s (the last cut at ``n``):
    the shares in rank order are 0..n-1 once each, and differ by a chunk at most."""
    return range(*shard_bounds(n, world, chunk)[rank])


def shard_bounds(n: int, world: int, chunk_size: int = 1) -> list[tuple[int, int]]:
    """Contiguous [start, end) row ranges, one per process, of whole chunks (the first ``chunks % world`` one chunk
    longer, the last cut at ``n``); no padding.

    A shard of whole chunks makes every chunk, and so every batch, the one a single process predicts: the same
    rows through the same batch shapes give the same floats, where a row's last bit can change with its batch's size.
    """
    chunks = -(-n // chunk_size)
    per, extra = divmod(chunks, world)
    starts = [min(n, (k * per + min(k, extra)) * chunk_size) for k in range(world + 1)]
    return list(zip(starts[:-1], starts[1:]))


def gather_lists(items: list) -> list[list]:
    """Every process's list, indexed by rank (a collective: every process must call it)."""
    from accelerate.utils import gather_object  # deferred: only a launch needs it

    return gather_object([items])


def leave_launch() -> None:
    """Closes the launch's process group before the process exits: a process that exits with a gloo group still open
    can abort in its C++ teardown ("terminate called without an active exception", seen after a sharded caption)."""
    if not launched():
        return
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
