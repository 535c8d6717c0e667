"""Named points of the save protocol, where a fault-injection test stops a rank.

``fzero.save`` calls ``reach(name)`` at each point below, in this order; with no hook set (always,
outside tests) that is one comparison. A test sets a hook in a child process
(``set_hook(fn)``) that raises or calls ``os._exit`` when a chosen point is reached, then
checks that ``fzero.load`` finds the newest complete checkpoint and resumes exactly
(``tests/faults/``). docs/checkpoints.md says what each window leaves on disk and what ``load``
then does. ``old_aside`` and ``renamed`` (and ``latest_written``) are also reached when a save
first settles what an interrupted earlier save left (``publish.recover``).
"""

from __future__ import annotations

from collections.abc import Callable

SAVE_POINTS = (
    "recovered",  # rank 0: leftovers of earlier saves settled, a fresh staging directory made
    "collective.begin",  # every rank: before the collective that agrees on the step
    "staging_ready",  # every rank: before writing its file
    "rank_file_partial",  # every rank: its file written and fsynced under a .partial name
    "rank_file_renamed",  # every rank: its file renamed to rank<r>.safetensors
    "collective.files",  # every rank: before the collective that gathers every file's sha256
    "manifest_written",  # rank 0: manifest.json in the staging directory, not yet committed
    "committed",  # rank 0: commit.json written: the new checkpoint is complete
    "latest_written",  # rank 0: latest names the new step
    "old_aside",  # rank 0, the same step saved again: the earlier copy moved to .step-<n>.old
    "renamed",  # rank 0: the staging directory renamed to step-<n>
    "cleaned",  # rank 0: the earlier copy and checkpoints beyond keep_last removed
    "collective.published",  # every rank: before the collective that reports the outcome
)
COLLECTIVES = tuple(name for name in SAVE_POINTS if name.startswith("collective."))

_hook: Callable[[str], None] | None = None


def set_hook(hook: Callable[[str], None] | None) -> Callable[[str], None] | None:
    """Call ``hook(name)`` at every point from now on (None: stop); returns the previous hook."""
    global _hook
    previous, _hook = _hook, hook
    return previous


def reach(name: str) -> None:
    """The save protocol is at point ``name``."""
    if _hook is not None:
        if name not in SAVE_POINTS:
            raise ValueError(f"unknown save point {name!r}; the points are {SAVE_POINTS}")
        _hook(name)
