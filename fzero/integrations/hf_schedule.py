"""Hugging Face's learning-rate schedules (``lr_scheduler_type``) as an fzero schedule.

With DeepSpeed, a config without a ``scheduler`` block trains with the Trainer's own schedule
(``linear`` by default, warm-up from ``warmup_steps``). DeepSpeed's WarmupDecayLR is not the
same curve (it lags one step and warms up over at least 2 steps), so the fzero Trainer runs
transformers' own multiplier functions: ``TransformersSchedule.lr_at(step, lr)`` is
``lr * lambda(step)`` with the lambda of ``transformers.get_scheduler``, which is exactly the
learning rate transformers' ``LambdaLR`` gives optimizer step ``step``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from fzero.errors import ConfigError


@dataclass(frozen=True)
class TransformersSchedule:
    """``transformers.get_scheduler(name, ...)``'s multiplier; fields are its arguments."""

    TYPE: ClassVar[str] = "TransformersSchedule"

    name: str = "linear"
    num_warmup_steps: int = 0
    num_training_steps: int = 1
    scheduler_kwargs_json: str = "{}"  # lr_scheduler_kwargs, as canonical JSON (hashable)

    def validate(self, path: str = "scheduler.params") -> None:
        _multiplier(
            self.name, self.num_warmup_steps, self.num_training_steps, self.scheduler_kwargs_json
        )

    def lr_at(self, step: int, base_lr: float) -> float:
        multiplier = _multiplier(
            self.name, self.num_warmup_steps, self.num_training_steps, self.scheduler_kwargs_json
        )
        return base_lr * multiplier(step)


def schedule_from_arguments(args: object, num_training_steps: int) -> TransformersSchedule | None:
    """The schedule ``TrainingArguments`` ask for, or None for ``constant`` (the config's lr)."""
    name = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    if name == "constant":
        return None
    kwargs = json.dumps(args.lr_scheduler_kwargs or {}, sort_keys=True)
    schedule = TransformersSchedule(
        name, args.get_warmup_steps(num_training_steps), num_training_steps, kwargs
    )
    schedule.validate()
    return schedule


@functools.lru_cache(maxsize=16)
def _multiplier(
    name: str, num_warmup_steps: int, num_training_steps: int, kwargs_json: str
) -> Callable[[int], float]:
    import torch
    from transformers import get_scheduler

    parameter = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    try:
        scheduler = get_scheduler(
            name,
            optimizer=optimizer,
            num_warmup_steps=num_warmup_steps,
            num_training_steps=num_training_steps,
            scheduler_specific_kwargs=json.loads(kwargs_json),
        )
    except (ValueError, TypeError) as error:
        raise ConfigError("lr_scheduler_type", f"{name!r}: {error}") from None
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if not lambdas or len(lambdas) != 1:
        raise ConfigError(
            "lr_scheduler_type",
            f"{name!r} is not a function of the step (fzero needs one); use linear, cosine, "
            "constant, constant_with_warmup, polynomial, ... or a DeepSpeed scheduler block",
        )
    return lambdas[0]
