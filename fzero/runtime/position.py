"""Where this rank's step is: the op the executor is running, as a small shared record.

The executor writes it on the hot path with plain integer and reference stores (no string
formatting, no clock reads): which step, which micro-batch, the trigger and the ops it keys,
and the op running (None between ops, while the model computes; its index in the trigger's
ops is found only when a report is written). The watchdog thread
and the error paths read it and only then turn it into text, from the schedule's own op
records. Reads from another thread may see a record half-updated; ``describe`` tolerates that
(it is used for reports, never for control flow).
"""

from __future__ import annotations

from typing import Any

STEP_PHASE = -1  # micro_batch value in the step phase (after the last micro-batch)


class OpPosition:
    __slots__ = ("active", "step", "micro_batch", "trigger", "entry", "ops", "op", "runs")

    def __init__(self) -> None:
        self.active = False  # inside a step: from the first micro-step to the step phase's end
        self.step = 0  # steps this runtime finished
        self.micro_batch = 0  # index in the step, or STEP_PHASE
        self.trigger: Any = None  # the trigger whose ops run now (or ran last)
        self.entry = 0  # its entry's index in the schedule's phase (-1 while tracing)
        self.ops: tuple[Any, ...] = ()
        self.op: Any = None  # the op running (one of ``ops``), None when none is
        self.runs = 0  # bumped each time a trigger's ops start: tells a stall from progress

    def snapshot(self) -> tuple[bool, int, int]:
        """What changes whenever the step moves on: equal snapshots a while apart mean a stall."""
        return (self.active, self.runs, id(self.op))

    def describe(self) -> dict[str, Any]:
        """The position as plain data (JSON-ready): step, micro-batch, trigger, entry, op index
        and the op's text (None between ops)."""
        ops, op = self.ops, self.op
        index = next((i for i, candidate in enumerate(ops) if candidate is op), -1)
        op_text = str(ops[index]).strip() if index >= 0 else None
        return {
            "active": self.active,
            "step": self.step,
            "micro_batch": self.micro_batch,
            "trigger": str(self.trigger) if self.trigger is not None else None,
            "entry": self.entry,
            "op_index": index,
            "op": " ".join(op_text.split()) if op_text else None,
        }


def position_text(where: dict[str, Any]) -> str:
    """One line for a ``describe()`` result: ``step 3, micro-batch 1, @post_backward(2) (entry
    7), op 0: ReduceScatter ...`` or ``..., in the model's compute after @pre_forward(1)``."""
    if not where.get("active"):
        return f"between steps (after step {where.get('step')})"
    phase = (
        "the step phase"
        if where.get("micro_batch") == STEP_PHASE
        else f"micro-batch {where.get('micro_batch')}"
    )
    head = f"step {where.get('step')}, {phase}"
    trigger = where.get("trigger")
    if trigger is None:
        return f"{head}, before its first trigger"
    at = f"@{trigger}" + (f" (entry {where['entry']})" if where.get("entry", -1) >= 0 else "")
    if where.get("op") is None:
        return f"{head}, outside fzero's ops (the model's own compute, or the host) after {at}"
    return f"{head}, {at} op {where['op_index']}: {where['op']}"


def same_op(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two ranks' positions are the same op of the same step."""
    keys = ("active", "step", "micro_batch", "trigger", "entry", "op_index")
    return all(a.get(k) == b.get(k) for k in keys)
