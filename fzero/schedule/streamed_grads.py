"""Streamed gradients: under optimizer offload, each host unit's reduced gradient is on the
device only from its landing to its copy down, instead of in a whole gradient shard.

Without streaming, reductions land in this rank's gradient shard (4 bytes per optimizer element
with fp32 accumulation), which lives from the step's first reduction to its optimizer step,
although every host unit's part goes down to the host right after its last reduction
(``CopyGradToHost``). Streaming rewrites the reductions' ops so that, for each host unit:

1. ``AllocUnitGrad`` right before its gradient lands (before ``WriteGradShard`` on one rank,
   which writes at once; before the ``WaitReduce`` of a ``ReduceScatter``, whose result lands
   there) points the landing at the device's gradient buffer (as large as the largest host
   unit's part), which the previous unit has left once its copy down read it;
2. ``AccumulateGradNorm`` after its ``WaitReduce`` records its squared norm on the device,
   before the copy; device units (partial offload) record theirs too;
3. ``CopyGradToHost`` copies it down, as without streaming.

The gradient shard keeps only the device units' part (partial offload; none under full
offload), ``ReduceScalars`` all-reduces the sum of the recorded norms (``summed_per_unit``)
instead of reading a shard, and ``FreeGradBuffer`` frees the buffer at the end of the step
phase.

Gradient accumulation: a unit whose gradient lands in several micro-batches of a step (stages
2 and 3 with ``gradient_accumulation_steps`` above 1, or not known) would add each landing into
a gradient that streaming has already copied down. With ``accumulates`` the pass puts a
``GradFromHost`` right after each ``AllocUnitGrad``: where the unit's gradient was copied down
earlier in the step, its sum so far comes back up into the buffer, the landing adds to it, and
the new sum goes down again; in the step's first landing it does nothing. The device adds the
same fp32 values in the same order as into a whole shard, so the gradient is the same bit for
bit, for two copies of the host units' gradient per micro-batch after the first (DeepSpeed's
ZeRO-3 offload adds each micro-batch's partition into its host buffer on the CPU instead). A
later landing's ``AccumulateGradNorm`` replaces the unit's recorded norm, so the sum reads each
unit's whole gradient. Whether to pay those copies is the planner's choice (``streams``):
by default only where no unit lands twice; ``fzero.stream_gradients: true`` asks for it with
accumulation too. Deterministic mode sums the norm parameter by parameter in model order over
the whole shard, so it keeps the shard.
"""

from __future__ import annotations

from dataclasses import dataclass

from fzero.schedule.ops import (
    AccumulateGradNorm,
    AllocGradShard,
    AllocUnitGrad,
    CopyGradToHost,
    FreeGradBuffer,
    FreeGradShard,
    GradFromHost,
    Op,
    ReduceScalars,
    WaitReduce,
    WriteGradShard,
    ZeroGradShard,
    _size,
)
from fzero.schedule.schedule import UnitInfo


def streams(
    *,
    optimizer_offloaded: bool,
    deterministic: bool,
    stage: int,
    gradient_accumulation_steps: int | None,
    requested: bool | None = None,
    reduce_every_micro_batch: bool | None = None,
) -> bool:
    """Whether host units' gradients stream down as they land, under optimizer offload.
    ``requested`` is ``fzero.stream_gradients``: False never; True always (with accumulation,
    each later landing brings the unit's sum up from the host first, ``GradFromHost``); None
    (the default) where no unit lands twice in a step (``lands_once``), so streaming adds no
    copy. Deterministic mode sums the norm in model order over the whole shard, so it keeps
    the shard."""
    if not optimizer_offloaded or deterministic or requested is False:
        return False
    return requested is True or lands_once(
        stage, gradient_accumulation_steps, reduce_every_micro_batch
    )


def lands_once(
    stage: int, gradient_accumulation_steps: int | None, reduce_every_micro_batch: bool | None
) -> bool:
    """Whether each unit's gradient lands once per step: with one micro-batch a step, or where
    the reduction runs once, in the step phase (stages 0 and 1 unless
    ``reduce_every_micro_batch``; None: the stage's default). Stages 2 and 3 reduce in the
    micro-steps: every one, or the last with ``reduce_every_micro_batch: false``, whose tracing
    first micro-batch reduces too."""
    in_step_phase = stage < 2 and not reduce_every_micro_batch
    return in_step_phase or gradient_accumulation_steps == 1


