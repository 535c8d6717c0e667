"""An in-process backend: N ranks as N threads of one process, for fast multi-rank tests.

Every collective is a rendezvous on a barrier: each rank posts its tensor, all read, all pass a
second barrier before anyone may change its tensor again. Sums are taken in rank order, so
results are deterministic. A rank that fails aborts the group, so the others raise instead of
waiting forever.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from fzero.collectives.base import (
    DoneWork,
    Work,
    check_all_to_all_sizes,
    check_gather_sizes,
    check_scatter_sizes,
)
from fzero.errors import CollectiveError


class ThreadGroup:
    """Shared state of ``world_size`` thread ranks. ``communicator(rank)`` gives one rank's view."""

    def __init__(self, world_size: int, timeout_s: float = 120.0):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self._slots: list[Any] = [None] * world_size
        self._barrier = threading.Barrier(world_size, timeout=timeout_s)

    def communicator(self, rank: int) -> ThreadCommunicator:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside 0..{self.world_size - 1}")
        return ThreadCommunicator(self, rank)

    def abort(self) -> None:
        self._barrier.abort()

    def _wait(self) -> None:
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            raise CollectiveError(
                "thread group aborted: another rank failed or timed out"
            ) from None

    def exchange(self, rank: int, value: Any, combine: Callable[[list[Any]], Any]) -> Any:
        self._slots[rank] = value
        self._wait()
        result = combine(list(self._slots))
        self._wait()
        return result


class ThreadCommunicator:
    def __init__(self, group: ThreadGroup, rank: int):
        self.group = group
        self.rank = rank
        self.world_size = group.world_size

    def all_gather(self, output: torch.Tensor, shard: torch.Tensor) -> Work:
        check_gather_sizes(self, output, shard)
        gathered = self.group.exchange(self.rank, shard, lambda shards: torch.cat(shards))
        output.copy_(gathered)
        return DoneWork()

    def reduce_scatter(self, output: torch.Tensor, full: torch.Tensor) -> Work:
        check_scatter_sizes(self, output, full)
        n = output.numel()
        lo, hi = self.rank * n, (self.rank + 1) * n
        output.copy_(
            self.group.exchange(
                self.rank, full, lambda fulls: _ordered_sum([f[lo:hi] for f in fulls])
            )
        )
        return DoneWork()

    def all_reduce(self, tensor: torch.Tensor) -> Work:
        tensor.copy_(self.group.exchange(self.rank, tensor, _ordered_sum))
        return DoneWork()

    def all_to_all(self, output: torch.Tensor, full: torch.Tensor) -> Work:
        check_all_to_all_sizes(self, output, full)
        n = full.numel() // self.world_size
        lo, hi = self.rank * n, (self.rank + 1) * n
        output.copy_(
            self.group.exchange(self.rank, full, lambda fulls: torch.cat([f[lo:hi] for f in fulls]))
        )
        return DoneWork()

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        tensor.copy_(self.group.exchange(self.rank, tensor, lambda ts: ts[src].clone()))

    def all_gather_object(self, obj: Any) -> list[Any]:
        return self.group.exchange(self.rank, obj, list)


def _ordered_sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    total = tensors[0].clone()
    for t in tensors[1:]:
        total += t
    return total


def run_ranks(world_size: int, fn: Callable[[ThreadCommunicator], Any]) -> list[Any]:
    """Run ``fn(communicator)`` on ``world_size`` thread ranks; return the results in rank
    order, or raise the first rank's exception (the other ranks are aborted)."""
    group = ThreadGroup(world_size)
    results: list[Any] = [None] * world_size
    errors: list[BaseException | None] = [None] * world_size

    def body(rank: int) -> None:
        try:
            results[rank] = fn(group.communicator(rank))
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            errors[rank] = error
            group.abort()

    threads = [
        threading.Thread(target=body, args=(r,), name=f"fzero-rank{r}") for r in range(world_size)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # A rank's own error beats the "aborted" errors it caused in the others.
    primary = [e for e in errors if e is not None and not isinstance(e, CollectiveError)]
    if primary or any(errors):
        raise (primary or [e for e in errors if e is not None])[0]
    return results
