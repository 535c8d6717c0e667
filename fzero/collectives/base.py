"""The communicator interface the executor talks to.

A communicator moves flat tensors between the ranks of one group. Asynchronous calls return a
``Work`` whose ``wait()`` makes the caller's stream wait for the result (on CUDA with NCCL this
is a stream-to-stream dependency, not a host block). Sums are plain sums: averaging is folded
into the optimizer's gradient scale so that it costs no extra pass.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch

from fzero.errors import CollectiveError


class Work(Protocol):
    def wait(self) -> None: ...


def wait_all_unless_failed(works: Iterable[Work]) -> None:
    """Wait for each of ``works`` (collectives in flight when a step is aborted); after one
    fails (a peer gone, a timeout), the group is broken and the rest are left alone: waiting
    would only fail again, a timeout at a time."""
    for work in works:
        try:
            work.wait()
        except RuntimeError:
            return


class DoneWork:
    """A collective that already finished (synchronous backends)."""

    def wait(self) -> None:
        return None


class Communicator(Protocol):
    rank: int
    world_size: int

    def all_gather(self, output: torch.Tensor, shard: torch.Tensor) -> Work:
        """``output`` (``world_size * shard.numel()``) receives every rank's ``shard`` in order."""

    def reduce_scatter(self, output: torch.Tensor, full: torch.Tensor) -> Work:
        """``output`` receives this rank's slice of the sum of every rank's ``full``."""

    def all_reduce(self, tensor: torch.Tensor) -> Work:
        """``tensor`` becomes the sum over ranks, in place."""

    def all_to_all(self, output: torch.Tensor, full: torch.Tensor) -> Work:
        """Slice ``r`` of ``output`` (``world_size`` equal slices) receives rank ``r``'s slice
        ``rank`` of ``full``: each rank gets every rank's copy of its own slice, unsummed."""

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        """``tensor`` becomes rank ``src``'s ``tensor``, in place."""

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order."""


def check_gather_sizes(comm: Communicator, output: torch.Tensor, shard: torch.Tensor) -> None:
    if output.numel() != shard.numel() * comm.world_size:
        raise CollectiveError(
            f"all_gather: output has {output.numel()} elements, expected "
            f"{comm.world_size} x {shard.numel()}"
        )
    if output.dtype != shard.dtype:
        raise CollectiveError(f"all_gather: dtypes differ ({output.dtype} vs {shard.dtype})")


def check_all_to_all_sizes(comm: Communicator, output: torch.Tensor, full: torch.Tensor) -> None:
    if output.numel() != full.numel() or full.numel() % comm.world_size:
        raise CollectiveError(
            f"all_to_all: input and output need the same size, a multiple of {comm.world_size}; "
            f"got {full.numel()} and {output.numel()}"
        )
    if output.dtype != full.dtype:
        raise CollectiveError(f"all_to_all: dtypes differ ({output.dtype} vs {full.dtype})")


def check_scatter_sizes(comm: Communicator, output: torch.Tensor, full: torch.Tensor) -> None:
    if full.numel() != output.numel() * comm.world_size:
        raise CollectiveError(
            f"reduce_scatter: input has {full.numel()} elements, expected "
            f"{comm.world_size} x {output.numel()}"
        )
    if output.dtype != full.dtype:
        raise CollectiveError(f"reduce_scatter: dtypes differ ({output.dtype} vs {full.dtype})")


class SingleProcess:
    """World size 1: every collective is a copy (or nothing)."""

    rank = 0
    world_size = 1

    def all_gather(self, output: torch.Tensor, shard: torch.Tensor) -> Work:
        check_gather_sizes(self, output, shard)
        if output.data_ptr() != shard.data_ptr():  # in place when the shard is the output
            output.copy_(shard)
        return DoneWork()

    def reduce_scatter(self, output: torch.Tensor, full: torch.Tensor) -> Work:
        check_scatter_sizes(self, output, full)
        if output.data_ptr() != full.data_ptr():
            output.copy_(full)
        return DoneWork()

    def all_reduce(self, tensor: torch.Tensor) -> Work:
        return DoneWork()

    def all_to_all(self, output: torch.Tensor, full: torch.Tensor) -> Work:
        check_all_to_all_sizes(self, output, full)
        if output.data_ptr() != full.data_ptr():
            output.copy_(full)
        return DoneWork()

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        return None

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]
