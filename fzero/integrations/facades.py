"""The optimizer and lr-scheduler objects ``fzero.initialize`` returns beside the engine.

DeepSpeed returns its ZeRO optimizer and scheduler; loops read their ``param_groups`` and
``get_last_lr()``. fzero's optimizer state is part of the engine's ``ZeroState`` and its
schedule is a pure function of the step, so these are read-only views of the engine: stepping
them directly is refused (``engine.step()`` does both), never silently done twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fzero.errors import EngineError

if TYPE_CHECKING:
    from fzero.integrations.engine import Engine


class EngineOptimizer:
    """The engine's AdamW as loops see an optimizer: hyperparameters, no stepping."""

    def __init__(self, engine: Engine):
        self.engine = engine

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """One group: every trainable parameter, with the lr of the next step."""
        optimizer = self.engine.config.optimizer
        params = [p for p in self.engine.module.parameters() if p.requires_grad]
        return [
            {
                "params": params,
                "lr": self.engine.get_lr()[0],
                "betas": tuple(optimizer.betas),
                "eps": optimizer.eps,
                "weight_decay": optimizer.weight_decay,
            }
        ]

    @property
    def loss_scale(self) -> float:
        return self.engine.get_loss_scale()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do (see ``Engine.zero_grad``)."""

    def step(self, closure: Any = None) -> None:
        raise EngineError(
            "optimizer.step(): fzero's optimizer runs inside engine.step() (at the gradient-"
            "accumulation boundary); call engine.step() instead"
        )


class EngineScheduler:
    """The config's ``scheduler`` block as loops see an lr scheduler."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def get_last_lr(self) -> list[float]:
        """The learning rate the next optimizer step uses."""
        return self.engine.get_lr()

    def get_lr(self) -> list[float]:
        return self.engine.get_lr()

    @property
    def last_batch_iteration(self) -> int:
        """DeepSpeed's count: applied optimizer steps minus one."""
        return int(self.engine.state.progress.applied_steps) - 1

    def step(self, *args: Any, **kwargs: Any) -> None:
        raise EngineError(
            "lr_scheduler.step(): the schedule advances inside engine.step(), once per applied "
            "optimizer step; calling it again would skip learning rates. Remove the call"
        )
