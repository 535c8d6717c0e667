"""PendingUpdate: a step's optimizer update that is decided but not yet applied, as leaves.

With optimizer offload at stage 3 the CPU AdamW step of each unit runs in the next step's first
forward, right before the unit is gathered (``ApplyPendingUpdate``), so that the CPU steps
overlap the forward. Between the two steps the update waits here: the step's reduced gradient
shard (on the host, where the CPU step reads it), the learning rate it was decided with, and the
one factor AdamW divides the gradient by (averaging over ranks, the loss scale and clipping).
The state is then complete: a ``tree_map`` copy carries the update with it, and anything that
reads the weights between steps (``save``, ``full_state_dict``, ``gathered``, an evaluation
forward) first applies it (``Runtime.settle``), which leaves the state's value unchanged.

``armed`` is 1 while an update waits, 0 otherwise (no offload, the first step, a skipped step,
or after the update was applied). Without optimizer offload ``grad`` has no elements.
"""

from __future__ import annotations

from dataclasses import dataclass

import optree
import torch


@dataclass(frozen=True, eq=False)
class PendingUpdate:
    grad: torch.Tensor  # this rank's reduced gradient shard, gradient-accumulation dtype
    lr: torch.Tensor  # 0-dim float64: the learning rate of the step that decided it
    inverse_scale: torch.Tensor  # 0-dim float32: AdamW's grad_scale (the gradient is divided)
    armed: torch.Tensor  # 0-dim int64: 1 while the update waits

    @classmethod
    def empty(cls, grad: torch.Tensor | None = None) -> PendingUpdate:
        """Nothing pending; ``grad`` is the buffer a pending update will keep its gradient in
        (none without offload)."""
        if grad is None:
            grad = torch.zeros(0, dtype=torch.float32)
        return cls(
            grad,
            torch.zeros((), dtype=torch.float64),
            torch.ones((), dtype=torch.float32),
            torch.zeros((), dtype=torch.int64),
        )

    @property
    def is_armed(self) -> bool:
        return bool(self.armed)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.grad, self.lr, self.inverse_scale, self.armed)


def _flatten(pending: PendingUpdate):
    return pending.tensors(), None, ("grad", "lr", "inverse_scale", "armed")


optree.register_pytree_node(
    PendingUpdate, _flatten, lambda _, children: PendingUpdate(*children), namespace="fzero"
)
