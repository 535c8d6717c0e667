"""``fzero.Config``: every knob, with DeepSpeed's key names where DeepSpeed has one.

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

from fzero.config.blocks import (
    DataTypesConfig,
    Fp16Config,
    FzeroConfig,
    OffloadOptimizerConfig,
    OffloadParamConfig,
    OptimizerConfig,
    PrecisionConfig,
    ZeroConfig,
    check_at_least,
)
from fzero.config.lr_schedules import SCHEDULERS, OneCycle, Scheduler
from fzero.config.notes import collecting_notes, report, suggest, warn_no_effect
from fzero.config.parse import Auto, DtypeName, build, flatten, load_file
from fzero.config.resolve import BATCH_KEYS, resolve_auto
from fzero.errors import ConfigError, ConfigTypeError

__all__ = [
    "Config",
    "names_stage",
    "DataTypesConfig",
    "Fp16Config",
    "FzeroConfig",
    "OffloadOptimizerConfig",
    "OffloadParamConfig",
    "OptimizerConfig",
    "PrecisionConfig",
    "SUPPORTED_OFFLOAD_DEVICES",
    "ZeroConfig",
]

logger = logging.getLogger("fzero")

# Offload devices the runtime implements. Any other device in offload_optimizer/offload_param is
# rejected at config time; the runtime adds "cpu" here when it implements CPU offload.
SUPPORTED_OFFLOAD_DEVICES: tuple[str, ...] = ("none", "cpu")

_DTYPE_NAMES = ("fp32", "bf16", "fp16")


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
    gradient_clipping: float | Auto = 0.0
    gradient_accumulation_steps: int | Auto | None = None
    train_micro_batch_size_per_gpu: int | Auto | None = None
    train_batch_size: int | Auto | None = None
    communication_data_type: DtypeName | None = None
    steps_per_print: int = 10

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
            scheduler = _build_scheduler(data.pop("scheduler", None))
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

    # -- checks ---------------------------------------------------------------------------------

    def validate(self) -> None:
        zero = self.zero_optimization
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
        self.optimizer.validate()
        if self.scheduler is not None:
            self.scheduler.validate()
        self.bf16.validate("bf16")
        self.fp16.validate("fp16")
        if self.bf16.enabled is True and self.fp16.enabled is True:
            raise ConfigError("bf16.enabled", "bf16.enabled and fp16.enabled are both true")
        check_at_least("gradient_clipping", self.gradient_clipping, 0)
        check_at_least("steps_per_print", self.steps_per_print, 1)
        check_at_least("fzero.alignment", self.fzero.alignment, 1)
        batch, micro, accumulation = sizes = self.batch_sizes
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
            ("data_types.grad_accum_dtype", self.data_types.grad_accum_dtype),
            ("communication_data_type", self.communication_data_type),
        ):
            if name is not None and name not in _DTYPE_NAMES:
                raise ConfigError(path, f"must be one of {_DTYPE_NAMES}, got {name!r}")
        self._check_precision()

    def _check_precision(self) -> None:
        """Precision settings that contradict each other (each error names the key to change)."""
        self.fp16.check_consistent("fp16")
        fp16, bf16 = self.fp16.enabled is True, self.bf16.enabled is True
        for path, name in (
            ("communication_data_type", self.communication_data_type),
            ("data_types.grad_accum_dtype", self.data_types.grad_accum_dtype),
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
        if fp16 and self.fzero.nonfinite_grads != "skip":
            raise ConfigError(
                "fzero.nonfinite_grads",
                f"{self.fzero.nonfinite_grads!r} with fp16.enabled: fp16 skips overflowing steps "
                'and lowers the loss scale; leave it "skip"',
            )
        if self.fzero.deterministic and self.fzero.reduce_every_micro_batch is False:
            raise ConfigError(
                "fzero.reduce_every_micro_batch",
                "false with fzero.deterministic: deterministic mode reduces every micro-batch "
                "in a fixed order; remove one of the two",
            )

    def check_stage_options(self) -> None:
        """Options whose meaning depends on the stage, checked by ``shard`` once the stage is
        final (``shard(stage=...)`` overrides the config's)."""
        zero = self.zero_optimization
        stage = zero.stage
        param = zero.offload_param
        if param is not None and param.device != "none" and stage != 3:
            message = f"parameter offload needs stage 3, got stage {stage}"
            raise ConfigError("zero_optimization.offload_param.device", message)
        optimizer = zero.offload_optimizer
        partial = optimizer is not None and optimizer.device != "none" and optimizer.ratio < 1
        if partial and stage != 3:
            message = f"partial offload (ratio < 1) needs stage 3, got stage {stage}"
            raise ConfigError("zero_optimization.offload_optimizer.ratio", message)
        if stage < 2 and self.fzero.reduce_every_micro_batch is True:
            raise ConfigError(
                "fzero.reduce_every_micro_batch",
                f"true with stage {stage}: stages 0 and 1 keep full gradients and reduce "
                "once per step; remove it or use stage 2 or 3",
            )

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


def _build_scheduler(data: Any) -> Scheduler | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ConfigTypeError("scheduler", f"expected an object, got {data!r}")
    for key in data:
        if key not in ("type", "params"):
            raise ConfigError(f"scheduler.{key}", f"unknown key{suggest(key, ('type', 'params'))}")
    name = data.get("type")
    if not isinstance(name, str):
        raise ConfigTypeError("scheduler.type", f"expected a scheduler name, got {name!r}")
    if name not in SCHEDULERS:
        raise ConfigError(
            "scheduler.type",
            f"unsupported scheduler {name!r}; fzero implements {', '.join(SCHEDULERS)}"
            + suggest(name, SCHEDULERS),
        )
    scheduler = build(SCHEDULERS[name], data.get("params", {}), "scheduler.params")
    if isinstance(scheduler, OneCycle) and scheduler.cycle_momentum:
        warn_no_effect(
            "scheduler.params.cycle_momentum",
            "fzero keeps Adam's betas fixed (cycle_min_mom, cycle_max_mom and decay_mom_rate are "
            "ignored); set cycle_momentum to false to say so",
        )
    return scheduler
