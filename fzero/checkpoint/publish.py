"""Rank 0's part of a save: commit the staging directory, point ``latest`` at it, rename it into
place, and settle whatever an interrupted earlier save left.

Every step is one atomic rename (of a file written and fsynced beside its target, or of a
directory), so a crash leaves the root in one of a few states, each of which ``locate.py``
reads correctly:

1. ``commit.json`` written into ``.step-<n>.tmp/``: from here on the new checkpoint is complete,
   and has the highest sequence number under the root.
2. ``latest`` names step n: written before the rename, so no published directory is ever newer
   than the copies of the step ``latest`` names.
3. The same step saved again: the earlier ``step-<n>/`` is renamed to ``.step-<n>.old/``.
4. ``.step-<n>.tmp/`` renamed to ``step-<n>/``; then ``.step-<n>.old/`` and checkpoints beyond
   ``keep_last`` are removed, each renamed out of the way first, so a crash while deleting never
   leaves half a directory under a checkpoint's name.

``recover`` runs at the start of the next save and finishes what one that died left: the newest
complete copy of every step ends up at ``step-<n>/``, everything else is removed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from fzero.checkpoint.commit import COMMIT, write_commit
from fzero.checkpoint.crash_points import reach
from fzero.checkpoint.files import fsync_dir, write_text_atomic
from fzero.checkpoint.locate import (
    ASIDE,
    PUBLISHED,
    STAGING,
    copies,
    copy_at,
    finished_checkpoints,
    newest,
    newest_complete,
)
from fzero.checkpoint.manifest import (
    LATEST,
    MANIFEST,
    REMOVING_PREFIX,
    aside_dir_name,
    staging_dir_name,
    step_dir_name,
)
from fzero.errors import CheckpointCorruptError


def next_sequence(root: Path) -> int:
    """One more than the sequence number of every complete checkpoint under ``root``."""
    return 1 + max((c.record.sequence for c in copies(root) if c.record), default=0)


def commit(staging: Path, manifest: dict[str, Any], sequence: int) -> None:
    """Write ``manifest`` (with its ``sequence``) and then the commit record into ``staging``,
    whose rank files are all durable: the checkpoint is complete once this returns."""
    manifest = {**manifest, "sequence": sequence}
    # Compact: per-rank tables grow with world size x units (``info`` prints it for people).
    text = json.dumps(manifest, separators=(",", ":")) + "\n"
    write_text_atomic(staging / MANIFEST, text)
    reach("manifest_written")
    write_commit(staging, text.encode(), manifest["step"], sequence)
    reach("committed")


def publish(root: Path, step: int) -> None:
    """Point ``latest`` at step ``step`` (committed in its staging directory), then move it to
    ``step-<n>/``."""
    write_text_atomic(root / LATEST, step_dir_name(step) + "\n")
    reach("latest_written")
    settle(root, step)


def settle(root: Path, step: int) -> None:
    """Leave the newest complete copy of ``step``'s checkpoint at ``step-<n>/`` and remove the
    others (the staging directory and the aside copy). A ``step-<n>/`` that is not complete
    (no crash leaves one) is left alone unless a complete copy of the step takes its place."""
    final = root / step_dir_name(step)
    staging, aside = root / staging_dir_name(step), root / aside_dir_name(step)
    kinds = ((final, PUBLISHED), (staging, STAGING), (aside, ASIDE))
    best = newest([copy_at(path, step, kind) for path, kind in kinds if path.is_dir()])
    if best is None or best.path == final:
        for path in (staging, aside):
            discard(path)
        return
    if best.path == staging:
        discard(aside)
        if final.exists():
            os.replace(final, aside)
            fsync_dir(root)
            reach("old_aside")
        os.replace(staging, final)
        fsync_dir(root)
        reach("renamed")
        discard(aside)
        return
    discard(staging)  # the aside copy is the newest complete one
    if not final.exists():
        os.replace(aside, final)
        fsync_dir(root)


def recover(root: Path) -> None:
    """Settle what interrupted saves left under ``root``: every step with a leftover directory
    gets its newest complete copy at ``step-<n>/``. When one of them is newer than what
    ``latest`` names, ``latest`` is pointed at it first (as a save does before its rename)."""
    for child in root.iterdir():
        if child.name.startswith(REMOVING_PREFIX):
            shutil.rmtree(child, ignore_errors=True)
        elif child.name == f".{LATEST}.partial":
            child.unlink()
    leftovers = copies(root, published=False)
    if not leftovers:
        return
    try:
        current = newest_complete(root)
    except CheckpointCorruptError:  # latest names a damaged directory: order by sequence alone
        current = newest(copies(root))
    if current is not None and current.kind != PUBLISHED:
        write_text_atomic(root / LATEST, step_dir_name(current.step) + "\n")
        reach("latest_written")
    for step in sorted({c.step for c in leftovers}):
        settle(root, step)


def rotate(root: Path, keep_last: int, keep: Path) -> None:
    """Remove the complete checkpoints with the lowest steps, so that ``keep_last`` remain with
    ``keep`` among them."""
    finished = [d for _, d in finished_checkpoints(root) if d != keep]
    for directory in finished[: max(len(finished) - (keep_last - 1), 0)]:
        discard(directory)


def uncommitted(staging: Path) -> bool:
    """``staging`` still exists and has no commit record: the save can be undone."""
    return staging.is_dir() and not (staging / COMMIT).exists()


def discard(path: Path) -> None:
    """Remove ``path``; a directory is first renamed out of the way, in one atomic step."""
    if path.is_dir() and not path.is_symlink():
        doomed = path.with_name(REMOVING_PREFIX + path.name.lstrip("."))
        if doomed.exists():
            shutil.rmtree(doomed)
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