@dataclass(frozen=True)
class GradStreaming:
    """What streaming needs to know: the host units (their gradients stream), the gradient
    buffer's bytes (the largest host unit's part), the device units' gradient shard
    (``shard_nbytes``, 0 under full offload) and the whole shard streaming replaces.
    ``accumulates``: a unit may land in several micro-batches of a step, so each landing first
    brings the unit's sum so far up from the host (``GradFromHost``). ``one_micro_batch``: the
    schedule reduces in the micro-steps without that, so it holds for steps of one micro-batch
    only (``gradient_accumulation_steps`` 1; stage 1 reduces in the step phase: any number)."""

    host_units: frozenset[int]
    buffer_nbytes: int
    shard_nbytes: int
    whole_shard_nbytes: int
    itemsize: int
    accumulates: bool = False
    one_micro_batch: bool = False

    @classmethod
    def of(
        cls,
        units: tuple[UnitInfo, ...],
        host_units: frozenset[int] | None,
        itemsize: int,
        accumulates: bool = False,
        one_micro_batch: bool = False,
    ) -> GradStreaming:
        """``host_units`` None: every unit steps on the host. A trainable unit with no
        optimizer elements on this rank streams too (an empty part): it lands nowhere else."""
        trainable = [u for u in units if u.has_trainable]
        host = [u for u in trainable if host_units is None or u.index in host_units]
        device_numel = sum(u.optimizer_numel for u in trainable if u not in host)
        return cls(
            frozenset(u.index for u in host),
            max((u.optimizer_numel for u in host), default=0) * itemsize,
            device_numel * itemsize,
            sum(u.optimizer_numel for u in trainable) * itemsize,
            itemsize,
            accumulates,
            one_micro_batch,
        )

    def __str__(self) -> str:
        device = f" and the device units' {_size(self.shard_nbytes)}" if self.shard_nbytes else ""
        return (
            f"streamed to the host as each unit lands: on the device a "
            f"{_size(self.buffer_nbytes)} buffer (the largest host unit's){device} instead of "
            f"the {_size(self.whole_shard_nbytes)} gradient shard"
            + ("; accumulated through the host (GradFromHost)" if self.accumulates else "")
            + ("; one micro-batch per step" if self.one_micro_batch else "")
        )


def stream_gradients(
    units: tuple[UnitInfo, ...], ops: tuple[Op, ...], streaming: GradStreaming
) -> tuple[Op, ...]:
    """``ops`` (one trigger's, or the step phase's) rewritten for streamed gradients (see the
    module docstring). Each unit's landing and its copy down fall in the same trigger, so the
    rewrite needs nothing from other triggers."""
    by_index = {u.index: u for u in units}
    shard = streaming.shard_nbytes
    in_buffer: set[int] = set()  # host units that took the buffer in these ops
    out: list[Op] = []

    def take_buffer(unit: UnitInfo) -> None:
        nbytes = unit.optimizer_numel * streaming.itemsize
        out.append(AllocUnitGrad(unit.index, unit.name, nbytes, streaming.buffer_nbytes))
        if streaming.accumulates:
            out.append(GradFromHost(unit.index, unit.name, nbytes))
        in_buffer.add(unit.index)

    for op in ops:
        if isinstance(op, (AllocGradShard, ZeroGradShard, FreeGradShard)):
            if shard:  # the device units' part only
                out.append(type(op)(shard))
            if isinstance(op, FreeGradShard) and streaming.host_units:
                out.append(FreeGradBuffer(streaming.buffer_nbytes))
            continue
        if isinstance(op, ReduceScalars):
            out.append(ReduceScalars(op.replicated_gradient, summed_per_unit=True))
            continue
        streamed = getattr(op, "unit", None) in streaming.host_units
        if isinstance(op, WriteGradShard) and streamed:
            take_buffer(by_index[op.unit])
        if isinstance(op, WaitReduce):
            unit = by_index[op.unit]
            if streamed and unit.index not in in_buffer:
                take_buffer(unit)
            out += [op, AccumulateGradNorm(unit.index, unit.name)]
            if streamed:
                nbytes = unit.optimizer_numel * streaming.itemsize
                out.append(CopyGradToHost(unit.index, unit.name, nbytes))
                in_buffer.discard(unit.index)
            continue
        out.append(op)
    return tuple(out)
