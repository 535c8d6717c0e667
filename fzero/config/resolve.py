"""``Config.resolve``: replace HF-style ``"auto"`` values and derive the batch sizes.

Kept apart from ``config.py`` because it is the one part of the config that needs the model and
the world (hidden size, parameter count, world size); the functions take and return configs.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from fzero.config.optimizer_block import OptimizerConfig
from fzero.errors import ConfigError

if TYPE_CHECKING:
    from fzero.config import Config

logger = logging.getLogger("fzero")

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
# DeepSpeed's defaults, used for hidden-size-based "auto" keys when the model has no hidden size.
_HIDDEN_SIZE_DEFAULTS = {
    "reduce_bucket_size": 500_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,
}


def resolve_auto(
    config: Config,
    *,
    world_size: int,
    hidden_size: int | None,
    param_numel: int,
    total_num_steps: int | None,
) -> Config:
    """See ``Config.resolve``."""
    if world_size < 1 or param_numel < 0:
        raise ValueError(f"need world_size >= 1, param_numel >= 0; got {world_size}, {param_numel}")
    notes: list[str] = []
    zero_changes: dict[str, int] = {}
    values, why = _HIDDEN_SIZE_DEFAULTS, "DeepSpeed's default: the model has no hidden size"
    if hidden_size is not None:
        h = hidden_size
        values, why = (
            {
                "reduce_bucket_size": h * h,
                "stage3_prefetch_bucket_size": int(0.9 * h * h),
                "stage3_param_persistence_threshold": 10 * h,
            },
            f"from hidden_size {h}",
        )
    for name, value in values.items():
        if getattr(config.zero_optimization, name) != "auto":
            continue
        note = why
        if name != "stage3_param_persistence_threshold" and value > max(param_numel, 1):
            value, note = (
                max(param_numel, 1),
                f"{why}, capped at the model's {param_numel} params",
            )
        zero_changes[name] = value
        notes.append(f"zero_optimization.{name}={value} ({note})")
    config = dataclasses.replace(
        config, zero_optimization=dataclasses.replace(config.zero_optimization, **zero_changes)
    )
    config = _resolve_defaults(config, notes, total_num_steps)
    config = _resolve_batch_sizes(config, world_size, notes)
    config.validate()
    if notes:
        logger.info("resolved config for world_size=%d: %s", world_size, "; ".join(notes))
    return config


def _resolve_defaults(config: Config, notes: list[str], total_num_steps: int | None) -> Config:
    """Replace the "auto" values that do not depend on the model or the world.

    These are the values only a trainer can fill (the Hugging Face Trainer writes its own
    learning rate, betas, clipping, precision and warm-up into them). DeepSpeed itself has no
    value for them, so here they take DeepSpeed's defaults, and one WARNING names each key with
    the value it got: a config written for a trainer, given to ``fzero.shard`` as it is, would
    otherwise train at lr 1e-3 in fp32 without clipping while its author believes otherwise.
    """
    filled: list[str] = []

    def resolved(block: Any, path: str, values: dict[str, Any]) -> Any:
        changes = {}
        for name, value in values.items():
            if getattr(block, name, None) == "auto":
                changes[name] = value
                filled.append(f"{path}{name}={value}")
        return dataclasses.replace(block, **changes) if changes else block

    defaults = {f.name: f.default for f in dataclasses.fields(OptimizerConfig)}
    defaults["weight_decay"] = config.optimizer.default_weight_decay
    optimizer = resolved(config.optimizer, "optimizer.params.", defaults)
    scheduler = config.scheduler
    if scheduler is not None:
        if getattr(scheduler, "total_num_steps", None) == "auto":
            if total_num_steps is None:
                raise ConfigError(
                    "scheduler.params.total_num_steps",
                    '"auto" needs the number of optimizer steps the run will take: pass '
                    "fzero.shard(..., total_num_steps=N) (or Config.resolve(..., "
                    "total_num_steps=N)), or write the number in the config",
                )
            scheduler = dataclasses.replace(scheduler, total_num_steps=total_num_steps)
            notes.append(f"scheduler.params.total_num_steps={total_num_steps} (given)")
        values = {f.name: f.default for f in dataclasses.fields(scheduler)}
        values.update(warmup_max_lr=optimizer.lr)
        scheduler = resolved(scheduler, "scheduler.params.", values)
    gradient_clipping = config.gradient_clipping
    if gradient_clipping == "auto":
        gradient_clipping = 0.0
        filled.append("gradient_clipping=0.0 (no clipping)")
    bf16 = resolved(config.bf16, "bf16.", {"enabled": False})
    fp16 = resolved(config.fp16, "fp16.", {"enabled": False})
    if filled:
        logger.warning(
            '"auto" values that only a trainer fills took DeepSpeed\'s defaults: %s. Write the '
            'numbers into the config (bf16: "bf16": {"enabled": true}), or let the Hugging Face '
            "Trainer fill them",
            ", ".join(filled),
        )
    return dataclasses.replace(
        config,
        optimizer=optimizer,
        scheduler=scheduler,
        bf16=bf16,
        fp16=fp16,
        gradient_clipping=gradient_clipping,
    )


def _resolve_batch_sizes(config: Config, world_size: int, notes: list[str]) -> Config:
    """Derive the missing batch sizes from the given ones, as DeepSpeed does."""
    batch, micro, accumulation = (
        None if getattr(config, name) == "auto" else getattr(config, name) for name in BATCH_KEYS
    )
    given = (batch, micro, accumulation)
    if batch is not None and micro is not None and accumulation is None:
        names = f"train_micro_batch_size_per_gpu ({micro}) * world_size ({world_size})"
        accumulation = _divide(batch, micro * world_size, names, "gradient_accumulation_steps")
    elif batch is not None and micro is None:
        accumulation = accumulation or 1
        names = f"gradient_accumulation_steps ({accumulation}) * world_size ({world_size})"
        micro = _divide(batch, accumulation * world_size, names, "train_micro_batch_size_per_gpu")
    elif batch is None and micro is not None:
        accumulation = accumulation or 1
        batch = micro * accumulation * world_size
    if None not in (batch, micro, accumulation) and batch != micro * accumulation * world_size:
        raise ConfigError(
            "train_batch_size",
            f"train_batch_size ({batch}) != train_micro_batch_size_per_gpu ({micro}) * "
            f"gradient_accumulation_steps ({accumulation}) * world_size ({world_size}) "
            f"= {micro * accumulation * world_size}",
        )
    for name, before, after in zip(BATCH_KEYS, given, (batch, micro, accumulation), strict=True):
        if after is None and getattr(config, name) == "auto":
            notes.append(f"{name} left unset (neither train_batch_size nor micro batch given)")
        elif before != after or getattr(config, name) == "auto":
            notes.append(f"{name}={after}")
    return dataclasses.replace(
        config,
        train_batch_size=batch,
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=accumulation,
    )


def _divide(batch: int, divisor: int, names: str, target: str) -> int:
    if batch % divisor:
        raise ConfigError(
            "train_batch_size",
            f"train_batch_size ({batch}) is not divisible by {names} = {divisor}, "
            f"so {target} cannot be derived",
        )
    return batch // divisor
