"""The executor: turns each op of a Schedule into work on the flat buffers.

It is driven by triggers (``fire``), which the module hooks in ``fzero/hooks.py`` raise as the
model runs. At each trigger it runs the ops the schedule keys there, in order, and checks that
the model reached the trigger the schedule expected next: a model that runs in another order
than it was traced gets a ``ScheduleError`` instead of a wrong gather. While the first
micro-batch is traced it runs the on-demand ops of ``schedule.OnDemand`` instead.

Nothing the executor does to buffers happens outside an op, so the ops it records
(``record_ops=True``) are exactly ``schedule.ops(micro_batches)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fzero.collectives import Communicator, DoneWork, Work
from fzero.errors import ScheduleError
from fzero.kernels.adamw import WeightDecaySegments, adamw_step
from fzero.schedule import OnDemand, Schedule, Trigger
from fzero.schedule import ops as O
from fzero.state.buffers import Workspace, alloc_storage, free_storage, is_allocated
from fzero.state.layout import FlatLayout


@dataclass
class Hyper:
    """Per-step optimizer values, set by ``train_step`` before the step phase runs."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    max_grad_norm: float


@dataclass
class OptimizerBuffers:
    master: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: torch.Tensor


@dataclass
class StepResult:
    loss: torch.Tensor | None = None
    grad_norm: torch.Tensor | None = None


