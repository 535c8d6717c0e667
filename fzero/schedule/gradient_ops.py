"""The gradient ops: a unit's gradient buffers (zeroing, dropping, allocating), its reduction
across ranks (reduce-scatter, all-reduce, the deterministic in-order reduction) and the gradient
shard the reductions land in. ``fzero/schedule/ops.py`` names them with the rest."""

from __future__ import annotations

from dataclasses import dataclass

from fzero.schedule.ops import REDUCE, Op, _size, _unit_label


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
class AllocUnitGrad(Op):
    """Streamed gradients (optimizer offload, ``streamed_grads.py``): unit ``unit``'s reduced
    gradient (``nbytes``, its part of the optimizer space in the gradient-accumulation dtype)
    lands in the device's gradient buffer instead of the whole gradient shard, and stays there
    until its ``CopyGradToHost`` has read it. The buffer (``buffer_nbytes``: the largest host
    unit's part) is allocated by the step's first ``AllocUnitGrad`` and reused by the next
    units: the device waits for the previous unit's copy down before this one lands."""

    unit: int
    name: str
    nbytes: int
    buffer_nbytes: int

    def __str__(self) -> str:
        label = _unit_label(self.unit, self.name)
        return (
            f"AllocUnitGrad {label}  {_size(self.nbytes)} of the {_size(self.buffer_nbytes)} buffer"
        )


@dataclass(frozen=True)
class FreeGradBuffer(Op):
    """Streamed gradients: free the device's gradient buffer (``nbytes``) at the end of the
    step phase; the copies down that read it finish first (the allocator waits for them)."""

    nbytes: int

    def __str__(self) -> str:
        return f"FreeGradBuffer {_size(self.nbytes)}"
