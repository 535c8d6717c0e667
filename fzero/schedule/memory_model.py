"""Bytes per parameter, and the per-rank model-state formulas of the ZeRO paper.

One description (``BytesPerParam``) feeds both ``fzero.memory.estimate_memory`` (the paper's
closed formulas, ``model_states``) and ``simulate`` (``MemoryModel``: the bytes a rank holds for
the whole step besides what the schedule's ops allocate and free), so the two agree: before the
first op of a step, the simulated parameters (stage 3: the persistent shards), gradients and
optimizer state are exactly ``model_states`` of the schedule's padded parameter count.
"""

from __future__ import annotations

from dataclasses import dataclass

from fzero.schedule import ops as O
from fzero.schedule.schedule import Schedule

DTYPE_NBYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def dtype_nbytes(name: str) -> int:
    try:
        return DTYPE_NBYTES[name]
    except KeyError:
        raise ValueError(
            f"unknown dtype {name!r}; expected one of {sorted(DTYPE_NBYTES)}"
        ) from None


@dataclass(frozen=True)
class BytesPerParam:
    """Bytes one parameter element costs in each buffer that holds it.

    The default is the ZeRO paper's mixed-precision Adam: 2-byte parameters and gradients and
    K = 12 bytes of optimizer state (fp32 master weights, momentum and variance).
    """

    parameter: int = 2  # the compute-dtype copy that forward and backward read
    gradient: int = 2  # the full gradient buffers backward writes (compute dtype)
    gradient_shard: int = 2  # the accumulated gradient the optimizer reads
    optimizer_state: int = 12  # K: master weights + AdamW moments

    @classmethod
    def from_dtypes(
        cls,
        compute_dtype: str = "bf16",
        master_dtype: str = "fp32",
        grad_accum_dtype: str | None = None,
        moment_dtype: str = "fp32",
    ) -> BytesPerParam:
        """``grad_accum_dtype`` None: the compute dtype, as in the paper. When the master dtype
        is the compute dtype, the parameters are the master weights: K counts the moments only."""
        compute = dtype_nbytes(compute_dtype)
        master = 0 if master_dtype == compute_dtype else dtype_nbytes(master_dtype)
        return cls(
            parameter=compute,
            gradient=compute,
            gradient_shard=dtype_nbytes(grad_accum_dtype or compute_dtype),
            optimizer_state=master + 2 * dtype_nbytes(moment_dtype),
        )


@dataclass(frozen=True)
class ModelStates:
    """Per-rank bytes of the three model states."""

    parameters: int
    gradients: int
    optimizer_state: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state


def model_states(
    numel: int,
    world_size: int,
    stage: int,
    bytes_per_param: BytesPerParam = BytesPerParam(),
    trainable_numel: int | None = None,
) -> ModelStates:
    """The ZeRO paper's per-rank bytes for ``numel`` parameters (Figure 1, with 2 + 2 + K):
    stage 0 (2 + 2 + K) numel, stage 1 (2 + 2) numel + K numel/N, stage 2 2 numel +
    (2 + K) numel/N, stage 3 (2 + 2 + K) numel/N. Gradients and optimizer state exist for the
    ``trainable_numel`` elements only (default: all). Shards round up, like padded buffers."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage}")
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    b = bytes_per_param
    trainable = numel if trainable_numel is None else trainable_numel

    def per_rank(count: int, sharded: bool) -> int:
        return -(-count // world_size) if sharded else count

    gradients = per_rank(trainable, stage >= 2) * (b.gradient if stage < 2 else b.gradient_shard)
    if stage == 0 and b.gradient_shard != b.gradient:
        # Stage 0 accumulates into the shard (the whole model) beside the compute-dtype
        # gradients; in one dtype the two are the same buffer.
        gradients += trainable * b.gradient_shard
    return ModelStates(
        parameters=per_rank(numel, stage == 3) * b.parameter,
        gradients=gradients,
        optimizer_state=per_rank(trainable, stage >= 1) * b.optimizer_state,
    )


@dataclass(frozen=True)
class MemoryModel:
    """Bytes one rank holds for the whole step that no op of the schedule allocates.

    ``parameter_shard_nbytes``: the compute-dtype shard gathers read from (stages 1-3; in stage
    0 the full parameters are the shard). ``gradient_shard_nbytes``: the accumulated gradient
    when it lives across steps (stage 0 unless it is the gradient buffers themselves, stages 2
    and 3; stage 1's comes and goes with ``ZeroGradShard``/``FreeGradShard``).
    ``optimizer_state_nbytes``: master weights and moments of this rank's shard.
    """

    parameter_shard_nbytes: int = 0
    gradient_shard_nbytes: int = 0
    optimizer_state_nbytes: int = 0

    @classmethod
    def from_schedule(
        cls, schedule: Schedule, bytes_per_param: BytesPerParam = BytesPerParam()
    ) -> MemoryModel:
        """Read the sizes from the schedule: the padded parameter bytes of its units, the
        optimizer shard of its ``OptimizerStep`` and the gradient shard of its
        ``ZeroGradShard``; ``bytes_per_param`` converts element counts to bytes."""
        b, stage = bytes_per_param, schedule.stage
        step_ops = [op for entry in schedule.step for op in entry.ops]
        shard_world = schedule.world_size if stage > 0 else 1
        padded_numel = sum(u.param_nbytes for u in schedule.units) // b.parameter
        shard_numel = -(-padded_numel // shard_world)
        optimizer_numel = next(
            (op.shard_numel for op in step_ops if isinstance(op, O.OptimizerStep)), shard_numel
        )
        grad_shard_nbytes = next(
            (op.nbytes for op in step_ops if isinstance(op, O.ZeroGradShard)),
            optimizer_numel * b.gradient_shard,
        )
        if stage == 1 or (stage == 0 and b.gradient_shard == b.gradient):
            grad_shard_nbytes = 0
        return cls(
            parameter_shard_nbytes=0 if stage == 0 else shard_numel * b.parameter,
            gradient_shard_nbytes=grad_shard_nbytes,
            optimizer_state_nbytes=optimizer_numel * b.optimizer_state,
        )
