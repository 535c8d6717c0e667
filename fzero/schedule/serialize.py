"""Schedules as JSON: to look at, diff between runs or ranks, and load back.

Each op is written as ``{"op": <class name>, <field>: <value>, ...}`` and read back by class
name from ``fzero.schedule.ops``, so ``schedule_from_json(schedule_to_json(s)) == s``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from fzero.errors import ScheduleError
from fzero.schedule import ops as O
from fzero.schedule.schedule import Schedule, UnitInfo
from fzero.schedule.streamed_grads import GradStreaming

FORMAT = "fzero.schedule"
# 2 added last_micro_step and gradient_reduction, 3 first_micro_extra, 4 grad_streaming; 1-3 load
VERSION = 4

OP_TYPES: dict[str, type[O.Op]] = {
    name: value
    for name, value in vars(O).items()
    if isinstance(value, type) and issubclass(value, O.Op) and value is not O.Op
}


def schedule_to_json(schedule: Schedule, indent: int | None = 1) -> str:
    """The whole schedule (units, micro-step and step entries, every op) as JSON text."""
    document = {
        "format": FORMAT,
        "version": VERSION,
        "stage": schedule.stage,
        "world_size": schedule.world_size,
        "traced": schedule.traced,
        "units": [dataclasses.asdict(u) for u in schedule.units],
        "micro_step": [_entry_to_dict(e) for e in schedule.micro_step],
        "last_micro_step": None
        if schedule.last_micro_step is None
        else [_entry_to_dict(e) for e in schedule.last_micro_step],
        "step": [_entry_to_dict(e) for e in schedule.step],
        "gradient_reduction": schedule.gradient_reduction,
        "first_micro_extra": [_entry_to_dict(e) for e in schedule.first_micro_extra],
        "grad_streaming": None
        if schedule.grad_streaming is None
        else {
            **dataclasses.asdict(schedule.grad_streaming),
            "host_units": sorted(schedule.grad_streaming.host_units),
        },
    }
    return json.dumps(document, indent=indent)


def schedule_from_json(text: str) -> Schedule:
    """Read a schedule written by ``schedule_to_json``."""
    document = json.loads(text)
    if document.get("format") != FORMAT or document.get("version") not in (1, 2, 3, VERSION):
        raise ScheduleError(
            f"not an {FORMAT} version {VERSION} document (format "
            f"{document.get('format')!r}, version {document.get('version')!r})"
        )
    last = document.get("last_micro_step")
    streaming = document.get("grad_streaming")
    if streaming is not None:
        streaming = GradStreaming(**{**streaming, "host_units": frozenset(streaming["host_units"])})
    return Schedule(
        stage=document["stage"],
        world_size=document["world_size"],
        units=tuple(UnitInfo(**u) for u in document["units"]),
        micro_step=tuple(_entry_from_dict(e) for e in document["micro_step"]),
        step=tuple(_entry_from_dict(e) for e in document["step"]),
        traced=document["traced"],
        last_micro_step=None if last is None else tuple(_entry_from_dict(e) for e in last),
        gradient_reduction=document.get("gradient_reduction", ""),
        first_micro_extra=tuple(_entry_from_dict(e) for e in document.get("first_micro_extra", ())),
        grad_streaming=streaming,
    )


def _entry_to_dict(entry: O.Entry) -> dict[str, Any]:
    return {
        "trigger": {"kind": entry.trigger.kind, "unit": entry.trigger.unit},
        "live_nbytes": entry.live_nbytes,
        "ops": [{"op": type(op).__name__, **_fields(op)} for op in entry.ops],
    }


def _fields(op: O.Op) -> dict[str, Any]:
    return {f.name: getattr(op, f.name) for f in dataclasses.fields(op)}


def _entry_from_dict(data: dict[str, Any]) -> O.Entry:
    return O.Entry(
        trigger=O.Trigger(**data["trigger"]),
        ops=tuple(_op_from_dict(op) for op in data["ops"]),
        live_nbytes=data["live_nbytes"],
    )


def _op_from_dict(data: dict[str, Any]) -> O.Op:
    fields = dict(data)
    name = fields.pop("op")
    op_type = OP_TYPES.get(name)
    if op_type is None:
        raise ScheduleError(f"unknown op {name!r}; known: {sorted(OP_TYPES)}")
    return op_type(**{key: _tuples(value) for key, value in fields.items()})


def _tuples(value: Any) -> Any:
    """JSON has lists only; op records hold tuples (they are frozen and hashable)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
