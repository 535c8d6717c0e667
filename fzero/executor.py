"""The executor: turns each op of a Schedule into work on the flat buffers.

It is driven by triggers (``fire``), which the module hooks in ``fzero/hooks.py`` raise as the
model runs. At each trigger it runs the ops the schedule keys there, in order, and checks that
the model reached the trigger the schedule expected next: a model that runs in another order
than it was traced gets a ``ScheduleError`` instead of a wrong gather. While the first
micro-batch is traced it runs the on-demand ops of ``schedule.OnDemand`` instead.

Nothing the executor does to buffers happens outside an op, so the ops it records
(``record_ops=True``) are exactly ``schedule.ops(micro_batches)``. Gathers and releases are
here; gradient reductions in ``fzero/reductions.py``; the step phase's scalars and AdamW in
``fzero/optimizer_phase.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fzero import optimizer_phase, reductions
from fzero.collectives import Communicator, DoneWork, Work
from fzero.errors import ScheduleError
from fzero.kernels.adamw import WeightDecaySegments
from fzero.schedule import OnDemand, Schedule, Trigger
from fzero.schedule import ops as O
from fzero.state.buffers import Workspace, alloc_storage, free_storage, is_allocated
from fzero.state.layout import FlatLayout
from fzero.timeline import MeasuredTimeline


@dataclass
class Hyper:
    """Per-step optimizer values, set by ``train_step`` before the step phase runs.

    ``loss_scale``: what the loss was multiplied by (fp16); gradients are divided by it.
    ``check_finite``: whether a non-finite gradient skips the update (``found_inf``).
    ``bias_correction``: Adam's ``1 - beta**step`` divisors (``optimizer.params``)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    max_grad_norm: float
    loss_scale: float = 1.0
    check_finite: bool = False
    bias_correction: bool = True


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
    # Host time inside ops, summed over steps: wall time, and the calling threads' CPU time.
    # Both include kernel launches and any wait for a full launch queue (a GPU-bound step
    # fills it); CPU time leaves out time the thread was descheduled.
    host_seconds: float = 0.0
    host_cpu_seconds: float = 0.0
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
        start, start_cpu = time.perf_counter(), time.thread_time()
        for op in ops:
            if self.record_ops:
                self.executed.append(op)
            getattr(self, f"_op_{type(op).__name__}")(op)
        self.host_seconds += time.perf_counter() - start
        self.host_cpu_seconds += time.thread_time() - start_cpu

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

    # The reduction and step-phase ops live in their own modules (one concept per file).
    _reduce_input = reductions.reduce_input
    _packed_gradients = reductions.packed_gradients
    _op_ReduceScatter = reductions.op_ReduceScatter
    _op_AllReduce = reductions.op_AllReduce
    _op_ReduceInOrder = reductions.op_ReduceInOrder
    _write_gradients_into_shard = reductions.write_gradients_into_shard
    _op_WaitReduce = reductions.op_WaitReduce
    _op_ZeroGradShard = reductions.op_ZeroGradShard
    _op_FreeGradShard = reductions.op_FreeGradShard
    _op_ReduceScalars = optimizer_phase.op_ReduceScalars
    _op_ReduceScalarsInOrder = optimizer_phase.op_ReduceScalarsInOrder
    _squares_in_model_order = optimizer_phase.squares_in_model_order
    _finish_scalars = optimizer_phase.finish_scalars
    _op_OptimizerStep = optimizer_phase.op_OptimizerStep

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
        self.optimizer_runs = optimizer_phase.optimizer_runs(self.layout, self.workspace)
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


class StreamWork:
    """Work queued on a CUDA stream: waiting makes the current stream wait for it."""

    def __init__(self, stream: Any):
        self.event = torch.cuda.Event()
        self.event.record(stream)

    def wait(self) -> None:
        torch.cuda.current_stream().wait_event(self.event)
