"""Bytes per parameter, and the per-rank model-state formulas of the ZeRO paper and of fzero.

One description (``BytesPerParam``) feeds both ``fzero.memory.estimate_memory`` (the closed
formulas, ``model_states``) and ``simulate`` (``MemoryModel``: the bytes a rank holds for the
whole step besides what the schedule's ops allocate and free), so the two agree: before the
first op of a step the simulated parameters, gradients and optimizer state are exactly
``model_states(..., layout="fzero").between_steps`` of the schedule's padded parameter count,
and at its ``OptimizerStep`` exactly its ``total``.
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


LAYOUTS = ("paper", "fzero")


@dataclass(frozen=True)
class ModelStates:
    """Per-rank bytes of the three model states at the optimizer step, where they peak.

    ``transient_gradients``: the part of ``gradients`` alive only from a step's first reduction
    to its optimizer step (fzero's gradient shard in stages 1-3; the paper counts none).
    """

    parameters: int
    gradients: int
    optimizer_state: int
    transient_gradients: int = 0

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state

    @property
    def between_steps(self) -> int:
        """What a rank keeps from one step to the next."""
        return self.total - self.transient_gradients


def model_states(
    numel: int,
    world_size: int,
    stage: int,
    bytes_per_param: BytesPerParam = BytesPerParam(),
    trainable_numel: int | None = None,
    layout: str = "paper",
) -> ModelStates:
    """Per-rank bytes for ``numel`` parameters on N = ``world_size`` ranks.

    ``layout="paper"``: the ZeRO paper (Figure 1, with 2 + 2 + K): stage 0 (2 + 2 + K) numel,
    stage 1 (2 + 2) numel + K numel/N, stage 2 2 numel + (2 + K) numel/N, stage 3
    (2 + 2 + K) numel/N. ``layout="fzero"``, at the optimizer step: stage 0 as the paper,
    stage 1 (2 + 2) numel + (2 + K) numel/N, stage 2 as the paper, stage 3 (2 + K) numel/N;
    the gradient shard (the 2 numel/N) of stages 1-3 is ``transient_gradients``, so
    ``between_steps`` is (2 + 2) numel + K numel/N, 2 numel + K numel/N and K numel/N. The
    gradient shard's 2 is ``bytes_per_param.gradient_shard``.

    Gradients and optimizer state exist for the ``trainable_numel`` elements only (default:
    all); in fzero's stage 3 only the frozen elements keep a compute-dtype shard. Shards round
    up, like padded buffers.
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage}")
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    b = bytes_per_param
    trainable = numel if trainable_numel is None else trainable_numel

    def per_rank(count: int, sharded: bool) -> int:
        return -(-count // world_size) if sharded else count

    gradients = per_rank(trainable, stage >= 2) * (b.gradient if stage < 2 else b.gradient_shard)
    if stage == 0 and b.gradient_shard != b.gradient:
        # Stage 0 accumulates into the shard (the whole model) beside the compute-dtype
        # gradients; in one dtype the two are the same buffer.
        gradients += trainable * b.gradient_shard
    parameters = per_rank(numel, stage == 3) * b.parameter
    transient = 0
    if layout == "fzero" and stage >= 1:
        # The gradient shard lives only from a step's first reduction to its optimizer step;
        # stage 1 reduces into it beside its full gradients.
        transient = per_rank(trainable, True) * b.gradient_shard
        gradients = trainable * b.gradient + transient if stage == 1 else transient
        if stage == 3:  # gathers cast the master on the fly: no compute-dtype shard is kept
            parameters = per_rank(numel - trainable, True) * b.parameter
    return ModelStates(
        parameters=parameters,
        gradients=gradients,
        optimizer_state=per_rank(trainable, stage >= 1) * b.optimizer_state,
        transient_gradients=transient,
    )


@dataclass(frozen=True)
class MemoryModel:
    """Bytes one rank holds for the whole step that no op of the schedule allocates.

    ``parameter_shard_nbytes``: a compute-dtype parameter shard kept beside the full parameters
    (fzero keeps none for its trainable parameters: stage 0's full parameters are the shard,
    stages 1 and 2 view their shard inside the full parameters, and stage 3 gathers from the
    master; only stage 3's frozen parameters keep their shard). ``gradient_shard_nbytes``: the
    accumulated gradient when it lives across steps (stage 0, unless it is the gradient buffers
    themselves); stages 1-3 allocate theirs with ``AllocGradShard`` (or the step's
    ``ZeroGradShard``) and free it with ``FreeGradShard``, so ``simulate`` counts it from those
    ops (and streamed gradients' buffer from ``AllocUnitGrad`` to ``FreeGradBuffer``).
    ``optimizer_state_nbytes``: master weights and moments of this rank's shard.
    """

    parameter_shard_nbytes: int = 0
    gradient_shard_nbytes: int = 0
    optimizer_state_nbytes: int = 0

    @classmethod
    def from_schedule(
        cls, schedule: Schedule, bytes_per_param: BytesPerParam = BytesPerParam()
    ) -> MemoryModel:
        """Read fzero's sizes from the schedule: the padded parameter bytes of its units and
        the optimizer shard of its ``OptimizerStep``; ``bytes_per_param`` converts element
        counts to bytes (its K should count the fp32 master, which fzero keeps apart from the
        compute-dtype parameters in stages 1-3).

        Under optimizer offload only what steps on the device (a partial offload's
        ``OptimizerStep`` over the device units; nothing under full offload) keeps its master
        and moments here, and stage 3 keeps a compute-dtype shard of every unit for the gathers
        (in host memory, so not counted, with parameter offload's ``UploadShard``)."""
        b, stage = bytes_per_param, schedule.stage
        step_ops = [op for entry in schedule.step for op in entry.ops]
        shard_world = schedule.world_size if stage > 0 else 1
        padded_numel = sum(u.param_nbytes for u in schedule.units) // b.parameter
        shard_numel = -(-padded_numel // shard_world)
        first = [op for entry in schedule.first_micro_extra for op in entry.ops]
        on_host = any(isinstance(op, (O.HostOptimizerStep, O.ApplyPendingUpdate)) for op in first)
        on_host = on_host or any(isinstance(op, O.HostOptimizerStep) for op in step_ops)
        optimizer_numel = next(
            (op.shard_numel for op in step_ops if isinstance(op, O.OptimizerStep)),
            0 if on_host else shard_numel,
        )
        # Stage 3's frozen parameters: the shard elements the optimizer does not own.
        parameter_shard_numel = shard_numel - optimizer_numel if stage == 3 else 0
        if stage == 3 and on_host:
            uploads = any(isinstance(op, O.UploadShard) for op in schedule.ops(1))
            parameter_shard_numel = 0 if uploads else shard_numel
        aliased = b.gradient_shard == b.gradient  # stage 0 accumulates in the gradient buffers
        return cls(
            parameter_shard_nbytes=parameter_shard_numel * b.parameter,
            # Deterministic mode allocates stage 0's shard with ops, as stages 1-3 do.
            gradient_shard_nbytes=optimizer_numel * b.gradient_shard
            if stage == 0 and not aliased and schedule.gradient_reduction == "step"
            else 0,
            optimizer_state_nbytes=optimizer_numel * b.optimizer_state,
        )
