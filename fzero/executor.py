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
from typing import Any

import torch

from fzero.collectives import Communicator, DoneWork, Work
from fzero.errors import ScheduleError
from fzero.kernels.adamw import WeightDecaySegments, adamw_step
from fzero.schedule import OnDemand, Schedule, Trigger
from fzero.schedule import ops as O
from fzero.state.buffers import Workspace, alloc_storage, free_storage, is_allocated
from fzero.state.layout import FlatLayout
from fzero.timeline import MeasuredTimeline


@dataclass
class Hyper:
    """Per-step optimizer values, set by ``train_step`` before the step phase runs.

    ``loss_scale``: what the loss was multiplied by (fp16); gradients are divided by it.
    ``check_finite``: whether a non-finite gradient skips the update (``found_inf``)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    max_grad_norm: float
    loss_scale: float = 1.0
    check_finite: bool = False


@dataclass
class OptimizerBuffers:
    master: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: torch.Tensor


@dataclass
class StepResult:
    loss: torch.Tensor | None = None
    grad_norm: torch.Tensor | None = None  # of the unscaled, averaged gradient
    found_inf: torch.Tensor | None = None  # 1.0 when a gradient on some rank was not finite


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
    timeline: MeasuredTimeline | None = None  # when set: device times of triggers and gathers
    _gather_stream: Any = None
    steps_run: int = 0
    # With record_ops: (trigger, gathered parameter bytes, gradient bytes) after its ops.
    live_log: list[tuple[Trigger, int, int]] = field(default_factory=list)
    _cursor: int = 0
    _tracing: OnDemand | None = None
    _trace: list[Trigger] = field(default_factory=list)
    _gathers: dict[int, tuple[Work, torch.Tensor | None]] = field(default_factory=dict)
    # unit -> (work, result buffer, how it lands in the gradient shard: "add", "copy" or
    # "fold", every rank's piece added in rank order)
    _reductions: dict[int, tuple[Work, torch.Tensor, str]] = field(default_factory=dict)
    _entries: tuple = ()  # the micro-step entries this micro-batch runs
    # Trainable parameters in model order as (unit, offset, shape): the order deterministic
    # mode sums squared norms in.
    norm_order: tuple[tuple[int, int, tuple[int, ...]], ...] = ()
    _loss_sum: torch.Tensor | None = None
    _sending: dict[int, torch.Tensor] = field(default_factory=dict)  # reduce inputs in flight
    _shard_written: set[int] = field(default_factory=set)  # units written into the shard
    _in_step_phase: bool = False
    unit_params: list[list[torch.nn.Parameter]] = field(default_factory=list)
    optimizer: OptimizerBuffers | None = None
    hyper: Hyper | None = None
    result: StepResult = field(default_factory=StepResult)

    # -- triggers -------------------------------------------------------------------------------

    def begin_micro_step(self, last: bool = True) -> None:
        """Start a micro-batch; ``last``: the step's last, which may run other ops."""
        self._cursor = 0
        self._entries = self.schedule.micro_entries(last)
        if not self.schedule.traced and self.on_trace is not None:
            # A traced micro-batch reduces its gradients (in order, in deterministic mode)
            # whether it is the last or not: the sum comes out the same.
            ordered = self.schedule.gradient_reduction == "ordered"
            self._tracing = OnDemand(
                self.schedule.units,
                self.schedule.stage,
                self.grad_shard_nbytes,
                reduction="ordered" if ordered else "",
            )
            self._trace = []

    def fire(self, trigger: Trigger) -> None:
        if self._tracing is not None:
            self._trace.append(trigger)
            self._run(self._tracing.ops(trigger))
            self._log_live(trigger)
            return
        entries = self._entries
        if self._cursor >= len(entries) or entries[self._cursor].trigger != trigger:
            expected = entries[self._cursor].trigger if self._cursor < len(entries) else "nothing"
            raise ScheduleError(
                f"the model reached {trigger} where the schedule expects {expected} (entry "
                f"{self._cursor}): its execution order differs from the traced one. fzero needs "
                "the same unit order every micro-batch."
            )
        self._cursor += 1
        self._run(entries[self._cursor - 1].ops)
        if self.timeline is not None:
            self.timeline.mark(str(trigger))
        self._log_live(trigger)

    def end_micro_step(self) -> None:
        if self._tracing is not None:
            self._tracing = None
            assert self.on_trace is not None
            self.schedule = self.on_trace(tuple(self._trace))
            return
        if self._cursor != len(self._entries):
            missing = self._entries[self._cursor].trigger
            raise ScheduleError(f"the micro-batch ended before the schedule's {missing}")

    def add_loss(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss

    def run_step(self, micro_batches: int) -> StepResult:
        self.result = StepResult()
        self._micro_batches = micro_batches
        self._in_step_phase = True
        if self.timeline is not None:
            self.timeline.mark("step")
        try:
            for entry in self.schedule.step:
                self._run(entry.ops)
        finally:
            self._in_step_phase = False
        if self.timeline is not None:
            self.timeline.mark("step_end")
        self._loss_sum = None
        self.steps_run += 1
        return self.result

    def _log_live(self, trigger: Trigger) -> None:
        if self.record_ops:
            self.live_log.append(
                (trigger, self.measured_param_nbytes(), self.measured_grad_nbytes())
            )

    def measured_live_nbytes(self) -> int:
        """Bytes of gathered (stage 3) parameters and of transient (stage 2, 3) gradients alive
        now: parameter gradients autograd produced and reduce buffers in flight. The schedule's
        ``live_nbytes`` bounds it (gradients appear during a unit's backward)."""
        return self.measured_param_nbytes() + self.measured_grad_nbytes()

    def measured_param_nbytes(self) -> int:
        if self.schedule.stage != 3:
            return 0
        return sum(f.untyped_storage().size() for f in self.workspace.param_flats)

    def measured_grad_nbytes(self) -> int:
        if self.schedule.stage < 2:
            return 0
        grads = [p.grad for params in self.unit_params for p in params if p.grad is not None]
        grads += list(self._sending.values())
        return sum(g.numel() * g.element_size() for g in grads)

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
            if flat.is_cuda:
                return self._copy_on_gather_stream(unit, flat), None
            self.workspace.write_shard(unit, flat)
            return DoneWork(), None
        source = self.workspace.gather_source(unit)
        return self.comm.all_gather(flat, source), source

    def _copy_on_gather_stream(self, unit: int, flat: torch.Tensor) -> Work:
        """One rank on CUDA: the gather is a cast-and-copy, run on a stream of its own so that
        a prefetched unit's copy overlaps the compute before it. The side stream waits for the
        compute stream (the master may just have been updated); WaitGather makes the compute
        stream wait for the copy, and the buffer is only released after that wait."""
        if self._gather_stream is None:
            self._gather_stream = torch.cuda.Stream(device=flat.device)
        stream = self._gather_stream
        stream.wait_stream(torch.cuda.current_stream(flat.device))
        start = self.timeline.begin(stream) if self.timeline is not None else None
        with torch.cuda.stream(stream):
            self.workspace.write_shard(unit, flat)
        if self.timeline is not None:
            self.timeline.end("gather", f"gather {unit}", start, stream)
        return StreamWork(stream)

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
        if self.schedule.stage >= 2:
            # Stages 2 and 3: autograd hands each parameter a fresh gradient (no zeroed buffer
            # to add into); ReduceScatter packs them and lets them go.
            for param in self._trainable(op.unit):
                param.grad = None
            return
        grad = self.workspace.grad_flats[op.unit]
        alloc_storage(grad)
        grad.zero_()

    def _op_AllocGrad(self, op: O.AllocGrad) -> None:
        # Stages 2 and 3: autograd creates each gradient at the unit's first backward of the
        # step and adds later micro-batches into it; nothing to do until the reduction.
        grad = self.workspace.grad_flats[op.unit]
        if grad is not None and not is_allocated(grad):
            alloc_storage(grad)
            grad.zero_()

    def _trainable(self, unit: int) -> list[torch.nn.Parameter]:
        return [p for p in self.unit_params[unit] if p.requires_grad]

    def _reduce_input(self, unit: int) -> torch.Tensor:
        grad = self.workspace.grad_flats[unit]
        dtype = self.reduce_dtype
        return grad if grad.dtype == dtype else grad.to(dtype)

    def _packed_gradients(self, unit: int, out: torch.Tensor) -> None:
        """Write unit ``unit``'s parameter gradients into ``out`` (its flat layout, any dtype:
        the copy casts) and let them go; gradients that were never produced, frozen parameters
        and padding read as zeros."""
        layout_unit = self.layout.units[unit]
        targets, grads = [], []
        covered = 0
        for slot, param in zip(layout_unit.params, self.unit_params[unit]):
            view = out[slot.offset : slot.offset + slot.numel]
            if param.requires_grad and param.grad is not None:
                targets.append(view)
                grads.append(param.grad.reshape(-1))
                covered += slot.numel
            else:
                view.zero_()
            param.grad = None
        out[layout_unit.numel :].zero_()
        if targets:
            torch._foreach_copy_(targets, grads)

    def _op_ReduceScatter(self, op: O.ReduceScatter) -> None:
        u = self.layout.units[op.unit]
        if self.schedule.stage == 1:  # full gradients persist in the unit buffers
            full = self._reduce_input(op.unit)
        elif self.comm.world_size == 1:
            # One rank: the sum is the gradient itself. It goes straight into the shard, one
            # pass per parameter with the cast folded in, and no buffer between.
            self._write_gradients_into_shard(op.unit)
            self._reductions[op.unit] = (DoneWork(), None, "done")
            return
        else:
            full = torch.empty(
                u.padded_numel, dtype=self.reduce_dtype, device=self.workspace.master.device
            )
            self._packed_gradients(op.unit, full)
        out = torch.empty(u.shard_numel, dtype=full.dtype, device=full.device)
        # ``full`` must live until the reduction is waited on.
        self._reductions[op.unit] = (self.comm.reduce_scatter(out, full), out, "add")
        self._sending[op.unit] = full

    def _op_AllReduce(self, op: O.AllReduce) -> None:
        full = self._reduce_input(op.unit)
        self._reductions[op.unit] = (self.comm.all_reduce(full), full, "copy")

    def _op_ReduceInOrder(self, op: O.ReduceInOrder) -> None:
        u = self.layout.units[op.unit]
        if self.schedule.stage < 2:  # full gradients persist in the unit buffers
            full = self._reduce_input(op.unit)
        else:
            full = torch.empty(
                u.padded_numel, dtype=self.reduce_dtype, device=self.workspace.master.device
            )
            self._packed_gradients(op.unit, full)
        # Cast to the reduce dtype even on one rank: the sum must not depend on the world size.
        world = self.comm.world_size
        if world == 1:
            self._reductions[op.unit] = (DoneWork(), full, "fold")
            return
        if op.whole_unit:  # stage 0 owns whole units: it receives every rank's whole gradient
            out = torch.empty(world * full.numel(), dtype=full.dtype, device=full.device)
            work = self.comm.all_gather(out, full)
        else:
            out = torch.empty_like(full)
            work = self.comm.all_to_all(out, full)
        self._reductions[op.unit] = (work, out, "fold")
        self._sending[op.unit] = full

    def _write_gradients_into_shard(self, unit: int) -> None:
        """World size 1 (the shard is the whole unit): write or add each parameter's gradient
        into its place in the gradient shard and let it go."""
        u = self.layout.units[unit]
        shard = self.workspace.grad_shard[
            u.optimizer_offset : u.optimizer_offset + u.optimizer_numel
        ]
        first = unit not in self._shard_written
        targets, grads = [], []
        for slot, param in zip(u.params, self.unit_params[unit]):
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

    def _op_WaitReduce(self, op: O.WaitReduce) -> None:
        work, out, how = self._reductions.pop(op.unit)
        work.wait()
        self._sending.pop(op.unit, None)
        if how == "done":  # already in the shard
            self._shard_written.add(op.unit)
            return
        u = self.layout.units[op.unit]
        target = self.workspace.grad_shard[
            u.optimizer_offset : u.optimizer_offset + u.optimizer_numel
        ]
        source = out[: u.optimizer_numel]
        if how == "fold":
            # Every rank's piece of this unit, added in rank order.
            pieces = out.view(self.comm.world_size, -1)[:, : u.optimizer_numel]
            first = op.unit not in self._shard_written
            for rank, piece in enumerate(pieces):
                if first and rank == 0:  # the shard was not zeroed: the first piece is copied
                    target.copy_(piece)
                else:
                    target.add_(piece)
        elif how == "add" and op.unit in self._shard_written:
            target.add_(source)
        elif source.data_ptr() != target.data_ptr():  # stage 0 may reduce the shard in place
            # The first reduction of a step writes instead of adding: the shard was never
            # zeroed (ZeroGradShard zeroes only what no reduction wrote, before it is read).
            target.copy_(source)
        self._shard_written.add(op.unit)

    def _op_ZeroGradShard(self, op: O.ZeroGradShard) -> None:
        # Materialise the shard; the reductions of this step write their units' slices. Once
        # alive (a later micro-batch, or the step phase), it only zeroes the slices of units
        # no reduction wrote this step, so the optimizer never reads stale memory.
        shard = self.workspace.grad_shard
        if not is_allocated(shard):
            alloc_storage(shard)
            self._shard_written = set()
            if self._in_step_phase:
                shard.zero_()
            return
        if self._in_step_phase:
            for u in self.layout.units:
                if u.optimizer_numel and u.index not in self._shard_written:
                    shard[u.optimizer_offset : u.optimizer_offset + u.optimizer_numel].zero_()
                    self._shard_written.add(u.index)

    def _op_FreeGradShard(self, op: O.FreeGradShard) -> None:
        free_storage(self.workspace.grad_shard)
        self._shard_written = set()

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
        self._finish_scalars(scalars[1])

    def _op_ReduceScalarsInOrder(self, op: O.ReduceScalarsInOrder) -> None:
        # No float sum is left to a collective: gathered values are added in a fixed order.
        world = self.comm.world_size
        device = self.workspace.master.device
        loss = self._loss_sum / self._micro_batches if self._loss_sum is not None else None
        loss = loss if loss is not None else torch.zeros((), device=device)
        losses = torch.empty(world, dtype=torch.float32, device=device)
        self.comm.all_gather(losses, loss.float().reshape(1)).wait()
        total_loss = losses[0]
        for value in losses[1:]:
            total_loss = total_loss + value
        self.result.loss = total_loss / world
        squares = torch.zeros((), dtype=torch.float32, device=device)
        for value in self._squares_in_model_order():
            squares = squares + value
        self._finish_scalars(squares)

    def _squares_in_model_order(self) -> list[torch.Tensor]:
        """Each trainable parameter's squared norm of the reduced gradient (summed over ranks),
        in model parameter order. Units are gathered one at a time: this rank's part of the
        gradient shard, zeros past it."""
        ws, layout = self.workspace, self.layout
        squares: dict[tuple[int, int], torch.Tensor] = {}
        for u in layout.units:
            if not u.has_trainable:
                continue
            full = ws.grad_shard[u.optimizer_offset : u.optimizer_offset + u.optimizer_numel]
            if layout.shard_world > 1:
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

    def _finish_scalars(self, squares: torch.Tensor) -> None:
        """The gradient norm and overflow flag from the global sum of squares of the reduced
        gradient, which is the sum over ranks (the mean is 1/world of it) times the loss scale.
        A non-finite sum means some rank's gradient held Inf or NaN."""
        hyper = self.hyper
        norm = squares.sqrt() / self.comm.world_size
        if hyper is not None and hyper.loss_scale != 1.0:
            norm = norm / hyper.loss_scale  # a power of two when dynamic: exact
        self.result.grad_norm = norm
        if hyper is not None and hyper.check_finite:
            self.result.found_inf = (~torch.isfinite(squares)).float()

    def _op_OptimizerStep(self, op: O.OptimizerStep) -> None:
        state, hyper = self.optimizer, self.hyper
        assert state is not None and hyper is not None
        # Averaging over ranks and undoing the loss scale, in the one factor AdamW reads.
        average = 1.0 / (self.comm.world_size * hyper.loss_scale)
        scale = torch.full((), average, device=state.master.device)
        if hyper.max_grad_norm > 0:
            # torch.nn.utils.clip_grad_norm_'s coefficient, kept on the device (no host sync).
            coef = hyper.max_grad_norm / (self.result.grad_norm + 1e-6)
            scale = scale * torch.clamp(coef, max=1.0)
        found_inf = self.result.found_inf
        # A skipped step leaves the step count too (on the device: no host sync).
        state.step.add_(1 if found_inf is None else 1 - found_inf)
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
                found_inf=found_inf,
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
        if self.schedule.stage == 3:  # persistent units stay gathered, as between steps
            kept = {u.index for u in self.schedule.units if u.persistent}
            for index, flat in enumerate(ws.param_flats):
                if index not in kept:
                    free_storage(flat)
        self._sending.clear()
        for unit, grad in enumerate(ws.grad_flats):
            if self.schedule.stage >= 2:
                for param in self._trainable(unit):
                    param.grad = None
            elif grad is not None:
                grad.zero_()
        if self.schedule.stage == 0 and self.schedule.gradient_reduction == "step":
            ws.grad_shard.zero_()  # stage 0's all-reduced gradient persists across steps
        else:
            free_storage(ws.grad_shard)
            self._shard_written = set()


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


class StreamWork:
    """Work queued on a CUDA stream: waiting makes the current stream wait for it."""

    def __init__(self, stream: Any):
        self.event = torch.cuda.Event()
        self.event.record(stream)

    def wait(self) -> None:
        torch.cuda.current_stream().wait_event(self.event)
