"""estimate_memory: per-rank bytes of the model states at each ZeRO stage, before sharding.

The ZeRO paper's formulas for mixed-precision Adam (Rajbhandari et al., 2020, Figure 1), per
rank, for Psi parameters on N ranks with K bytes of optimizer state per parameter:

    stage 0: (2 + 2 + K) Psi         stage 2: 2 Psi + (2 + K) Psi / N
    stage 1: (2 + 2) Psi + K Psi / N stage 3: (2 + 2 + K) Psi / N

Activations, temporary buffers and gathered parameters in flight are not included; for those,
compile the schedule and ``fzero.schedule.simulate`` it (which uses the same formula code).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fzero.schedule.memory_model import BytesPerParam, model_states

GB = 1e9  # the paper's gigabyte


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank of parameters, gradients and optimizer state."""

    stage: int
    world_size: int
    numel: int
    trainable_numel: int
    parameters: int
    gradients: int
    optimizer_state: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state

    def __str__(self) -> str:
        return (
            f"ZeRO stage {self.stage}, {self.numel / 1e9:.3g}B parameters on "
            f"{self.world_size} rank(s): {self.total / GB:.2f} GB per rank (parameters "
            f"{self.parameters / GB:.2f} GB, gradients {self.gradients / GB:.2f} GB, optimizer "
            f"state {self.optimizer_state / GB:.2f} GB)"
        )


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all, trainable) parameter elements of ``model``, each tied parameter counted once."""
    unique = {id(p): p for _, p in model.named_parameters(remove_duplicate=False)}
    numel = sum(p.numel() for p in unique.values())
    trainable = sum(p.numel() for p in unique.values() if p.requires_grad)
    return numel, trainable


def estimate_memory(
    model_or_param_count: nn.Module | int,
    world_size: int,
    stage: int,
    *,
    compute_dtype: str = "bf16",
    master_dtype: str = "fp32",
    grad_accum_dtype: str | None = None,
    optimizer_state_bytes: int | None = None,
) -> MemoryEstimate:
    """Per-rank model-state bytes of ``model_or_param_count`` (an ``nn.Module`` or an element
    count) on ``world_size`` ranks at ZeRO ``stage``.

    Defaults are the paper's: bf16/fp16 parameters and gradients, fp32 master weights and
    moments (K = 12). ``grad_accum_dtype`` sizes the gradient shard (None: the compute dtype;
    fzero's own default config accumulates in fp32, pass ``"fp32"`` to match it).
    ``optimizer_state_bytes`` overrides K. Frozen parameters of a module cost no gradients and
    no optimizer state.
    """
    if isinstance(model_or_param_count, nn.Module):
        numel, trainable = count_parameters(model_or_param_count)
    elif isinstance(model_or_param_count, int) and not isinstance(model_or_param_count, bool):
        numel = trainable = model_or_param_count
    else:
        raise TypeError(
            f"expected an nn.Module or a parameter count, got {type(model_or_param_count).__name__}"
        )
    if numel < 0:
        raise ValueError(f"parameter count must be non-negative, got {numel}")
    bytes_per_param = BytesPerParam.from_dtypes(compute_dtype, master_dtype, grad_accum_dtype)
    if optimizer_state_bytes is not None:
        bytes_per_param = BytesPerParam(
            bytes_per_param.parameter,
            bytes_per_param.gradient,
            bytes_per_param.gradient_shard,
            optimizer_state_bytes,
        )
    states = model_states(numel, world_size, stage, bytes_per_param, trainable_numel=trainable)
    return MemoryEstimate(
        stage,
        world_size,
        numel,
        trainable,
        states.parameters,
        states.gradients,
        states.optimizer_state,
    )
