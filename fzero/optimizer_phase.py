"""The step phase's scalars and optimizer: global loss and gradient norm, overflow, AdamW.

Each function is one op of the schedule (bound as an ``Executor`` method, ``ex`` is the
executor), plus how the optimizer space is split into kernel launches.
"""

from __future__ import annotations

from typing import Any

import torch

from fzero.kernels.adamw import adamw_step
from fzero.schedule import ops as O
from fzero.state.buffers import Workspace
from fzero.state.layout import FlatLayout

Executor = Any  # fzero.executor.Executor (imported there, not here: it binds these functions)


def op_ReduceScalars(ex: Executor, op: O.ReduceScalars) -> None:
    grad = ex.workspace.grad_shard
    device = grad.device
    # vector_norm reduces without materialising a squared copy of the shard.
    squares = torch.linalg.vector_norm(grad, dtype=torch.float32).square()
    if ex.layout.shard_world == 1 and ex.comm.rank != 0:
        squares = torch.zeros_like(squares)  # stage 0: every rank holds the same gradient
    loss = ex._loss_sum / ex._micro_batches if ex._loss_sum is not None else None
    scalars = torch.stack(
        [loss if loss is not None else torch.zeros((), device=device), squares.to(device)]
    )
    ex.comm.all_reduce(scalars).wait()
    world = ex.comm.world_size
    ex.result.loss = scalars[0] / world
    ex._finish_scalars(scalars[1])


def op_ReduceScalarsInOrder(ex: Executor, op: O.ReduceScalarsInOrder) -> None:
    # No float sum is left to a collective: gathered values are added in a fixed order.
    world = ex.comm.world_size
    device = ex.workspace.master.device
    loss = ex._loss_sum / ex._micro_batches if ex._loss_sum is not None else None
    loss = loss if loss is not None else torch.zeros((), device=device)
    losses = torch.empty(world, dtype=torch.float32, device=device)
    ex.comm.all_gather(losses, loss.float().reshape(1)).wait()
    total_loss = losses[0]
    for value in losses[1:]:
        total_loss = total_loss + value
    ex.result.loss = total_loss / world
    squares = torch.zeros((), dtype=torch.float32, device=device)
    for value in ex._squares_in_model_order():
        squares = squares + value
    ex._finish_scalars(squares)


def squares_in_model_order(ex: Executor) -> list[torch.Tensor]:
    """Each trainable parameter's squared norm of the reduced gradient (summed over ranks),
    in model parameter order. Units are gathered one at a time: this rank's part of the
    gradient shard, zeros past it."""
    ws, layout = ex.workspace, ex.layout
    squares: dict[tuple[int, int], torch.Tensor] = {}
    for u in layout.units:
        if not u.has_trainable:
            continue
        full = ws.grad_shard[u.optimizer_offset : u.optimizer_offset + u.optimizer_numel]
        if layout.shard_world > 1:
            send = torch.zeros(u.shard_numel, dtype=full.dtype, device=full.device)
            send[: u.optimizer_numel] = full
            full = torch.empty(u.padded_numel, dtype=full.dtype, device=full.device)
            ex.comm.all_gather(full, send).wait()
        for slot in u.params:
            if slot.requires_grad:
                grad = full[slot.offset : slot.offset + slot.numel].view(slot.shape)
                value = torch.linalg.vector_norm(grad, dtype=torch.float32).square()
                squares[(u.index, slot.offset)] = value
    return [squares[(unit, offset)] for unit, offset, _ in ex.norm_order]


def finish_scalars(ex: Executor, squares: torch.Tensor) -> None:
    """The gradient norm and overflow flag from the global sum of squares of the reduced
    gradient, which is the sum over ranks (the mean is 1/world of it) times the loss scale.
    A non-finite sum means some rank's gradient held Inf or NaN."""
    hyper = ex.hyper
    norm = squares.sqrt() / ex.comm.world_size
    if hyper is not None and hyper.loss_scale != 1.0:
        norm = norm / hyper.loss_scale  # a power of two when dynamic: exact
    ex.result.grad_norm = norm
    if hyper is not None and hyper.check_finite:
        ex.result.found_inf = (~torch.isfinite(squares)).float()


def op_OptimizerStep(ex: Executor, op: O.OptimizerStep) -> None:
    state, hyper = ex.optimizer, ex.hyper
    assert state is not None and hyper is not None
    # Averaging over ranks and undoing the loss scale, in the one factor AdamW reads.
    average = 1.0 / (ex.comm.world_size * hyper.loss_scale)
    scale = torch.full((), average, device=state.master.device)
    if hyper.max_grad_norm > 0:
        # torch.nn.utils.clip_grad_norm_'s coefficient, kept on the device (no host sync).
        coef = hyper.max_grad_norm / (ex.result.grad_norm + 1e-6)
        scale = scale * torch.clamp(coef, max=1.0)
    found_inf = ex.result.found_inf
    # A skipped step leaves the step count too (on the device: no host sync).
    state.step.add_(1 if found_inf is None else 1 - found_inf)
    for (lo, hi, param_out), decay in zip(ex.optimizer_runs, ex.decay_runs):
        adamw_step(
            state.master[lo:hi],
            ex.workspace.grad_shard[lo:hi],
            state.exp_avg[lo:hi],
            state.exp_avg_sq[lo:hi],
            lr=hyper.lr,
            beta1=hyper.beta1,
            beta2=hyper.beta2,
            eps=hyper.eps,
            step=state.step,
            decay=decay,
            grad_scale=scale,
            found_inf=found_inf,
            param_out=param_out,
            bias_correction=hyper.bias_correction,
        )


def optimizer_runs(layout: FlatLayout, workspace: Workspace):
    """Split the optimizer space into runs, one kernel launch each, whose compute-dtype
    destinations are contiguous too: one run in stages 0 and 3 unless a unit holds frozen
    parameters, one per unit in stages 1 and 2 (each unit's shard is a slice of its own buffer).
    The destination is None where nothing besides the master is kept."""
    runs: list[tuple[int, int, torch.Tensor | None]] = []
    for u in layout.units:
        if u.optimizer_numel == 0:
            continue
        lo, hi = u.optimizer_offset, u.optimizer_offset + u.optimizer_numel
        dest = workspace.param_out(u.index)
        if runs and runs[-1][1] == lo:
            prev_lo, _, prev = runs[-1]
            if prev is None and dest is None:
                runs[-1] = (prev_lo, hi, None)
                continue
            if prev is not None and dest is not None and _follows(prev, dest):
                runs[-1] = (
                    prev_lo,
                    hi,
                    workspace.param_shard[
                        prev.storage_offset() : dest.storage_offset() + dest.numel()
                    ],
                )
                continue
        runs.append((lo, hi, dest))
    return runs


def _follows(first: torch.Tensor, second: torch.Tensor) -> bool:
    """Whether ``second`` starts where ``first`` ends in the same storage (stage 0's shard)."""
    return (
        first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
        and first.storage_offset() + first.numel() == second.storage_offset()
    )
