"""The offload pass: copies between device and host, and the CPU optimizer step, as ops.

Applied after the other passes when ``zero_optimization.offload_optimizer.device`` is
``"cpu"`` (``Knobs.offload_optimizer``), and for ``offload_param`` (``Knobs.offload_param``):

- Each unit's gradient goes down once per step, right after its last reduction lands
  (``CopyGradToHost`` after its ``WaitReduce``; stages 2 and 3 in the last micro-batch's
  backward, on the device-to-host stream, so the copies overlap the backward of later units;
  stage 1 in the step phase, where it reduces).
- Streamed gradients (``streamed_grads.py``, where each unit's gradient lands once per step)
  replace the copies placed here: the compiler rewrites the landings instead.
- The step phase keeps ``ReduceScalars`` on the device (the global norm and overflow flag are
  summed where the gradient is), reads them on the host once (``ScalarsToHost``), then runs, unit
  by unit in index order, ``HostOptimizerStep`` and ``CopyParamsToDevice``: the upload of unit k
  overlaps the CPU step of unit k + 1. ``WaitUploads`` makes the compute stream wait for the
  last of them before the gradient shard is freed and the refresh gathers (stages 1, 2) run.
- With parameter offload (stage 3) the shards live on the host: every ``AllGather`` is preceded
  by an ``UploadShard`` on the gather stream (prefetched gathers prefetch their upload too), and
  the CPU step writes the host shard directly, so no ``CopyParamsToDevice`` is needed. Under
  partial offload the device units' ``OptimizerStep`` is followed by ``CopyParamsToHost``, which
  casts their stepped master into the host shard before any later ``UploadShard`` reads it.
- At stage 3 (``fzero.offload_update_in_forward``, the default) a unit's CPU step leaves the
  step phase: the step phase ends once the scalars are read, and the next step's first
  micro-batch runs ``ApplyPendingUpdate`` (and, without parameter offload, ``UploadUpdate`` on
  the gather stream) right before the unit's first gather, in ``Schedule.first_micro_extra``.
  The forward of unit k then waits only for unit k's CPU step, and the CPU steps of the later
  units run while it computes. Units the step phase gathers (persistent ones) keep their CPU
  step there.
"""

from __future__ import annotations

from dataclasses import replace

from fzero.schedule.ops import (
    FORWARD_COMPUTE,
    POST_FORWARD,
    AllGather,
    ApplyPendingUpdate,
    CopyGradToHost,
    CopyParamsToDevice,
    CopyParamsToHost,
    Entry,
    HostOptimizerStep,
    Op,
    OptimizerStep,
    ScalarsToHost,
    Trigger,
    UploadShard,
    UploadUpdate,
    WaitReduce,
    WaitUploads,
)
from fzero.schedule.schedule import UnitInfo


def copy_grads_down(
    units: tuple[UnitInfo, ...],
    entries: tuple[Entry, ...],
    grad_itemsize: int,
    host_units: frozenset[int] | None = None,
) -> tuple[Entry, ...]:
    """``CopyGradToHost`` after every host unit's ``WaitReduce`` (the step's last reduction);
    ``host_units`` None: every unit is one."""
    return tuple(
        replace(entry, ops=_copies_after_waits(units, entry.ops, grad_itemsize, host_units))
        for entry in entries
    )


def _copies_after_waits(
    units: tuple[UnitInfo, ...],
    ops: tuple[Op, ...],
    grad_itemsize: int,
    host_units: frozenset[int] | None,
) -> tuple[Op, ...]:
    by_index = {u.index: u for u in units}
    out: list[Op] = []
    for op in ops:
        out.append(op)
        if isinstance(op, WaitReduce) and (host_units is None or op.unit in host_units):
            unit = by_index[op.unit]
            nbytes = unit.optimizer_numel * grad_itemsize
            out.append(CopyGradToHost(unit.index, unit.name, nbytes))
    return tuple(out)


