"""Staging buffers between NVMe offload's files and the step: the ops' handlers read a unit's
ranges into them, step or upload from them, and write them back (``fzero/offload/files.py``).

``OptimizerStaging``: ``offload_optimizer.buffer_count`` slots, each holding one unit's master
and moments. ``read(k)`` (``ReadStateFromFile``) takes a free slot, or the oldest one written
back, after waiting for its write and its upload; ``arrays(k)`` (the CPU step) waits for the
read; ``write(k)`` (``WriteStateToFile``) sends it back. So while unit k steps, unit k + 1 is
read into another slot and unit k - 1 written from a third.

The slots are sized for the ``buffer_count`` largest units, one each (``slot_numels``), not all
for the largest: a model whose root unit holds the embedding and the head (at 3.9B, 315M
elements against 113M per block) would otherwise stage three times the block's bytes in every
slot. Any ``buffer_count`` units fit the slots at once (the i-th largest of them is no larger
than the i-th largest unit). A unit takes the smallest slot it fits, free before written back,
so the large slots stay for the large units; where none fits yet, its read waits until its
step needs it (``arrays``), when the unit stepped before it has been written back.

``ShardStaging``: ``offload_param.buffer_count`` slots for compute-dtype parameter shards read
for their gathers (``ReadShardFromFile``, taken by ``UploadShard``), and two for the shards the
CPU step writes. A read that ran before the unit's update was written (prefetched in the
forward that applies the update) gets the new values copied in, so a gather never sends stale
parameters.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from fzero.offload.host import HostBuffer
from fzero.offload.mapped import MappedFile
from fzero.offload.swap import SwapHandle


def _wait(handles: list[SwapHandle | None]) -> None:
    for handle in handles:
        if handle is not None:
            handle.wait()
    handles.clear()


@dataclass(eq=False)
class Slot:
    """Staging buffers (uint8, 4096-aligned) and what they hold now."""

    buffers: list[HostBuffer]
    numel: int = 0  # the elements of a range each buffer holds (any range that long)
    unit: int | None = None
    reads: list[SwapHandle | None] = field(default_factory=list)
    writes: list[SwapHandle | None] = field(default_factory=list)
    upload: Any = None  # a CUDA event: an upload from the slot is in flight until it is done
    dirty: bool = False  # stepped since read: write it back

    def settle(self) -> None:
        """Wait for everything in flight from or into the slot."""
        _wait(self.reads)
        _wait(self.writes)
        if self.upload is not None:
            self.upload.synchronize()
            self.upload = None


def _slots(count: int, nbytes: int, buffers: int, pin_memory: bool) -> list[Slot]:
    return [
        Slot([HostBuffer(nbytes, torch.uint8, pin_memory=pin_memory) for _ in range(buffers)])
        for _ in range(count)
    ]


def slot_numels(unit_numels: list[int], count: int) -> list[int]:
    """The range lengths of ``count`` optimizer slots for units of ``unit_numels`` elements:
    the ``count`` largest, one slot each (the smallest of them again where there are fewer
    units than slots). ``OffloadPlan.staging_nbytes`` prices the same slots."""
    largest = sorted(unit_numels, reverse=True)[:count] or [0]
    return largest + [largest[-1]] * (count - len(largest))


class OptimizerStaging:
    """Slots for units' master and moments (``files``: the three mapped files, in that order;
    ``ranges``: each unit's element range in them)."""

    def __init__(
        self,
        files: tuple[MappedFile, ...],
        ranges: dict[int, tuple[int, int]],
        count: int,
        pin_memory: bool,
    ):
        self.files, self.ranges = files, ranges
        self.free: deque[Slot] = deque()
        for numel in slot_numels([hi - lo for lo, hi in ranges.values()], count):
            (slot,) = _slots(1, MappedFile.staging_nbytes(numel, 4), len(files), pin_memory)
            slot.numel = numel
            self.free.append(slot)
        self.by_unit: dict[int, Slot] = {}  # read, and not yet written back
        self.retiring: deque[Slot] = deque()  # written back (or not stepped), oldest first

    def read(self, unit: int) -> None:
        """Start reading unit ``unit``'s ranges into a slot; where no slot it fits is free or
        written back yet, the read waits for ``arrays``."""
        if unit in self.by_unit:
            return
        for slot in self.retiring:  # its last write must land before the file is read again
            if slot.unit == unit:
                _wait(slot.writes)
        lo, hi = self.ranges[unit]
        slot = self._take(hi - lo)
        if slot is None:
            return
        slot.unit, slot.dirty = unit, False
        slot.reads = [f.read(lo, hi, b.tensor) for f, b in zip(self.files, slot.buffers)]
        self.by_unit[unit] = slot

    def _take(self, numel: int) -> Slot | None:
        """The smallest slot that holds ``numel`` elements: a free one, else the oldest of
        those written back (after its transfers finish); None when every slot that fits holds
        a unit not yet written back."""
        for pool in (self.free, self.retiring):
            fitting = [slot for slot in pool if slot.numel >= numel]
            if fitting:
                slot = min(fitting, key=lambda s: s.numel)  # the first: the oldest of a size
                pool.remove(slot)
                slot.settle()
                return slot
        return None

    def arrays(self, unit: int) -> tuple[torch.Tensor, ...]:
        """Unit ``unit``'s master, exp_avg and exp_avg_sq in its slot (read now if no
        ``read`` ran), marked to be written back."""
        self.read(unit)
        slot = self.by_unit.get(unit)
        if slot is None:
            lo, hi = self.ranges[unit]
            raise RuntimeError(
                f"every NVMe staging buffer that holds unit {unit}'s {hi - lo:,} elements holds "
                "a unit not yet written back; raise "
                "zero_optimization.offload_optimizer.buffer_count"
            )
        _wait(slot.reads)
        slot.dirty = True
        lo, hi = self.ranges[unit]
        return tuple(f.view(lo, hi, b.tensor) for f, b in zip(self.files, slot.buffers))

    def write(self, unit: int) -> None:
        """Write unit ``unit``'s slot back if it stepped; the slot is reusable after that."""
        slot = self.by_unit.pop(unit, None)
        if slot is None:
            return
        _wait(slot.reads)
        if slot.dirty:
            lo, hi = self.ranges[unit]
            slot.writes = [f.write(lo, hi, b.tensor) for f, b in zip(self.files, slot.buffers)]
        self.retiring.append(slot)

    def master(self, unit: int) -> torch.Tensor | None:
        """The staged master of ``unit`` from this step (to upload), or None."""
        slot = self.by_unit.get(unit) or next(
            (s for s in reversed(self.retiring) if s.unit == unit), None
        )
        if slot is None:
            return None
        _wait(slot.reads)
        lo, hi = self.ranges[unit]
        return self.files[0].view(lo, hi, slot.buffers[0].tensor)

    def uploading(self, unit: int, event: Any) -> None:
        for slot in (*self.by_unit.values(), *self.retiring):
            if slot.unit == unit:
                slot.upload = event

    def wait_writes(self) -> None:
        """Every write landed, and no slot stands for a unit any more: the files (and their
        mappings) are the state again."""
        for slot in list(self.by_unit.values()):
            self.write(slot.unit)
        for slot in self.retiring:
            _wait(slot.writes)
            slot.unit = None

    def abort(self) -> None:
        """After a failed micro-batch: what stepped is written back, transfers in flight
        finish, and every slot is free again."""
        self.wait_writes()
        for slot in (*self.by_unit.values(), *self.retiring):
            slot.settle()
            slot.unit = None
            self.free.append(slot)
        self.by_unit.clear()
        self.retiring.clear()


