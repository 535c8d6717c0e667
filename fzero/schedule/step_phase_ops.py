"""The step phase's own ops: the global loss and gradient norm (``ReduceScalars``, and its
fixed-order twin) and the AdamW step over this rank's shard. ``fzero/schedule/ops.py`` names
them with the rest."""

from __future__ import annotations

from dataclasses import dataclass

from fzero.schedule.ops import Op, _size, _unit_label


@dataclass(frozen=True)
class ReduceScalars(Op):
    """One tiny all-reduce of (loss, squared gradient norm) so every rank sees global values.
    A non-finite norm on any rank makes the global one non-finite: that is the overflow check.
    ``replicated_gradient``: every rank holds the same whole gradient (stage 0), so only rank
    0 contributes its squared norm."""

    replicated_gradient: bool = False
    # Streamed gradients: the squared norm is the sum ``AccumulateGradNorm`` kept, unit by unit,
    # as each gradient landed; no gradient shard is read here.
    summed_per_unit: bool = False

    def __str__(self) -> str:
        once = "  (rank 0's norm: the gradient is replicated)" if self.replicated_gradient else ""
        if self.summed_per_unit:
            once = "  (grad_norm^2 summed per unit as each landed)"
        return f"ReduceScalars loss, grad_norm^2  8 B{once}"


@dataclass(frozen=True)
class AccumulateGradNorm(Op):
    """Streamed gradients: record unit ``unit``'s squared gradient norm (fp32, on the device),
    right after the unit's gradient landed and before it is copied down; a later landing in the
    step (gradient accumulation: onto its sum so far) replaces it. ``ReduceScalars`` all-reduces
    the sum of the recorded norms, added in the order of the units' last landings (the
    schedule's), so every run sums the same values in the same order."""

    unit: int
    name: str

    def __str__(self) -> str:
        return f"AccumulateGradNorm {_unit_label(self.unit, self.name)}"


@dataclass(frozen=True)
class ReduceScalarsInOrder(Op):
    """Deterministic mode's ``ReduceScalars``: the reduced gradient is gathered one unit at a
    time (``grad_nbytes`` in all; 0 in stage 0, where every rank holds all of it) and every rank
    sums each parameter's squared norm in the model's parameter order; the losses are gathered
    and summed in rank order. No float sum is left to a collective."""

    grad_nbytes: int

    def __str__(self) -> str:
        return f"ReduceScalarsInOrder loss, grad_norm^2  gathers {_size(self.grad_nbytes)}"


@dataclass(frozen=True)
class OptimizerStep(Op):
    """AdamW over this rank's whole flat shard in one pass (one launch per contiguous run); in
    stages 0-2 it also writes the compute-dtype parameters, in stage 3 the next gathers cast
    the master. ``shard_numel`` elements.

    ``units`` (partial optimizer offload, ``offload_optimizer.ratio`` < 1): only these units'
    part of the shard, the device part, which steps here while the host steps the rest
    (``HostOptimizerStep``); ``ScalarsToHost`` before it has counted the step. With parameter
    offload it writes no compute-dtype values: ``CopyParamsToHost`` after it does. Empty: every
    unit, and this op counts the step."""

    shard_numel: int
    units: tuple[int, ...] = ()

    def __str__(self) -> str:
        if not self.units:
            return f"OptimizerStep {self.shard_numel:,} elements"
        listed = ", ".join(str(u) for u in self.units)
        return f"OptimizerStep {self.shard_numel:,} elements on the device: units {listed}"
