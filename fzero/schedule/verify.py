"""verify: check that a schedule keeps the invariants the executor relies on.

The schedule is replayed op by op (steps of two, three and one micro-batches, so that anything
left behind by one micro-batch or one step is seen by the next, two micro-batches in a row run
``micro_step``, and a step whose only micro-batch is the last is covered; three steps of one
micro-batch for a schedule compiled for one, streamed gradients') against a small model
of what each op does to this rank's buffers. The first broken invariant raises
``ScheduleInvariantError`` naming the op's position, the unit and the rule.

Parameters: in stage 3 a unit is released, gathering (``AllGather`` issued) or ready (after
``WaitGather``), and must be ready from its pre-compute trigger to the matching post trigger.
In stages 0-2 every unit is always ready, except during the step phase's refresh gathers. An
activation-checkpoint recompute (``pre_recompute(u)``) needs the unit ready from that trigger
to its ``post_backward``: the recomputed activations its backward reads are built from it.
Gradients: each trainable unit is reduced exactly once per micro-batch (stages 2 and 3, and every
stage in deterministic mode, with ``ReduceInOrder``), once per step in the step phase (stages 0
and 1) or once per step in ``last_micro_step`` (``reduce_every_micro_batch: false``), after its
backward, and before the optimizer reads the gradient shard. The gradient shard: stage 0 keeps
it across steps (except in deterministic mode); otherwise it is held only from a step's first
reduction to its optimizer step, so it must be allocated
(``AllocGradShard``, which does nothing to a live shard) before a reduction lands in it, freed
(``FreeGradShard``) only after ``OptimizerStep`` read it, and freed before the step ends.
Streamed gradients (optimizer offload): a host unit lands in the gradient buffer, which it
holds from its ``AllocUnitGrad`` until its ``AccumulateGradNorm`` and ``CopyGradToHost`` read it
(the next unit takes it only then), ``ReduceScalars`` sums every landed unit's norm, and
``FreeGradBuffer`` frees the buffer before the step ends.

Whether all ranks run the same collectives in the same order is checked across ranks, by
comparing ``collective_signature`` (``signature.py``).

This file holds the replay (``verify``) and its state (``_Checker``: triggers and phase ends);
the rules of each kind of op are mixins of it: ``verify_parameters.py``,
``verify_gradients.py``, ``verify_streaming.py``, ``verify_offload.py``, ``verify_files.py``.

``ScheduleInvariantError.invariant`` names the rule: gather-before-use, gather-once,
wait-after-gather, release-after-gather, release-after-last-use, release-stage-3-only,
max-live-bytes, refresh-after-optimizer (stages 1, 2), zero-grad-before-backward, reduce-once,
reduce-kind, reduce-after-backward, wait-after-reduce, grad-shard, optimizer-after-reduce,
end-of-micro-step, end-of-step, file-io (NVMe offload's reads and writes), known-op (an op
verify has no rule for).
"""

from __future__ import annotations

from fzero.errors import ScheduleInvariantError
from fzero.schedule import ops as O
from fzero.schedule.schedule import Schedule
from fzero.schedule.verify_files import FileRules
from fzero.schedule.verify_gradients import GradientRules
from fzero.schedule.verify_offload import OffloadRules
from fzero.schedule.verify_parameters import GATHERING, READY, RELEASED, ParameterRules
from fzero.schedule.verify_streaming import StreamingRules


def verify(schedule: Schedule, *, max_live_nbytes: int | None = None) -> None:
    """Raise ``ScheduleInvariantError`` at the first op that breaks an invariant.

    ``max_live_nbytes`` bounds the gathered parameter bytes alive at any point in stage 3
    (below stage 3 every parameter is always gathered, so no limit applies).
    """
    checker = _Checker(schedule, max_live_nbytes)
    steps = ((1, 2), (2, 3), (3, 1))
    streaming = schedule.grad_streaming
    if streaming is not None and streaming.one_micro_batch:  # compiled for one per step
        steps = ((1, 1), (2, 1), (3, 1))
    for step, micro_batches in steps:
        for micro in range(1, micro_batches + 1):
            last = micro == micro_batches
            name = "micro_step"
            if last and schedule.last_micro_step is not None:
                name = "last_micro_step"
            for index, entry in enumerate(schedule.micro_entries(last, first=micro == 1)):
                checker.entry(f"{name}[{index}]", entry, f"step {step}, micro-batch {micro}")
            checker.end_micro_step(f"end of {name} (step {step}, micro-batch {micro})", last)
        for index, entry in enumerate(schedule.step):
            checker.entry(f"step[{index}]", entry, f"step {step}")
        checker.end_step(f"end of step (step {step})")


