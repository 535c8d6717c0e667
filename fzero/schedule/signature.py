"""Which ops talk to the other ranks, and ``collective_signature``: a digest of them in order.

Every rank must issue the same collectives, with the same sizes, in the same order, or the step
hangs. ``verify`` checks one rank's schedule; this is what ranks compare with each other
(``fzero/runtime/cross_rank.py``, ``step_checks.py``). Offload's copies and CPU steps are on
streams of their own but are this rank's alone, sized by its own shard, so they are no part of it.
"""

from __future__ import annotations

import hashlib

from fzero.schedule import ops as O
from fzero.schedule.schedule import Schedule

COLLECTIVES = (
    O.AllGather,
    O.ReduceScatter,
    O.AllReduce,
    O.ReduceInOrder,
    O.ReduceScalars,
    O.ReduceScalarsInOrder,
)


LOCAL_OFFLOAD_OPS = (
    O.CopyGradToHost,
    O.GradFromHost,
    O.ScalarsToHost,
    O.HostOptimizerStep,
    O.CopyParamsToDevice,
    O.CopyParamsToHost,
    O.WaitUploads,
    O.UploadShard,
    O.ApplyPendingUpdate,
    O.UploadUpdate,
    O.ReadStateFromFile,
    O.WriteStateToFile,
    O.ReadShardFromFile,
    O.WaitFileWrites,
)


def is_collective(op: O.Op) -> bool:
    """Whether ``op`` talks to the other ranks (they must all issue it, in the same order).
    Offload's copies and CPU steps are this rank's own, sized by its own shard."""
    if isinstance(op, LOCAL_OFFLOAD_OPS):
        return False
    return isinstance(op, COLLECTIVES) or op.stream != O.COMPUTE


def collective_signature(schedule: Schedule) -> str:
    """sha256 of the ordered collective ops (micro-step, then step): equal on every rank that
    will issue the same collectives, with the same sizes, in the same order."""
    digest = hashlib.sha256()
    phases = [("micro_step", schedule.micro_step), ("step", schedule.step)]
    if schedule.last_micro_step is not None:
        phases.insert(1, ("last_micro_step", schedule.last_micro_step))
    for phase, entries in phases:
        digest.update(f"[{phase}]\n".encode())
        for entry in entries:
            for op in entry.ops:
                if is_collective(op):
                    digest.update(f"{op!r}\n".encode())
    return digest.hexdigest()
