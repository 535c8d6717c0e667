"""The op records a schedule is made of, and the trigger points they are keyed to.

Every op is a small frozen dataclass with a readable ``__str__``. The executor turns each op into
work; nothing else happens in a step. Sizes are in bytes (``nbytes``) unless the name says
``numel``. ``unit`` is the unit's index in the layout and ``name`` its module path (``""`` is the
root unit: every parameter not inside a repeated block).

This file holds the triggers, the streams, the base ``Op``, the parameter ops (``AllGather``,
``WaitGather``, ``Release``) and ``Entry``; the gradient ops are in ``gradient_ops.py``, the step
phase's in ``step_phase_ops.py``, offload's in ``offload_ops.py`` and NVMe offload's file I/O in
``file_ops.py``, all named here too.
"""

from __future__ import annotations

from dataclasses import dataclass

# Trigger kinds, in the order a unit meets them in one micro-batch.
PRE_FORWARD = "pre_forward"
POST_FORWARD = "post_forward"
PRE_BACKWARD = "pre_backward"
# Activation checkpointing: the unit's forward runs again inside backward, to rebuild the
# activations its backward reads (torch.utils.checkpoint, Hugging Face's gradient
# checkpointing, or fzero's own ``activation_checkpointing.number_checkpoints``). It needs the
# unit's parameters gathered, like a forward, and its backward follows, so nothing is released
# at its end (no post trigger: a recompute that torch stops early never returns normally).
PRE_RECOMPUTE = "pre_recompute"
POST_BACKWARD = "post_backward"
BACKWARD_END = "backward_end"  # autograd's final callback: every gradient of the pass is written
STEP = "step"  # after the last micro-batch: reductions that wait for all of them, then AdamW

TRIGGER_KINDS = (
    PRE_FORWARD,
    POST_FORWARD,
    PRE_BACKWARD,
    PRE_RECOMPUTE,
    POST_BACKWARD,
    BACKWARD_END,
    STEP,
)
# The triggers at which a unit's compute starts in each pass: a gather may move (prefetch)
# between triggers of one pass, never from backward into forward.
FORWARD_COMPUTE = (PRE_FORWARD,)
BACKWARD_COMPUTE = (PRE_BACKWARD, PRE_RECOMPUTE)

# Streams an op runs on. On CPU every stream is the calling thread.
COMPUTE = "compute"
GATHER = "gather"
REDUCE = "reduce"
DEVICE_TO_HOST = "d2h"  # offload: copies down, on a copy stream of their own
HOST_TO_DEVICE = "h2d"  # offload: copies up
HOST = "host"  # offload: the CPU optimizer step, on the host's cores


@dataclass(frozen=True, order=True)
class Trigger:
    """A point in the step at which the executor runs ops: ``kind`` of unit ``unit``.

    ``unit`` is -1 for ``backward_end`` and ``step``, which belong to no unit.
    """

    kind: str
    unit: int = -1

    def __str__(self) -> str:
        return self.kind if self.unit < 0 else f"{self.kind}({self.unit})"


@dataclass(frozen=True)
class Op:
    """Base of all ops. ``stream`` is where the op's work runs."""

    @property
    def stream(self) -> str:
        return COMPUTE


def _unit_label(unit: int, name: str) -> str:
    return f"unit {unit} ({name or '<root>'})"


def _size(nbytes: int) -> str:
    for scale, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {suffix}"
    return f"{nbytes} B"


@dataclass(frozen=True)
class AllGather(Op):
    """Gather unit ``unit``'s parameter shards from all ranks into its full flat buffer.

    Asynchronous: it is issued on the gather stream and must be followed by ``WaitGather``
    before the unit's compute. ``nbytes`` is the size of the gathered (full, padded) buffer.
    """

    unit: int
    name: str
    nbytes: int

    @property
    def stream(self) -> str:
        return GATHER

    def __str__(self) -> str:
        return f"AllGather    {_unit_label(self.unit, self.name)}  {_size(self.nbytes)}"


@dataclass(frozen=True)
class WaitGather(Op):
    """Make the compute stream wait until unit ``unit``'s gather has landed."""

    unit: int
    name: str

    def __str__(self) -> str:
        return f"WaitGather   {_unit_label(self.unit, self.name)}"


@dataclass(frozen=True)
class Release(Op):
    """Free unit ``unit``'s gathered parameters (stage 3); its views stay but hold no memory."""

    unit: int
    name: str
    nbytes: int

    def __str__(self) -> str:
        return f"Release      {_unit_label(self.unit, self.name)}  {_size(self.nbytes)}"


@dataclass(frozen=True)
class Entry:
    """The ops run at one trigger, with the gathered bytes alive once they are done."""

    trigger: Trigger
    ops: tuple[Op, ...]
    live_nbytes: int = 0


# The other op families live in files of their own, one concept each; they are ops like the
# rest and are named here too, so ``from fzero.schedule import ops as O`` reaches every op.
from fzero.schedule.file_ops import (  # noqa: E402
    FILE,
    ReadShardFromFile,
    ReadStateFromFile,
    WaitFileWrites,
    WriteStateToFile,
)
from fzero.schedule.gradient_ops import (  # noqa: E402
    AllocGrad,
    AllocGradShard,
    AllocUnitGrad,
    AllReduce,
    DropGrads,
    FreeGradBuffer,
    FreeGradShard,
    ReduceInOrder,
    ReduceScatter,
    WaitReduce,
    WriteGradShard,
    ZeroGrad,
    ZeroGradShard,
)
from fzero.schedule.offload_ops import (  # noqa: E402
    ApplyPendingUpdate,
    CopyGradToHost,
    CopyParamsToDevice,
    CopyParamsToHost,
    GradFromHost,
    HostOptimizerStep,
    ScalarsToHost,
    UploadShard,
    UploadUpdate,
    WaitUploads,
)
from fzero.schedule.step_phase_ops import (  # noqa: E402
    AccumulateGradNorm,
    OptimizerStep,
    ReduceScalars,
    ReduceScalarsInOrder,
)

__all__ = [
    "FILE",
    "AccumulateGradNorm",
    "AllReduce",
    "AllocGrad",
    "AllocGradShard",
    "AllocUnitGrad",
    "ApplyPendingUpdate",
    "CopyGradToHost",
    "CopyParamsToDevice",
    "CopyParamsToHost",
    "DropGrads",
    "FreeGradBuffer",
    "FreeGradShard",
    "GradFromHost",
    "HostOptimizerStep",
    "OptimizerStep",
    "ReadShardFromFile",
    "ReadStateFromFile",
    "ReduceInOrder",
    "ReduceScalars",
    "ReduceScalarsInOrder",
    "ReduceScatter",
    "ScalarsToHost",
    "UploadShard",
    "UploadUpdate",
    "WaitReduce",
    "WaitFileWrites",
    "WaitUploads",
    "WriteGradShard",
    "WriteStateToFile",
    "ZeroGrad",
    "ZeroGradShard",
]
