"""Schedules: pure data about which collectives a step runs, when, and how much is live.

Nothing here touches a device or a process group; everything can be tested with integers.
"""

from __future__ import annotations

from fzero.schedule.compile import Knobs, OnDemand, compile_schedule, presumed_trace
from fzero.schedule.ops import Entry, Op, Trigger
from fzero.schedule.schedule import Schedule, UnitInfo

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
]
