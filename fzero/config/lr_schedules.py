"""DeepSpeed's learning-rate schedules as pure functions of the step.

Each schedule is a frozen dataclass whose fields are DeepSpeed's ``scheduler.params`` keys, with
DeepSpeed's defaults, and whose ``lr_at(step, base_lr)`` returns the learning rate that optimizer
step ``step`` (0-based) uses. ``base_lr`` is ``optimizer.params.lr``; WarmupLR (when
``warmup_max_lr`` is unset) and WarmupCosineLR scale from it, as DeepSpeed's do.

The step indexing copies DeepSpeed exactly, so a run moved from DeepSpeed sees the same learning
rate at every step. DeepSpeed sets the lr when the scheduler is built and calls
``scheduler.step()`` after each optimizer step, so optimizer step ``s`` runs with the lr of
DeepSpeed's ``last_batch_iteration = s - 1``; before the first ``scheduler.step()`` (step 0) that
is ``warmup_min_lr`` (WarmupLR, WarmupDecayLR), 0 (WarmupCosineLR), ``cycle_min_lr`` (OneCycle)
or ``lr_range_test_min_lr`` (LRRangeTest). Formulas follow ``deepspeed/runtime/lr_schedules.py``.

Fields that HF-style configs set to ``"auto"`` hold the string ``"auto"`` until
``Config.resolve`` replaces it; ``lr_at`` is only meant for resolved schedules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

from fzero.errors import ConfigError

Auto = Literal["auto"]
AUTO = "auto"
WarmupType = Literal["log", "linear"]


def _warmup_fraction(iteration: int, warmup_num_steps: int, warmup_type: str) -> float:
    """Fraction of the warmup done after scheduler iteration ``iteration`` (< warmup steps)."""
    if iteration < 0:
        return 0.0
    if warmup_type == "log":
        return math.log(iteration + 1) / math.log(warmup_num_steps)
    return iteration / warmup_num_steps


def _check(path: str, value: object, low: float, what: str = "") -> None:
    """Raise unless ``value`` (a number, None or "auto") is at least ``low``."""
    if isinstance(value, (int, float)) and not value >= low:
        raise ConfigError(path, f"must be >= {low}{what}, got {value}")


@dataclass(frozen=True)
class WarmupLR:
    """Warm up from ``warmup_min_lr`` to ``warmup_max_lr`` over ``warmup_num_steps``, then hold.

    ``warmup_type`` "log" rises with log(iteration + 1), "linear" with iteration. DeepSpeed uses
    at least 2 warmup steps whatever is configured.
    """

    TYPE: ClassVar[str] = "WarmupLR"

    warmup_min_lr: float | Auto = 0.0
    warmup_max_lr: float | Auto | None = None  # None: the optimizer's lr
    warmup_num_steps: int | Auto = 1000
    warmup_type: WarmupType = "log"

    def validate(self, path: str = "scheduler.params") -> None:
        _check(f"{path}.warmup_min_lr", self.warmup_min_lr, 0)
        _check(f"{path}.warmup_max_lr", self.warmup_max_lr, 0)
        _check(f"{path}.warmup_num_steps", self.warmup_num_steps, 1)

    def _gamma(self, iteration: int) -> float:
        warmup_num_steps = max(2, self.warmup_num_steps)
        if iteration < warmup_num_steps:
            return _warmup_fraction(iteration, warmup_num_steps, self.warmup_type)
        return 1.0

    def lr_at(self, step: int, base_lr: float) -> float:
        max_lr = base_lr if self.warmup_max_lr is None else self.warmup_max_lr
        return self.warmup_min_lr + (max_lr - self.warmup_min_lr) * self._gamma(step - 1)


@dataclass(frozen=True)
class WarmupDecayLR(WarmupLR):
    """WarmupLR, then linear decay to 0 at ``total_num_steps`` (required)."""

    TYPE: ClassVar[str] = "WarmupDecayLR"

    warmup_max_lr: float | Auto | None = 0.001
    total_num_steps: int | Auto | None = None

    def validate(self, path: str = "scheduler.params") -> None:
        super().validate(path)
        if self.total_num_steps is None:
            raise ConfigError(f"{path}.total_num_steps", "required by WarmupDecayLR")
        _check(f"{path}.total_num_steps", self.total_num_steps, 1)

    def _gamma(self, iteration: int) -> float:
        warmup_num_steps = max(2, self.warmup_num_steps)
        if iteration < warmup_num_steps:
            return _warmup_fraction(iteration, warmup_num_steps, self.warmup_type)
        decay_steps = max(1, self.total_num_steps - warmup_num_steps)
        return max(0.0, (self.total_num_steps - iteration) / decay_steps)


@dataclass(frozen=True)
class WarmupCosineLR:
    """Warm up the lr ratio from ``warmup_min_ratio`` to 1, then cosine-decay it to
    ``cos_min_ratio`` at ``total_num_steps`` (required) and hold; the lr is ratio x base lr."""

    TYPE: ClassVar[str] = "WarmupCosineLR"

    total_num_steps: int | Auto | None = None
    warmup_min_ratio: float = 0.0
    warmup_num_steps: int | Auto = 1000
    cos_min_ratio: float = 0.0001
    warmup_type: WarmupType = "log"

    def validate(self, path: str = "scheduler.params") -> None:
        if self.total_num_steps is None:
            raise ConfigError(f"{path}.total_num_steps", "required by WarmupCosineLR")
        _check(f"{path}.total_num_steps", self.total_num_steps, 1)
        _check(f"{path}.warmup_min_ratio", self.warmup_min_ratio, 0)
        _check(f"{path}.warmup_num_steps", self.warmup_num_steps, 1)
        _check(f"{path}.cos_min_ratio", self.cos_min_ratio, 0)

    def lr_at(self, step: int, base_lr: float) -> float:
        iteration = step - 1
        if iteration < 0:
            return 0.0  # DeepSpeed's WarmupCosineLR starts at lr 0 before its first step()
        warmup_num_steps = max(2, self.warmup_num_steps)
        if iteration < warmup_num_steps:
            fraction = _warmup_fraction(iteration, warmup_num_steps, self.warmup_type)
            return base_lr * (self.warmup_min_ratio + fraction * (1.0 - self.warmup_min_ratio))
        decay_steps = max(1, self.total_num_steps - warmup_num_steps)
        progress = min(1.0, (iteration - warmup_num_steps + 1) / decay_steps)
        cosine = (1.0 + math.cos(math.pi * progress)) / 2.0
        return base_lr * max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * cosine)


@dataclass(frozen=True)
class OneCycle:
    """One triangular cycle between ``cycle_min_lr`` and ``cycle_max_lr`` (both required), then
    ``cycle_min_lr / (1 + decay_lr_rate * k / decay_step_size)`` k steps after the cycle.

    The momentum keys are accepted so DeepSpeed configs load, but fzero keeps Adam's betas as
    configured: DeepSpeed's beta1 cycling (on by default) has no effect here.
    """

    TYPE: ClassVar[str] = "OneCycle"

    cycle_min_lr: float | None = None
    cycle_max_lr: float | None = None
    decay_lr_rate: float = 0.0
    cycle_first_step_size: int = 2000
    cycle_second_step_size: int | None = None  # None: cycle_first_step_size
    cycle_first_stair_count: int = 0
    cycle_second_stair_count: int | None = None  # None: cycle_first_stair_count
    decay_step_size: int = 0
    cycle_momentum: bool = True
    cycle_min_mom: float = 0.8
    cycle_max_mom: float = 0.9
    decay_mom_rate: float = 0.0

    def validate(self, path: str = "scheduler.params") -> None:
        for name in ("cycle_min_lr", "cycle_max_lr"):
            if getattr(self, name) is None:
                raise ConfigError(f"{path}.{name}", "required by OneCycle")
            _check(f"{path}.{name}", getattr(self, name), 0)
        _check(f"{path}.decay_lr_rate", self.decay_lr_rate, 0)
        _check(f"{path}.cycle_first_step_size", self.cycle_first_step_size, 1)
        _check(f"{path}.cycle_second_step_size", self.cycle_second_step_size, 1)
        _check(f"{path}.cycle_first_stair_count", self.cycle_first_stair_count, 0)
        _check(f"{path}.cycle_second_stair_count", self.cycle_second_stair_count, 0)
        _check(f"{path}.decay_step_size", self.decay_step_size, 0)

    def lr_at(self, step: int, base_lr: float) -> float:
        first = float(self.cycle_first_step_size)
        second = (
            first if self.cycle_second_step_size is None else float(self.cycle_second_step_size)
        )
        total = first + second
        if step - 1 < total:
            return self.cycle_min_lr + (self.cycle_max_lr - self.cycle_min_lr) * self._scale(
                step, first, second
            )
        if self.decay_step_size == 0 or self.decay_lr_rate == 0:
            return self.cycle_min_lr
        return self.cycle_min_lr / (
            1.0 + self.decay_lr_rate * (step - total) / self.decay_step_size
        )

    def _scale(self, batch_iteration: int, first: float, second: float) -> float:
        """Height in the cycle, 0 at the ends and 1 at the peak (DeepSpeed's scale factor)."""
        total = first + second
        step_ratio = first / total
        x = 1.0 + batch_iteration / total - math.floor(1.0 + batch_iteration / total)
        if x <= step_ratio:
            scale, stair_count = x / step_ratio, self.cycle_first_stair_count
        else:
            scale = (x - 1.0) / (step_ratio - 1.0)
            stair_count = self.cycle_second_stair_count
            if stair_count is None:
                stair_count = self.cycle_first_stair_count
        if stair_count > 0:
            # Stairs hold the lr flat; quantise from the integer position, as DeepSpeed does, so a
            # float rounding just under a stair edge cannot drop a whole stair.
            position = batch_iteration % total
            if position <= first:
                stairs = position * stair_count / first
            else:
                stairs = (total - position) * stair_count / second
            scale = math.floor(stairs) / stair_count
        return scale


@dataclass(frozen=True)
class LRRangeTest:
    """Grow the lr from ``lr_range_test_min_lr`` by ``lr_range_test_step_rate`` per
    ``lr_range_test_step_size`` steps, continuously or (``lr_range_test_staircase``) in stairs."""

    TYPE: ClassVar[str] = "LRRangeTest"

    lr_range_test_min_lr: float = 0.001
    lr_range_test_step_size: int = 2000
    lr_range_test_step_rate: float = 1.0
    lr_range_test_staircase: bool = False

    def validate(self, path: str = "scheduler.params") -> None:
        _check(f"{path}.lr_range_test_min_lr", self.lr_range_test_min_lr, 0)
        _check(f"{path}.lr_range_test_step_size", self.lr_range_test_step_size, 1)
        _check(f"{path}.lr_range_test_step_rate", self.lr_range_test_step_rate, 0)

    def lr_at(self, step: int, base_lr: float) -> float:
        interval = step / self.lr_range_test_step_size
        if self.lr_range_test_staircase:
            interval = math.floor(interval)
        return self.lr_range_test_min_lr * (1.0 + self.lr_range_test_step_rate * interval)


Scheduler = WarmupLR | WarmupCosineLR | OneCycle | LRRangeTest  # WarmupDecayLR is a WarmupLR

SCHEDULERS: dict[str, type] = {
    cls.TYPE: cls for cls in (WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle, LRRangeTest)
}
