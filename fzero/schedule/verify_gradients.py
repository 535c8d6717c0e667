"""verify's rules for gradients: zeroing, reductions and their waits, the gradient shard, and
the step phase's reads of it (``ReduceScalars``, ``OptimizerStep``). A mixin of
``verify._Checker``, whose replay state (``grad_alive``, ``reducing``, ``shard_alive``, ...)
and ``fail`` these methods use; the module docstring of ``verify.py`` states the invariants."""

from __future__ import annotations

from fzero.schedule import ops as O


class GradientRules:
    def begin_backward(self, unit: int) -> None:
        """A unit's backward starts: it will write its gradient."""
        self.backward.add(unit)
        self.backward_seen.add(unit)
        if unit not in self.trainable:
            return
        if self.mode != "step" and unit in self.reduced:
            self.fail(
                "reduce-after-backward",
                unit,
                "backward runs after the gradient was "
                f"reduced at {self.reduced[unit]}: that gradient would be lost",
            )
        if unit not in self.grad_alive:
            self.fail(
                "zero-grad-before-backward",
                unit,
                "backward runs with no gradient buffer: ZeroGrad (DropGrads in stages 2 "
                "and 3) is missing before it",
            )
        if unit in self.grad_stale:
            self.fail(
                "zero-grad-before-backward",
                unit,
                "backward adds onto a gradient that "
                "was already reduced: ZeroGrad (DropGrads in stages 2 and 3) is missing after "
                "the reduction",
            )
        if unit in self.reducing:
            self.fail(
                "reduce-after-backward",
                unit,
                "backward writes the gradient while its reduction is in flight",
            )
        self.grad_dirty.add(unit)

    # -- gradient ops -----------------------------------------------------------------------

    def op_ZeroGrad(self, op: O.ZeroGrad | O.DropGrads) -> None:
        unit, name = op.unit, type(op).__name__
        if unit not in self.trainable:
            self.fail("zero-grad-before-backward", unit, f"{name}, but no trainable parameters")
        if unit in self.reducing:
            self.fail(
                "zero-grad-before-backward",
                unit,
                f"{name} while the reduction reading the gradient is in flight",
            )
        if unit in self.grad_dirty:
            self.fail(
                "zero-grad-before-backward",
                unit,
                f"{name} discards a gradient that was never reduced",
            )
        self.grad_alive.add(unit)
        self.grad_stale.discard(unit)

    # Stages 2 and 3 start a unit's gradients by dropping .grad: the same rules.
    op_DropGrads = op_ZeroGrad

    def op_AllocGrad(self, op: O.AllocGrad) -> None:
        # Materialises the buffer as zeros unless it is alive (holding this step's earlier
        # micro-batches: then nothing happens).
        unit = op.unit
        if unit not in self.trainable:
            self.fail("zero-grad-before-backward", unit, "AllocGrad, but no trainable parameters")
        if unit in self.reducing:
            self.fail(
                "zero-grad-before-backward",
                unit,
                "AllocGrad while the reduction reading the gradient is in flight",
            )
        self.grad_alive.add(unit)

    def op_ReduceScatter(self, op: O.ReduceScatter) -> None:
        self.reduce(op)

    def op_WriteGradShard(self, op: O.WriteGradShard) -> None:
        self.reduce(op)

    def op_ReduceInOrder(self, op: O.ReduceInOrder) -> None:
        if op.whole_unit != (self.stage == 0):
            self.fail(
                "reduce-kind",
                op.unit,
                f"ReduceInOrder with whole_unit={op.whole_unit} in stage {self.stage} "
                "(only stage 0, which owns whole units, gathers them whole)",
            )
        self.reduce(op)

    def op_AllReduce(self, op: O.AllReduce) -> None:
        self.reduce(op)

    def reduce(
        self, op: O.ReduceScatter | O.AllReduce | O.ReduceInOrder | O.WriteGradShard
    ) -> None:
        unit, name = op.unit, type(op).__name__
        expected = "AllReduce" if self.stage == 0 else "ReduceScatter"
        if self.stage >= 2 and self.world_size == 1:
            expected = "WriteGradShard"
        if self.mode == "ordered":
            expected = "ReduceInOrder"
        if name != expected:
            how = "deterministic mode" if self.mode == "ordered" else f"stage {self.stage}"
            self.fail("reduce-kind", unit, f"{how} reduces gradients with {expected}, not {name}")
        if name == "WriteGradShard" and unit in self.streamed_units:
            self.require_holder(unit, "WriteGradShard writes it")
        phases = {
            "step": ("step",),
            "last_micro_batch": ("last_micro_step",),
        }.get(self.mode, ("micro_step", "last_micro_step"))
        if self.phase not in phases:
            how = f"stage {self.stage}" if self.mode != "ordered" else "deterministic mode"
            if self.mode == "last_micro_batch":
                how = "reduce_every_micro_batch: false"
            self.fail(
                "reduce-once",
                unit,
                f"reduced in the {self.phase}, but {how} reduces gradients in the "
                f"{' or '.join(phases)} phase",
            )
        if unit not in self.trainable:
            self.fail("reduce-once", unit, "reduced, but has no trainable parameters")
        if unit in self.reduced:
            per = "micro-batch" if self.per_micro else "step"
            self.fail(
                "reduce-once", unit, f"reduced twice in one {per} (first at {self.reduced[unit]})"
            )
        if unit in self.backward:
            self.fail(
                "reduce-after-backward",
                unit,
                "reduced before its backward finished (post_backward)",
            )
        if unit not in self.grad_alive:
            self.fail(
                "zero-grad-before-backward",
                unit,
                "reduces a gradient buffer that was never allocated (ZeroGrad missing)",
            )
        self.reducing[unit] = op
        self.reduced[unit] = self.where
        self.grad_dirty.discard(unit)
        self.grad_stale.add(unit)

    def op_WaitReduce(self, op: O.WaitReduce) -> None:
        unit = op.unit
        reduction = self.reducing.pop(unit, None)
        if reduction is None:
            self.fail("wait-after-reduce", unit, "WaitReduce with no reduction in flight")
        if unit in self.streamed_units:
            self.streamed_landing(unit)
        elif not self.shard_alive:
            self.fail(
                "grad-shard",
                unit,
                "the reduction lands in a gradient shard that is not "
                "allocated (ZeroGradShard missing)",
            )
        self.shard_holds.add(unit)
        self.normed.discard(unit)  # a new landing: its norm is recorded anew
        if op.frees_nbytes:
            self.grad_alive.discard(unit)
            self.grad_stale.discard(unit)

    def op_AllocGradShard(self, op: O.AllocGradShard) -> None:
        # Materialises the shard; on a shard that is alive (it holds this step's earlier
        # reductions) it does nothing.
        if self.shard_alive:
            return
        self.shard_alive, self.shard_consumed = True, False
        self.shard_holds.clear()

    def op_ZeroGradShard(self, op: O.ZeroGradShard) -> None:
        # The step phase's: materialises the shard if needed and zeroes the slices no
        # reduction wrote; what reductions wrote stays.
        if self.phase != "step":
            self.fail("grad-shard", -1, "ZeroGradShard outside the step phase (AllocGradShard?)")
        self.op_AllocGradShard(op)

    def op_FreeGradShard(self, op: O.FreeGradShard) -> None:
        if not self.shard_alive:
            self.fail("grad-shard", -1, "FreeGradShard of a gradient shard that is not allocated")
        self.require_shard_consumed("FreeGradShard frees")
        self.shard_alive = False
        self.shard_holds.clear()

    def require_shard_consumed(self, action: str) -> None:
        if self.shard_holds and not self.shard_consumed:
            held = sorted(self.shard_holds)
            self.fail(
                "grad-shard",
                -1,
                f"{action} the reduced gradients of units {held} before OptimizerStep read them",
            )

    # -- step ops ---------------------------------------------------------------------------

    def require_gradients_reduced(self, reader: str, reads_shard: bool = True) -> None:
        """``reads_shard`` False: the reader needs no gradient shard (host steps and the
        scalars under streamed gradients, whose gradients are down or summed already)."""
        if self.phase != "step":
            self.fail("optimizer-after-reduce", -1, f"{reader} runs outside the step phase")
        for unit in sorted(self.reducing):
            self.fail(
                "optimizer-after-reduce",
                unit,
                f"{reader} reads the gradient shard while "
                "this unit's reduction is in flight (WaitReduce missing before it)",
            )
        if self.mode == "step":
            for unit in sorted(self.trainable - set(self.reduced)):
                self.fail(
                    "reduce-once",
                    unit,
                    f"{reader} reads the gradient shard, but this "
                    "unit's gradient was never reduced in this step",
                )
        if reads_shard and not self.shard_alive:
            self.fail("grad-shard", -1, f"{reader} reads a gradient shard that is not allocated")

    def op_ReduceScalars(self, op: O.ReduceScalars) -> None:
        if op.summed_per_unit != self.streaming:
            why = (
                "reads the gradient shard, but streamed gradients leave only the device units' "
                "part there (summed_per_unit missing)"
                if self.streaming
                else "sums per-unit norms, but gradients do not stream: no unit adds its norm"
            )
            self.fail("grad-shard", -1, f"ReduceScalars {why}")
        self.require_gradients_reduced("ReduceScalars", reads_shard=not self.streaming)
        for unit in sorted(self.shard_holds - self.normed) if self.streaming else ():
            self.fail("grad-shard", unit, "landed, but AccumulateGradNorm never added its norm")
        self.scalars_done = True

    def op_ReduceScalarsInOrder(self, op: O.ReduceScalarsInOrder) -> None:
        self.require_gradients_reduced("ReduceScalarsInOrder")
        self.scalars_done = True

    def op_OptimizerStep(self, op: O.OptimizerStep) -> None:
        # Streamed gradients under full offload leave no device part to step.
        self.require_gradients_reduced("OptimizerStep", reads_shard=True)
        if not self.scalars_done:
            self.fail(
                "optimizer-after-reduce",
                -1,
                "OptimizerStep runs before ReduceScalars, so gradient clipping has no global norm",
            )
        if self.optimizer_done:
            self.fail("optimizer-after-reduce", -1, "OptimizerStep runs twice in one step")
        if op.units:  # partial offload: the device part; the host steps the other units
            self.step_device_part(op)
            return
        self.optimizer_done = self.shard_consumed = True