class ShardStaging:
    """Slots for units' compute-dtype parameter shards, read for gathers and written by the
    CPU step (``file``: the mapped shard file; ``ranges``: each unit's shard range and the end
    of its trainable part)."""

    def __init__(
        self,
        file: MappedFile,
        ranges: dict[int, tuple[int, int, int]],
        count: int,
        pin_memory: bool,
        resident: frozenset[int] = frozenset(),
    ):
        self.file, self.ranges = file, ranges
        # offload_param.max_in_cpu: these units' shards stay in memory, the file's own pages
        # locked there; their gathers read the mapping and their steps write it, no staging.
        self.resident = resident
        if resident:
            end = max(ranges[u][1] for u in resident)
            file.keep_in_memory(0, end)
        largest = max((hi - lo for lo, hi, _ in ranges.values()), default=0)
        nbytes = MappedFile.staging_nbytes(largest, file.itemsize)
        self.free = deque(_slots(count, nbytes, 1, pin_memory))
        self.read_slots: dict[int, Slot] = {}  # read for a gather, not yet taken
        self.taken: dict[int, Slot] = {}  # taken by an upload, until it says it is done
        self.writers = deque(_slots(2, nbytes, 1, pin_memory))
        self.written: dict[int, Slot] = {}  # unit -> the writer its last write went from

    def read(self, unit: int) -> None:
        if unit in self.read_slots or unit in self.resident:
            return
        writer = self.written.get(unit)
        if writer is not None:  # the file must hold the update before it is read
            _wait(writer.writes)
        if not self.free:
            raise RuntimeError(
                "every parameter staging buffer holds a shard not yet uploaded; raise "
                "zero_optimization.offload_param.buffer_count"
            )
        slot = self.free.popleft()
        if slot.upload is not None:
            slot.upload.synchronize()
            slot.upload = None
        lo, hi, _ = self.ranges[unit]
        slot.unit, slot.reads = unit, [self.file.read(lo, hi, slot.buffers[0].tensor)]
        self.read_slots[unit] = slot

    def take(self, unit: int) -> torch.Tensor:
        """Unit ``unit``'s shard, read (now, if no ``read`` ran); ``release`` gives the slot
        back once the upload from it is issued. A resident unit's is the mapping itself."""
        if unit in self.resident:
            lo, hi, _ = self.ranges[unit]
            return self.file.tensor[lo:hi]
        self.read(unit)
        slot = self.read_slots.pop(unit)
        _wait(slot.reads)
        self.taken[unit] = slot
        lo, hi, _ = self.ranges[unit]
        return self.file.view(lo, hi, slot.buffers[0].tensor)

    def release(self, unit: int, event: Any) -> None:
        """The upload of ``unit``'s taken shard is issued (``event``: its CUDA event, None
        when it is complete)."""
        slot = self.taken.pop(unit)
        slot.upload, slot.unit = event, None
        self.free.append(slot)

    def write(self, unit: int, values: torch.Tensor) -> None:
        """Write ``values`` (fp32, the unit's trainable part) into the unit's shard: cast into
        a writer slot, written back from there; a read of the unit already staged is patched."""
        lo, hi, trainable_end = self.ranges[unit]
        writer = self.writers.popleft()
        writer.settle()
        self.file.view(lo, trainable_end, writer.buffers[0].tensor).copy_(values)
        writer.writes = [self.file.write(lo, trainable_end, writer.buffers[0].tensor)]
        writer.unit = unit
        self.writers.append(writer)
        self.written[unit] = writer
        staged = self.read_slots.get(unit)
        if staged is not None:  # read before this update: give it the new values
            _wait(staged.reads)
            self.file.view(lo, trainable_end, staged.buffers[0].tensor).copy_(values)

    def wait_writes(self) -> None:
        for writer in self.writers:
            _wait(writer.writes)
        self.written.clear()

    def abort(self) -> None:
        for slot in (*self.read_slots.values(), *self.taken.values()):
            slot.settle()
            slot.unit = None
            self.free.append(slot)
        self.read_slots.clear()
        self.taken.clear()
        self.wait_writes()
