"""estimate_memory: per-rank bytes of the model states at each ZeRO stage, before sharding.

The ZeRO paper's formulas for mixed-precision Adam (Rajbhandari et al., 2020, Figure 1), per
rank, for Psi parameters on N ranks with K bytes of optimizer state per parameter:

    stage 0: (2 + 2 + K) Psi         stage 2: 2 Psi + (2 + K) Psi / N
    stage 1: (2 + 2) Psi + K Psi / N stage 3: (2 + 2 + K) Psi / N

fzero's own buffers differ (``layout="fzero"``). Stage 3 keeps no bf16 copy of its shard (a
gather casts the fp32 master slice on the fly), so its model states at the optimizer step are
(2 + K) Psi / N. Stages 1-3 hold the gradient shard (2 Psi / N) only from a step's first
reduction to its optimizer step: stage 1 holds it beside its full gradients during the step
phase, (2 + 2) Psi + (2 + K) Psi / N at the optimizer step, and between steps stages 2 and 3
hold 2 Psi + K Psi / N and K Psi / N.

With ``offload_optimizer``/``offload_param`` set to ``"cpu"`` or ``"nvme"`` the same states are
split by residence: GPU, host and file bytes per rank (``fzero.schedule.offload_memory`` has
the formulas), which is what DeepSpeed's ``estimate_zero3_model_states_mem_needs_all_live``
reports too (it counts per node and adds a 1.5x buffer factor; fzero counts per rank, exactly).
Where optimizer offload streams gradients (one micro-batch per step, or stage 1), the GPU's
transient gradient is one unit's part of the shard, not the whole shard.

Activations, temporary buffers and gathered parameters in flight are not included; for those,
compile the schedule and ``fzero.schedule.simulate`` it (its model states match
``layout="fzero"``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from fzero.schedule.memory_model import BytesPerParam, ModelStates, dtype_nbytes, model_states
from fzero.schedule.offload_memory import offload_states
from fzero.schedule.streamed_grads import streams

GB = 1e9  # the paper's gigabyte


@dataclass(frozen=True, kw_only=True)
class MemoryEstimate(ModelStates):
    """Bytes per rank of parameters, gradients and optimizer state on the GPU at the optimizer
    step (``ModelStates``: ``total``, ``between_steps``), with what they were computed for.

    Under offload, ``host`` and ``file`` hold the states that moved there and
    ``host_staging_nbytes`` the NVMe swap buffers; ``gpu_nbytes``, ``host_nbytes`` and
    ``file_nbytes`` are the three totals per rank."""

    stage: int
    world_size: int
    numel: int
    trainable_numel: int
    layout: str = "paper"
    offload_optimizer: str = "none"
    offload_param: str = "none"
    offload_ratio: float = 1.0  # offload_optimizer.ratio
    host: ModelStates = ModelStates(0, 0, 0)
    file: ModelStates = ModelStates(0, 0, 0)
    host_staging_nbytes: int = 0

    @property
    def gpu_nbytes(self) -> int:
        return self.total

    @property
    def host_nbytes(self) -> int:
        return self.host.total + self.host_staging_nbytes

    @property
    def file_nbytes(self) -> int:
        return self.file.total

    def __str__(self) -> str:
        between = (
            f", {self.between_steps / GB:.2f} GB between steps" if self.transient_gradients else ""
        )
        offload = ""
        ratio = f" (ratio {self.offload_ratio:g})" if self.offload_ratio < 1 else ""
        if self.offload_optimizer != "none" or self.offload_param != "none":
            offload = (
                f"; offload_optimizer {self.offload_optimizer}{ratio}, offload_param "
                f"{self.offload_param}: host {self.host_nbytes / GB:.2f} GB, file "
                f"{self.file_nbytes / GB:.2f} GB per rank"
            )
        return (
            f"ZeRO stage {self.stage} ({self.layout}), {self.numel / 1e9:.3g}B parameters on "
            f"{self.world_size} rank(s): {self.total / GB:.2f} GB per rank{between} (parameters "
            f"{self.parameters / GB:.2f} GB, gradients {self.gradients / GB:.2f} GB, optimizer "
            f"state {self.optimizer_state / GB:.2f} GB){offload}"
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
    layout: str | None = None,
    offload_optimizer: str = "none",
    offload_param: str = "none",
    largest_unit_numel: int | None = None,
    optimizer_buffer_count: int = 4,
    param_buffer_count: int = 5,
    param_buffer_size: int = 100_000_000,
    param_max_in_cpu: int = 0,
    offload_ratio: float = 1.0,
    gradient_accumulation_steps: int | None = 1,
    deterministic: bool = False,
    stream_gradients: bool | None = None,
) -> MemoryEstimate:
    """Per-rank model-state bytes of ``model_or_param_count`` (an ``nn.Module`` or an element
    count) on ``world_size`` ranks at ZeRO ``stage``, at the optimizer step.

    Defaults are the paper's: bf16/fp16 parameters and gradients, fp32 master weights and
    moments (K = 12). ``grad_accum_dtype`` sizes the gradient shard (None: the compute dtype;
    fzero's own default config accumulates in fp32, pass ``"fp32"`` to match it).
    ``optimizer_state_bytes`` overrides K. Frozen parameters of a module cost no gradients and
    no optimizer state. ``layout``: ``"paper"`` for the ZeRO paper's formulas, ``"fzero"`` for
    the buffers fzero keeps (see the module docstring); None: ``"paper"`` without offload,
    ``"fzero"`` with it (offload is fzero's). ``offload_optimizer``, ``offload_param``:
    ``"none"``, ``"cpu"`` or ``"nvme"``; the buffer counts are the config's
    ``offload_optimizer.buffer_count`` and ``offload_param.buffer_count``, which count NVMe
    staging buffers of the largest unit's shard (``largest_unit_numel``; None: the whole model
    as one unit, an upper bound); ``param_buffer_size`` (``offload_param.buffer_size``) sizes
    nothing in fzero and is accepted for DeepSpeed's sake; ``param_max_in_cpu``
    (``offload_param.max_in_cpu``, 0 here: every shard in the file) elements of the parameter
    shard also stay in host memory under ``"nvme"``. ``offload_ratio``:
    ``offload_optimizer.ratio``, the share of the optimizer state on the host (``"cpu"``
    only); the rest stays on the GPU. ``gradient_accumulation_steps``, ``deterministic`` and
    ``stream_gradients`` (the config's ``fzero.deterministic`` and ``fzero.stream_gradients``)
    decide, as the compiler does, whether optimizer offload streams gradients down unit by unit
    (by default stage 1, or one micro-batch per step, and not deterministic; with
    ``stream_gradients=True`` with accumulation too): then the GPU's transient gradient is the
    largest unit's part of the shard
    (``largest_unit_numel``; None: the whole model as one unit) beside the device units' part of
    a partial offload, instead of the whole gradient shard.
    """
    offloaded = offload_optimizer != "none" or offload_param != "none"
    if layout is None:
        layout = "fzero" if offloaded else "paper"
    if offloaded and layout != "fzero":
        raise ValueError(
            f'offload estimates use layout="fzero" (the paper has none), got {layout!r}'
        )
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
    if layout == "fzero" and stage > 0 and master_dtype == compute_dtype:
        # Only stage 0 uses the master as its parameters: stages 1-3 keep it apart.
        bytes_per_param = replace(
            bytes_per_param,
            optimizer_state=bytes_per_param.optimizer_state + dtype_nbytes(master_dtype),
        )
    if optimizer_state_bytes is not None:
        bytes_per_param = replace(bytes_per_param, optimizer_state=optimizer_state_bytes)
    states = model_states(
        numel, world_size, stage, bytes_per_param, trainable_numel=trainable, layout=layout
    )
    streamed = streams(  # as the planner decides
        optimizer_offloaded=offload_optimizer != "none" and offload_ratio > 0,
        deterministic=deterministic,
        stage=stage,
        gradient_accumulation_steps=gradient_accumulation_steps,
        requested=stream_gradients,
    )
    split = offload_states(
        states,
        numel=numel,
        trainable_numel=trainable,
        world_size=world_size,
        stage=stage,
        bytes_per_param=bytes_per_param,
        offload_optimizer=offload_optimizer,
        offload_param=offload_param,
        largest_unit_numel=largest_unit_numel,
        optimizer_buffer_count=optimizer_buffer_count,
        param_buffer_count=param_buffer_count,
        param_buffer_size=param_buffer_size,
        param_max_in_cpu=param_max_in_cpu,
        offload_ratio=offload_ratio,
        streamed_gradients=streamed,
    )
    device = split.device
    return MemoryEstimate(
        parameters=device.parameters,
        gradients=device.gradients,
        optimizer_state=device.optimizer_state,
        transient_gradients=device.transient_gradients,
        stage=stage,
        world_size=world_size,
        numel=numel,
        trainable_numel=trainable,
        layout=layout,
        offload_optimizer=offload_optimizer,
        offload_param=offload_param,
        offload_ratio=offload_ratio,
        host=split.host,
        file=split.file,
        host_staging_nbytes=split.host_staging_nbytes,
    )
