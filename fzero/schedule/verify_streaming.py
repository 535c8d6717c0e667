"""verify's rules for streamed gradients (``streamed_grads.py``): a host unit lands in the
gradient buffer, which it holds from its ``AllocUnitGrad`` until ``AccumulateGradNorm`` and
``CopyGradToHost`` have read it; the next unit takes the buffer only then, and
``FreeGradBuffer`` frees it before the step ends. A unit landing again in a step, after its
copy down, must have had its sum brought back up first (``GradFromHost``), or the earlier
micro-batches' gradient would be lost. A mixin of ``verify._Checker``; the landing
and scalar rules that also hold without streaming are in ``verify_gradients.py``."""

from __future__ import annotations

from fzero.schedule import ops as O


class StreamingRules:
    def init_streaming(self, schedule) -> None:
        """Streamed gradients (``streamed_grads.py``): host units land in the gradient buffer,
        one unit at a time, and leave it once their norm was added and their copy down issued."""
        streaming = schedule.grad_streaming
        self.streamed_units = streaming.host_units if streaming is not None else frozenset()
        self.streaming = streaming is not None
        self.buffer_alive = False
        self.buffer_holder: int | None = None
        self.buffer_done = True  # the holder's gradient was copied down: the buffer may be reused
        self.buffer_carries = False  # the holder's sum so far was brought up (GradFromHost)
        self.normed: set[int] = set()  # units whose latest landing's squared norm is recorded
        self.sent_down: set[int] = set()  # streamed units copied down in this step

    def require_holder(self, unit: int, action: str) -> None:
        if self.buffer_holder != unit:
            self.fail(
                "grad-shard",
                unit,
                f"{action}, but the gradient buffer does not hold this unit (AllocUnitGrad "
                "missing before it)",
            )

    def op_AllocUnitGrad(self, op: O.AllocUnitGrad) -> None:
        if op.unit not in self.streamed_units:
            self.fail(
                "grad-shard", op.unit, "AllocUnitGrad for a unit whose gradient does not stream"
            )
        if not self.buffer_done:
            self.fail(
                "grad-shard",
                op.unit,
                f"takes the gradient buffer while unit {self.buffer_holder}'s gradient in it was "
                "not copied down yet (CopyGradToHost missing)",
            )
        self.buffer_alive, self.buffer_holder, self.buffer_done = True, op.unit, False
        self.buffer_carries = False

    def op_GradFromHost(self, op: O.GradFromHost) -> None:
        self.require_holder(op.unit, "GradFromHost brings its sum up")
        if op.unit in self.shard_holds and op.unit not in self.sent_down:
            self.fail(
                "grad-shard",
                op.unit,
                "GradFromHost over a landed gradient that was not copied down: it would be lost",
            )
        self.buffer_carries = op.unit in self.sent_down

    def streamed_landing(self, unit: int) -> None:
        """A streamed unit's reduction lands in the buffer: after a copy down in this step,
        only onto its sum brought back up."""
        self.require_holder(unit, "its reduction lands")
        if unit in self.sent_down and not self.buffer_carries:
            self.fail(
                "grad-shard",
                unit,
                "lands again in this step after its copy down without GradFromHost: the "
                "earlier micro-batches' gradient would be lost",
            )
        self.normed.discard(unit)

    def op_FreeGradBuffer(self, op: O.FreeGradBuffer) -> None:
        if not self.buffer_alive:
            self.fail("grad-shard", -1, "FreeGradBuffer of a gradient buffer that is not allocated")
        if not self.buffer_done:
            self.fail(
                "grad-shard",
                self.buffer_holder,
                "FreeGradBuffer frees the gradient before it was copied down",
            )
        self.buffer_alive, self.buffer_holder = False, None

    def op_AccumulateGradNorm(self, op: O.AccumulateGradNorm) -> None:
        if op.unit not in self.shard_holds:
            self.fail("grad-shard", op.unit, "AccumulateGradNorm before the gradient landed")
        if op.unit in self.normed:
            self.fail("grad-shard", op.unit, "squared norm recorded twice for one landing")
        if op.unit in self.streamed_units:
            self.require_holder(op.unit, "AccumulateGradNorm reads it")
        self.normed.add(op.unit)

    def copied_down(self, unit: int) -> None:
        """``CopyGradToHost`` of ``unit``: under streaming its norm is in and the buffer free."""
        if unit not in self.streamed_units:
            return
        self.require_holder(unit, "CopyGradToHost reads it")
        if unit not in self.normed:
            self.fail(
                "grad-shard",
                unit,
                "copied down before AccumulateGradNorm added its norm: the buffer may be reused",
            )
        self.buffer_done = True
        self.sent_down.add(unit)

    def end_step_streaming(self) -> None:
        if self.buffer_alive:
            self.fail(
                "end-of-step", -1, "the gradient buffer outlives the step (FreeGradBuffer missing)"
            )
        self.normed.clear()
        self.sent_down.clear()
        if self.streaming:
            self.shard_holds.clear()
