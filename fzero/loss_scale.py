"""fp16 loss scaling: DeepSpeed's dynamic rule as a pure function over a frozen state.

fp16 ends at 65504 and its smallest normal is 6e-5, so small gradients flush to zero. Training
multiplies the loss by a scale S before backward, which multiplies every gradient by S; the
optimizer divides by S again (fzero folds 1/S into AdamW's gradient scale, so it costs no pass).
Dynamic scaling starts high, halves S when a step's gradients overflow (that step is skipped on
every rank) and doubles it after a window of clean steps, so S stays just under the overflow edge.

``update`` is the sequence of DeepSpeed's ``DynamicLossScaler.update_scale``
(``deepspeed/runtime/fp16/loss_scaler.py``), step for step:

- Overflow: when ``hysteresis`` is 1 or only one overflow of hysteresis is left, the scale halves,
  never below ``min_scale`` (an overflow *at* ``min_scale`` raises ``LossScaleError``, as
  DeepSpeed's default does); otherwise one overflow of hysteresis is used up and the scale stays.
  Either way the step is remembered as the last overflow. Halving does not refill hysteresis.
- Clean step: with ``consecutive_hysteresis`` the hysteresis is refilled. ``stable`` counts the
  clean steps before this one since the last overflow (at the start, as if step -1 overflowed);
  when it is a positive multiple of ``window`` the scale doubles and, without
  ``consecutive_hysteresis``, the hysteresis is refilled.

So with no overflow at all the scale first doubles at step ``window`` (0-based), then every
``window`` steps; after an overflow at step k it doubles at step k + window + 1.

A static scale (``fp16.loss_scale`` > 0) never changes; overflowing steps are still skipped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fzero.errors import LossScaleError


@dataclass(frozen=True)
class LossScaler:
    """The loss scale and what decides the next one. ``dynamic=False``: a fixed ``scale``."""

    scale: float = 1.0
    dynamic: bool = False
    window: int = 1000
    hysteresis: int = 2
    consecutive_hysteresis: bool = False
    min_scale: float = 1.0
    iteration: int = 0  # steps seen, skipped ones included
    last_overflow: int = -1  # the iteration of the last overflow
    hysteresis_left: int = 2

    @classmethod
    def from_fp16(cls, fp16) -> LossScaler:
        """The scaler a (resolved) ``fp16`` config block describes: scale 1 when fp16 is off,
        ``loss_scale`` when it is > 0, else dynamic from ``2**initial_scale_power``."""
        if fp16.enabled is not True:
            return cls()
        if fp16.loss_scale > 0:
            return cls(scale=float(fp16.loss_scale))
        return cls(
            scale=2.0**fp16.initial_scale_power,
            dynamic=True,
            window=fp16.loss_scale_window,
            hysteresis=fp16.hysteresis,
            consecutive_hysteresis=fp16.consecutive_hysteresis,
            min_scale=float(fp16.min_loss_scale),
            hysteresis_left=fp16.hysteresis,
        )

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)


def update(scaler: LossScaler, overflow: bool) -> LossScaler:
    """The scaler after a step whose gradients did (``overflow``) or did not overflow."""
    if not scaler.dynamic:
        return dataclasses.replace(scaler, iteration=scaler.iteration + 1)
    scale, hysteresis_left = scaler.scale, scaler.hysteresis_left
    last_overflow = scaler.last_overflow
    if overflow:
        if scaler.hysteresis == 1 or hysteresis_left == 1:
            if scale == scaler.min_scale:
                raise LossScaleError(
                    f"fp16 gradients overflowed at the minimum loss scale {scale:g} "
                    "(fp16.min_loss_scale): the scale cannot go lower. The step was skipped; "
                    "lower fp16.min_loss_scale, lower the learning rate or use bf16"
                )
            scale = max(scale / 2.0, scaler.min_scale)
        else:
            hysteresis_left -= 1
        last_overflow = scaler.iteration
    else:
        if scaler.consecutive_hysteresis:
            hysteresis_left = scaler.hysteresis
        stable = scaler.iteration - scaler.last_overflow - 1
        if stable > 0 and stable % scaler.window == 0:
            if not scaler.consecutive_hysteresis:
                hysteresis_left = scaler.hysteresis
            scale *= 2.0
    return dataclasses.replace(
        scaler,
        scale=scale,
        iteration=scaler.iteration + 1,
        last_overflow=last_overflow,
        hysteresis_left=hysteresis_left,
    )
