"""Gradient reductions: the executor's ops that move gradients into this rank's shard.

Each function is one op of the schedule (bound as an ``Executor`` method, ``ex`` is the
executor). Stages 0 and 1 reduce their persistent full gradients; stages 2 and 3 pack the
gradients autograd produced for a unit, reduce them and let them go; on one rank the gradient
goes straight into the shard. The first reduction of a step writes a unit's slice of the
shard, later ones add to it, and ``ZeroGradShard`` zeroes only what no reduction wrote.
"""

from __future__ import annotations

from typing import Any

import torch

from fzero.collectives import DoneWork
from fzero.schedule import ops as O
from fzero.state.buffers import alloc_storage, free_storage, is_allocated

Executor = Any  # fzero.executor.Executor (imported there, not here: it binds these functions)


def reduce_input(ex: Executor, unit: int) -> torch.Tensor:
    grad = ex.workspace.grad_flats[unit]
    dtype = ex.reduce_dtype
    return grad if grad.dtype == dtype else grad.to(dtype)


def packed_gradients(ex: Executor, unit: int, out: torch.Tensor) -> None:
    """Write unit ``unit``'s parameter gradients into ``out`` (its flat layout, any dtype:
    the copy casts) and let them go; gradients that were never produced, frozen parameters
    and padding read as zeros."""
    layout_unit = ex.layout.units[unit]
    targets, grads = [], []
    for slot, param in zip(layout_unit.params, ex.unit_params[unit]):
        view = out[slot.offset : slot.offset + slot.numel]
        if param.requires_grad and param.grad is not None:
            targets.append(view)
            grads.append(param.grad.reshape(-1))
        else:
            view.zero_()
        param.grad = None
    out[layout_unit.numel :].zero_()
    if targets:
        torch._foreach_copy_(targets, grads)


def op_ReduceScatter(ex: Executor, op: O.ReduceScatter) -> None:
    u = ex.layout.units[op.unit]
    if ex.schedule.stage == 1:  # full gradients persist in the unit buffers
        full = ex._reduce_input(op.unit)
    elif ex.comm.world_size == 1:
        # One rank: the sum is the gradient itself. It goes straight into the shard, one
        # pass per parameter with the cast folded in, and no buffer between.
        ex._write_gradients_into_shard(op.unit)
        ex._reductions[op.unit] = (DoneWork(), None, "done")
        return
    else:
        full = torch.empty(u.padded_numel, dtype=ex.reduce_dtype, device=ex.workspace.master.device)
        ex._packed_gradients(op.unit, full)
    out = torch.empty(u.shard_numel, dtype=full.dtype, device=full.device)
    # ``full`` must live until the reduction is waited on.
    ex._reductions[op.unit] = (ex.comm.reduce_scatter(out, full), out, "add")
    ex._sending[op.unit] = full


def op_AllReduce(ex: Executor, op: O.AllReduce) -> None:
    full = ex._reduce_input(op.unit)
    ex._reductions[op.unit] = (ex.comm.all_reduce(full), full, "copy")


def op_ReduceInOrder(ex: Executor, op: O.ReduceInOrder) -> None:
    u = ex.layout.units[op.unit]
    if ex.schedule.stage < 2:  # full gradients persist in the unit buffers
        full = ex._reduce_input(op.unit)
    else:
        full = torch.empty(u.padded_numel, dtype=ex.reduce_dtype, device=ex.workspace.master.device)
        ex._packed_gradients(op.unit, full)
    # Cast to the reduce dtype even on one rank: the sum must not depend on the world size.
    world = ex.comm.world_size
    if world == 1:
        ex._reductions[op.unit] = (DoneWork(), full, "fold")
        return
    if op.whole_unit:  # stage 0 owns whole units: it receives every rank's whole gradient
        out = torch.empty(world * full.numel(), dtype=full.dtype, device=full.device)
        work = ex.comm.all_gather(out, full)
    else:
        out = torch.empty_like(full)
        work = ex.comm.all_to_all(out, full)
    ex._reductions[op.unit] = (work, out, "fold")
    ex._sending[op.unit] = full


def write_gradients_into_shard(ex: Executor, unit: int) -> None:
    """World size 1 (the shard is the whole unit): write or add each parameter's gradient
    into its place in the gradient shard and let it go."""
    u = ex.layout.units[unit]
    shard = ex.workspace.grad_shard[u.optimizer_offset : u.optimizer_offset + u.optimizer_numel]
    first = unit not in ex._shard_written
    targets, grads = [], []
    for slot, param in zip(u.params, ex.unit_params[unit]):
        if not param.requires_grad:
            continue  # frozen parameters lie past the optimizer space
        view = shard[slot.offset : slot.offset + slot.numel]
        if param.grad is not None:
            targets.append(view)
            grads.append(param.grad.reshape(-1))
        elif first:
            view.zero_()
        param.grad = None
    if first:
        shard[u.numel if u.trainable_numel == u.padded_numel else u.optimizer_numel :].zero_()
    if targets:
        (torch._foreach_copy_ if first else torch._foreach_add_)(targets, grads)


def op_WaitReduce(ex: Executor, op: O.WaitReduce) -> None:
    work, out, how = ex._reductions.pop(op.unit)
    work.wait()
    ex._sending.pop(op.unit, None)
    if how == "done":  # already in the shard
        ex._shard_written.add(op.unit)
        return
    u = ex.layout.units[op.unit]
    target = ex.workspace.grad_shard[u.optimizer_offset : u.optimizer_offset + u.optimizer_numel]
    source = out[: u.optimizer_numel]
    if how == "fold":
        # Every rank's piece of this unit, added in rank order.
        pieces = out.view(ex.comm.world_size, -1)[:, : u.optimizer_numel]
        first = op.unit not in ex._shard_written
        for rank, piece in enumerate(pieces):
            if first and rank == 0:  # the shard was not zeroed: the first piece is copied
                target.copy_(piece)
            else:
                target.add_(piece)
    elif how == "add" and op.unit in ex._shard_written:
        target.add_(source)
    elif source.data_ptr() != target.data_ptr():  # stage 0 may reduce the shard in place
        # The first reduction of a step writes instead of adding: the shard was never
        # zeroed (ZeroGradShard zeroes only what no reduction wrote, before it is read).
        target.copy_(source)
    ex._shard_written.add(op.unit)


def op_ZeroGradShard(ex: Executor, op: O.ZeroGradShard) -> None:
    # Materialise the shard; the reductions of this step write their units' slices. Once
    # alive (a later micro-batch, or the step phase), it only zeroes the slices of units
    # no reduction wrote this step, so the optimizer never reads stale memory.
    shard = ex.workspace.grad_shard
    if not is_allocated(shard):
        alloc_storage(shard)
        ex._shard_written = set()
        if ex._in_step_phase:
            shard.zero_()
        return
    if ex._in_step_phase:
        for u in ex.layout.units:
            if u.optimizer_numel and u.index not in ex._shard_written:
                shard[u.optimizer_offset : u.optimizer_offset + u.optimizer_numel].zero_()
                ex._shard_written.add(u.index)


def op_FreeGradShard(ex: Executor, op: O.FreeGradShard) -> None:
    free_storage(ex.workspace.grad_shard)
    ex._shard_written = set()
