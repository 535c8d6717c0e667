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
2. ``AccumulateGradNorm`` after its ``WaitReduce`` adds its squared norm to the step's sum on the
   device, before the copy; device units (partial offload) add theirs too;
3. ``CopyGradToHost`` copies it down, as without streaming.

The gradient shard keeps only the device units' part (partial offload; none under full
offload), ``ReduceScalars`` all-reduces the accumulated sum (``summed_per_unit``) instead of
reading a shard, and ``FreeGradBuffer`` frees the buffer at the end of the step phase.

Exact only when each unit's gradient lands once per step (``streams``, which the planner
and ``estimate_memory`` both ask): accumulation across micro-batches adds into
the landed gradient, which streaming has already copied down. Deterministic mode sums the norm
parameter by parameter in model order over the whole shard, so it keeps the shard.
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
) -> bool:
    """Whether host units' gradients can stream down as they land: under optimizer offload,
    when each unit's gradient lands once per step. Stage 1 reduces once, in the step phase;
    stages 2 and 3 reduce in the micro-steps (every one, or the last with
    ``reduce_every_micro_batch: false``, whose tracing first micro-batch reduces too), so only
    with ``gradient_accumulation_steps`` 1: with accumulation a later micro-batch adds into the
    landed gradient. Deterministic mode sums the norm in model order over the whole shard, so
    it keeps the shard."""
    if not optimizer_offloaded or deterministic:
        return False
    return stage == 1 or gradient_accumulation_steps == 1


@dataclass(frozen=True)
class GradStreaming:
    """What streaming needs to know: the host units (their gradients stream), the gradient
    buffer's bytes (the largest host unit's part), the device units' gradient shard
    (``shard_nbytes``, 0 under full offload) and the whole shard streaming replaces.
    ``one_micro_batch``: the schedule reduces in the micro-steps, so it is exact for steps of one
    micro-batch only (stage 1 reduces in the step phase: any number)."""

    host_units: frozenset[int]
    buffer_nbytes: int
    shard_nbytes: int
    whole_shard_nbytes: int
    itemsize: int
    one_micro_batch: bool = True

    @classmethod
    def of(
        cls,
        units: tuple[UnitInfo, ...],
        host_units: frozenset[int] | None,
        itemsize: int,
        one_micro_batch: bool = True,
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
            one_micro_batch,
        )

    def __str__(self) -> str:
        device = f" and the device units' {_size(self.shard_nbytes)}" if self.shard_nbytes else ""
        return (
            f"streamed to the host as each unit lands: on the device a "
            f"{_size(self.buffer_nbytes)} buffer (the largest host unit's){device} instead of "
            f"the {_size(self.whole_shard_nbytes)} gradient shard"
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
