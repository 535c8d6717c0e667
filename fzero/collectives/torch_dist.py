"""Collectives over a ``torch.distributed`` process group (NCCL on CUDA, gloo on CPU).

This file and ``threads.py`` are the only places fzero touches ``torch.distributed``. Async
collectives run on the backend's own stream; ``Work.wait()`` makes the current stream wait for
them, so a gather issued early overlaps the compute that comes before its wait.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from fzero.collectives.base import (
    Work,
    check_all_to_all_sizes,
    check_gather_sizes,
    check_scatter_sizes,
)
from fzero.collectives.launch_env import read_launch_environment


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_process_group(obj: Any) -> bool:
    return dist.is_available() and isinstance(obj, dist.ProcessGroup)


class ProcessGroupCommunicator:
    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = dist.get_backend(group)

    def all_gather(self, output: torch.Tensor, shard: torch.Tensor) -> Work:
        check_gather_sizes(self, output, shard)
        if self.backend != "nccl" and _overlaps(output, shard):
            # NCCL gathers in place when the shard is this rank's slice of the output; other
            # backends may overwrite the input while sending it.
            shard = shard.clone()
        return _all_gather(output, shard, group=self.group, async_op=True)

    def reduce_scatter(self, output: torch.Tensor, full: torch.Tensor) -> Work:
        check_scatter_sizes(self, output, full)
        return _reduce_scatter(output, full, group=self.group, async_op=True)

    def all_reduce(self, tensor: torch.Tensor) -> Work:
        return dist.all_reduce(tensor, group=self.group, async_op=True)

    def all_to_all(self, output: torch.Tensor, full: torch.Tensor) -> Work:
        check_all_to_all_sizes(self, output, full)
        return dist.all_to_all_single(output, full, group=self.group, async_op=True)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        dist.broadcast(
            tensor,
            src=dist.get_global_rank(self.group, src) if self.group else src,
            group=self.group,
        )

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out


# torch 2.13 renamed the flat-tensor collectives; older releases only have the first names.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def default_communicator() -> ProcessGroupCommunicator | None:
    """The default process group's communicator, or None when none is initialised."""
    return ProcessGroupCommunicator(None) if is_initialized() else None


def init_from_env() -> tuple[int, int, torch.device]:
    """Join the process group a launcher describes in the environment (torchrun, ``fzero``,
    ``accelerate launch``, ``deepspeed``, ``mpirun``: see ``launch_env.py``; NCCL when CUDA is
    available, gloo otherwise) and pick this rank's device. Started by no launcher, it joins
    nothing and returns rank 0 of 1. Returns (rank, world_size, device)."""
    import os

    launch = read_launch_environment(os.environ)
    if launch is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if is_initialized():  # a group the caller joined itself
            return dist.get_rank(), dist.get_world_size(), device
        return 0, 1, device
    if torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank)
        device = torch.device("cuda", launch.local_rank)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not is_initialized():
        # MPI launchers name the rank in their own variables; torch reads RANK and WORLD_SIZE.
        os.environ.update(
            RANK=str(launch.rank),
            WORLD_SIZE=str(launch.world_size),
            LOCAL_RANK=str(launch.local_rank),
        )
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    return dist.get_rank(), dist.get_world_size(), device


def join_from_env() -> ProcessGroupCommunicator | None:
    """The default group's communicator, joining it first when a launcher started this process
    as one of several ranks (so ``fzero.shard`` under torchrun needs no setup). None when the
    process runs alone."""
    import os

    if not is_initialized():
        launch = read_launch_environment(os.environ)
        if launch is None or launch.world_size == 1:
            return None
        init_from_env()
    return default_communicator()


def shutdown() -> None:
    """Leave the process group, if one was joined."""
    if is_initialized():
        dist.destroy_process_group()
