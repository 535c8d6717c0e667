"""Read any range of a unit's flat buffer out of a checkpoint's rank files.

Every rank's shard of a unit is a range of the unit flat (``manifest.rank_units``): its
optimizer part (master weights and moments) and its compute-dtype part. So a range of the flat,
whatever world size or stage asks for it, is a few slices of a few old files; each is read as
one byte range (``os.preadv``: file pages stay in the page cache, never in the process, so
reading a file costs memory for the range alone), and each file is opened (and its size and
sha256 checked) only when first needed. Stage 0 writes whole units on every rank: one rank's
copy is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from fzero.checkpoint.files import sha256_of
from fzero.checkpoint.manifest import Checkpoint
from fzero.checkpoint.safetensors_ranges import RangeReader, StoredTensor, read_header
from fzero.errors import CheckpointCorruptError, CheckpointError

OPTIMIZER_KINDS = ("master", "exp_avg", "exp_avg_sq")


class ShardReader:
    """Reads unit-flat ranges from ``checkpoint``; ``prefer`` picks the rank whose copy is read
    where every rank has one (stage 0 units, the step, buffers). ``verify`` checks each file's
    sha256 before its first read (its size is always checked)."""

    def __init__(self, checkpoint: Checkpoint, prefer: int = 0, verify: bool = True):
        self.checkpoint = checkpoint
        self.prefer = prefer % checkpoint.world_size
        self.verify = verify
        self._headers: dict[int, dict[str, StoredTensor]] = {}
        self._ranges = RangeReader()

    def file(self, rank: int) -> Any:
        """The open safetensors file of ``rank`` (for its metadata), checked on first use."""
        path = self.checkpoint.file(rank)
        self.header(rank)
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except Exception as error:  # safetensors raises its own types for bad headers
            raise CheckpointCorruptError(f"{path} cannot be read: {error}") from error

    def header(self, rank: int) -> dict[str, StoredTensor]:
        """The tensors of ``rank``'s file; the file is checked on first use."""
        if rank not in self._headers:
            path = self.checkpoint.file(rank)
            check_file(path, self.checkpoint.rank_entry(rank), self.verify)
            try:
                self._headers[rank] = read_header(path)
            except CheckpointError as error:
                raise CheckpointCorruptError(f"{path} cannot be read: {error}") from error
        return self._headers[rank]

    def _stored(self, rank: int, name: str) -> StoredTensor:
        header = self.header(rank)
        if name not in header:
            path = self.checkpoint.file(rank)
            raise CheckpointCorruptError(
                f"{path}: cannot read {name!r}: the file has no such tensor"
            )
        return header[name]

    def tensor(self, rank: int, name: str) -> torch.Tensor:
        stored = self._stored(rank, name)
        return self._ranges.read(stored, 0, stored.numel).view(stored.shape)

    def close(self) -> None:
        """Close the files; a later read opens them again."""
        self._ranges.close()

    def has(self, rank: int, name: str) -> bool:
        return name in self.header(rank)

    def read(self, unit: int, lo: int, hi: int, kind: str, out: torch.Tensor) -> None:
        """Copy the unit flat's ``[lo, hi)`` of ``kind`` into ``out`` (``hi - lo`` long) where
        the checkpoint has it; positions it lacks (padding past the old padded size) are left.

        ``kind``: ``master``/``exp_avg``/``exp_avg_sq`` (the optimizer part), ``compute`` (the
        compute-dtype values kept beside the master), or ``values`` (fp32 parameter values:
        the master where it exists, else the compute-dtype values).
        """
        if kind == "values":
            self.read(unit, lo, hi, "compute", out)
            self.read(unit, lo, hi, "master", out)
            return
        for rank, seg_lo, seg_hi, name, base in self._segments(unit, kind):
            a, b = max(lo, seg_lo), min(hi, seg_hi)
            if a >= b:
                continue
            stored = self._stored(rank, name)
            piece = self._ranges.read(stored, base + a - seg_lo, base + b - seg_lo)
            out[a - lo : b - lo].copy_(piece)

    def _segments(self, unit: int, kind: str):
        """``(rank, flat_lo, flat_hi, tensor name, index of flat_lo in the tensor)`` for every
        old rank's part of ``unit`` holding ``kind``."""
        ckpt = self.checkpoint
        shard_numel = ckpt.units[unit]["shard_numel"]
        ranks = range(ckpt.world_size) if ckpt.shard_world > 1 else [self.prefer]
        for rank in ranks:
            start, optimizer_offset, optimizer_numel, compute_numel = ckpt.rank_entry(rank)[
                "units"
            ][unit]
            if kind in OPTIMIZER_KINDS:
                if optimizer_numel:
                    yield rank, start, start + optimizer_numel, kind, optimizer_offset
            elif kind == "compute":
                if compute_numel:
                    end = start + shard_numel
                    yield rank, end - compute_numel, end, f"param_shard.{unit}", 0
            else:
                raise ValueError(f"unknown kind {kind!r}")


def check_file(path: Path, entry: dict[str, Any], verify: bool) -> None:
    """``path`` exists with the size (and, with ``verify``, the sha256) the manifest records."""
    if not path.is_file():
        raise CheckpointCorruptError(f"{path} is missing (the manifest lists it)")
    size = path.stat().st_size
    if size != entry["nbytes"]:
        what = "truncated" if size < entry["nbytes"] else "longer than written"
        raise CheckpointCorruptError(
            f"{path} is {what}: {size} bytes, the manifest records {entry['nbytes']}"
        )
    if verify and sha256_of(path) != entry["sha256"]:
        raise CheckpointCorruptError(
            f"{path} fails its checksum: its sha256 differs from the one the manifest records, "
            "so its contents changed after it was written"
        )
