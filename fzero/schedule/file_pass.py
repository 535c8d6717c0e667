"""The NVMe pass: where a step reads and writes the units' swap files (``file_ops.py``).

Applied after the offload pass (``offload.py``), when ``Knobs.optimizer_in_files`` (the master
and moments in files: ``offload_optimizer.device: "nvme"``) or ``Knobs.params_in_files`` (the
compute-dtype shards in files: ``offload_param.device: "nvme"``):

- Each unit's CPU step (``HostOptimizerStep`` in the step phase, ``ApplyPendingUpdate`` in the
  first micro-batch at stage 3) is preceded by the read of the next stepping unit's state
  (``ReadStateFromFile``; the first unit's read comes right before its own step) and followed by
  ``WriteStateToFile``: while unit k steps, unit k + 1's state is read and unit k - 1's written.
- With parameter shards in files, the first ``UploadShard`` of a phase is preceded by its
  ``ReadShardFromFile``, and every ``UploadShard`` is followed by the read of the next gathered
  unit's shard, in the schedule's gather order. Units whose shard ``offload_param.max_in_cpu``
  keeps in memory (``resident``) upload from memory and write no shard: no file op for them.
- The step phase ends with ``WaitFileWrites``.
"""

from __future__ import annotations

from dataclasses import replace

from fzero.schedule.ops import (
    ApplyPendingUpdate,
    Entry,
    HostOptimizerStep,
    Op,
    ReadShardFromFile,
    ReadStateFromFile,
    UploadShard,
    WaitFileWrites,
    WriteStateToFile,
)
from fzero.schedule.schedule import UnitInfo

_STEPS = (HostOptimizerStep, ApplyPendingUpdate)


def file_io_steps(
    units: tuple[UnitInfo, ...],
    entries: tuple[Entry, ...],
    *,
    optimizer_in_files: bool,
    params_in_files: bool,
    resident: frozenset[int] = frozenset(),
) -> tuple[Entry, ...]:
    """Reads ahead of and writes after every CPU step in ``entries`` (one phase, in order)."""
    by_index = {u.index: u for u in units}
    stepping = [op.unit for entry in entries for op in entry.ops if isinstance(op, _STEPS)]
    following = dict(zip(stepping, stepping[1:]))

    def read(unit: int) -> ReadStateFromFile:
        info = by_index[unit]
        return ReadStateFromFile(unit, info.name, info.optimizer_numel * 12)

    out = []
    first = True
    for entry in entries:
        ops: list[Op] = []
        for op in entry.ops:
            if not isinstance(op, _STEPS):
                ops.append(op)
                continue
            info = by_index[op.unit]
            if optimizer_in_files:
                if first:
                    ops.append(read(op.unit))
                if op.unit in following:
                    ops.append(read(following[op.unit]))
            first = False
            ops.append(op)
            state_nbytes = info.optimizer_numel * 12 if optimizer_in_files else 0
            shard_in_file = params_in_files and op.unit not in resident
            shard_nbytes = info.optimizer_numel * info.param_itemsize if shard_in_file else 0
            if state_nbytes or shard_nbytes:
                ops.append(WriteStateToFile(op.unit, info.name, state_nbytes, shard_nbytes))
        out.append(replace(entry, ops=tuple(ops)))
    return tuple(out)


def read_shards_ahead(
    units: tuple[UnitInfo, ...], entries: tuple[Entry, ...], resident: frozenset[int] = frozenset()
) -> tuple[Entry, ...]:
    """``ReadShardFromFile`` before a phase's first ``UploadShard`` from a file and after every
    one, for the next such upload's unit (``resident`` units upload from memory)."""
    by_index = {u.index: u for u in units}
    uploads = [
        op.unit
        for entry in entries
        for op in entry.ops
        if isinstance(op, UploadShard) and op.unit not in resident
    ]

    def read(unit: int) -> ReadShardFromFile:
        info = by_index[unit]
        return ReadShardFromFile(unit, info.name, info.shard_nbytes)

    out = []
    count = 0
    for entry in entries:
        ops: list[Op] = []
        for op in entry.ops:
            if isinstance(op, UploadShard) and op.unit not in resident:
                if count == 0:
                    ops.append(read(op.unit))
                ops.append(replace(op, from_file=True))
                count += 1
                if count < len(uploads):
                    ops.append(read(uploads[count]))
                continue
            ops.append(op)
        out.append(replace(entry, ops=tuple(ops)))
    return tuple(out)


def wait_file_writes(step_ops: tuple[Op, ...]) -> tuple[Op, ...]:
    """The step phase ends with every file write waited for."""
    return (*step_ops, WaitFileWrites())
