"""The on-demand ops: what each trigger needs with nothing known about the order.

Gather a unit right before it computes and release it right after, start its gradients before
its backward, reduce them as soon as they are written. That alone is a correct schedule: the
compiler starts from it (``compile.py``), and the executor runs it while the first micro-batch
traces the order.
"""

from __future__ import annotations

from fzero.schedule.ops import (
    BACKWARD_END,
    POST_BACKWARD,
    POST_FORWARD,
    PRE_BACKWARD,
    PRE_FORWARD,
    PRE_RECOMPUTE,
    AllGather,
    AllocGrad,
    AllocGradShard,
    DropGrads,
    Entry,
    Op,
    ReduceInOrder,
    ReduceScatter,
    Release,
    Trigger,
    WaitGather,
    WaitReduce,
    WriteGradShard,
    ZeroGrad,
)
from fzero.schedule.schedule import UnitInfo
from fzero.schedule.streamed_grads import GradStreaming, stream_gradients


def on_demand(
    units: tuple[UnitInfo, ...],
    stage: int,
    world_size: int,
    trace: tuple[Trigger, ...],
    grad_shard_nbytes: int = 0,
    reduction: str = "",
    reduce: bool = True,
) -> list[Entry]:
    planner = OnDemand(units, stage, world_size, grad_shard_nbytes, reduction, reduce)
    return [Entry(trigger, planner.ops(trigger)) for trigger in trace]


class OnDemand:
    """Emits, trigger by trigger, the ops that need no knowledge of what comes next. The
    executor uses it directly while it traces the first micro-batch (then with ``reduce`` true:
    a traced micro-batch reduces its gradients whether it is the last one or not). Before the
    first step, ``state.schedule`` is these ops over the presumed order (``presumed_trace``):
    what the tracing micro-batch runs when the model runs in module order.

    ``reduce`` false (``last_micro_batch``'s micro-batches before the last) keeps gradients.
    ``streaming`` (the schedule's ``grad_streaming``): the tracing micro-batch streams its
    gradients down as the compiled schedule does (``streamed_grads.py``)."""

    def __init__(
        self,
        units: tuple[UnitInfo, ...],
        stage: int,
        world_size: int,
        grad_shard_nbytes: int = 0,
        reduction: str = "",
        reduce: bool = True,
        streaming: GradStreaming | None = None,
    ):
        self.units = units
        self.streaming = streaming
        self.by_index = {u.index: u for u in units}
        self.stage = stage
        self.world_size = world_size
        self.grad_shard_nbytes = grad_shard_nbytes
        self.reduction = reduction or ("step" if stage < 2 else "micro_batch")
        self.reduce = reduce
        self.shard_ready = False  # ZeroGradShard emitted in this micro-batch
        kept = {u.index for u in units if u.persistent} if stage == 3 else set(self.by_index)
        self.kept = kept  # never released: below stage 3, or persistent in stage 3
        self.gathered: set[int] = set(kept)
        self.grad_live: set[int] = set()
        self.reduced: set[int] = set()

    def ops(self, trigger: Trigger) -> tuple[Op, ...]:
        ops: list[Op] = []
        stage, kind = self.stage, trigger.kind
        unit = self.by_index.get(trigger.unit)
        needs_params = kind in (PRE_FORWARD, PRE_RECOMPUTE) or (
            kind == PRE_BACKWARD and unit.backward_reads_params
        )
        if needs_params and unit.index not in self.gathered:
            ops += [
                AllGather(unit.index, unit.name, unit.param_nbytes),
                WaitGather(unit.index, unit.name),
            ]
            self.gathered.add(unit.index)
        ordered = self.reduction == "ordered"
        if (
            kind == PRE_BACKWARD
            and (stage >= 2 or ordered)
            and unit.has_trainable
            and unit.index not in self.grad_live
            and unit.index not in self.reduced
        ):
            zero = ZeroGrad if stage < 2 else DropGrads
            zero = AllocGrad if self.reduction == "last_micro_batch" else zero
            ops.append(zero(unit.index, unit.name, unit.grad_nbytes))
            self.grad_live.add(unit.index)
        # The root unit is used at both ends of forward and backward: keep it for the step.
        if kind == POST_FORWARD and stage == 3 and not unit.is_root and unit.index not in self.kept:
            ops.append(Release(unit.index, unit.name, unit.param_nbytes))
            self.gathered.discard(unit.index)
        if kind == POST_BACKWARD:
            if unit.index in self.grad_live and self.reduce:
                if not self.shard_ready:
                    # Stages 2 and 3 keep the gradient shard only from the first reduction to
                    # the optimizer step, so it is not alive while activations peak.
                    ops.append(AllocGradShard(self.grad_shard_nbytes))
                    self.shard_ready = True
                packs = stage >= 2  # the gradients are the parameters' own .grad
                if ordered:
                    reduction = ReduceInOrder(
                        unit.index, unit.name, unit.reduce_nbytes, stage == 0, packs
                    )
                elif packs and self.world_size == 1:
                    reduction = WriteGradShard(unit.index, unit.name, unit.reduce_nbytes)
                else:
                    reduction = ReduceScatter(unit.index, unit.name, unit.reduce_nbytes, packs)
                frees = unit.grad_nbytes if stage >= 2 else 0  # stages 0, 1 keep full gradients
                ops += [reduction, WaitReduce(unit.index, unit.name, frees)]
                self.grad_live.discard(unit.index)
                self.reduced.add(unit.index)
            if stage == 3 and unit.index in self.gathered - self.kept:
                ops.append(Release(unit.index, unit.name, unit.param_nbytes))
                self.gathered.discard(unit.index)
        if kind == BACKWARD_END:
            if stage == 3:
                ops += [
                    Release(i, self.by_index[i].name, self.by_index[i].param_nbytes)
                    for i in sorted(self.gathered - self.kept)
                ]
                self.gathered = set(self.kept)
            self.reduced.clear()
            self.shard_ready = False
        if self.streaming is not None:
            return stream_gradients(self.units, tuple(ops), self.streaming)
        return tuple(ops)
