"""Collectives over a ``torch.distributed`` process group (NCCL on CUDA, gloo on CPU).

This file and ``threads.py`` are the only places fzero touches ``torch.distributed``. Async
collectives run on the backend's own stream; ``Work.wait()`` makes the current stream wait for
them, so a gather issued early overlaps the compute that comes before its wait.

Clean exit with gloo: a gloo collective runs on the process group's worker threads, which keep
their own reference to the op (and so to its tensors) until a moment after ``wait()`` returns.
Were the worker's reference the last one to a tensor that Python created (a slice, a cast, a
temporary), the worker would have to take the GIL to free the tensor's Python object; if the
interpreter is finalising by then, taking the GIL ends the thread, and ending a C++ thread that
way is ``terminate called without an active exception`` (SIGABRT) after the script finished.
So every asynchronous gloo op is returned as a ``RetainedWork`` that keeps its tensors, and the
last ``RETAINED_WORKS`` waited ops stay referenced: their workers never hold the last reference,
and Python frees them, under the GIL, when the communicator goes. Only the last few ops before
exit matter; an older one whose worker is still finishing makes the worker take the GIL while
the interpreter runs, which is harmless. (Cost: on gloo, the buffers of the last few ops, such
as a packed gradient bucket, live until later ops are waited.) A gloo process group
``init_from_env`` created is destroyed at interpreter exit (``atexit``), while the interpreter
still runs, so its worker threads are joined before finalisation. (NCCL groups are left to the
script: destroying one at exit after a failure on another rank can hang.)
"""

from __future__ import annotations

import atexit
import collections
import datetime
import itertools
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


# Communicators made in this process, in order: ranks that build the same models in the same
# order number them alike, which keeps their side-channel keys apart.
_instances = itertools.count()

# How long the process group waits beyond fzero's step timeout, when fzero creates the group:
# long enough for fzero's own report to come first.
GROUP_TIMEOUT_MARGIN_S = 60.0


class ProcessGroupCommunicator:
    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = dist.get_backend(group)
        self.instance = next(_instances)
        self._wait_timeout: datetime.timedelta | None = None
        # Waited gloo ops, kept so that their worker threads never hold the last reference.
        self.retained: collections.deque[RetainedWork] = collections.deque(maxlen=RETAINED_WORKS)

    def set_step_timeout(self, seconds: float) -> None:
        """Waits on this communicator's collectives give up after ``seconds`` (gloo: the wait
        raises). NCCL waits do not block the host (they order streams), so there the process
        group's own timeout and fzero's watchdog thread apply instead."""
        if self.backend != "nccl":
            self._wait_timeout = datetime.timedelta(seconds=seconds)

    def _timed(self, work: Any) -> Any:
        return work if self._wait_timeout is None else TimedWork(work, self._wait_timeout)

    def side_channel(self) -> StoreChannel | None:
        """The group's key-value store (the c10d store it was set up with) as a side channel,
        or None where the group has none."""
        try:
            store = dist.distributed_c10d._get_process_group_store(
                self.group or dist.distributed_c10d._get_default_group()
            )
        except (KeyError, RuntimeError, AttributeError, ValueError):
            return None
        return StoreChannel(store, f"fzero/{self.instance}")

    def _async(self, work: Any, *tensors: torch.Tensor) -> Work:
        """The backend's work, with the step timeout on its wait (``_timed``) and, on gloo, its
        tensors retained past the wait (``RetainedWork``)."""
        work = self._timed(work)
        if self.backend != "gloo":
            return work
        return RetainedWork(work, tensors, self.retained)

    def all_gather(self, output: torch.Tensor, shard: torch.Tensor) -> Work:
        check_gather_sizes(self, output, shard)
        if self.backend != "nccl" and _overlaps(output, shard):
            # NCCL gathers in place when the shard is this rank's slice of the output; other
            # backends may overwrite the input while sending it.
            shard = shard.clone()
        return self._async(
            _all_gather(output, shard, group=self.group, async_op=True), output, shard
        )

    def reduce_scatter(self, output: torch.Tensor, full: torch.Tensor) -> Work:
        check_scatter_sizes(self, output, full)
        if self._wait_timeout is not None and self.backend == "gloo":
            # Gloo's reduce-scatter ignores a wait's timeout (torch 2.13): with a step timeout,
            # reduce the whole buffer with an all-reduce (whose wait honours it) and keep this
            # rank's slice. Twice the traffic, on the CPU backend only.
            summed = full.clone()
            work = self._async(dist.all_reduce(summed, group=self.group, async_op=True), summed)
            return SliceWork(work, summed, output, self.rank)
        work = _reduce_scatter(output, full, group=self.group, async_op=True)
        return self._async(work, output, full)

    def all_reduce(self, tensor: torch.Tensor) -> Work:
        return self._async(dist.all_reduce(tensor, group=self.group, async_op=True), tensor)

    def all_to_all(self, output: torch.Tensor, full: torch.Tensor) -> Work:
        check_all_to_all_sizes(self, output, full)
        work = dist.all_to_all_single(output, full, group=self.group, async_op=True)
        return self._async(work, output, full)

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


