"""verify's rules for offload's ops: a gradient goes down only after its reduction landed, the
host steps read the step's scalars and every gradient, each unit steps once, and nothing reads
the updated parameters before their upload was waited on. A unit whose CPU step waits for the
next step (``ApplyPendingUpdate``) is not gathered or uploaded before that step applies it, and
its ``UploadUpdate`` follows the update. Under partial offload with parameter offload, a device
unit's ``CopyParamsToHost`` follows its device step and precedes its next ``UploadShard``. A
mixin of ``verify._Checker``."""

from __future__ import annotations

from fzero.schedule import ops as O
from fzero.schedule.verify_parameters import RELEASED


class OffloadRules:
    def init_offload(self, schedule) -> None:
        # Units whose CPU step runs in the next step's first forward, and those of them whose
        # update is decided and not yet applied (across the step boundary).
        self.deferred = {
            op.unit
            for entry in schedule.first_micro_extra
            for op in entry.ops
            if isinstance(op, O.ApplyPendingUpdate)
        }
        self.pending_units: set[int] = set()
        self.applied_now: set[int] = set()
        # Partial offload with parameter offload: device units stepped whose values have not
        # reached the host shard yet (CopyParamsToHost), across the step boundary too.
        self.params_offloaded = any(isinstance(op, O.UploadShard) for op in schedule.ops(1))
        self.copies_to_host_owed: set[int] = set()

    def reset_offload(self) -> None:
        self.host_scalars = False
        self.host_stepped: set[int] = set()
        self.uploads_pending: set[int] = set()

    def op_CopyGradToHost(self, op: O.CopyGradToHost) -> None:
        if op.unit in self.reducing:
            self.fail(
                "offload-copy",
                op.unit,
                "copied to the host while its reduction is in flight (WaitReduce missing before)",
            )
        if op.unit not in self.shard_holds:
            self.fail("offload-copy", op.unit, "copied to the host before its reduction landed")
        self.copied_down(op.unit)

    def op_ScalarsToHost(self, op: O.ScalarsToHost) -> None:
        if not self.scalars_done:
            self.fail("optimizer-after-reduce", -1, "ScalarsToHost runs before ReduceScalars")
        self.host_scalars = True
        if self.deferred:  # their gradient and factors wait on the host for the next step
            self.require_gradients_reduced(
                "ScalarsToHost keeps the pending update", reads_shard=not self.streaming
            )
            self.pending_units = set(self.deferred)
            self.host_stepped |= self.deferred
            self.shard_consumed = True
            stepping = {u.index for u in self.units.values() if u.optimizer_numel}
            if stepping <= self.host_stepped and not self.uploads_pending:
                self.optimizer_done = True

    def op_ApplyPendingUpdate(self, op: O.ApplyPendingUpdate) -> None:
        if op.unit not in self.deferred:
            self.fail("pending-update", op.unit, "ApplyPendingUpdate for a unit not deferred")
        if self.params.get(op.unit) != RELEASED and op.unit not in self.kept:
            self.fail("pending-update", op.unit, "update applied after the unit was gathered")
        self.pending_units.discard(op.unit)  # nothing pending in the first step: a no-op
        self.applied_now.add(op.unit)

    def op_UploadUpdate(self, op: O.UploadUpdate) -> None:
        if op.unit not in self.applied_now:
            self.fail("pending-update", op.unit, "UploadUpdate before its ApplyPendingUpdate")
        self.applied_now.discard(op.unit)

    def require_no_pending_update(self, unit: int, action: str) -> None:
        if unit in self.pending_units:
            self.fail(
                "pending-update",
                unit,
                f"{action} before ApplyPendingUpdate applied the previous step's update",
            )

    def op_HostOptimizerStep(self, op: O.HostOptimizerStep) -> None:
        self.require_gradients_reduced("HostOptimizerStep", reads_shard=not self.streaming)
        if not self.host_scalars:
            self.fail(
                "optimizer-after-reduce",
                op.unit,
                "HostOptimizerStep runs before ScalarsToHost: skipping and clipping unknown",
            )
        if op.unit in self.host_stepped:
            self.fail("optimizer-after-reduce", op.unit, "HostOptimizerStep runs twice")
        self.host_stepped.add(op.unit)
        self.shard_consumed = True
        stepping = {u.index for u in self.units.values() if u.optimizer_numel}
        if stepping <= self.host_stepped and not self.uploads_pending:
            self.optimizer_done = True

    def step_device_part(self, op: O.OptimizerStep) -> None:
        """Partial offload's ``OptimizerStep`` over the device units (``op.units``): after
        ``ScalarsToHost``, which counts the step it reads; each of its units steps once, and
        the step is done once the host units have stepped too."""
        if not self.host_scalars:
            self.fail(
                "optimizer-after-reduce",
                -1,
                "OptimizerStep of the device units runs before ScalarsToHost counted the step",
            )
        twice = self.host_stepped & set(op.units)
        if twice:
            self.fail("optimizer-after-reduce", min(twice), "steps on the host and the device")
        self.host_stepped |= set(op.units)  # every unit stepped, on the host or the device
        if self.params_offloaded:  # their compute-dtype shards are on the host
            self.copies_to_host_owed |= set(op.units)
        self.shard_consumed = True
        stepping = {u.index for u in self.units.values() if u.optimizer_numel}
        self.optimizer_done = stepping <= self.host_stepped and not self.uploads_pending

    def op_CopyParamsToDevice(self, op: O.CopyParamsToDevice) -> None:
        if op.unit not in self.host_stepped:
            self.fail("offload-copy", op.unit, "uploaded before its HostOptimizerStep")
        self.uploads_pending.add(op.unit)
        self.optimizer_done = False

    def op_WaitUploads(self, op: O.WaitUploads) -> None:
        self.uploads_pending.clear()
        stepping = {u.index for u in self.units.values() if u.optimizer_numel}
        self.optimizer_done = stepping <= self.host_stepped

    def op_CopyParamsToHost(self, op: O.CopyParamsToHost) -> None:
        for unit in op.units:
            if unit not in self.copies_to_host_owed:
                self.fail(
                    "offload-copy",
                    unit,
                    "CopyParamsToHost of a unit that no device OptimizerStep stepped before it",
                )
        self.copies_to_host_owed -= set(op.units)

    def op_UploadShard(self, op: O.UploadShard) -> None:
        self.require_no_pending_update(op.unit, "uploaded")
        if op.unit in self.copies_to_host_owed:
            self.fail(
                "offload-copy",
                op.unit,
                "uploaded before CopyParamsToHost wrote its device step's values into the host "
                "shard: the gather would send the old parameters",
            )
        if self.stage != 3:
            self.fail("offload-copy", op.unit, "UploadShard outside stage 3")

    def require_uploads_waited(self, unit: int) -> None:
        if self.uploads_pending:
            self.fail(
                "refresh-after-optimizer",
                unit,
                "gathered while uploads of updated parameters are in flight (WaitUploads missing)",
            )
