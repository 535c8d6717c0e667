"""Schedule: the ops one optimizer step runs, as data.

``micro_step`` runs once per micro-batch (forward and backward), ``step`` once after the last
micro-batch. ``print(schedule)`` lists every op under its trigger with the gathered bytes alive
after it; ``schedule.ops(n)`` is the exact op sequence of a step with ``n`` micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass

from fzero.schedule.ops import BACKWARD_END, POST_BACKWARD, PRE_BACKWARD, Entry, Op, _size


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

    def ops(self, micro_batches: int = 1) -> list[Op]:
        """Every op a step with ``micro_batches`` micro-batches runs, in order."""
        ops: list[Op] = []
        for _ in range(micro_batches):
            for entry in self.micro_step:
                ops.extend(entry.ops)
        for entry in self.step:
            ops.extend(entry.ops)
        return ops

    @property
    def peak_live_nbytes(self) -> int:
        return max((e.live_nbytes for e in self.micro_step), default=0)

    def __str__(self) -> str:
        order = "traced" if self.traced else "presumed from module order (traced on first step)"
        total = sum(u.param_nbytes for u in self.units)
        lines = [
            f"Schedule: ZeRO stage {self.stage}, world size {self.world_size}, "
            f"{len(self.units)} units, {_size(total)} of parameters (gathered size), order {order}",
            f"  peak gathered bytes alive: {_size(self.peak_live_nbytes)}",
        ]
        phase = None
        for entry in self.micro_step + self.step:
            kind = entry.trigger.kind
            new_phase = (
                "backward"
                if kind in (PRE_BACKWARD, POST_BACKWARD, BACKWARD_END)
                else "step"
                if entry in self.step
                else "forward"
            )
            if new_phase != phase:
                phase = new_phase
                header = {
                    "forward": "forward (each micro-batch)",
                    "backward": "backward (each micro-batch)",
                    "step": "step (once, after the last micro-batch)",
                }[phase]
                lines.append(f"-- {header}")
            unit = next((u for u in self.units if u.index == entry.trigger.unit), None)
            where = f" {unit.name or '<root>'}" if unit else ""
            live = f"live {_size(entry.live_nbytes)}" if entry in self.micro_step else ""
            lines.append(f"  @{entry.trigger}{where}  {live}".rstrip())
            lines.extend(f"      {op}    [{op.stream}]" for op in entry.ops)
        return "\n".join(lines)