def host_step_ops(
    units: tuple[UnitInfo, ...],
    step_ops: tuple[Op, ...],
    *,
    reduces_in_step: bool,
    grad_itemsize: int,
    param_offload: bool,
    host_units: frozenset[int] | None = None,
) -> tuple[Op, ...]:
    """The step phase with the device ``OptimizerStep`` replaced by the host steps (of
    ``host_units``, None: of every unit; the others keep an ``OptimizerStep`` of their own)."""
    if reduces_in_step:  # stage 1: the reductions are here
        step_ops = _copies_after_waits(units, step_ops, grad_itemsize, host_units)
    on_host = [u for u in units if host_units is None or u.index in host_units]
    on_device = [u for u in units if u not in on_host and u.optimizer_numel]
    ops: list[Op] = []
    for op in step_ops:
        if not isinstance(op, OptimizerStep):
            ops.append(op)
            continue
        ops.append(ScalarsToHost())
        if on_device:
            numel = sum(u.optimizer_numel for u in on_device)
            indices = tuple(u.index for u in on_device)
            ops.append(OptimizerStep(numel, indices))
            if param_offload:  # their shards live on the host: the stepped values go down
                nbytes = sum(u.optimizer_numel * u.param_itemsize for u in on_device)
                ops.append(CopyParamsToHost(indices, nbytes))
        for unit in on_host:
            if unit.optimizer_numel == 0:
                continue
            shard = unit.optimizer_numel * unit.param_itemsize if param_offload else 0
            ops.append(HostOptimizerStep(unit.index, unit.name, unit.optimizer_numel, shard))
            if not param_offload:
                nbytes = unit.optimizer_numel * 4  # the fp32 master, cast on the device
                ops.append(CopyParamsToDevice(unit.index, unit.name, nbytes))
        if not param_offload:
            ops.append(WaitUploads())
    return tuple(ops)


def upload_before_gathers(
    units: tuple[UnitInfo, ...], entries: tuple[Entry, ...]
) -> tuple[Entry, ...]:
    """Parameter offload: ``UploadShard`` right before every ``AllGather``."""
    by_index = {u.index: u for u in units}
    out = []
    for entry in entries:
        ops: list[Op] = []
        for op in entry.ops:
            if isinstance(op, AllGather):
                unit = by_index[op.unit]
                ops.append(UploadShard(unit.index, unit.name, unit.shard_nbytes))
            ops.append(op)
        out.append(replace(entry, ops=tuple(ops)))
    return tuple(out)


def defer_host_steps(
    units: tuple[UnitInfo, ...],
    micro: tuple[Entry, ...],
    step_ops: tuple[Op, ...],
    *,
    param_offload: bool,
) -> tuple[tuple[Entry, ...], tuple[Op, ...]]:
    """Move each unit's CPU step (and upload) from the step phase to the next step's first
    forward, right before the unit's first ``AllGather`` there. Returns the first micro-batch's
    extra entries and the step phase's ops without the moved ones."""
    forward = (*FORWARD_COMPUTE, POST_FORWARD)
    refreshed = {op.unit for op in step_ops if isinstance(op, AllGather)}
    first_gather: dict[int, Trigger] = {}
    for entry in micro:
        if entry.trigger.kind not in forward:
            continue
        for op in entry.ops:
            if isinstance(op, AllGather) and op.unit not in first_gather:
                first_gather[op.unit] = entry.trigger
    moved = {
        op.unit
        for op in step_ops
        if isinstance(op, HostOptimizerStep)
        and op.unit in first_gather
        and op.unit not in refreshed
    }
    if not moved:
        return (), step_ops
    by_index = {u.index: u for u in units}
    extra: dict[Trigger, list[Op]] = {}
    for unit_index, trigger in first_gather.items():  # in the order the forward gathers
        if unit_index not in moved:
            continue
        unit = by_index[unit_index]
        ops = extra.setdefault(trigger, [])
        shard = unit.optimizer_numel * unit.param_itemsize if param_offload else 0
        ops.append(ApplyPendingUpdate(unit.index, unit.name, unit.optimizer_numel, shard))
        if not param_offload:
            ops.append(UploadUpdate(unit.index, unit.name, unit.optimizer_numel * 4))
    kept = [
        op
        for op in step_ops
        if not (isinstance(op, (HostOptimizerStep, CopyParamsToDevice)) and op.unit in moved)
    ]
    if not any(isinstance(op, CopyParamsToDevice) for op in kept):
        kept = [op for op in kept if not isinstance(op, WaitUploads)]
    entries = tuple(Entry(trigger, tuple(ops)) for trigger, ops in extra.items())
    return entries, tuple(kept)
