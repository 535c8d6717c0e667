"""The precision blocks of ``fzero.Config``: ``bf16``, ``fp16`` (with its loss scaling) and
``data_types`` (DeepSpeed: ``deepspeed/runtime/precision_config.py``).

Field names and defaults are DeepSpeed's unless a docstring says otherwise; ``validate(path)``
checks ranges within the block and names the JSON path of a bad key (checks across blocks are in
``validate.py``: whether bf16 and fp16 are both on, or the dtypes chosen for gradients contradict
them). Fields typed ``... | Auto`` hold the string ``"auto"`` until ``Config.resolve`` replaces it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fzero.config.parse import DROPS_AUTO, Auto, DtypeName
from fzero.config.ranges import check_at_least
from fzero.errors import ConfigError


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


DROPS_AUTO.update({PrecisionConfig, Fp16Config})
