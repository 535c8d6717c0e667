"""The commit record: a small file, written after the manifest, that makes a checkpoint complete.

``commit.json`` holds the sha256 and size of ``manifest.json``'s bytes, the step, and the save's
sequence number (one more than any earlier save under the same root, so the save made last is
the one with the highest number). It is written, fsynced and renamed into place only once every
rank's file and the manifest are durable, so:

- a directory without it is an interrupted save, never loaded;
- a manifest changed after the commit (edited by hand, or torn by a write that was not atomic)
  cannot match the digest, and is refused naming the file;
- choosing the newest checkpoint reads only these small records, never the manifests.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from fzero.checkpoint.files import write_text_atomic
from fzero.errors import CheckpointCorruptError, CheckpointIncompleteError

COMMIT = "commit.json"
COMMIT_FORMAT = "fzero-checkpoint-commit"


@dataclass(frozen=True)
class CommitRecord:
    """What ``commit.json`` says about its directory's manifest."""

    step: int
    sequence: int
    manifest_sha256: str
    manifest_nbytes: int


def write_commit(directory: Path, manifest_bytes: bytes, step: int, sequence: int) -> None:
    """Commit ``directory``: its manifest (``manifest_bytes``, already durable) is final."""
    record = {
        "format": COMMIT_FORMAT,
        "step": step,
        "sequence": sequence,
        "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        "manifest_nbytes": len(manifest_bytes),
    }
    write_text_atomic(directory / COMMIT, json.dumps(record) + "\n")


def read_commit(directory: Path) -> CommitRecord:
    """The commit record of ``directory``; raises ``CheckpointIncompleteError`` when there is
    none (the save stopped before committing) and ``CheckpointCorruptError`` when it cannot be
    read as one (it was changed after it was written)."""
    path = directory / COMMIT
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CheckpointIncompleteError(
            f"{directory} is an incomplete checkpoint: it has no {COMMIT}, so the save that "
            "wrote it did not finish"
        ) from None
    except OSError as error:
        raise CheckpointCorruptError(f"cannot read {path}: {error}") from error
    try:
        data = json.loads(text)
        if data.get("format") != COMMIT_FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, not {COMMIT_FORMAT!r}")
        record = CommitRecord(
            step=data["step"],
            sequence=data["sequence"],
            manifest_sha256=data["manifest_sha256"],
            manifest_nbytes=data["manifest_nbytes"],
        )
        for name in ("step", "sequence", "manifest_nbytes"):
            value = getattr(record, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} is {value!r}, not an integer")
        if not isinstance(record.manifest_sha256, str):
            raise ValueError("manifest_sha256 is not a string")
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointCorruptError(
            f"{path} is not a valid commit record ({type(error).__name__}: {error}): it was "
            "changed after the save wrote it"
        ) from error
    return record


def committed_or_none(directory: Path) -> CommitRecord | None:
    """The commit record of ``directory``, or None when it has none or an unreadable one."""
    try:
        return read_commit(directory)
    except (CheckpointIncompleteError, CheckpointCorruptError):
        return None


def check_manifest_bytes(directory: Path, manifest_name: str, record: CommitRecord) -> bytes:
    """The bytes of ``directory/manifest_name``, once they match the digest ``record`` holds."""
    path = directory / manifest_name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointCorruptError(
            f"{path} is missing, but {directory / COMMIT} records it: the checkpoint was "
            "damaged after it was saved; restore the file or load another checkpoint"
        ) from None
    except OSError as error:
        raise CheckpointCorruptError(f"cannot read {path}: {error}") from error
    if len(data) != record.manifest_nbytes or (
        hashlib.sha256(data).hexdigest() != record.manifest_sha256
    ):
        raise CheckpointCorruptError(
            f"{path} does not match its commit record {directory / COMMIT}: its "
            f"{'size' if len(data) != record.manifest_nbytes else 'sha256'} differs from the one "
            "recorded when the save committed it, so the manifest (or the record) was changed "
            "afterwards. Restore both files from a copy, or load another checkpoint"
        )
    return data
