"""The step phase: global loss and gradient norm, the overflow flag, and AdamW over the shard.

``StepPhase`` owns what a step accumulates (the micro-batches' loss) and what it produces
(``StepResult``); its handlers are ``ReduceScalars``, ``ReduceScalarsInOrder``,
``AccumulateGradNorm`` (streamed gradients: the squared norm summed unit by unit as each
landed) and ``OptimizerStep``. The per-step optimizer values arrive with ``begin``
(``Hyper``), never as fields set from outside.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fzero.collectives import Communicator
from fzero.kernels import WeightDecaySegments, adamw_step
from fzero.runtime.landings import GradientLandings
from fzero.schedule import ops as O
from fzero.state.buffers import Workspace
from fzero.state.layout import FlatLayout
from fzero.state.pending import PendingUpdate
from fzero.state.split import SplitFlat


@dataclass(frozen=True)
class Hyper:
    """Per-step optimizer values. ``loss_scale``: what the loss was multiplied by (fp16);
    gradients are divided by it. ``check_finite``: whether a non-finite gradient skips the
    update (``found_inf``)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    max_grad_norm: float
    loss_scale: float = 1.0
    check_finite: bool = False
    bias_correction: bool = True  # Adam's 1 - beta**step divisors (optimizer.params)
    # Carry each rank's count of micro-steps in the scalars reduction; unequal counts skip the
    # update and set ``found_inf`` (``step_checks.py``).
    check_counts: bool = False


@dataclass
class OptimizerBuffers:
    """The optimizer state the step phase and the host optimizer update in place; under
    partial offload the master and moments are ``SplitFlat`` (a device and a host part)."""

    master: torch.Tensor | SplitFlat
    exp_avg: torch.Tensor | SplitFlat
    exp_avg_sq: torch.Tensor | SplitFlat
    step: torch.Tensor
    # An update decided but not applied yet (optimizer offload at stage 3; see pending.py).
    pending: PendingUpdate = field(default_factory=PendingUpdate.empty)


@dataclass
class StepResult:
    loss: torch.Tensor | None = None
    grad_norm: torch.Tensor | None = None  # of the unscaled, averaged gradient
    found_inf: torch.Tensor | None = None  # 1.0 when a gradient on some rank was not finite
    counts: torch.Tensor | None = None  # with check_counts: every rank's micro-steps, by rank


