"""Parameter gathers: the handlers of ``AllGather``, ``WaitGather`` and ``Release``.

A gather fills a unit's full flat buffer (which the model's parameters are views into) from
every rank's shard. On one rank it is a cast-and-copy of the shard; on CUDA that copy runs on a
stream of its own so that a prefetched unit overlaps the compute before it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from fzero.collectives import Communicator, DoneWork, Work, wait_all_unless_failed
from fzero.errors import ScheduleError
from fzero.runtime.timeline import MeasuredTimeline
from fzero.schedule import ops as O
from fzero.state.buffers import Workspace, alloc_storage, free_storage
from fzero.state.released import UnitClasses


class InFlightGather(NamedTuple):
    """A gather issued and not yet waited on; ``send`` must live until the wait."""

    work: Work
    send: torch.Tensor | None


class Gathers:
    """Issues, waits for and releases unit gathers; owns the gathers in flight."""

    def __init__(
        self,
        workspace: Workspace,
        comm: Communicator,
        timeline: MeasuredTimeline | None,
        unit_params: list[list[torch.nn.Parameter]],
        shard_files: Any = None,
    ):
        self.workspace = workspace
        # NVMe parameter offload (fzero/offload/staging.py): UploadShard takes the shard its
        # ReadShardFromFile staged instead of reading the file's mapping.
        self.shard_files = shard_files
        self.unit_params = unit_params
        self.classes = [UnitClasses(params) for params in unit_params]
        self.comm = comm
        self.timeline = timeline
        self.in_flight: dict[int, InFlightGather] = {}
        self.uploaded: dict[int, torch.Tensor] = {}  # parameter offload: shards brought up
        self._shards_on_host = workspace.shards_on_host  # fixed when the workspace is built
        self._stream: Any = None

    def all_gather(self, op: O.AllGather) -> None:
        self.in_flight[op.unit] = self.gather(op.unit)

    def wait_gather(self, op: O.WaitGather) -> None:
        pending = self.in_flight.pop(op.unit, None)
        if pending is None:
            raise ScheduleError(
                f"WaitGather for unit {op.unit} ({op.name!r}) with no gather issued"
            )
        pending.work.wait()

    def release(self, op: O.Release) -> None:
        self.release_unit(op.unit)

    def release_unit(self, unit: int) -> None:
        """Free unit ``unit``'s gathered buffer; its parameters then refuse reads
        (``fzero/state/released.py``) instead of reading freed memory."""
        free_storage(self.workspace.param_flats[unit])
        self.classes[unit].release()

    def upload_shard(self, op: O.UploadShard) -> None:
        """Parameter offload: bring this rank's host shard of the unit up, on the gather stream
        (so a prefetched gather prefetches its upload), for the gather that follows."""
        flat = self.workspace.param_flats[op.unit]
        files = self.shard_files
        staged = op.from_file  # else in memory: "cpu", or kept there by max_in_cpu
        if staged and files is None:
            raise ScheduleError(f"{op}: this model keeps no parameter shards in files")
        source = files.take(op.unit) if staged else self.workspace.gather_source(op.unit)
        if not flat.is_cuda:
            # A staging buffer is reused by a later read: the gather sends a copy of it.
            self.uploaded[op.unit] = source.clone() if staged else source
            if staged:
                files.release(op.unit, None)
            return
        stream = self._gather_stream(flat)
        stream.wait_stream(torch.cuda.current_stream(flat.device))
        with torch.cuda.stream(stream):
            self.uploaded[op.unit] = source.to(flat.device, non_blocking=True)
            if staged:  # the staging buffer is free once this copy ran
                event = torch.cuda.Event()
                event.record(stream)
                files.release(op.unit, event)

    def gather(self, unit: int) -> InFlightGather:
        """Fill unit ``unit``'s full buffer from every rank's shard (the uploaded copy, when
        ``UploadShard`` brought it up)."""
        flat = self.workspace.param_flats[unit]
        alloc_storage(flat)
        self.classes[unit].gather()
        source = self.uploaded.pop(unit, None)
        if source is None and not self._shards_on_host:
            source = self.workspace.gather_source(unit) if self.comm.world_size > 1 else None
        elif source is None:  # outside the schedule (evaluation): bring it up here
            source = self.workspace.gather_source(unit).to(flat.device)
        if self.comm.world_size == 1:  # the shard is the whole unit: write it, cast included
            if flat.is_cuda:
                return InFlightGather(self._copy_on_gather_stream(unit, flat, source), source)
            if source is None:
                self.workspace.write_shard(unit, flat)
            else:
                flat.copy_(source)
            return InFlightGather(DoneWork(), source)
        return InFlightGather(self.comm.all_gather(flat, source), source)

    def _gather_stream(self, flat: torch.Tensor) -> Any:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=flat.device)
        return self._stream

    def _copy_on_gather_stream(
        self, unit: int, flat: torch.Tensor, source: torch.Tensor | None
    ) -> Work:
        """One rank on CUDA: the side stream waits for the compute stream (the master may just
        have been updated); WaitGather makes the compute stream wait for the copy, and the
        buffer is only released after that wait."""
        stream = self._gather_stream(flat)
        stream.wait_stream(torch.cuda.current_stream(flat.device))
        start = self.timeline.begin(stream) if self.timeline is not None else None
        with torch.cuda.stream(stream):
            if source is None:
                self.workspace.write_shard(unit, flat)
            else:
                flat.copy_(source)
        if self.timeline is not None:
            self.timeline.end("gather", f"gather {unit}", start, stream)
        return StreamWork(stream)

    def abort(self) -> None:
        wait_all_unless_failed(pending.work for pending in self.in_flight.values())
        self.in_flight.clear()
        self.uploaded.clear()


class StreamWork:
    """Work queued on a CUDA stream: waiting makes the current stream wait for it."""

    def __init__(self, stream: Any):
        self.event = torch.cuda.Event()
        self.event.record(stream)

    def wait(self) -> None:
        torch.cuda.current_stream().wait_event(self.event)
