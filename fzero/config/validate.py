"""Checks on a whole ``Config``: what one block cannot check alone.

Each block's ``validate(path)`` checks the ranges inside it (``zero_block.py``, ...);
``validate_config``, which ``Config.validate`` runs after every construction, checks the blocks
together: the offload devices the runtime implements, the batch-size product, dtype names, and
precision settings that contradict each other. ``validate_stage_options`` checks what depends
on the ZeRO stage, at ``shard`` time, once ``shard(stage=...)`` has had its say. Every error
names the key to change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fzero.config.ranges import check_at_least
from fzero.config.resolve import BATCH_KEYS
from fzero.errors import ConfigError

if TYPE_CHECKING:
    from fzero.config.config import Config

# Offload devices the runtime implements. Any other device in offload_optimizer/offload_param is
# rejected at config time.
SUPPORTED_OFFLOAD_DEVICES: tuple[str, ...] = ("none", "cpu", "nvme")

_DTYPE_NAMES = ("fp32", "bf16", "fp16")


def validate_config(config: Config) -> None:
    """Raise ``ConfigError`` naming the first key of ``config`` that is out of range or
    contradicts another."""
    zero = config.zero_optimization
    zero.validate()
    for name in ("offload_optimizer", "offload_param"):
        block = getattr(zero, name)
        if block is None or block.device == "none":
            continue
        if block.device not in SUPPORTED_OFFLOAD_DEVICES:
            raise ConfigError(
                f"zero_optimization.{name}.device",
                f'offload to "{block.device}" is not implemented in fzero yet; '
                'set "device": "none" or remove the block',
            )
    config.optimizer.validate()
    if config.scheduler is not None:
        config.scheduler.validate()
    config.bf16.validate("bf16")
    config.fp16.validate("fp16")
    config.activation_checkpointing.validate()
    config.aio.validate("aio")
    if config.bf16.enabled is True and config.fp16.enabled is True:
        raise ConfigError("bf16.enabled", "bf16.enabled and fp16.enabled are both true")
    check_at_least("gradient_clipping", config.gradient_clipping, 0)
    check_at_least("steps_per_print", config.steps_per_print, 1)
    check_at_least("fzero.alignment", config.fzero.alignment, 1)
    timeout = config.fzero.step_timeout_s
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ConfigError(
            "fzero.step_timeout_s", f"must be a number of seconds > 0, got {timeout!r}"
        )
    batch, micro, accumulation = sizes = config.batch_sizes
    for name, value in zip(BATCH_KEYS, sizes, strict=True):
        check_at_least(name, value, 1)
    if all(isinstance(value, int) for value in sizes) and batch % (micro * accumulation):
        raise ConfigError(
            "train_batch_size",
            f"train_batch_size ({batch}) must equal train_micro_batch_size_per_gpu "
            f"({micro}) * gradient_accumulation_steps ({accumulation}) * world_size, "
            f"but it is not a multiple of {micro * accumulation}",
        )
    for path, name in (
        ("data_types.grad_accum_dtype", config.data_types.grad_accum_dtype),
        ("communication_data_type", config.communication_data_type),
    ):
        if name is not None and name not in _DTYPE_NAMES:
            raise ConfigError(path, f"must be one of {_DTYPE_NAMES}, got {name!r}")
    _validate_precision(config)


def _validate_precision(config: Config) -> None:
    """Precision settings that contradict each other (each error names the key to change)."""
    config.fp16.check_consistent("fp16")
    fp16, bf16 = config.fp16.enabled is True, config.bf16.enabled is True
    for path, name in (
        ("communication_data_type", config.communication_data_type),
        ("data_types.grad_accum_dtype", config.data_types.grad_accum_dtype),
    ):
        if fp16 and name == "bf16":
            raise ConfigError(
                path,
                "bf16 with fp16.enabled: loss-scaled fp16 gradients would be rounded to "
                "bf16's 8-bit mantissa; use fp32 (or fp16)",
            )
        if bf16 and name == "fp16":
            raise ConfigError(
                path,
                "fp16 with bf16.enabled: bf16 gradients are not loss-scaled and can exceed "
                "fp16's range (65504); use fp32 (or bf16)",
            )
    if fp16 and config.fzero.nonfinite_grads != "skip":
        raise ConfigError(
            "fzero.nonfinite_grads",
            f"{config.fzero.nonfinite_grads!r} with fp16.enabled: fp16 skips overflowing steps "
            'and lowers the loss scale; leave it "skip"',
        )
    if config.fzero.deterministic and config.fzero.reduce_every_micro_batch is False:
        raise ConfigError(
            "fzero.reduce_every_micro_batch",
            "false with fzero.deterministic: deterministic mode reduces every micro-batch "
            "in a fixed order; remove one of the two",
        )


def validate_stage_options(config: Config) -> None:
    """Options whose meaning depends on the stage, checked by ``shard`` once the stage is
    final (``shard(stage=...)`` overrides the config's)."""
    zero = config.zero_optimization
    stage = zero.stage
    param = zero.offload_param
    if param is not None and param.device != "none" and stage != 3:
        message = f"parameter offload needs stage 3, got stage {stage}"
        raise ConfigError("zero_optimization.offload_param.device", message)
    # offload_optimizer.ratio < 1 runs at stages 1-3 (DeepSpeed's only at 3): fzero splits the
    # optimizer state by unit, and every stage steps unit by unit (fzero/offload/plan.py).
    if stage < 2 and config.fzero.reduce_every_micro_batch is True:
        raise ConfigError(
            "fzero.reduce_every_micro_batch",
            f"true with stage {stage}: stages 0 and 1 keep full gradients and reduce "
            "once per step; remove it or use stage 2 or 3",
        )