class StepPhase:
    def __init__(
        self,
        layout: FlatLayout,
        workspace: Workspace,
        comm: Communicator,
        optimizer: OptimizerBuffers,
        decay_ranges: tuple[tuple[int, int, float], ...],
        norm_order: tuple[tuple[int, int, tuple[int, ...]], ...],
        landings: GradientLandings | None = None,
    ):
        self.layout = layout
        self.landings = landings or GradientLandings(layout, workspace)
        # Streamed gradients: per unit landed so far in this step, the squared norm of its
        # latest landing (with accumulation, of its sum so far), in the order of the latest.
        self.unit_squares: dict[int, torch.Tensor] = {}
        self.workspace = workspace
        self.comm = comm
        self.optimizer = optimizer
        # Trainable parameters in model order as (unit, offset, shape): the order
        # deterministic mode sums squared norms in.
        self.norm_order = norm_order
        self._decay = WeightDecaySegments.from_ranges(decay_ranges, layout.optimizer_numel)
        # Per OptimizerStep.units (() for every unit): its runs and their weight decay.
        self._runs: dict[tuple[int, ...], list] = {}
        self.loss_sum: torch.Tensor | None = None
        self.micro_batches = 0
        self.ran = 0  # micro-steps this rank really ran in the step
        self.hyper: Hyper | None = None
        self._rank_basis: torch.Tensor | None = None  # one-hot of this rank, for the counts
        self.result = StepResult()

    def add_loss(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss

    def begin(self, micro_batches: int, hyper: Hyper, ran: int = 0) -> None:
        self.micro_batches, self.hyper, self.result = micro_batches, hyper, StepResult()
        self.ran = ran or micro_batches

    def _counts_one_hot(self, device: torch.device) -> torch.Tensor:
        """This rank's count of micro-steps at its own index, zeros elsewhere: summed over
        ranks, every rank's count (exact in fp32)."""
        if self._rank_basis is None or self._rank_basis.device != device:
            basis = torch.zeros(self.comm.world_size, dtype=torch.float32, device=device)
            basis[self.comm.rank] = 1.0
            self._rank_basis = basis
        return self._rank_basis * self.ran

    def finish(self) -> StepResult:
        self.loss_sum = None
        return self.result

    def abort(self) -> None:
        """A failed micro-batch: drop what the step accumulated."""
        self.loss_sum = None
        self.unit_squares = {}

    def _mean_loss(self, device: torch.device) -> torch.Tensor:
        if self.loss_sum is None:
            return torch.zeros((), device=device)
        return self.loss_sum / self.micro_batches

    # -- handlers ---------------------------------------------------------------------------

    def accumulate_grad_norm(self, op: O.AccumulateGradNorm) -> None:
        """Record unit ``op.unit``'s squared norm where it landed. A later landing of the unit
        in the step (accumulation) replaces it and moves it last, so the sum reads each unit's
        whole gradient once, in the order of the units' last landings: the schedule's order,
        so every run adds the same values in the same order."""
        grad = self.landings.target(op.unit)
        self.unit_squares.pop(op.unit, None)
        self.unit_squares[op.unit] = torch.linalg.vector_norm(grad, dtype=torch.float32).square()

    def reduce_scalars(self, op: O.ReduceScalars) -> None:
        grad = self.workspace.grad_shard
        if op.summed_per_unit:  # streamed gradients: no whole shard to read
            squares = None
            for unit_squares in self.unit_squares.values():
                squares = unit_squares if squares is None else squares + unit_squares
            if squares is None:
                squares = torch.zeros((), dtype=torch.float32, device=grad.device)
            self.unit_squares = {}
        else:
            # vector_norm reduces without materialising a squared copy of the shard.
            squares = torch.linalg.vector_norm(grad, dtype=torch.float32).square()
        if op.replicated_gradient and self.comm.rank != 0:
            squares = torch.zeros_like(squares)  # every rank holds the same gradient
        scalars = torch.stack([self._mean_loss(grad.device), squares.to(grad.device)])
        if self.hyper is not None and self.hyper.check_counts:
            scalars = torch.cat([scalars, self._counts_one_hot(grad.device)])
        self.comm.all_reduce(scalars).wait()
        self.result.loss = scalars[0] / self.comm.world_size
        self._finish_scalars(scalars[1], scalars[2:] if scalars.numel() > 2 else None)

    def reduce_scalars_in_order(self, op: O.ReduceScalarsInOrder) -> None:
        # No float sum is left to a collective: gathered values are added in a fixed order.
        world = self.comm.world_size
        device = self.workspace.device
        counted = self.hyper is not None and self.hyper.check_counts
        mine = self._mean_loss(device).float().reshape(1)
        if counted:  # each rank's count of micro-steps travels beside its loss
            mine = torch.cat([mine, torch.full((1,), float(self.ran), device=device)])
        gathered = torch.empty(world * mine.numel(), dtype=torch.float32, device=device)
        self.comm.all_gather(gathered, mine).wait()
        gathered = gathered.view(world, mine.numel())
        losses = gathered[:, 0]
        total_loss = losses[0]
        for value in losses[1:]:
            total_loss = total_loss + value
        self.result.loss = total_loss / world
        squares = torch.zeros((), dtype=torch.float32, device=device)
        for value in self._squares_in_model_order(gather=op.grad_nbytes > 0):
            squares = squares + value
        self._finish_scalars(squares, gathered[:, 1] if counted else None)

    def _squares_in_model_order(self, gather: bool) -> list[torch.Tensor]:
        """Each trainable parameter's squared norm of the reduced gradient (summed over ranks),
        in model parameter order. ``gather``: the gradient is sharded, so each unit is gathered
        in turn (this rank's part of the shard, zeros past it)."""
        ws = self.workspace
        squares: dict[tuple[int, int], torch.Tensor] = {}
        for u in self.layout.units:
            if not u.has_trainable:
                continue
            full = ws.grad_shard[u.optimizer_offset : u.optimizer_offset + u.optimizer_numel]
            if gather and self.comm.world_size > 1:
                send = torch.zeros(u.shard_numel, dtype=full.dtype, device=full.device)
                send[: u.optimizer_numel] = full
                full = torch.empty(u.padded_numel, dtype=full.dtype, device=full.device)
                self.comm.all_gather(full, send).wait()
            for slot in u.params:
                if slot.requires_grad:
                    grad = full[slot.offset : slot.offset + slot.numel].view(slot.shape)
                    value = torch.linalg.vector_norm(grad, dtype=torch.float32).square()
                    squares[(u.index, slot.offset)] = value
        return [squares[(unit, offset)] for unit, offset, _ in self.norm_order]

    def _finish_scalars(self, squares: torch.Tensor, counts: torch.Tensor | None = None) -> None:
        """The gradient norm and overflow flag from the global sum of squares of the reduced
        gradient, which is the sum over ranks (the mean is 1/world of it) times the loss scale.
        A non-finite sum means some rank's gradient held Inf or NaN. ``counts``: every rank's
        micro-steps; unequal ones raise the flag too, so that nothing is updated."""
        hyper = self.hyper
        norm = squares.sqrt() / self.comm.world_size
        if hyper is not None and hyper.loss_scale != 1.0:
            norm = norm / hyper.loss_scale  # a power of two when dynamic: exact
        self.result.grad_norm = norm
        flag = None
        if hyper is not None and hyper.check_finite:
            flag = ~torch.isfinite(squares)
        if counts is not None:
            self.result.counts = counts
            unequal = (counts != counts[0]).any()
            flag = unequal if flag is None else flag | unequal
        if flag is not None:
            self.result.found_inf = flag.float()

    def optimizer_step(self, op: O.OptimizerStep) -> None:
        state, hyper = self.optimizer, self.hyper
        assert hyper is not None, "StepPhase.begin sets the step's optimizer values"
        # Averaging over ranks and undoing the loss scale, in the one factor AdamW reads.
        average = 1.0 / (self.comm.world_size * hyper.loss_scale)
        scale = torch.full((), average, device=state.master.device)
        if hyper.max_grad_norm > 0:
            # torch.nn.utils.clip_grad_norm_'s coefficient, kept on the device (no host sync).
            coef = hyper.max_grad_norm / (self.result.grad_norm + 1e-6)
            scale = scale * torch.clamp(coef, max=1.0)
        found_inf = self.result.found_inf
        step = state.step
        if op.units:  # partial offload: ScalarsToHost counted the step, on the host
            step = step.to(scale.device)
        else:  # a skipped step leaves the step count too (on the device: no host sync)
            step.add_(1 if found_inf is None else 1 - found_inf)
        for lo, hi, param_out, decay in self._runs_of(op.units):
            adamw_step(
                state.master[lo:hi],
                self.workspace.grad_shard[lo:hi],
                state.exp_avg[lo:hi],
                state.exp_avg_sq[lo:hi],
                lr=hyper.lr,
                beta1=hyper.beta1,
                beta2=hyper.beta2,
                eps=hyper.eps,
                step=step,
                decay=decay,
                grad_scale=scale,
                found_inf=found_inf,
                param_out=param_out,
                bias_correction=hyper.bias_correction,
            )

    def _runs_of(self, units: tuple[int, ...]) -> list:
        """The kernel launches of an ``OptimizerStep`` over ``units`` (() for all), each as
        (lo, hi, param_out, weight decay), built once."""
        if units not in self._runs:
            runs = optimizer_runs(self.layout, self.workspace, frozenset(units) or None)
            self._runs[units] = [
                (lo, hi, out, WeightDecaySegments.from_ranges(self._decay.within(lo, hi), hi - lo))
                for lo, hi, out in runs
            ]
        return self._runs[units]


def optimizer_runs(layout: FlatLayout, workspace: Workspace, units: frozenset[int] | None = None):
    """Split the optimizer space into runs, one kernel launch each, whose compute-dtype
    destinations are contiguous too: one run in stages 0 and 3 unless a unit holds frozen
    parameters, one per unit in stages 1 and 2 (each unit's shard is a slice of its own buffer).
    The destination is None where nothing besides the master is kept. ``units``: only these
    (partial offload's device units); None: every unit."""
    runs: list[tuple[int, int, torch.Tensor | None]] = []
    for u in layout.units:
        if u.optimizer_numel == 0 or (units is not None and u.index not in units):
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
