"""The op records a schedule is made of, and the trigger points they are keyed to.

Every op is a small frozen dataclass with a readable ``__str__``. The executor turns each op into
work; nothing else happens in a step. Sizes are in bytes (``nbytes``) unless the name says
``numel``. ``unit`` is the unit's index in the layout and ``name`` its module path (``""`` is the
root unit: every parameter not inside a repeated block).
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
class ZeroGrad(Op):
    """Zero unit ``unit``'s persistent flat gradient buffer (stages 0 and 1), which its
    parameters' ``.grad`` are views into, so autograd accumulates straight into it."""

    unit: int
    name: str
    nbytes: int

    def __str__(self) -> str:
        return f"ZeroGrad     {_unit_label(self.unit, self.name)}  {_size(self.nbytes)}"


@dataclass(frozen=True)
class DropGrads(Op):
    """Clear unit ``unit``'s parameters' ``.grad`` (stages 2 and 3), so autograd hands each a
    fresh gradient (``nbytes`` of them at most) that the unit's reduction packs and frees."""

    unit: int
    name: str
    nbytes: int

    def __str__(self) -> str:
        return f"DropGrads    {_unit_label(self.unit, self.name)}  {_size(self.nbytes)}"


@dataclass(frozen=True)
class AllocGrad(Op):
    """Materialise unit ``unit``'s gradient buffer as zeros, unless it is already alive (then it
    holds this step's earlier micro-batches and nothing happens): stages 2 and 3 with
    ``reduce_every_micro_batch: false`` accumulate full gradients locally until the last
    micro-batch reduces them."""

    unit: int
    name: str
    nbytes: int

    def __str__(self) -> str:
        return f"AllocGrad    {_unit_label(self.unit, self.name)}  {_size(self.nbytes)}"


_PACKS = "  (packs .grad)"


@dataclass(frozen=True)
class ReduceScatter(Op):
    """Sum unit ``unit``'s gradient over ranks; each rank adds its shard of the sum into its
    gradient shard. ``nbytes`` is the size of the reduced buffer, in the reduce dtype.
    ``packs``: the gradient is the parameters' ``.grad`` (stages 2 and 3), packed into a flat
    buffer and let go; otherwise it is the unit's persistent flat gradient (stage 1)."""

    unit: int
    name: str
    nbytes: int
    packs: bool = False

    @property
    def stream(self) -> str:
        return REDUCE

    def __str__(self) -> str:
        packs = _PACKS if self.packs else ""
        return f"ReduceScatter {_unit_label(self.unit, self.name)}  {_size(self.nbytes)}{packs}"


@dataclass(frozen=True)
class WriteGradShard(Op):
    """World size 1, stages 2 and 3: the sum over one rank is the gradient itself, so each
    parameter's ``.grad`` is written (the first time in a step) or added into its place in the
    gradient shard, the cast folded in, and let go. No buffer, no collective."""

    unit: int
    name: str
    nbytes: int

    def __str__(self) -> str:
        return f"WriteGradShard {_unit_label(self.unit, self.name)}  {_size(self.nbytes)}"


@dataclass(frozen=True)
class AllReduce(Op):
    """Stage 0: sum unit ``unit``'s full gradient over ranks, into every rank's gradient."""

    unit: int
    name: str
    nbytes: int

    @property
    def stream(self) -> str:
        return REDUCE

    def __str__(self) -> str:
        return f"AllReduce    {_unit_label(self.unit, self.name)}  {_size(self.nbytes)}"


@dataclass(frozen=True)
class ReduceInOrder(Op):
    """Deterministic mode: every rank receives every rank's gradient of what it owns (an
    all-to-all of shard slices; stage 0, which owns whole units, an all-gather) and
    ``WaitReduce`` adds them into the gradient shard in rank order. Summing in a fixed order on
    the receiver, instead of inside the collective, is what makes the result independent of the
    backend, world size and layout. ``nbytes``: the unit's gradient in the reduce dtype."""

    unit: int
    name: str
    nbytes: int
    whole_unit: bool = False  # stage 0: every rank receives every rank's whole gradient
    packs: bool = False  # as ReduceScatter's: the gradient is the parameters' .grad

    @property
    def stream(self) -> str:
        return REDUCE

    def __str__(self) -> str:
        how = "all-gather" if self.whole_unit else "all-to-all"
        packs = _PACKS if self.packs else ""
        label = _unit_label(self.unit, self.name)
        return f"ReduceInOrder {label}  {_size(self.nbytes)}  ({how}){packs}"