@dataclass(repr=False)
class Executor:
    layout: FlatLayout
    schedule: Schedule
    workspace: Workspace
    comm: Communicator
    decay_ranges: tuple[tuple[int, int, float], ...]
    record_ops: bool = False
    on_trace: Callable[[tuple[Trigger, ...]], Schedule] | None = None

    executed: list[O.Op] = field(default_factory=list)
    host_seconds: float = 0.0  # host time spent running ops, summed over steps
    steps_run: int = 0
    # With record_ops: (trigger, gathered parameter + gradient bytes allocated after its ops).
    live_log: list[tuple[Trigger, int]] = field(default_factory=list)
    _cursor: int = 0
    _tracing: OnDemand | None = None
    _trace: list[Trigger] = field(default_factory=list)
    _gathers: dict[int, tuple[Work, torch.Tensor | None]] = field(default_factory=dict)
    # unit -> (work, result buffer, whether the result adds into the gradient shard)
    _reductions: dict[int, tuple[Work, torch.Tensor, bool]] = field(default_factory=dict)
    _loss_sum: torch.Tensor | None = None
    optimizer: OptimizerBuffers | None = None
    hyper: Hyper | None = None
    result: StepResult = field(default_factory=StepResult)

    # -- triggers -------------------------------------------------------------------------------

    def begin_micro_step(self) -> None:
        self._cursor = 0
        if not self.schedule.traced and self.on_trace is not None:
            self._tracing = OnDemand(
                self.schedule.units, self.schedule.stage, self.grad_shard_nbytes
            )
            self._trace = []

    def fire(self, trigger: Trigger) -> None:
        if self._tracing is not None:
            self._trace.append(trigger)
            self._run(self._tracing.ops(trigger))
            self._log_live(trigger)
            return
        entries = self.schedule.micro_step
        if self._cursor >= len(entries) or entries[self._cursor].trigger != trigger:
            expected = entries[self._cursor].trigger if self._cursor < len(entries) else "nothing"
            raise ScheduleError(
                f"the model reached {trigger} where the schedule expects {expected} (entry "
                f"{self._cursor}): its execution order differs from the traced one. fzero needs "
                "the same unit order every micro-batch."
            )
        self._cursor += 1
        self._run(entries[self._cursor - 1].ops)
        self._log_live(trigger)

    def end_micro_step(self) -> None:
        if self._tracing is not None:
            self._tracing = None
            assert self.on_trace is not None
            self.schedule = self.on_trace(tuple(self._trace))
            return
        if self._cursor != len(self.schedule.micro_step):
            missing = self.schedule.micro_step[self._cursor].trigger
            raise ScheduleError(f"the micro-batch ended before the schedule's {missing}")

    def add_loss(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss

    def run_step(self, micro_batches: int) -> StepResult:
        self.result = StepResult()
        self._micro_batches = micro_batches
        for entry in self.schedule.step:
            self._run(entry.ops)
        self._loss_sum = None
        self.steps_run += 1
        return self.result

    def _log_live(self, trigger: Trigger) -> None:
        if self.record_ops:
            self.live_log.append((trigger, self.measured_live_nbytes()))

    def measured_live_nbytes(self) -> int:
        """Bytes of gathered (stage 3) parameter and transient (stage 2, 3) gradient buffers
        allocated now: what the schedule's ``live_nbytes`` accounts for."""
        stage = self.schedule.stage
        flats = list(self.workspace.param_flats) if stage == 3 else []
        flats += [g for g in self.workspace.grad_flats if g is not None] if stage >= 2 else []
        return sum(f.untyped_storage().size() for f in flats)

    # -- ops ------------------------------------------------------------------------------------

    def _run(self, ops: tuple[O.Op, ...]) -> None:
        start = time.perf_counter()
        for op in ops:
            if self.record_ops:
                self.executed.append(op)
            getattr(self, f"_op_{type(op).__name__}")(op)
        self.host_seconds += time.perf_counter() - start

    def _op_AllGather(self, op: O.AllGather) -> None:
        self._gathers[op.unit] = self.gather(op.unit)

    def gather(self, unit: int) -> tuple[Work, torch.Tensor | None]:
        """Fill unit ``unit``'s full buffer from every rank's shard; returns the work and the
        send buffer, which must live until the work is waited on."""
        flat = self.workspace.param_flats[unit]
        alloc_storage(flat)
        if self.comm.world_size == 1:  # the shard is the whole unit: write it, cast included
            self.workspace.write_shard(unit, flat)
            return DoneWork(), None
        source = self.workspace.gather_source(unit)
        return self.comm.all_gather(flat, source), source

    def _op_WaitGather(self, op: O.WaitGather) -> None:
        pending = self._gathers.pop(op.unit, None)
        if pending is None:
            raise ScheduleError(
                f"WaitGather for unit {op.unit} ({op.name!r}) with no gather issued"
            )
        pending[0].wait()

    def _op_Release(self, op: O.Release) -> None:
        free_storage(self.workspace.param_flats[op.unit])

    def _op_ZeroGrad(self, op: O.ZeroGrad) -> None:
        grad = self.workspace.grad_flats[op.unit]
        alloc_storage(grad)
        grad.zero_()

    def _reduce_input(self, unit: int) -> torch.Tensor:
        grad = self.workspace.grad_flats[unit]
        dtype = self.reduce_dtype
        return grad if grad.dtype == dtype else grad.to(dtype)

    def _op_ReduceScatter(self, op: O.ReduceScatter) -> None:
        if self.comm.world_size == 1:
            # One rank: the sum is the gradient itself; WaitReduce adds it into the shard in
            # one pass (casting on the fly) instead of a cast, a copy and an add.
            grad = self.workspace.grad_flats[op.unit]
            self._reductions[op.unit] = (DoneWork(), grad, True)
            return
        full = self._reduce_input(op.unit)
        out = torch.empty(
            self.layout.units[op.unit].shard_numel, dtype=full.dtype, device=full.device
        )
        self._reductions[op.unit] = (self.comm.reduce_scatter(out, full), out, True)

    def _op_AllReduce(self, op: O.AllReduce) -> None:
        full = self._reduce_input(op.unit)
        self._reductions[op.unit] = (self.comm.all_reduce(full), full, False)

    def _op_WaitReduce(self, op: O.WaitReduce) -> None:
        work, out, accumulate = self._reductions.pop(op.unit)
        work.wait()
        u = self.layout.units[op.unit]
        target = self.workspace.grad_shard[
            u.optimizer_offset : u.optimizer_offset + u.optimizer_numel
        ]
        source = out[: u.optimizer_numel]
        if accumulate:
            target.add_(source)
        elif source.data_ptr() != target.data_ptr():  # stage 0 may reduce the shard in place
            target.copy_(source)
        if op.frees_nbytes:
            free_storage(self.workspace.grad_flats[op.unit])

    def _op_ZeroGradShard(self, op: O.ZeroGradShard) -> None:
        # Materialise the shard as zeros, unless it already holds this step's gradients
        # (a later micro-batch, or the step phase after reductions).
        if not is_allocated(self.workspace.grad_shard):
            alloc_storage(self.workspace.grad_shard)
            self.workspace.grad_shard.zero_()

    def _op_FreeGradShard(self, op: O.FreeGradShard) -> None:
        free_storage(self.workspace.grad_shard)

    def _op_ReduceScalars(self, op: O.ReduceScalars) -> None:
        grad = self.workspace.grad_shard
        device = grad.device
        # vector_norm reduces without materialising a squared copy of the shard.
        squares = torch.linalg.vector_norm(grad, dtype=torch.float32).square()
        if self.layout.shard_world == 1 and self.comm.rank != 0:
            squares = torch.zeros_like(squares)  # stage 0: every rank holds the same gradient
        loss = self._loss_sum / self._micro_batches if self._loss_sum is not None else None
        scalars = torch.stack(
            [loss if loss is not None else torch.zeros((), device=device), squares.to(device)]
        )
        self.comm.all_reduce(scalars).wait()
        world = self.comm.world_size
        self.result.loss = scalars[0] / world
        # The gradient shard holds the sum over ranks; the mean is 1/world of it.
        self.result.grad_norm = scalars[1].sqrt() / world

    def _op_OptimizerStep(self, op: O.OptimizerStep) -> None:
        state, hyper = self.optimizer, self.hyper
        assert state is not None and hyper is not None
        scale = torch.full((), 1.0 / self.comm.world_size, device=state.master.device)
        if hyper.max_grad_norm > 0:
            # torch.nn.utils.clip_grad_norm_'s coefficient, kept on the device (no host sync).
            coef = hyper.max_grad_norm / (self.result.grad_norm + 1e-6)
            scale = scale * torch.clamp(coef, max=1.0)
        state.step.add_(1)
        for (lo, hi, param_out), decay in zip(self.optimizer_runs, self.decay_runs):
            adamw_step(
                state.master[lo:hi],
                self.workspace.grad_shard[lo:hi],
                state.exp_avg[lo:hi],
                state.exp_avg_sq[lo:hi],
                lr=hyper.lr,
                beta1=hyper.beta1,
                beta2=hyper.beta2,
                eps=hyper.eps,
                step=state.step,
                decay=decay,
                grad_scale=scale,
                param_out=param_out,
            )

    # -- set-up ---------------------------------------------------------------------------------

    @property
    def grad_shard_nbytes(self) -> int:
        shard = self.workspace.grad_shard
        return shard.numel() * shard.element_size()

    @property
    def reduce_dtype(self) -> torch.dtype:
        return self._reduce_dtype

    def configure(self, reduce_dtype: torch.dtype) -> None:
        self._reduce_dtype = reduce_dtype
        self.optimizer_runs = optimizer_runs(self.layout, self.workspace)
        self.decay_runs = [
            WeightDecaySegments.from_ranges(
                [
                    (max(a, lo) - lo, min(b, hi) - lo, d)
                    for a, b, d in self.decay_ranges
                    if a < hi and b > lo
                ],
                hi - lo,
            )
            for lo, hi, _ in self.optimizer_runs
        ]

    def abort(self) -> None:
        """Return to the between-steps state after a failed micro-batch: wait for collectives
        in flight, release stage-3 parameters, clear partial gradients. Parameters, master
        weights and moments are untouched, so the state given to ``train_step`` stays valid."""
        for work, _ in self._gathers.values():
            work.wait()
        for work, _, _ in self._reductions.values():
            work.wait()
        self._gathers.clear()
        self._reductions.clear()
        self._tracing = None
        self._loss_sum = None
        ws = self.workspace
        if self.schedule.stage == 3:
            for flat in ws.param_flats:
                free_storage(flat)
        for grad in ws.grad_flats:
            if grad is not None and self.schedule.stage >= 2:
                free_storage(grad)
            elif grad is not None:
                grad.zero_()
        if self.schedule.stage == 0:
            ws.grad_shard.zero_()
        else:
            free_storage(ws.grad_shard)


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
