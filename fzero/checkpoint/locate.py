"""Which checkpoint a root means: the newest complete one, whatever an interrupted save left.

A checkpoint of step n can lie in three directories: ``step-<n>/`` (published), ``.step-<n>.tmp/``
(a save's staging directory) and ``.step-<n>.old/`` (the earlier copy, moved aside while step n
is saved again). A copy is complete when its commit record is (``commit.py``); among complete
copies the save made last has the highest sequence number.

A save writes ``latest`` before it renames its committed staging directory into place
(``publish.py``), so no published directory is ever newer than the copies of the step ``latest``
names. The newest complete checkpoint is therefore the highest sequence among the copies of that
step and the few leftovers (dot directories) of interrupted saves: only their small commit
records are read, never every checkpoint's. Reading never changes the root (another job may be
saving into it); the next save settles what an interrupted one left.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from fzero.checkpoint.commit import COMMIT, CommitRecord, committed_or_none, read_commit
from fzero.checkpoint.manifest import (
    ASIDE_DIR,
    LATEST,
    MANIFEST,
    STAGING_DIR,
    STEP_DIR,
    Checkpoint,
    read_checkpoint,
    step_dir_name,
)
from fzero.errors import CheckpointCorruptError, CheckpointError, CheckpointIncompleteError

logger = logging.getLogger("fzero")
PUBLISHED, STAGING, ASIDE = "published", "staging", "aside"
# Only to order two complete copies with the same sequence (a directory copied by hand).
_KIND_RANK = {PUBLISHED: 2, STAGING: 1, ASIDE: 0}


@dataclass(frozen=True)
class Copy:
    """A directory that may hold a checkpoint of ``step``, and its commit record (None when it
    is not complete)."""

    step: int
    path: Path
    kind: str
    record: CommitRecord | None


def copies(root: Path, *, published: bool = True) -> list[Copy]:
    """Every directory under ``root`` named as a copy of some step (``published=False``: only
    the leftovers of saves, ``.step-<n>.tmp`` and ``.step-<n>.old``), with its commit record
    when complete. A record whose step is not the directory's is not this directory's own."""
    found = []
    for child in root.iterdir():
        for pattern, kind in ((STEP_DIR, PUBLISHED), (STAGING_DIR, STAGING), (ASIDE_DIR, ASIDE)):
            match = pattern.match(child.name)
            if match and (published or kind != PUBLISHED) and child.is_dir():
                found.append(copy_at(child, int(match.group(1)), kind))
    return found


def copy_at(path: Path, step: int, kind: str) -> Copy:
    """``path`` as a copy of ``step``'s checkpoint (its record None unless it is complete)."""
    record = committed_or_none(path)
    return Copy(step, path, kind, record if record is not None and record.step == step else None)


def newest(candidates: list[Copy]) -> Copy | None:
    """The complete copy saved last among ``candidates``."""
    complete = [c for c in candidates if c.record is not None]
    if not complete:
        return None
    return max(complete, key=lambda c: (c.record.sequence, _KIND_RANK[c.kind]))


def latest_step(root: Path) -> int | None:
    """The step ``root/latest`` names, or None when it is missing or names no step directory."""
    try:
        match = STEP_DIR.match((root / LATEST).read_text().strip())
    except OSError:
        return None
    return int(match.group(1)) if match else None


def newest_complete(root: Path) -> Copy | None:
    """The newest complete checkpoint under ``root``: the copies of ``latest``'s step and the
    leftovers of interrupted saves; every published one only when ``latest`` names nothing
    complete (removed by hand, or a root without one)."""
    named = latest_step(root)
    candidates = copies(root, published=False)
    if named is not None:
        published = root / step_dir_name(named)
        if published.is_dir():
            candidates.append(copy_at(published, named, PUBLISHED))
        if not any(c.step == named and c.record is not None for c in candidates):
            if published.is_dir():
                # Never left by a crash (a directory gets this name only once committed).
                problem = _problem(published)
                raise CheckpointCorruptError(
                    f"{root / LATEST} names {published}, which is not a complete checkpoint: "
                    f"{problem}. Restore it from a copy, or load another step-* directory by "
                    "its path"
                )
            logger.warning(
                "%s names %s, which does not exist; choosing among every complete checkpoint",
                root / LATEST,
                published,
            )
            named = None
    if named is None:
        candidates = copies(root)
    best = newest(candidates)
    for skipped in candidates:
        if (
            skipped.record is None
            and skipped.kind == PUBLISHED
            and (best is None or skipped.step >= best.step)
        ):
            logger.warning("skipping %s: %s", skipped.path, _problem(skipped.path))
    return best


def _problem(directory: Path) -> str:
    try:
        read_checkpoint(directory)
    except CheckpointError as error:
        return str(error)
    return f"its {COMMIT} is for step {read_commit(directory).step}"


def open_checkpoint(path: str | Path) -> Checkpoint:
    """The checkpoint at ``path``: a checkpoint directory, or a root (its newest complete
    checkpoint, which is the one ``latest`` names unless a save was interrupted after it
    committed). Its manifest is checked against its commit record."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}: no such directory")
    if (path / COMMIT).exists() or (path / MANIFEST).exists():
        return read_checkpoint(path)
    found = newest_complete(path)
    if found is not None:
        return read_checkpoint(found.path)
    staging = STAGING_DIR.match(path.name)
    if staging or any(path.glob("rank*.safetensors")) or any(path.glob(".rank*.partial")):
        raise CheckpointIncompleteError(
            f"{path} is an incomplete checkpoint: it has no {MANIFEST} or {COMMIT}, so the save "
            "that wrote it did not finish. Load the previous checkpoint (pass the checkpoint "
            "root to take its newest complete one)."
        )
    raise CheckpointIncompleteError(
        f"no finished checkpoint in {path}: no {COMMIT} here and no step-* directory with one"
    )


def finished_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """``(step, directory)`` of every complete published checkpoint under ``root``, oldest step
    first."""
    return sorted((c.step, c.path) for c in copies(root) if c.kind == PUBLISHED and c.record)
