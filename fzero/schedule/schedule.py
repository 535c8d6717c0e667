"""Schedule: the ops one optimizer step runs, as data.

``micro_step`` runs once per micro-batch (forward and backward), ``step`` once after the last
micro-batch. When gradients are reduced only at the last micro-batch, that one runs
``last_micro_step`` instead (same triggers, plus the reductions). ``print(schedule)`` lists every
op under its trigger with the gathered bytes alive after it; ``schedule.ops(n)`` is the exact op
sequence of a step with ``n`` micro-batches.

``gradient_reduction`` says where gradients are reduced:

- ``"step"``: once per step, in the step phase (stages 0 and 1);
- ``"micro_batch"``: each micro-batch, right after a unit's backward (stages 2 and 3);
- ``"last_micro_batch"``: stages 2 and 3 keep full unit gradients across micro-batches and
  reduce them in ``last_micro_step`` only;
- ``"ordered"``: deterministic mode, each micro-batch, with ``ReduceInOrder`` (every stage).

``first_micro_extra`` (optimizer offload at stage 3) holds ops the first micro-batch of a step
runs at a trigger before that trigger's own: the previous step's CPU update of each unit
(``ApplyPendingUpdate``) and its upload, right before the unit's first gather, so the CPU steps
overlap the forward (see ``fzero/schedule/offload.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fzero.schedule.ops import (
    BACKWARD_END,
    POST_BACKWARD,
    PRE_BACKWARD,
    PRE_RECOMPUTE,
    ApplyPendingUpdate,
    Entry,
    HostOptimizerStep,
    Op,
    OptimizerStep,
    _size,
)

if TYPE_CHECKING:
    from fzero.schedule.streamed_grads import GradStreaming

HOST_STEPS = (HostOptimizerStep, ApplyPendingUpdate)


@dataclass(frozen=True)
class UnitInfo:
    """What the compiler needs to know of a unit: its name and sizes in bytes."""

    index: int
    name: str
    numel: int
    param_nbytes: int  # gathered, padded, in the compute dtype
    grad_nbytes: int  # the unit's gradient buffer, in the compute dtype
    reduce_nbytes: int  # the buffer a reduction moves, in the reduce dtype
    has_trainable: bool
    # Stage 3: smaller than stage3_param_persistence_threshold, so it stays gathered for good
    # (refreshed after each optimizer step) instead of being gathered and released around uses.
    persistent: bool = False
    # False when the unit's backward needs no parameter values (an embedding: its backward
    # reads only the indices), so stage 3 does not gather it for backward.
    backward_reads_params: bool = True
    # This rank's part (offload sizes its copies by it): trainable elements of its shard, the
    # shard's bytes in the compute dtype, and that dtype's item size.
    optimizer_numel: int = 0
    shard_nbytes: int = 0
    param_itemsize: int = 2
    # fzero checkpoints the unit's forward (activation_checkpointing.number_checkpoints): its
    # forward runs again in backward, after its pre_backward (``pre_recompute``).
    recomputed: bool = False

    @property
    def is_root(self) -> bool:
        return self.name == ""


@dataclass(frozen=True)
class Schedule:
    stage: int
    world_size: int
    units: tuple[UnitInfo, ...]
    micro_step: tuple[Entry, ...]
    step: tuple[Entry, ...]
    traced: bool  # False: order presumed from module registration, until the first step traces it
    last_micro_step: tuple[Entry, ...] | None = None  # None: the last runs micro_step too
    gradient_reduction: str = ""  # one of GRADIENT_REDUCTIONS; "" means the stage's default
    # Run by a step's first micro-batch at their trigger, before its own ops (see above).
    first_micro_extra: tuple[Entry, ...] = ()
    # Optimizer offload: host units' gradients stream down as they land (a
    # ``streamed_grads.GradStreaming``); None: they land in the whole gradient shard.
    grad_streaming: GradStreaming | None = None

    def __post_init__(self) -> None:
        if not self.gradient_reduction:
            default = "step" if self.stage < 2 else "micro_batch"
            object.__setattr__(self, "gradient_reduction", default)
        if self.gradient_reduction not in GRADIENT_REDUCTIONS:
            raise ValueError(
                f"gradient_reduction must be one of {GRADIENT_REDUCTIONS}, "
                f"got {self.gradient_reduction!r}"
            )

    def micro_entries(self, last: bool, first: bool = False) -> tuple[Entry, ...]:
        """The entries a micro-batch runs: ``last_micro_step`` for the last one when there is
        one, else ``micro_step``; for the ``first``, with ``first_micro_extra`` merged in."""
        entries = self.micro_step
        if last and self.last_micro_step is not None:
            entries = self.last_micro_step
        if first and self.first_micro_extra:
            extra = {e.trigger: e.ops for e in self.first_micro_extra}
            entries = tuple(
                Entry(e.trigger, extra[e.trigger] + e.ops, e.live_nbytes)
                if e.trigger in extra
                else e
                for e in entries
            )
        return entries

    def ops(self, micro_batches: int = 1) -> list[Op]:
        """Every op a step with ``micro_batches`` micro-batches runs, in order (a step after
        another: with ``first_micro_extra``, the first step of all finds nothing pending)."""
        ops: list[Op] = []
        for index in range(micro_batches):
            for entry in self.micro_entries(index == micro_batches - 1, first=index == 0):
                ops.extend(entry.ops)
        for entry in self.step:
            ops.extend(entry.ops)
        return ops

    def optimizer_placement(self) -> str:
        """Partial optimizer offload: which units step on the device and which on the host,
        with the host's share of this rank's optimizer elements; "" otherwise."""
        ops = [op for entry in self.first_micro_extra + self.step for op in entry.ops]
        device = next((op for op in ops if isinstance(op, OptimizerStep) and op.units), None)
        if device is None:
            return ""
        host = {op.unit: op.numel for op in ops if isinstance(op, HOST_STEPS)}
        host_numel = sum(host.values())
        share = host_numel / (host_numel + device.shard_numel)
        return (
            f"units {_listed(host)} on the host ({host_numel:,} elements, {share:.1%} of the "
            f"optimizer state), units {_listed(device.units)} on the device "
            f"({device.shard_numel:,} elements)"
        )

    @property
    def peak_live_nbytes(self) -> int:
        entries = self.micro_step + (self.last_micro_step or ())
        return max((e.live_nbytes for e in entries), default=0)

    def __str__(self) -> str:
        order = "traced"
        if not self.traced:
            order = (
                "presumed from module order: on-demand ops, which the first micro-batch runs "
                "for the order it traces before the compiled schedule replaces them"
            )
        total = sum(u.param_nbytes for u in self.units)
        lines = [
            f"Schedule: ZeRO stage {self.stage}, world size {self.world_size}, "
            f"{len(self.units)} units, {_size(total)} of parameters (gathered size), order {order}",
            f"  peak gathered bytes alive: {_size(self.peak_live_nbytes)}",
            f"  gradients reduced: {_REDUCTION_TEXT[self.gradient_reduction]}",
        ]
        if self.grad_streaming is not None:
            lines.append(f"  gradients: {self.grad_streaming}")
        placement = self.optimizer_placement()
        if placement:
            lines.append(f"  optimizer steps: {placement}")
        which = "each micro-batch"
        phases = [(self.micro_step, which)]
        if self.last_micro_step is not None:
            phases = [(self.micro_step, f"{which} but the last"), (self.last_micro_step, "last")]
        if self.first_micro_extra:
            lines.append(
                "-- first micro-batch only, before the trigger's own ops: the previous step's "
                "CPU updates"
            )
            lines += _entry_lines(self.units, self.first_micro_extra, "", live=False)[1:]
        for entries, micro_label in phases:
            lines += _entry_lines(self.units, entries, micro_label, live=True)
        lines += _entry_lines(self.units, self.step, "", live=False)
        return "\n".join(lines)


def _listed(units) -> str:
    return ", ".join(str(u) for u in sorted(units)) or "none"


GRADIENT_REDUCTIONS = ("step", "micro_batch", "last_micro_batch", "ordered")
_REDUCTION_TEXT = {
    "step": "once per step, in the step phase",
    "micro_batch": "each micro-batch, after each unit's backward",
    "last_micro_batch": "once per step, at the last micro-batch (full gradients kept until then)",
    "ordered": "each micro-batch, summed in rank order (deterministic)",
}


def _entry_lines(
    units: tuple[UnitInfo, ...], entries: tuple[Entry, ...], micro_label: str, live: bool
) -> list[str]:
    lines: list[str] = []
    phase = None
    for entry in entries:
        kind = entry.trigger.kind
        new_phase = (
            "step"
            if not live
            else "backward"
            if kind in (PRE_BACKWARD, PRE_RECOMPUTE, POST_BACKWARD, BACKWARD_END)
            else "forward"
        )
        if new_phase != phase:
            phase = new_phase
            header = (
                "step (once, after the last micro-batch)"
                if phase == "step"
                else f"{phase} ({micro_label})"
            )
            lines.append(f"-- {header}")
        unit = next((u for u in units if u.index == entry.trigger.unit), None)
        where = f" {unit.name or '<root>'}" if unit else ""
        live_text = f"live {_size(entry.live_nbytes)}" if live else ""
        lines.append(f"  @{entry.trigger}{where}  {live_text}".rstrip())
        lines.extend(f"      {op}    [{op.stream}]" for op in entry.ops)
    return lines
