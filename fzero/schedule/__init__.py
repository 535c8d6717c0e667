"""Schedules: pure data about which collectives a step runs, when, and how much is live.

Nothing here touches a device or a process group; everything can be tested with integers.
"""

from __future__ import annotations

from fzero.schedule.compile import Knobs, compile_schedule, presumed_trace
from fzero.schedule.cost_model import CostModel
from fzero.schedule.memory_model import BytesPerParam, MemoryModel, ModelStates, model_states
from fzero.schedule.on_demand import OnDemand
from fzero.schedule.ops import Entry, Op, Trigger
from fzero.schedule.schedule import Schedule, UnitInfo
from fzero.schedule.serialize import schedule_from_json, schedule_to_json
from fzero.schedule.signature import collective_signature
from fzero.schedule.simulate import simulate
from fzero.schedule.simulated_timeline import MemorySample, Span, Timeline
from fzero.schedule.trace_export import chrome_trace, plot_memory, write_chrome_trace
from fzero.schedule.verify import verify

__all__ = [
    "Entry",
    "Knobs",
    "OnDemand",
    "Op",
    "Schedule",
    "Trigger",
    "UnitInfo",
    "compile_schedule",
    "presumed_trace",
    "BytesPerParam",
    "CostModel",
    "MemoryModel",
    "MemorySample",
    "ModelStates",
    "Span",
    "Timeline",
    "chrome_trace",
    "collective_signature",
    "model_states",
    "plot_memory",
    "schedule_from_json",
    "schedule_to_json",
    "simulate",
    "verify",
    "write_chrome_trace",
]
