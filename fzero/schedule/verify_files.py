"""verify's rules for NVMe offload's file I/O (``file_ops.py``): a unit's state is read once
before its CPU step and written only after it, a parameter shard in a file is read before its
upload, and no write is in flight when the step ends. A mixin of ``verify._Checker``, placed
before ``OffloadRules`` (its ``op_UploadShard`` adds a check, then defers to theirs)."""

from __future__ import annotations

from fzero.schedule import ops as O


class FileRules:
    def init_files(self, schedule) -> None:
        self.state_reads: set[int] = set()  # read, not yet stepped and written
        self.shard_reads: set[int] = set()  # read, not yet uploaded
        self.file_writes = False

    def op_ReadStateFromFile(self, op: O.ReadStateFromFile) -> None:
        if op.unit in self.state_reads:
            self.fail("file-io", op.unit, "state read again before its step wrote it back")
        self.state_reads.add(op.unit)

    def op_WriteStateToFile(self, op: O.WriteStateToFile) -> None:
        if op.unit not in self.host_stepped and op.unit not in self.applied_now:
            self.fail("file-io", op.unit, "state written to its file before its CPU step")
        if op.state_nbytes:  # the master and moments are in files: the step read them
            if op.unit not in self.state_reads:
                self.fail("file-io", op.unit, "stepped without ReadStateFromFile before")
            self.state_reads.discard(op.unit)
        self.file_writes = True

    def op_ReadShardFromFile(self, op: O.ReadShardFromFile) -> None:
        if op.unit in self.shard_reads:
            self.fail("file-io", op.unit, "shard read twice before its upload")
        self.shard_reads.add(op.unit)

    def op_UploadShard(self, op: O.UploadShard) -> None:
        if op.from_file:
            if op.unit not in self.shard_reads:
                self.fail("file-io", op.unit, "uploaded without ReadShardFromFile before")
            self.shard_reads.discard(op.unit)
        elif op.unit in self.shard_reads:
            self.fail("file-io", op.unit, "read from its file, then uploaded from memory")
        super().op_UploadShard(op)

    def op_WaitFileWrites(self, op: O.WaitFileWrites) -> None:
        self.file_writes = False

    def end_step_files(self) -> None:
        if self.file_writes:
            self.fail("file-io", -1, "file writes in flight at the end of the step")
        for unit in sorted(self.state_reads):
            self.fail("file-io", unit, "state read from its file but never stepped")
