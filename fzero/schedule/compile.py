"""The schedule compiler: units' sizes + the traced trigger order + knobs -> a Schedule.

It works over plain integers:

1. ``on_demand`` (``on_demand.py``): the ops each trigger needs with nothing known about the
   order (gather a unit right before it computes, release it right after, reduce its gradient
   as soon as it is written). This alone is a correct schedule.
2. With the traced order known, the passes of ``passes.py``, each keeping the schedule correct:
   ``keep_for_reuse`` (stage 3: a unit used again soon stays gathered), ``prefetch`` (stage 3:
   each gather moves to an earlier trigger, after that trigger's wait, so it overlaps compute,
   while the live bytes stay under ``max_live_nbytes``), ``defer_reduce_waits`` (stages 2 and
   3 with ``overlap_comm``: reductions run on under the next units' backward).
3. ``with_live_nbytes`` annotates each trigger with the bytes alive after its ops.
4. Under offload, ``apply_offload`` (``offload_passes.py``) adds the copies, the CPU steps and
   NVMe's file reads and writes.

Stages 0 and 1 keep full gradients and reduce them once, at the ``step`` trigger; stages 2 and 3
reduce each unit's gradient right after its backward, and stage 3 also gathers parameters.

Two other ways to reduce (``Knobs.gradient_reduction``, read from the ``fzero`` config block):

- ``"last_micro_batch"`` (``reduce_every_micro_batch: false``, stages 2 and 3): each unit's full
  gradient is kept across micro-batches (``AllocGrad`` zeroes it only when it is not alive) and
  reduced once, in ``last_micro_step``. Reduction traffic drops from one reduce-scatter per
  micro-batch to one per step; the price is that every unit's full gradient (in the compute
  dtype) stays allocated from the first micro-batch's backward to the last one's reduction,
  instead of one unit at a time, and the accumulation is in the compute dtype, not the fp32
  shard (bf16 sums of many micro-batches lose precision).
- ``"ordered"`` (``deterministic: true``, every stage): each micro-batch's gradient of a unit is
  zeroed before its backward and reduced right after it with ``ReduceInOrder``: an all-to-all
  gives each rank every rank's slice of its shard (stage 0: an all-gather of whole units) and
  the rank adds them into the fp32 gradient shard in rank order. The gradient shard therefore
  sums micro-batch gradients in the fixed order (micro-batch 0 of rank 0, of rank 1, ..., then
  micro-batch 1 ...), whatever the world size or layout. ``ReduceScalarsInOrder`` gathers the
  reduced gradient (``grad_gather_nbytes``) to sum the squared norm parameter by parameter in
  model order. Costs: stages 0 and 1 reduce every micro-batch instead of once per step, stage
  0's all-gather moves N times an all-reduce's bytes, the all-to-all receive buffer is a full
  unit, and the norm gathers the whole gradient once per step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fzero.schedule.offload_passes import apply_offload
from fzero.schedule.on_demand import on_demand
from fzero.schedule.ops import (
    BACKWARD_END,
    POST_BACKWARD,
    POST_FORWARD,
    PRE_BACKWARD,
    PRE_FORWARD,
    PRE_RECOMPUTE,
    STEP,
    AllGather,
    AllocGrad,
    AllReduce,
    DropGrads,
    Entry,
    FreeGradShard,
    Op,
    OptimizerStep,
    ReduceScalars,
    ReduceScalarsInOrder,
    ReduceScatter,
    Release,
    Trigger,
    WaitGather,
    WaitReduce,
    ZeroGrad,
    ZeroGradShard,
)
from fzero.schedule.passes import defer_reduce_waits, keep_for_reuse, prefetch
from fzero.schedule.schedule import GRADIENT_REDUCTIONS, Schedule, UnitInfo


@dataclass(frozen=True)
class Knobs:
    """Compile-time choices (bytes). ``gradient_reduction``: one of ``GRADIENT_REDUCTIONS``, ""
    for the stage's default. ``grad_gather_nbytes``: what ``ReduceScalarsInOrder`` gathers (the
    padded trainable units in the accumulation dtype; equal on every rank)."""

    prefetch: bool = True
    max_live_nbytes: int = 1 << 62
    # stage3_max_reuse_distance in elements: a unit used again within this many elements of
    # other units' parameters stays gathered (0: release after every use, FSDP2's
    # reshard_after_forward=True).
    max_reuse_numel: int = 0
    # stage3_prefetch_bucket_size in elements: gathers run ahead while this many elements are
    # in flight (at least one unit ahead when prefetching at all).
    prefetch_bucket_numel: int = 0
    # reduce_bucket_size in elements: reductions stay in flight, overlapping the backward of the
    # units after them, while this many elements are being reduced (overlap_comm).
    overlap_reductions: bool = False
    reduce_bucket_numel: int = 0
    # allgather_bucket_size in elements: stages 1 and 2 refresh their parameters after the
    # optimizer step with this many elements of gathers in flight at a time.
    gather_bucket_numel: int = 1 << 62
    gradient_reduction: str = ""
    grad_gather_nbytes: int = 0
    grad_shard_itemsize: int = 4  # the gradient-accumulation dtype's
    # zero_optimization.offload_optimizer / offload_param device "cpu" (see offload.py)
    offload_optimizer: bool = False
    offload_param: bool = False
    # offload_optimizer.ratio < 1: the units whose optimizer steps on the host (the others step
    # on the device, ``offload_split.py``); None: every unit's.
    host_step_units: frozenset[int] | None = None
    # Optimizer offload: host units' gradients stream down as they land instead of filling a
    # whole gradient shard (streamed_grads.py); ``accumulate_streamed_grads``: a unit may land
    # in several micro-batches of a step, so each landing first brings its sum up from the host.
    stream_gradients: bool = False
    accumulate_streamed_grads: bool = False
    # fzero.offload_update_in_forward: stage 3's CPU steps move into the next first forward
    offload_update_in_forward: bool = False
    # device "nvme": the master and moments / the parameter shards live in files (file_pass.py)
    optimizer_in_files: bool = False
    params_in_files: bool = False
    # offload_param.max_in_cpu: units whose shard stays in host memory (no file I/O for them)
    resident_shard_units: frozenset[int] = frozenset()


def presumed_trace(units: tuple[UnitInfo, ...]) -> tuple[Trigger, ...]:
    """The order a plain sequential model runs in: the root unit wraps the blocks, blocks run in
    registration order forward and in reverse backward (a unit fzero checkpoints recomputes
    its forward inside its backward). Used until a real step is traced."""
    root = [u.index for u in units if u.is_root]
    blocks = [u.index for u in units if not u.is_root]
    trace = [Trigger(PRE_FORWARD, r) for r in root]
    for b in blocks:
        trace += [Trigger(PRE_FORWARD, b), Trigger(POST_FORWARD, b)]
    trace += [Trigger(POST_FORWARD, r) for r in root]
    trace += [Trigger(PRE_BACKWARD, r) for r in root]
    recomputed = {u.index for u in units if u.recomputed}
    for b in reversed(blocks):
        trace.append(Trigger(PRE_BACKWARD, b))
        if b in recomputed:  # torch's non-reentrant checkpoint: inside the unit's backward
            trace.append(Trigger(PRE_RECOMPUTE, b))
        trace.append(Trigger(POST_BACKWARD, b))
    trace += [Trigger(POST_BACKWARD, r) for r in root]
    trace.append(Trigger(BACKWARD_END))
    return tuple(trace)


def compile_schedule(
    units: tuple[UnitInfo, ...],
    *,
    stage: int,
    world_size: int,
    trace: tuple[Trigger, ...],
    traced: bool,
    optimizer_numel: int,
    grad_shard_nbytes: int,
    knobs: Knobs = Knobs(),
) -> Schedule:
    reduction = knobs.gradient_reduction or ("step" if stage < 2 else "micro_batch")
    if reduction not in GRADIENT_REDUCTIONS:
        raise ValueError(f"gradient_reduction must be one of {GRADIENT_REDUCTIONS}")
    if stage < 2 and reduction in ("micro_batch", "last_micro_batch"):
        raise ValueError(f"stage {stage} keeps full gradients: it cannot reduce by {reduction}")
    if stage >= 2 and reduction == "step":
        raise ValueError(f"stage {stage} frees gradients after each unit: it cannot reduce by step")

    def micro_pass(reduce: bool) -> tuple[Entry, ...]:
        entries = on_demand(units, stage, world_size, trace, grad_shard_nbytes, reduction, reduce)
        if not traced:  # the on-demand ops the first, tracing micro-batch runs
            return tuple(with_live_nbytes(units, stage, entries))
        if stage == 3 and knobs.max_reuse_numel > 0:
            entries = keep_for_reuse(units, entries, knobs.max_reuse_numel, knobs.max_live_nbytes)
        if stage == 3 and knobs.prefetch:
            entries = prefetch(units, entries, knobs.max_live_nbytes, knobs.prefetch_bucket_numel)
        if stage >= 2 and knobs.overlap_reductions:
            entries = defer_reduce_waits(units, entries, knobs.reduce_bucket_numel)
        # Kept across micro-batches, every unit's gradient may be alive from the start.
        carried = {u.index for u in units if u.has_trainable}
        carried = carried if reduction == "last_micro_batch" else set()
        return tuple(with_live_nbytes(units, stage, entries, carried))

    # A tracing micro-batch reduces its gradients whether it is the last or not.
    last = reduction == "last_micro_batch" and traced
    micro = micro_pass(reduce=not last)
    ops = step_ops(
        units,
        stage,
        optimizer_numel,
        grad_shard_nbytes,
        reduction,
        gather_bucket_numel=knobs.gather_bucket_numel,
    )
    if reduction == "ordered":
        ops = tuple(
            ReduceScalarsInOrder(knobs.grad_gather_nbytes if stage > 0 else 0)
            if isinstance(op, ReduceScalars)
            else op
            for op in ops
        )
    last_micro = micro_pass(reduce=True) if last else None
    micro, last_micro, first_extra, ops, streaming = apply_offload(
        units, stage, reduction, traced, micro, last_micro, ops, knobs
    )
    step = Entry(Trigger(STEP), ops)
    return Schedule(
        stage,
        world_size,
        units,
        micro,
        (step,),
        traced,
        last_micro_step=last_micro,
        gradient_reduction=reduction,
        first_micro_extra=first_extra,
        grad_streaming=streaming,
    )


def _buckets(units: list[UnitInfo], bucket_numel: int) -> list[list[UnitInfo]]:
    """Consecutive units grouped while their elements fit in ``bucket_numel`` (each bucket
    holds at least one unit)."""
    buckets: list[list[UnitInfo]] = []
    for unit in units:
        if buckets and sum(u.numel for u in buckets[-1]) + unit.numel <= bucket_numel:
            buckets[-1].append(unit)
        else:
            buckets.append([unit])
    return buckets


def with_live_nbytes(
    units: tuple[UnitInfo, ...],
    stage: int,
    entries: list[Entry],
    grads_at_start: frozenset[int] | set[int] = frozenset(),
) -> list[Entry]:
    """Annotate each entry with the gathered parameter and transient gradient bytes alive
    after it (stages 2 and 3 only allocate gradient buffers in the micro-step).
    ``grads_at_start``: units whose gradients a previous micro-batch left alive."""
    by_index = {u.index: u for u in units}
    params: set[int] = {u.index for u in units if u.persistent} if stage == 3 else set()
    grads: set[int] = set(grads_at_start) if stage >= 2 else set()
    out = []
    for entry in entries:
        for op in entry.ops:
            if isinstance(op, AllGather):
                params.add(op.unit)
            elif isinstance(op, Release):
                params.discard(op.unit)
            elif isinstance(op, (DropGrads, AllocGrad)) and stage >= 2:
                grads.add(op.unit)
            elif isinstance(op, WaitReduce) and op.frees_nbytes:
                grads.discard(op.unit)
        live = sum(by_index[i].param_nbytes for i in params)
        live += sum(by_index[i].grad_nbytes for i in grads)
        out.append(replace(entry, live_nbytes=live))
    return out


def step_ops(
    units: tuple[UnitInfo, ...],
    stage: int,
    optimizer_numel: int,
    grad_shard_nbytes: int,
    reduction: str = "",
    gather_bucket_numel: int = 1 << 62,
) -> tuple[Op, ...]:
    trainable = [u for u in units if u.has_trainable]
    once = (reduction or "step") == "step" and stage < 2  # stages 0, 1 reduce here
    ops: list[Op] = []
    if stage == 0 and once:
        ops += [AllReduce(u.index, u.name, u.reduce_nbytes) for u in trainable]
        ops += [WaitReduce(u.index, u.name, 0) for u in trainable]
    if stage >= 1 or not once:  # a no-op unless no unit was reduced in a micro-step
        ops.append(ZeroGradShard(grad_shard_nbytes))
    if stage == 1 and once:
        ops += [ReduceScatter(u.index, u.name, u.reduce_nbytes) for u in trainable]
        ops += [WaitReduce(u.index, u.name, 0) for u in trainable]
    ops += [ReduceScalars(replicated_gradient=stage == 0), OptimizerStep(optimizer_numel)]
    if stage >= 1 or not once:  # stage 0's all-reduced full gradient persists
        ops.append(FreeGradShard(grad_shard_nbytes))
    # Refresh the full parameters from the updated shards: every unit in stages 1 and 2, the
    # persistent ones in stage 3; allgather_bucket_size elements in flight at a time.
    refreshed = [u for u in trainable if stage in (1, 2) or (stage == 3 and u.persistent)]
    for bucket in _buckets(refreshed, gather_bucket_numel):
        ops += [AllGather(u.index, u.name, u.param_nbytes) for u in bucket]
        ops += [WaitGather(u.index, u.name) for u in bucket]
    if once:  # full gradients persist; clear them for the next step
        ops += [ZeroGrad(u.index, u.name, u.grad_nbytes) for u in trainable]
    return tuple(ops)
