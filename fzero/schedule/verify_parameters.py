"""verify's rules for parameters: a unit is released, gathering or ready, must be ready while it
computes, is gathered once (the step phase's refresh aside) and released only after its last
use. A mixin of ``verify._Checker``, whose replay state (``params``, ``kept``, ``forward``, ...)
and ``fail`` these methods use; the module docstring of ``verify.py`` states the invariants."""

from __future__ import annotations

from fzero.schedule import ops as O

RELEASED, GATHERING, READY = "released", "gathering", "ready"


class ParameterRules:
    def require_ready(self, unit: int, use: str) -> None:
        state = self.params.get(unit, RELEASED)
        if state == GATHERING:
            self.fail(
                "gather-before-use",
                unit,
                f"used by {use} while its AllGather is in flight (WaitGather missing)",
            )
        if state == RELEASED:
            self.fail(
                "gather-before-use",
                unit,
                f"used by {use} but not gathered (AllGather and WaitGather missing, or released)",
            )

    def op_AllGather(self, op: O.AllGather) -> None:
        unit, state = op.unit, self.params.get(op.unit, RELEASED)
        if self.stage == 0:
            self.fail("gather-once", unit, "stage 0 does not shard parameters: nothing to gather")
        self.require_no_pending_update(unit, "gathered")
        refresh = unit in self.kept and self.phase == "step" and state == READY
        if refresh:
            self.require_uploads_waited(unit)
        if refresh and not self.optimizer_done:
            self.fail(
                "refresh-after-optimizer",
                unit,
                "re-gathered before OptimizerStep updated its shard",
            )
        if state != RELEASED and not (refresh and unit not in self.refreshed):
            self.fail("gather-once", unit, f"gathered while already alive ({state})")
        if refresh:
            self.refreshed.add(unit)
        self.params[unit] = GATHERING
        alive = sorted(i for i, s in self.params.items() if s != RELEASED)
        live = sum(self.units[i].param_nbytes for i in alive)
        if self.stage == 3 and self.max_live_nbytes is not None and live > self.max_live_nbytes:
            self.fail(
                "max-live-bytes",
                unit,
                f"{live} gathered bytes alive (units {alive}) "
                f"exceed max_live_nbytes={self.max_live_nbytes}",
            )

    def op_WaitGather(self, op: O.WaitGather) -> None:
        if self.params.get(op.unit) != GATHERING:
            self.fail("wait-after-gather", op.unit, "WaitGather with no AllGather in flight")
        self.params[op.unit] = READY

    def op_Release(self, op: O.Release) -> None:
        unit, state = op.unit, self.params.get(op.unit, RELEASED)
        if unit in self.kept:
            kept = "it is persistent" if self.stage == 3 else f"stage {self.stage} keeps it"
            self.fail("release-stage-3-only", unit, f"released, but {kept}: always gathered")
        if state != READY:
            what = "its AllGather is in flight" if state == GATHERING else "it is not gathered"
            self.fail("release-after-gather", unit, f"released while {what}")
        for pass_name, computing in (("forward", self.forward), ("backward", self.backward)):
            if unit in computing:
                self.fail(
                    "release-after-last-use",
                    unit,
                    f"released during its {pass_name} (before its post_{pass_name})",
                )
        if unit in self.recomputing:
            self.fail(
                "release-after-last-use",
                unit,
                "released between its pre_recompute and its post_backward, while backward "
                "still reads the recomputed activations",
            )
        self.params[unit] = RELEASED
