"""NVMe offload's ops: a unit's state read from and written back to its swap files.

Under ``offload_optimizer.device: "nvme"`` the master and moments of this rank's shard live in
files, and under ``offload_param.device: "nvme"`` its compute-dtype parameter shard too
(``fzero/offload/files.py``). A unit's CPU step reads its ranges into staging buffers first and
writes them back after, and a gather reads the unit's parameter shard before uploading it; these
ops say where, so ``print(state.schedule)`` shows the file I/O and ``simulate`` prices it. Each
read is issued one unit ahead of its use (a prefetch into another staging buffer) and waited
for by the op that uses it; writes are waited for when their buffer is reused and, all of them,
by ``WaitFileWrites`` at the end of the step. They are this rank's own, never collectives.
"""

from __future__ import annotations

from dataclasses import dataclass

from fzero.schedule.ops import Op, _size, _unit_label

FILE = "file"  # the swapper's worker threads


@dataclass(frozen=True)
class ReadStateFromFile(Op):
    """Start reading unit ``unit``'s master and moments (``nbytes``) from their files into a
    staging buffer, for its ``HostOptimizerStep`` or ``ApplyPendingUpdate`` (which waits for
    it). Does nothing when the unit will not step (a skipped step, nothing pending)."""

    unit: int
    name: str
    nbytes: int

    @property
    def stream(self) -> str:
        return FILE

    def __str__(self) -> str:
        return f"ReadStateFromFile {_unit_label(self.unit, self.name)}  {_size(self.nbytes)}"


@dataclass(frozen=True)
class WriteStateToFile(Op):
    """After unit ``unit``'s CPU step: start writing what of it lives in files back: the staged
    master and moments (``state_nbytes``, 0 when they are in host memory) and the new
    compute-dtype shard (``shard_nbytes``, under parameter offload to nvme). Nothing is
    written for a unit that did not step."""

    unit: int
    name: str
    state_nbytes: int
    shard_nbytes: int = 0

    @property
    def nbytes(self) -> int:
        return self.state_nbytes + self.shard_nbytes

    @property
    def stream(self) -> str:
        return FILE

    def __str__(self) -> str:
        parts = [f"state {_size(self.state_nbytes)}"] if self.state_nbytes else []
        parts += [f"shard {_size(self.shard_nbytes)}"] if self.shard_nbytes else []
        return f"WriteStateToFile {_unit_label(self.unit, self.name)}  {', '.join(parts)}"


@dataclass(frozen=True)
class ReadShardFromFile(Op):
    """Parameter offload to nvme: start reading this rank's compute-dtype shard of unit
    ``unit`` (``nbytes``) from its file into a staging buffer, for the ``UploadShard`` of the
    unit's next gather (which waits for it). Issued right after the previous gather's upload,
    so the read overlaps that gather and the compute before the unit."""

    unit: int
    name: str
    nbytes: int

    @property
    def stream(self) -> str:
        return FILE

    def __str__(self) -> str:
        return f"ReadShardFromFile {_unit_label(self.unit, self.name)}  {_size(self.nbytes)}"


@dataclass(frozen=True)
class WaitFileWrites(Op):
    """The host waits for every file write of the step: the state's file-backed leaves (memory
    mappings of the files) are then current for any reader between steps."""

    def __str__(self) -> str:
        return "WaitFileWrites"
