"""The executor: runs the ops a Schedule keys to each trigger, through one table of handlers.

It is driven by triggers (``fire``), which the module hooks in ``hooks.py`` raise as the model
runs. At each trigger it runs the ops the schedule keys there, in order, and checks that the
model reached the trigger the schedule expected next: a model that runs in another order than
it was traced gets a ``ScheduleError`` instead of a wrong gather. While the first micro-batch is
traced it runs the on-demand ops of ``schedule.OnDemand`` for the triggers as they come (the
ops ``print(state.schedule)`` shows before the first step, when the model runs in module
order), and ``end_micro_step`` hands the recorded order back so a compiled schedule can be
installed (``install``).

One table (``handlers.py``) maps each op type to the component method that runs it: gathers
(``gathers.py``), gradient reduction (``reductions.py``), the step phase (``step_phase.py``) and
the host optimizer under offload. No handler asks which ZeRO stage it is in: the compiler emits a
different op where behaviour differs. Nothing the executor does to buffers happens outside an
op, so the ops it records (``record_ops=True``) are exactly ``schedule.ops(micro_batches)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from fzero.collectives import Communicator
from fzero.errors import ScheduleError, StepTimeoutError
from fzero.runtime.failures import op_failure
from fzero.runtime.gathers import Gathers
from fzero.runtime.handlers import handler_table
from fzero.runtime.landings import GradientLandings
from fzero.runtime.position import STEP_PHASE, OpPosition
from fzero.runtime.reductions import GradientReduction
from fzero.runtime.step_phase import Hyper, OptimizerBuffers, StepPhase, StepResult
from fzero.runtime.timeline import MeasuredTimeline
from fzero.schedule import OnDemand, Schedule, Trigger
from fzero.schedule import ops as O
from fzero.state.buffers import Workspace
from fzero.state.layout import FlatLayout


@dataclass(frozen=True)
class ExecutorParts:
    """What an executor is built from, besides its schedule: the rank's buffers and the
    model's parameters per unit, and the step phase's fixed inputs."""

    layout: FlatLayout
    workspace: Workspace
    comm: Communicator
    optimizer: OptimizerBuffers
    unit_params: list[list[torch.nn.Parameter]]
    reduce_dtype: torch.dtype
    decay_ranges: tuple[tuple[int, int, float], ...]
    norm_order: tuple[tuple[int, int, tuple[int, ...]], ...]
    host_optimizer: Any = None  # fzero.offload.plan.HostOptimizerSettings under offload


class Executor:
    def __init__(
        self,
        schedule: Schedule,
        parts: ExecutorParts,
        *,
        record_ops: bool = False,
        timeline: MeasuredTimeline | None = None,
    ):
        self.layout, self.workspace, self.comm = parts.layout, parts.workspace, parts.comm
        self.optimizer = parts.optimizer
        self.unit_params = parts.unit_params
        self.record_ops = record_ops
        self.timeline = timeline  # when set: device times of triggers and gathers
        files = getattr(parts.host_optimizer, "files", None)  # NVMe offload's swap files
        self.gathers = Gathers(
            parts.workspace,
            parts.comm,
            timeline,
            parts.unit_params,
            shard_files=files.shards if files is not None else None,
        )
        # Where each unit's reduced gradient lands (the gradient shard or, streamed, a buffer).
        self.landings = GradientLandings(parts.layout, parts.workspace)
        self.reduction = GradientReduction(
            parts.layout,
            parts.workspace,
            parts.comm,
            parts.unit_params,
            parts.reduce_dtype,
            self.landings,
        )
        self.step_phase = StepPhase(
            parts.layout,
            parts.workspace,
            parts.comm,
            parts.optimizer,
            parts.decay_ranges,
            parts.norm_order,
            self.landings,
        )
        self.host_optimizer = None
        if parts.host_optimizer is not None:
            from fzero.offload.optimizer import HostOptimizer

            self.host_optimizer = HostOptimizer(
                parts.layout,
                parts.workspace,
                parts.optimizer,
                self.step_phase,
                parts.decay_ranges,
                pin_memory=parts.host_optimizer.pin_memory,
                compute_dtype=parts.host_optimizer.compute_dtype,
                params_on_host=parts.host_optimizer.params_on_host,
                host_offset_numel=parts.host_optimizer.host_offset_numel,
                files=files,
                landings=self.landings,
            )
        self.handlers = handler_table(
            self.gathers, self.reduction, self.step_phase, self.host_optimizer
        )
        self.executed: list[O.Op] = []
        # With record_ops: (trigger, gathered parameter bytes, gradient bytes) after its ops.
        self.live_log: list[tuple[Trigger, int, int]] = []
        # Host time inside ops, summed over steps: wall time, and the calling threads' CPU
        # time. Both include kernel launches and any wait for a full launch queue (a GPU-bound
        # step fills it); CPU time leaves out time the thread was descheduled.
        self.host_seconds = 0.0
        self.host_cpu_seconds = 0.0
        self.steps_run = 0
        self.micro_steps_run = 0  # in the step under way
        # Where the step is (read by the watchdog and on error paths; see position.py).
        self.position = OpPosition()
        self.watchdog: Any = None  # the runtime's Watchdog, when the group has a side channel
        self._cursor = 0
        self._entries: tuple[O.Entry, ...] = ()
        self._tracing: OnDemand | None = None
        self._trace: list[Trigger] = []
        self.install(schedule)

    def install(self, schedule: Schedule) -> None:
        """Run ``schedule`` from the next micro-batch on."""
        self.schedule = schedule
        ops = schedule.ops(1)
        # Units some op releases (stage 3, less the persistent ones): gathered only in use.
        self.released_units = frozenset(op.unit for op in ops if isinstance(op, O.Release))
        # Stage 0 keeps its all-reduced gradient across steps; the others free it each step.
        frees = (O.FreeGradShard, O.FreeGradBuffer)
        self.shard_persists = not any(isinstance(op, frees) for op in ops)
        # The entries of each kind of micro-batch, merged once here rather than per micro-batch.
        self._micro_entries = {
            (last, first): schedule.micro_entries(last, first=first)
            for last in (False, True)
            for first in (False, True)
        }
        if self.host_optimizer is not None:
            self.host_optimizer.install(schedule)

    # -- triggers -------------------------------------------------------------------------------

    def begin_micro_step(self, last: bool = True) -> None:
        """Start a micro-batch; ``last``: the step's last, which may run other ops."""
        self.reduction.restore_grad_views()
        self._cursor = 0
        self._entries = self._micro_entries[(last, self.micro_steps_run == 0)]
        position = self.position
        position.active, position.micro_batch, position.trigger = True, self.micro_steps_run, None
        if not self.schedule.traced:
            self.settle()  # on-demand ops apply no pending update: apply it before
            # A traced micro-batch reduces its gradients (in order, in deterministic mode)
            # whether it is the last or not: the sum comes out the same.
            ordered = self.schedule.gradient_reduction == "ordered"
            self._tracing = OnDemand(
                self.schedule.units,
                self.schedule.stage,
                self.schedule.world_size,
                self.grad_shard_nbytes,
                reduction="ordered" if ordered else "",
                streaming=self.schedule.grad_streaming,
            )
            self._trace = []

    def fire(self, trigger: Trigger) -> None:
        position = self.position
        if self._tracing is not None:
            self._trace.append(trigger)
            position.trigger, position.entry = trigger, -1
            self._run(self._tracing.ops(trigger))
            self._log_live(trigger)
            return
        entries = self._entries
        expected = entries[self._cursor].trigger if self._cursor < len(entries) else None
        # Field by field: a frozen dataclass's == builds two tuples per call.
        if expected is None or expected.unit != trigger.unit or expected.kind != trigger.kind:
            expected = expected or "nothing"
            raise ScheduleError(
                f"the model reached {trigger} where the schedule expects {expected} (entry "
                f"{self._cursor}): its execution order differs from the traced one. fzero needs "
                "the same unit order every micro-batch."
            )
        position.trigger, position.entry = trigger, self._cursor
        self._cursor += 1
        self._run(entries[self._cursor - 1].ops)
        if self.timeline is not None:
            self.timeline.mark(str(trigger))
        self._log_live(trigger)

    def end_micro_step(self) -> tuple[Trigger, ...] | None:
        """Finish a micro-batch; returns the order it ran in when it was the tracing one (the
        caller compiles a schedule for it and installs it), else None."""
        if self._tracing is not None:
            self._tracing = None
            self.micro_steps_run += 1
            return tuple(self._trace)
        if self._cursor != len(self._entries):
            missing = self._entries[self._cursor].trigger
            raise ScheduleError(f"the micro-batch ended before the schedule's {missing}")
        self.micro_steps_run += 1
        return None

    def add_loss(self, loss: torch.Tensor) -> None:
        self.step_phase.add_loss(loss)

    def run_step(self, micro_batches: int, hyper: Hyper) -> StepResult:
        self.step_phase.begin(micro_batches, hyper, ran=self.micro_steps_run)
        position = self.position
        position.active, position.micro_batch = True, STEP_PHASE
        if self.timeline is not None:
            self.timeline.mark("step")
        for index, entry in enumerate(self.schedule.step):
            position.trigger, position.entry = entry.trigger, index
            self._run(entry.ops)
        if self.timeline is not None:
            self.timeline.mark("step_end")
        if self.host_optimizer is not None:
            # A host leaf written by an asynchronous copy (the device units' parameters under
            # partial and parameter offload) holds its value when the step returns: a tree_map
            # copy of the state taken right after reads it on the host.
            self.host_optimizer.wait_copies_to_host()
        result = self.step_phase.finish()
        if self.watchdog is not None:  # NCCL: the step's host read, timed (see watchdog.py)
            try:
                self.watchdog.wait_for_device(result.found_inf, self.comm.world_size)
            except StepTimeoutError:
                position.active = False
                raise
        self.steps_run += 1
        self.micro_steps_run = 0
        position.active, position.step = False, self.steps_run
        return result

    def _run(self, ops: tuple[O.Op, ...]) -> None:
        start, start_cpu = time.perf_counter(), time.thread_time()
        handlers, position = self.handlers, self.position
        position.ops = ops
        position.runs += 1
        try:
            for op in ops:
                position.op = op
                if self.record_ops:
                    self.executed.append(op)
                handlers[type(op)](op)
        except Exception as error:
            failure = op_failure(error, self)
            position.active = False  # the step is over on this rank: nothing more to watch
            if failure is error:
                raise
            raise failure from error
        position.op = None
        self.host_seconds += time.perf_counter() - start
        self.host_cpu_seconds += time.thread_time() - start_cpu

    def gather(self, unit: int):
        """Gather one unit outside the schedule's ops (evaluation, checkpoint refresh), with the
        last step's update applied first if it is still pending."""
        self.settle()
        return self.gathers.gather(unit)

    def settle(self) -> None:
        """Apply an update still pending from the last step (``fzero/state/pending.py``)."""
        if self.host_optimizer is not None:
            self.host_optimizer.settle()

    def release(self, unit: int) -> None:
        """Release one unit gathered outside the schedule's ops."""
        self.gathers.release_unit(unit)

    # -- measuring ------------------------------------------------------------------------------

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
        """Bytes of gathered copies of sharded parameters alive now (stage 3, persistent units
        included, as the schedule counts them); 0 where the full parameters are the rank's own
        standing buffers (stages 0-2)."""
        if not self.workspace.gathers_params:
            return 0
        return sum(f.untyped_storage().size() for f in self.workspace.param_flats)

    def measured_grad_nbytes(self) -> int:
        return self.reduction.transient_grad_nbytes()

    @property
    def grad_shard_nbytes(self) -> int:
        shard = self.workspace.grad_shard
        return shard.numel() * shard.element_size()

    # -- failure --------------------------------------------------------------------------------

    def abort(self) -> None:
        """Return to the between-steps state after a failed micro-batch: wait for collectives
        in flight, release units gathered only in use, clear partial gradients. Parameters,
        master weights and moments are untouched, so the state given to ``train_step`` stays
        valid."""
        self.position.active, self.position.op = False, None
        self.micro_steps_run = 0
        self.gathers.abort()
        if self.host_optimizer is not None:
            self.host_optimizer.abort()
        self._tracing = None
        self.step_phase.abort()
        for unit in self.released_units:
            self.gathers.release_unit(unit)
        self.reduction.abort(self.shard_persists)
