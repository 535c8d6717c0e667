"""The cross-rank check: every rank compares what it compiled with the others before any
collective of a step can hang on a difference.

One small collective (a hash per rank); only on a mismatch are the summaries themselves
exchanged, to name the first thing that differs: a parameter's shape, a config key, or a
trigger's collectives.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fzero.collectives import Communicator
from fzero.config import Config
from fzero.errors import ScheduleMismatchError
from fzero.schedule import Schedule
from fzero.schedule.signature import is_collective
from fzero.state.layout import FlatLayout


def layout_summary(layout: FlatLayout, cfg: Config) -> dict[str, Any]:
    """What every rank must agree on at shard time, keyed by names so that a difference reads
    as ``units.blocks.0.blocks.0.linear.weight.shape[1] (5 vs 7)``."""
    return {
        "world_size": layout.world_size,
        "units": {
            unit.name or "<root>": {
                slot.names[0]: {
                    "shape": list(slot.shape),
                    "trainable": slot.requires_grad,
                    "tied_names": list(slot.names[1:]),
                }
                for slot in unit.params
            }
            for unit in layout.units
        },
        "config": cfg.to_dict(),
    }


def schedule_summary(schedule: Schedule) -> dict[str, Any]:
    """The collectives each trigger issues, in order: what every rank must agree on (per-rank
    sizes such as the optimizer shard may differ)."""
    return {
        "collectives": [
            f"{entry.trigger}: " + ", ".join(str(op) for op in entry.ops if is_collective(op))
            for entry in schedule.micro_step + (schedule.last_micro_step or ()) + schedule.step
        ]
    }


def check_same_on_all_ranks(comm: Communicator, what: str, summary: dict[str, Any]) -> None:
    """One small collective: every rank compares a hash of ``summary``; on a mismatch every
    rank raises, naming the first thing that differs, instead of hanging later."""
    if comm.world_size == 1:
        return
    text = json.dumps(summary, sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()
    digests = comm.all_gather_object(digest)
    if len(set(digests)) == 1:
        return
    summaries = comm.all_gather_object(summary)
    other = next(r for r, d in enumerate(digests) if d != digests[0])
    raise ScheduleMismatchError(
        f"ranks disagree on the {what}: rank 0 and rank {other} differ at "
        f"{first_difference(summaries[0], summaries[other])}. Every rank must build the same "
        "model with the same config."
    )


def first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
    if isinstance(a, list) and isinstance(b, list):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return first_difference(x, y, f"{path}[{i}]")
        if len(a) != len(b):
            return f"{path} (length {len(a)} vs {len(b)})"
    return f"{path or '<top>'} ({a!r} vs {b!r})"
