"""The blocks of ``fzero.Config``: one frozen dataclass per DeepSpeed JSON object.

Field names and defaults are DeepSpeed's (``deepspeed/runtime/zero/config.py``,
``offload_config.py``, ``precision_config.py``) unless the docstring says otherwise. Each block's
``validate(path)`` checks ranges within the block and names the JSON path of a bad key; checks
that involve several blocks live in ``Config.validate``. Fields typed ``... | Auto`` also hold the
string ``"auto"`` until ``Config.resolve`` replaces it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from fzero.config.parse import DROPS_AUTO, NESTED_PARAMS, Auto, DtypeName
from fzero.errors import ConfigError

OffloadDevice = Literal["none", "cpu", "nvme"]


def check_at_least(path: str, value: object, low: float) -> None:
    """Raise unless ``value`` is >= ``low``; None and "auto" pass (nothing to check yet)."""
    if isinstance(value, (int, float)) and not value >= low:
        raise ConfigError(path, f"must be >= {low}, got {value}")


def check_fraction(path: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(path, f"must be in [0, 1], got {value}")


@dataclass(frozen=True)
class OffloadParamConfig:
    """``zero_optimization.offload_param``: where stage 3 keeps parameters between uses."""

    device: OffloadDevice = "none"
    nvme_path: str | None = None
    buffer_count: int = 5
    buffer_size: int = 100_000_000
    max_in_cpu: int = 1_000_000_000
    pin_memory: bool = False

    def validate(self, path: str) -> None:
        _validate_offload(self, path)
        for name in ("buffer_size", "max_in_cpu"):
            check_at_least(f"{path}.{name}", getattr(self, name), 0)


@dataclass(frozen=True)
class OffloadOptimizerConfig:
    """``zero_optimization.offload_optimizer``: where optimizer state lives and steps."""

    device: OffloadDevice = "none"
    nvme_path: str | None = None
    buffer_count: int = 4
    pin_memory: bool = False
    pipeline_read: bool = False
    pipeline_write: bool = False
    fast_init: bool = False
    ratio: float = 1.0
    super_offload: bool = False
    convert_grad_on_cpu: bool = True
    cpuadam_cores_perc: float = 0.8

    def validate(self, path: str) -> None:
        _validate_offload(self, path)
        check_fraction(f"{path}.ratio", self.ratio)
        check_fraction(f"{path}.cpuadam_cores_perc", self.cpuadam_cores_perc)


def _validate_offload(block: OffloadParamConfig | OffloadOptimizerConfig, path: str) -> None:
    if block.device not in ("none", "cpu", "nvme"):
        raise ConfigError(
            f"{path}.device", f'must be "none", "cpu" or "nvme", got {block.device!r}'
        )
    if block.device == "nvme" and not block.nvme_path:
        raise ConfigError(f"{path}.nvme_path", 'required when device is "nvme"')
    check_at_least(f"{path}.buffer_count", block.buffer_count, 0)


@dataclass(frozen=True)
class ZeroConfig:
    """The ``zero_optimization`` block. Sizes count elements, not bytes, as in DeepSpeed.

    ``overlap_comm`` defaults to true at every stage (DeepSpeed: true only for stage 3).
    """

    stage: int = 0
    reduce_bucket_size: int | Auto = 500_000_000
    allgather_bucket_size: int = 500_000_000
    overlap_comm: bool = True
    stage3_prefetch_bucket_size: int | Auto = 50_000_000
    stage3_max_live_parameters: int = 1_000_000_000
    stage3_max_reuse_distance: int = 1_000_000_000
    stage3_param_persistence_threshold: int | Auto = 100_000
    offload_optimizer: OffloadOptimizerConfig | None = None
    offload_param: OffloadParamConfig | None = None

    def validate(self, path: str = "zero_optimization") -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ConfigError(f"{path}.stage", f"must be 0, 1, 2 or 3, got {self.stage}")
        for name in (
            "reduce_bucket_size",
            "allgather_bucket_size",
            "stage3_prefetch_bucket_size",
            "stage3_max_live_parameters",
            "stage3_max_reuse_distance",
            "stage3_param_persistence_threshold",
        ):
            check_at_least(f"{path}.{name}", getattr(self, name), 0)
        if self.offload_optimizer is not None:
            self.offload_optimizer.validate(f"{path}.offload_optimizer")
        if self.offload_param is not None:
            self.offload_param.validate(f"{path}.offload_param")


# DeepSpeed's optimizer defaults for Adam and AdamW: its engine builds FusedAdam
# (deepspeed/ops/adam/fused_adam.py: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0,
# bias_correction true), or with "torch_adam": true torch.optim.AdamW, whose weight_decay
# default is 0.01 (deepspeed/runtime/engine.py, _configure_basic_optimizer).
FUSED_ADAM_WEIGHT_DECAY = 0.0
TORCH_ADAMW_WEIGHT_DECAY = 0.01


@dataclass(frozen=True)
class OptimizerConfig:
    """The ``optimizer`` block: Adam with decoupled weight decay (AdamW).

    As in DeepSpeed, ``"Adam"`` means AdamW unless ``adam_w_mode`` is false (L2-coupled Adam,
    which fzero does not offer); ``"AdamW"`` is AdamW whatever ``adam_w_mode`` says. Type names
    are case-insensitive. Defaults are DeepSpeed's for the same block: ``weight_decay`` 0 (its
    FusedAdam), or 0.01 with ``torch_adam`` (torch's AdamW). ``torch_adam`` changes nothing else:
    fzero's fused AdamW computes torch's update. ``bias_correction: false`` drops Adam's
    ``1 - beta**step`` corrections, as FusedAdam does.
    """

    type: str = "AdamW"
    lr: float | Auto = 1e-3
    betas: tuple[float, float] | Auto = (0.9, 0.999)
    eps: float | Auto = 1e-8
    weight_decay: float | Auto | None = None  # None: DeepSpeed's default for this block
    adam_w_mode: bool = True
    torch_adam: bool = False
    bias_correction: bool = True

    def __post_init__(self) -> None:
        if self.weight_decay is None:
            object.__setattr__(self, "weight_decay", self.default_weight_decay)

    @property
    def default_weight_decay(self) -> float:
        return TORCH_ADAMW_WEIGHT_DECAY if self.torch_adam else FUSED_ADAM_WEIGHT_DECAY

    def validate(self, path: str = "optimizer") -> None:
        kind = self.type.lower()
        if kind not in ("adamw", "adam"):
            raise ConfigError(
                f"{path}.type", f"unsupported optimizer {self.type!r}; fzero implements Adam, AdamW"
            )
        if kind == "adam" and not self.adam_w_mode:
            raise ConfigError(
                f"{path}.params.adam_w_mode",
                "unsupported: L2-coupled Adam is not implemented; remove it to get AdamW",
            )
        check_at_least(f"{path}.params.lr", self.lr, 0)
        if self.betas != "auto" and (
            len(self.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in self.betas)
        ):
            raise ConfigError(
                f"{path}.params.betas", f"need two values in [0, 1), got {list(self.betas)}"
            )
        if self.eps != "auto" and not self.eps > 0:
            raise ConfigError(f"{path}.params.eps", f"must be > 0, got {self.eps}")
        check_at_least(f"{path}.params.weight_decay", self.weight_decay, 0)


NESTED_PARAMS[OptimizerConfig] = "params"


@dataclass(frozen=True)
class PrecisionConfig:
    """The ``bf16`` block: compute in bfloat16, keeping fp32 master weights."""

    enabled: bool | Auto = False

    def validate(self, path: str = "bf16") -> None:
        """Nothing to range-check: ``enabled`` is checked against fp16 in ``Config.validate``."""


@dataclass(frozen=True)
class Fp16Config(PrecisionConfig):
    """The ``fp16`` block, with DeepSpeed's loss-scaling keys and defaults.

    ``loss_scale`` 0 means dynamic scaling starting at ``2**initial_scale_power``, halved after
    ``hysteresis`` overflowing steps and doubled after ``loss_scale_window`` clean ones, never below
    ``min_loss_scale`` (the exact rule: ``fzero/loss_scale.py``); ``loss_scale`` > 0 is a static
    scale. Overflowing steps are skipped on every rank either way.

    ``auto_cast``: with fp16 enabled, cast the floating-point tensors of each micro-batch to
    fp16 before the forward, as DeepSpeed's engine does (``deepspeed/runtime/engine.py``,
    ``_cast_inputs_half``); ``fzero.cast_forward_inputs`` (on by default) does so already.
    """

    auto_cast: bool = False
    loss_scale: float = 0.0
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    consecutive_hysteresis: bool = False
    min_loss_scale: float = 1.0

    def validate(self, path: str = "fp16") -> None:
        check_at_least(f"{path}.loss_scale", self.loss_scale, 0)
        if not math.isfinite(self.loss_scale):
            raise ConfigError(f"{path}.loss_scale", f"must be finite, got {self.loss_scale}")
        if not 0 <= self.initial_scale_power <= 127:
            raise ConfigError(
                f"{path}.initial_scale_power",
                f"must be in [0, 127] (2**128 overflows fp32), got {self.initial_scale_power}",
            )
        check_at_least(f"{path}.loss_scale_window", self.loss_scale_window, 1)
        check_at_least(f"{path}.hysteresis", self.hysteresis, 1)
        if not (self.min_loss_scale > 0 and math.isfinite(self.min_loss_scale)):
            raise ConfigError(
                f"{path}.min_loss_scale", f"must be finite and > 0, got {self.min_loss_scale}"
            )

    def check_consistent(self, path: str = "fp16") -> None:
        """Contradictions within an enabled dynamic block (parsed-only keys are not checked)."""
        initial = 2.0**self.initial_scale_power
        if self.enabled is True and self.loss_scale == 0 and self.min_loss_scale > initial:
            raise ConfigError(
                f"{path}.min_loss_scale",
                f"{self.min_loss_scale:g} is above the initial dynamic loss scale "
                f"2**{path}.initial_scale_power = {initial:g}; lower it or raise "
                "initial_scale_power",
            )


@dataclass(frozen=True)
class DataTypesConfig:
    """The ``data_types`` block: the dtype gradients accumulate in (``fp32`` unless set)."""

    grad_accum_dtype: DtypeName | None = None


@dataclass(frozen=True)
class ActivationCheckpointingConfig:
    """``activation_checkpointing``: fzero recomputes units' forwards in backward itself.

    ``number_checkpoints``: how many block units (the first ones, in model order; more than
    there are means all) fzero wraps in ``torch.utils.checkpoint`` (non-reentrant): their
    activations are dropped after forward and recomputed in backward, at the schedule's
    ``pre_recompute`` triggers. (DeepSpeed reads it only to size a buffer for
    ``contiguous_memory_optimization``, for models that call ``deepspeed.checkpointing``.)
    ``cpu_checkpointing``: the inputs those units keep for their recompute are held on the host
    (``torch.autograd.graph.save_on_cpu(pin_memory=True)``) and copied back in backward.
    The block's other keys are warned (``fzero/config/keys_top_level.py``)."""

    number_checkpoints: int | None = None
    cpu_checkpointing: bool = False

    def validate(self, path: str = "activation_checkpointing") -> None:
        check_at_least(f"{path}.number_checkpoints", self.number_checkpoints, 0)
        if self.cpu_checkpointing and not self.number_checkpoints:
            raise ConfigError(
                f"{path}.cpu_checkpointing",
                "keeps the inputs of the units fzero checkpoints on the CPU, but "
                "number_checkpoints is not set: set it (e.g. to the number of layers), or "
                "set cpu_checkpointing to false",
            )