@dataclass(frozen=True)
class WaitReduce(Op):
    """Wait for unit ``unit``'s reduction; a gradient buffer that only fed it is freed."""

    unit: int
    name: str
    frees_nbytes: int

    def __str__(self) -> str:
        freed = f"  frees {_size(self.frees_nbytes)}" if self.frees_nbytes else ""
        return f"WaitReduce   {_unit_label(self.unit, self.name)}{freed}"


@dataclass(frozen=True)
class AllocGradShard(Op):
    """Materialise this rank's gradient shard, unless it is already alive (then it holds this
    step's earlier reductions and nothing happens). Nothing is zeroed: each reduction writes its
    unit's slice the first time in a step and adds after that. Stages 1-3 keep the shard only
    from a step's first reduction to its optimizer step."""

    nbytes: int

    def __str__(self) -> str:
        return f"AllocGradShard {_size(self.nbytes)}"


@dataclass(frozen=True)
class ZeroGradShard(Op):
    """Step phase: materialise the gradient shard if no reduction did, and zero every unit's
    slice that no reduction wrote this step, so the optimizer never reads stale memory."""

    nbytes: int

    def __str__(self) -> str:
        return f"ZeroGradShard {_size(self.nbytes)}"


@dataclass(frozen=True)
class FreeGradShard(Op):
    """Free this rank's gradient shard once the optimizer has read it (stages 1-3)."""

    nbytes: int

    def __str__(self) -> str:
        return f"FreeGradShard {_size(self.nbytes)}"


@dataclass(frozen=True)
class ReduceScalars(Op):
    """One tiny all-reduce of (loss, squared gradient norm) so every rank sees global values.
    A non-finite norm on any rank makes the global one non-finite: that is the overflow check.
    ``replicated_gradient``: every rank holds the same whole gradient (stage 0), so only rank
    0 contributes its squared norm."""

    replicated_gradient: bool = False

    def __str__(self) -> str:
        once = "  (rank 0's norm: the gradient is replicated)" if self.replicated_gradient else ""
        return f"ReduceScalars loss, grad_norm^2  8 B{once}"


@dataclass(frozen=True)
class ReduceScalarsInOrder(Op):
    """Deterministic mode's ``ReduceScalars``: the reduced gradient is gathered one unit at a
    time (``grad_nbytes`` in all; 0 in stage 0, where every rank holds all of it) and every rank
    sums each parameter's squared norm in the model's parameter order; the losses are gathered
    and summed in rank order. No float sum is left to a collective."""

    grad_nbytes: int

    def __str__(self) -> str:
        return f"ReduceScalarsInOrder loss, grad_norm^2  gathers {_size(self.grad_nbytes)}"


@dataclass(frozen=True)
class OptimizerStep(Op):
    """AdamW over this rank's whole flat shard in one pass (one launch per contiguous run); in
    stages 0-2 it also writes the compute-dtype parameters, in stage 3 the next gathers cast
    the master. ``shard_numel`` elements."""

    shard_numel: int

    def __str__(self) -> str:
        return f"OptimizerStep {self.shard_numel:,} elements"


@dataclass(frozen=True)
class Entry:
    """The ops run at one trigger, with the gathered bytes alive once they are done."""

    trigger: Trigger
    ops: tuple[Op, ...]
    live_nbytes: int = 0


# Offload's ops (copies between device and host, the CPU optimizer step) are in offload_ops.py,
# one concept per file; they are ops like the rest and are named here too.
from fzero.schedule.offload_ops import (  # noqa: E402
    ApplyPendingUpdate,
    CopyGradToHost,
    CopyParamsToDevice,
    HostOptimizerStep,
    ScalarsToHost,
    UploadShard,
    UploadUpdate,
    WaitUploads,
)

__all__ = [
    "ApplyPendingUpdate",
    "CopyGradToHost",
    "CopyParamsToDevice",
    "HostOptimizerStep",
    "ScalarsToHost",
    "UploadShard",
    "UploadUpdate",
    "WaitUploads",
]
