"""Progress: the counters a resume needs besides the buffers, as pytree leaves.

Every counter is a 0-dim tensor on the host, so ``optree.tree_map(torch.clone, state)`` copies it
with the buffers and reading it costs no device sync. The loss scaler's rule (dynamic or not,
window, hysteresis, minimum) is static config; its position lives here.
"""

from __future__ import annotations

from dataclasses import dataclass

import optree
import torch

from fzero.loss_scale import LossScaler


def _counter(value: int) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int64)


@dataclass(frozen=True, eq=False)
class Progress:
    """``steps``: ``train_step`` calls, skipped steps included; ``skipped_steps``: steps whose
    gradients were not finite (nothing updated). The learning-rate schedule's position is the
    number of applied steps, ``steps - skipped_steps``. The rest is the fp16 loss scaler's
    position: ``loss_scale``, ``scaler_iteration`` (steps it has seen), ``last_overflow`` (the
    iteration of the last overflow) and ``hysteresis_left``."""

    steps: torch.Tensor
    skipped_steps: torch.Tensor
    loss_scale: torch.Tensor  # float64
    scaler_iteration: torch.Tensor
    last_overflow: torch.Tensor
    hysteresis_left: torch.Tensor

    @classmethod
    def start(cls, scaler: LossScaler) -> Progress:
        return cls.of(0, 0, scaler)

    @classmethod
    def of(cls, steps: int, skipped_steps: int, scaler: LossScaler) -> Progress:
        return cls(
            _counter(steps),
            _counter(skipped_steps),
            torch.tensor(scaler.scale, dtype=torch.float64),
            _counter(scaler.iteration),
            _counter(scaler.last_overflow),
            _counter(scaler.hysteresis_left),
        )

    @property
    def step_count(self) -> int:
        return int(self.steps)

    @property
    def skipped_count(self) -> int:
        return int(self.skipped_steps)

    @property
    def applied_steps(self) -> int:
        """Optimizer updates applied so far: the learning-rate schedule's position."""
        return self.step_count - self.skipped_count

    def scaler(self, rule: LossScaler) -> LossScaler:
        """The loss scaler at this position, following ``rule``'s static settings."""
        return LossScaler(
            scale=float(self.loss_scale),
            dynamic=rule.dynamic,
            window=rule.window,
            hysteresis=rule.hysteresis,
            consecutive_hysteresis=rule.consecutive_hysteresis,
            min_scale=rule.min_scale,
            iteration=int(self.scaler_iteration),
            last_overflow=int(self.last_overflow),
            hysteresis_left=int(self.hysteresis_left),
        )

    def after_step(self, skipped: bool, scaler: LossScaler) -> Progress:
        """The progress one step later: ``skipped`` says whether it was skipped, ``scaler`` is
        the loss scaler after it."""
        return Progress.of(self.step_count + 1, self.skipped_count + int(skipped), scaler)

    def assign(self, other: Progress) -> None:
        """Write ``other``'s values into this progress's own tensors (a step that raised after
        skipping: the state given to it stays usable and counts the skip)."""
        for mine, theirs in zip(_flatten(self)[0], _flatten(other)[0], strict=True):
            mine.copy_(theirs)


def _flatten(progress: Progress):
    names = (
        "steps",
        "skipped_steps",
        "loss_scale",
        "scaler_iteration",
        "last_overflow",
        "hysteresis_left",
    )
    return tuple(getattr(progress, n) for n in names), None, names


optree.register_pytree_node(
    Progress, _flatten, lambda _, children: Progress(*children), namespace="fzero"
)