def _op_text(op: O.Op) -> str:
    return " ".join(str(op).split())


class _Checker(ParameterRules, GradientRules, StreamingRules, FileRules, OffloadRules):
    """The replay state: what the ops so far have done to this rank's buffers. Each ``op_X``
    method checks and applies one op of class ``X``: the parameter ops' in ``ParameterRules``,
    the gradient ops' in ``GradientRules``, offload's in ``OffloadRules``."""

    def __init__(self, schedule: Schedule, max_live_nbytes: int | None):
        stage = self.stage = schedule.stage
        self.world_size = schedule.world_size
        self.units = {u.index: u for u in schedule.units}
        self.trainable = {u.index for u in schedule.units if u.has_trainable}
        self.max_live_nbytes = max_live_nbytes
        # Never released: every unit below stage 3, the persistent ones in stage 3.
        self.kept = {i for i, u in self.units.items() if stage < 3 or u.persistent}
        self.params = {i: READY if i in self.kept else RELEASED for i in self.units}
        self.forward: set[int] = set()  # between pre_forward(u) and post_forward(u)
        self.backward: set[int] = set()  # between pre_backward(u) and post_backward(u)
        self.recomputing: set[int] = set()  # between pre_recompute(u) and post_backward(u)
        self.backward_seen: set[int] = set()  # pre_backward(u) seen in this micro-batch
        self.mode = schedule.gradient_reduction
        # Whether every micro-batch reduces its gradients (else the step or the last one does).
        self.per_micro = self.mode in ("micro_batch", "ordered")
        self.grad_alive = set(self.trainable) if stage < 2 else set()
        self.grad_dirty: set[int] = set()  # written by backward, not yet reduced
        self.grad_stale: set[int] = set()  # reduced already: must be zeroed before reuse
        self.reducing: dict[int, O.Op] = {}
        self.reduced: dict[int, str] = {}  # where, this micro-batch (stages 2, 3) or step (0, 1)
        # Stage 0 keeps its all-reduced gradient across steps; otherwise the shard is allocated
        # in each step.
        self.persistent_shard = stage == 0 and self.mode == "step"
        self.shard_alive = self.persistent_shard
        self.shard_holds: set[int] = set()  # units whose reduction landed in the gradient shard
        self.shard_consumed = False  # the optimizer read it: it may be freed
        self.scalars_done = self.optimizer_done = False
        self.init_offload(schedule)
        self.reset_offload()
        self.init_streaming(schedule)
        self.init_files(schedule)
        self.refreshed: set[int] = set()
        self.where = self.phase = ""

    def fail(self, invariant: str, unit: int, message: str) -> None:
        if unit >= 0:
            info = self.units.get(unit)
            message = f"unit {unit} ({info.name or '<root>' if info else 'unknown'}): {message}"
        raise ScheduleInvariantError(invariant, self.where, unit, message)

    # -- triggers ---------------------------------------------------------------------------

    def entry(self, position: str, entry: O.Entry, context: str) -> None:
        self.phase = "step" if position.startswith("step") else position.split("[")[0]
        trigger, unit = entry.trigger, entry.trigger.unit
        self.where = f"{position} @{trigger} ({context})"
        if trigger.kind in (O.POST_FORWARD, O.POST_BACKWARD):
            computing = self.forward if trigger.kind == O.POST_FORWARD else self.backward
            if unit in computing:
                if trigger.kind == O.POST_FORWARD or self.units[unit].backward_reads_params:
                    self.require_ready(unit, f"its compute before {trigger}")
                computing.discard(unit)
        if trigger.kind == O.POST_BACKWARD and unit in self.recomputing:
            self.require_ready(unit, f"its recomputed activations before {trigger}")
            self.recomputing.discard(unit)
        if trigger.kind == O.BACKWARD_END:
            self.backward.clear()
            self.recomputing.clear()
        for number, op in enumerate(entry.ops):
            self.where = f"{position} @{trigger} op {number} '{_op_text(op)}' ({context})"
            handler = getattr(self, f"op_{type(op).__name__}", None)
            if handler is None:
                self.fail("known-op", -1, f"verify does not know the op {type(op).__name__}")
            handler(op)
        self.where = f"{position} @{trigger} ({context})"
        if trigger.kind == O.PRE_FORWARD:
            self.require_ready(unit, f"its forward at {trigger}")
            self.forward.add(unit)
        if trigger.kind == O.PRE_RECOMPUTE:
            self.require_ready(unit, f"its recompute at {trigger}")
            self.recomputing.add(unit)
        if trigger.kind == O.PRE_BACKWARD:
            if self.units[unit].backward_reads_params:
                self.require_ready(unit, f"its backward at {trigger}")
            self.begin_backward(unit)

    # -- phase ends -------------------------------------------------------------------------

    def end_micro_step(self, where: str, last: bool = False) -> None:
        self.where = where
        self.require_quiet("end-of-micro-step", "micro-step")
        for unit, state in sorted(self.params.items()):
            if self.stage == 3 and state != RELEASED and unit not in self.kept:
                self.fail(
                    "end-of-micro-step",
                    unit,
                    "still gathered at the end of the micro-step (Release missing)",
                )
        if self.per_micro or (last and self.mode == "last_micro_batch"):
            for unit in sorted((self.trainable & self.backward_seen) - set(self.reduced)):
                self.fail("reduce-once", unit, "gradient never reduced in the micro-step")
            self.reduced.clear()
        self.forward.clear()
        self.backward.clear()
        self.recomputing.clear()
        self.backward_seen.clear()

    def end_step(self, where: str) -> None:
        self.where = where
        self.require_quiet("end-of-step", "step")
        if not self.optimizer_done:
            self.fail("optimizer-after-reduce", -1, "the step has no OptimizerStep")
        for unit, state in sorted(self.params.items()):
            if self.stage == 3 and state != RELEASED and unit not in self.kept:
                self.fail("end-of-step", unit, "still gathered at the end of the step")
        for unit in sorted((self.trainable & self.kept) - self.refreshed) if self.stage else ():
            self.fail(
                "refresh-after-optimizer",
                unit,
                "not re-gathered after OptimizerStep: the next forward would use the old values",
            )
        for unit in sorted(self.grad_stale & self.trainable) if self.mode == "step" else ():
            self.fail(
                "end-of-step",
                unit,
                "gradient not zeroed after its reduction: the next step would add onto it",
            )
        if not self.persistent_shard and self.shard_alive:
            self.fail(
                "end-of-step",
                -1,
                f"stage {self.stage} keeps the gradient shard past the step (FreeGradShard "
                "missing): the next step would add onto it",
            )
        if self.persistent_shard and not self.shard_alive:
            self.fail(
                "end-of-step",
                -1,
                "stage 0 frees its gradient shard, the all-reduced full gradient it keeps "
                "across steps (FreeGradShard is for stages 1-3 only)",
            )
        self.reduced.clear()
        self.refreshed.clear()
        self.scalars_done = self.optimizer_done = False
        self.end_step_files()
        self.end_step_streaming()
        self.reset_offload()

    def require_quiet(self, invariant: str, phase: str) -> None:
        for unit in sorted(self.reducing):
            self.fail(
                invariant,
                unit,
                f"reduction still in flight at the end of the {phase} (WaitReduce missing)",
            )
        for unit, state in sorted(self.params.items()):
            if state == GATHERING:
                self.fail(
                    invariant,
                    unit,
                    f"AllGather still in flight at the end of the {phase} (WaitGather missing)",
                )