class TimedWork:
    """A collective whose ``wait`` gives up after the step timeout (raising the backend's
    timeout error) instead of the process group's."""

    __slots__ = ("work", "timeout")

    def __init__(self, work: Any, timeout: datetime.timedelta):
        self.work, self.timeout = work, timeout

    def wait(self) -> None:
        self.work.wait(self.timeout)

    def is_completed(self) -> bool:
        return self.work.is_completed()


class SliceWork:
    """A reduce-scatter done as an all-reduce: waiting copies this rank's slice of the sum."""

    __slots__ = ("work", "summed", "output", "rank")

    def __init__(self, work: Any, summed: torch.Tensor, output: torch.Tensor, rank: int):
        self.work, self.summed, self.output, self.rank = work, summed, output, rank

    def wait(self) -> None:
        self.work.wait()
        numel = self.output.numel()
        self.output.copy_(self.summed[self.rank * numel : (self.rank + 1) * numel])


class StoreChannel:
    """A side channel beside the collectives: the process group's c10d store. Each rank posts
    a short text under its own key; others read it. Used only off the hot path: by the watchdog
    thread when a step stalls, and on error paths."""

    def __init__(self, store: Any, prefix: str):
        self.store, self.prefix = store, prefix

    def post(self, rank: int, text: str) -> None:
        self.store.set(f"{self.prefix}/{rank}", text)

    def read(self, rank: int) -> str | None:
        """Rank ``rank``'s last post, None when it posted nothing (never blocks)."""
        key = f"{self.prefix}/{rank}"
        if not self.store.check([key]):
            return None
        return self.store.get(key).decode()


# More ops than the backend's worker threads (gloo's default is 2) can be finishing at once.
RETAINED_WORKS = 4


class RetainedWork:
    """An asynchronous gloo op with the tensors it was given; once waited, it stays in
    ``retained`` (a bounded deque: the oldest entries drop off as new ones are waited)."""

    __slots__ = ("retained", "tensors", "work")

    def __init__(self, work: Any, tensors: tuple[torch.Tensor, ...], retained: collections.deque):
        self.work, self.tensors, self.retained = work, tensors, retained

    def wait(self) -> None:
        self.work.wait()
        self.retained.append(self)

    def is_completed(self) -> bool:
        return self.work.is_completed()


# torch 2.13 renamed the flat-tensor collectives; older releases only have the first names.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def default_communicator() -> ProcessGroupCommunicator | None:
    """The default process group's communicator, or None when none is initialised."""
    return ProcessGroupCommunicator(None) if is_initialized() else None


def init_from_env(step_timeout_s: float = 300.0) -> tuple[int, int, torch.device]:
    """Join the process group a launcher describes in the environment (torchrun, ``fzero``,
    ``accelerate launch``, ``deepspeed``, ``mpirun``: see ``launch_env.py``; NCCL when CUDA is
    available, gloo otherwise) and pick this rank's device. Started by no launcher, it joins
    nothing and returns rank 0 of 1. Returns (rank, world_size, device).

    ``step_timeout_s``: the config's ``fzero.step_timeout_s`` (default 300 s); the group's own
    timeout is set a minute longer, so that a stall is reported by fzero (which op each rank
    waits at) before the backend gives up with its own message."""
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
        dist.init_process_group(
            backend,
            device_id=device if backend == "nccl" else None,
            timeout=datetime.timedelta(seconds=step_timeout_s + GROUP_TIMEOUT_MARGIN_S),
        )
        if backend == "gloo":  # its threads joined while the interpreter is alive (see the top)
            atexit.register(shutdown)
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