@dataclass(frozen=True)
class FzeroConfig:
    """fzero's own knobs, in the ``fzero`` block (DeepSpeed has no name for them).

    ``no_weight_decay``: glob patterns (``fnmatch``) on parameter names that get weight decay 0,
    e.g. ``["*.bias", "*norm*"]``. ``alignment``: every flat buffer is padded to a multiple of
    world size x alignment elements.

    ``nonfinite_grads``: what a step whose gradients hold Inf or NaN does in fp32 and bf16:
    ``"skip"`` it on every rank (nothing changes; ``metrics["skipped"]``), raise
    ``NonFiniteGradientError`` after skipping it (``"error"``), or ``"apply"`` it as it is (no
    check, no host read; but see ``fzero/runtime/step_checks.py`` for the micro-batch count
    check when ``gradient_accumulation_steps`` is unset). fp16 always skips and lowers the loss
    scale.

    ``reduce_every_micro_batch``: stages 2 and 3 reduce each micro-batch's gradient into the
    fp32 gradient shard (true, the default), or keep every unit's full gradient across the
    micro-batches and reduce once, at the last one (false: 1/micro_batches of the traffic, full
    gradients held through the step). Stages 0 and 1 always reduce once per step.

    ``deterministic``: reduce in a fixed order that depends neither on the world size nor on
    the layout, so that N ranks match one device that sums the same micro-batch gradients in
    order bit for bit (``fzero/schedule/compile.py`` says how, and what it costs).

    ``compile_units``: run each block unit's ``forward`` through ``torch.compile`` (the hooks
    that gather, release and reduce stay outside the compiled code). Off by default.

    ``cast_forward_inputs``: with bf16 or fp16 compute, cast the floating-point tensors of each
    micro-batch to the compute dtype before the forward (as FSDP2's
    ``MixedPrecisionPolicy(cast_forward_inputs=True)``); integer tensors are left alone. Set it
    false to pass the batch as given (``fp16.auto_cast`` still casts to fp16, as in DeepSpeed).

    ``embedding_units``: besides the repeated blocks, make every ``nn.Embedding`` outside them
    a unit of its own (default units: the blocks plus one for the rest). Stage 3 then gathers an
    embedding for its forward only and releases it right after, instead of holding it with the
    root from the start of forward to the end of backward. Off by default.

    ``step_timeout_s``: how long a step may wait at one op before every rank that waits raises
    ``StepTimeoutError``, saying which op each rank was at (``fzero/runtime/watchdog.py``).
    Well under the process group's timeout (30 minutes by default); when fzero creates the
    group (``fzero.collectives.init_from_env``) the group's is set a minute longer.
    """

    no_weight_decay: tuple[str, ...] = ()
    cast_forward_inputs: bool = True
    alignment: int = 16
    nonfinite_grads: Literal["skip", "error", "apply"] = "skip"
    reduce_every_micro_batch: bool | None = None
    deterministic: bool = False
    compile_units: bool = False
    embedding_units: bool = False
    step_timeout_s: float = 300.0


DROPS_AUTO.update(
    {ZeroConfig, OffloadParamConfig, OffloadOptimizerConfig, PrecisionConfig, Fp16Config}
)
