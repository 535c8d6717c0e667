"""``fzero.Config``: every knob, with DeepSpeed's key names where DeepSpeed has one.

This file holds the dataclass itself: its fields (the blocks: ``zero_block.py``,
``optimizer_block.py``, ``precision_blocks.py``, ``runtime_blocks.py``), how it is built, the
values the runtime derives from it, and its comparison across ranks. Its checks are
``validate.py``, its "auto" resolution ``resolve.py``, the reading of JSON ``parse.py``.

A config is built from a dict in DeepSpeed's JSON layout (``Config.from_dict``), keyword
arguments of the same shape (``Config.from_kwargs``), a JSON or HJSON file (``Config.from_any``,
which reads ``ds_config.json`` files unchanged) or an existing ``Config``. Every DeepSpeed key is
implemented with DeepSpeed's meaning, accepted with a one-time ``ConfigWarning`` saying why it has
no effect, or rejected (``fzero/config/keys.py``; the table is ``docs/config.md``). Unknown keys,
wrong types and out-of-range values raise ``ConfigError`` naming the JSON path of the key
(``zero_optimization.stage``), so a typo never silently falls back to a default.

Frozen dataclasses, not pydantic: no dependency beyond the standard library, and a frozen config
is hashable and immutable, so it can sit in the static part of the state beside the schedule and
be fingerprinted and compared across ranks (``fingerprint``, ``diff``).

HF-style ``"auto"`` values stay in the config as the string ``"auto"`` until ``resolve`` replaces
them from the model and the world; the runtime only reads resolved configs. Sizes follow
DeepSpeed: bucket sizes, prefetch size, live-parameter limit, reuse distance and persistence
threshold count *elements* (parameters), not bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from fzero.config.aio_block import AioConfig
from fzero.config.lr_schedules import Scheduler
from fzero.config.notes import collecting_notes, report
from fzero.config.optimizer_block import OptimizerConfig
from fzero.config.parse import Auto, DtypeName, build, build_scheduler, flatten, load_file
from fzero.config.precision_blocks import DataTypesConfig, Fp16Config, PrecisionConfig
from fzero.config.resolve import resolve_auto
from fzero.config.runtime_blocks import ActivationCheckpointingConfig, FzeroConfig
from fzero.config.validate import validate_config, validate_stage_options
from fzero.config.zero_block import ZeroConfig
from fzero.errors import ConfigError, ConfigTypeError

__all__ = ["Config", "names_stage"]

logger = logging.getLogger("fzero")


@dataclass(frozen=True)
class Config:
    """All of fzero's settings. Build with ``Config.from_any(dict | path | Config | None)``."""

    zero_optimization: ZeroConfig = field(default_factory=ZeroConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: Scheduler | None = None
    bf16: PrecisionConfig = field(default_factory=PrecisionConfig)
    fp16: Fp16Config = field(default_factory=Fp16Config)
    data_types: DataTypesConfig = field(default_factory=DataTypesConfig)
    fzero: FzeroConfig = field(default_factory=FzeroConfig)
    activation_checkpointing: ActivationCheckpointingConfig = field(
        default_factory=ActivationCheckpointingConfig
    )
    gradient_clipping: float | Auto = 0.0
    gradient_accumulation_steps: int | Auto | None = None
    train_micro_batch_size_per_gpu: int | Auto | None = None
    train_batch_size: int | Auto | None = None
    communication_data_type: DtypeName | None = None
    steps_per_print: int = 10
    aio: AioConfig = field(default_factory=AioConfig)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_any(cls, config: Config | dict | str | os.PathLike | None) -> Config:
        if config is None:
            return cls()
        if isinstance(config, Config):
            return config
        if isinstance(config, (str, os.PathLike)):
            config = load_file(config)
        if not isinstance(config, dict):
            raise ConfigTypeError(
                "", f"expected a dict, a JSON path or a Config, got {type(config)}"
            )
        return cls.from_dict(config)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """A validated config from a dict in DeepSpeed's JSON layout."""
        if not isinstance(data, dict):
            raise ConfigTypeError("", f"expected an object, got {type(data).__name__}")
        data = dict(data)
        if "bfloat16" in data:  # DeepSpeed's old name for the bf16 block
            if "bf16" in data:
                raise ConfigError("bfloat16", "give bf16 or its old name bfloat16, not both")
            data["bf16"] = data.pop("bfloat16")
        optimizer = data.get("optimizer")
        if isinstance(optimizer, dict) and isinstance(optimizer.get("type"), str):
            OptimizerConfig(type=optimizer["type"]).validate()  # before its params are read
        with collecting_notes() as notes:
            scheduler = build_scheduler(data.pop("scheduler", None))
            config = dataclasses.replace(build(cls, data, ""), scheduler=scheduler)
        config.validate()
        report(notes)
        return config

    @classmethod
    def from_kwargs(cls, **keys: Any) -> Config:
        """``Config.from_kwargs(zero_optimization={"stage": 3}, bf16={"enabled": True})``."""
        return cls.from_dict(keys)

    def replace(self, **changes: Any) -> Config:
        config = dataclasses.replace(self, **changes)
        config.validate()
        return config

    def with_stage(self, stage: int) -> Config:
        return self.replace(
            zero_optimization=dataclasses.replace(self.zero_optimization, stage=stage)
        )

    def with_stage_override(self, stage: int | None) -> Config:
        """This config with ``stage`` (an explicit ``shard(stage=...)``) replacing the config's
        ``zero_optimization.stage``; logs one line on the "fzero" logger when they differ."""
        if stage is None or stage == self.stage:
            return self
        config = self.with_stage(stage)
        logger.info(
            "stage=%d passed to shard() overrides zero_optimization.stage=%d from the config",
            stage,
            self.stage,
        )
        return config

    # -- checks (fzero/config/validate.py) ------------------------------------------------------

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first key out of range or contradicting another."""
        validate_config(self)

    def check_stage_options(self) -> None:
        """Options whose meaning depends on the stage, checked by ``shard`` once the stage is
        final (``shard(stage=...)`` overrides the config's)."""
        validate_stage_options(self)

    # -- derived values the runtime reads -------------------------------------------------------

    @property
    def batch_sizes(self) -> tuple[int | str | None, int | str | None, int | str | None]:
        """``(train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps)``."""
        return (
            self.train_batch_size,
            self.train_micro_batch_size_per_gpu,
            self.gradient_accumulation_steps,
        )

    @property
    def stage(self) -> int:
        return self.zero_optimization.stage

    @property
    def compute_dtype_name(self) -> str:
        if self.bf16.enabled is True:
            return "bf16"
        return "fp16" if self.fp16.enabled is True else "fp32"

    @property
    def reduce_every_micro_batch(self) -> bool:
        """Whether gradients are reduced at every micro-batch (stages 2, 3 by default, and
        every stage in deterministic mode) rather than once per step."""
        if self.fzero.deterministic:
            return True
        flag = self.fzero.reduce_every_micro_batch
        return self.stage >= 2 if flag is None else flag

    @property
    def grad_accum_dtype_name(self) -> str:
        return self.data_types.grad_accum_dtype or "fp32"

    @property
    def reduce_dtype_name(self) -> str:
        return self.communication_data_type or self.grad_accum_dtype_name

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based): the scheduler's, else the
        optimizer's lr. Called every step, so it is plain arithmetic on resolved fields."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        lr = self.optimizer.lr
        if self.scheduler is not None:
            try:
                lr = self.scheduler.lr_at(step, lr)
            except TypeError:  # arithmetic on an unresolved "auto"
                lr = "auto"
        if isinstance(lr, str):
            keys = self.unresolved_keys() or ["scheduler"]
            raise ConfigError(keys[0], '"auto" is not resolved yet; call Config.resolve first')
        return lr

    # -- "auto" ---------------------------------------------------------------------------------

    def unresolved_keys(self) -> list[str]:
        """JSON paths of the keys still set to ``"auto"``."""
        return [path for path, value in flatten(self.to_dict()).items() if value == "auto"]

    def resolve(
        self,
        *,
        world_size: int,
        hidden_size: int | None,
        param_numel: int,
        total_num_steps: int | None = None,
    ) -> Config:
        """This config with every ``"auto"`` replaced and the batch sizes derived.

        Bucket sizes come from the model's hidden size as DeepSpeed's HF integration computes
        them (reduce_bucket_size = h*h, stage3_prefetch_bucket_size = 0.9*h*h,
        stage3_param_persistence_threshold = 10*h), with the two bucket sizes capped at the
        model's ``param_numel`` (a bigger bucket is never filled). Without a hidden size they take
        DeepSpeed's defaults. ``scheduler.params.warmup_max_lr`` becomes the optimizer's lr,
        ``total_num_steps`` the argument of that name; any other "auto" takes the default listed
        in docs/config.md. Of train_batch_size, train_micro_batch_size_per_gpu and
        gradient_accumulation_steps, the given ones derive the rest as DeepSpeed does, and
        ``train_batch_size == micro * accumulation * world_size`` is enforced. What was resolved
        is logged once, at INFO, on the "fzero" logger.
        """
        return resolve_auto(
            self,
            world_size=world_size,
            hidden_size=hidden_size,
            param_numel=param_numel,
            total_num_steps=total_num_steps,
        )

    # -- comparison -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The config in DeepSpeed's JSON layout; ``Config.from_dict`` reads it back."""
        data: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            data[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        optimizer = data["optimizer"]
        data["optimizer"] = {"type": optimizer.pop("type"), "params": optimizer}
        if self.scheduler is not None:
            data["scheduler"] = {"type": self.scheduler.TYPE, "params": data["scheduler"]}
        return data

    def diff(self, other: Config) -> list[str]:
        """JSON paths of the keys whose values differ between ``self`` and ``other``."""
        mine, theirs = flatten(self.to_dict()), flatten(other.to_dict())
        missing = object()
        paths = dict.fromkeys([*mine, *theirs])
        return [p for p in paths if mine.get(p, missing) != theirs.get(p, missing)]

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of ``to_dict()``: equal on ranks with equal configs."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def names_stage(config: Config | dict | str | os.PathLike) -> bool:
    """Whether ``config`` (as given to ``shard`` or ``load``) chooses a ZeRO stage: a dict or
    file with ``zero_optimization.stage`` set to a number; a ``Config`` always holds one."""
    if isinstance(config, Config):
        return True
    if isinstance(config, (str, os.PathLike)):
        config = load_file(config)
    zero = config.get("zero_optimization") if isinstance(config, dict) else None
    return isinstance(zero, dict) and zero.get("stage") not in (None, "auto")
