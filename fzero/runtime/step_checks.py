"""Checks a step makes so that a misuse raises on every rank instead of training wrong or
hanging: equal micro-batch counts on every rank, and ``requires_grad`` as ``shard`` saw it.

Micro-batch counts. With ``gradient_accumulation_steps`` set, every rank checks its own count
against it (``train.micro_batches_of``), and the config is the same on every rank (checked at
``shard``), so the counts agree by construction. Unset, the ranks compare counts:

- In the step phase, for free: the scalars reduction (``ReduceScalars``: an all-reduce of the
  loss and the squared norm; ``ReduceScalarsInOrder``: an all-gather of the losses) carries
  each rank's count of micro-steps run, as a one-hot vector (exact in fp32). A mismatch joins
  the overflow flag on the device, so AdamW skips the update without a host sync, and the
  step's one host read of that flag then raises ``MicroBatchCountError`` naming every count.
  This covers every schedule whose micro-steps issue no collective (stages 0 and 1; stage 2
  reducing at the last micro-batch only), where ranks with different counts still issue the
  same collectives.
- Where micro-steps issue collectives (stage 3's gathers, stage 2 reducing every micro-batch,
  deterministic mode, the first step's tracing micro-batch at stages 2 and 3), ranks with
  different counts would pair different collectives before the step phase: one small
  all-reduce of the declared count (``micro_step``'s ``count``) runs before the first
  micro-batch, and every rank raises there. That is one extra round trip and one host read per
  step, at those stages only, and only without ``gradient_accumulation_steps``.

Limit: a caller that declares one count and runs another (an engine bug) is caught at stages
0 and 1 by the step phase; where micro-steps issue collectives it shows as a stall, which the
step watchdog reports as a ``StepTimeoutError`` naming where each rank is.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any

import torch

from fzero.collectives import Communicator
from fzero.errors import MicroBatchCountError, RequiresGradChangedError
from fzero.schedule import Schedule
from fzero.schedule.signature import is_collective
from fzero.state.layout import FlatLayout

_REQUIRES_GRAD = attrgetter("requires_grad")


class StepChecks:
    def __init__(
        self,
        layout: FlatLayout,
        unit_params: list[list[torch.nn.Parameter]],
        comm: Communicator,
        gradient_accumulation_steps: int | None,
    ):
        self.comm = comm
        self.params = tuple(p for params in unit_params for p in params)
        self.flags = self.requires_grad_flags()
        self.names = [slot.names[0] for unit in layout.units for slot in unit.params]
        # Whether ranks must compare micro-batch counts (nothing fixes them in the config, and
        # the peers are real: a simulated world's reductions keep this rank's value alone).
        self.compare_counts = (
            comm.world_size > 1
            and gradient_accumulation_steps is None
            and not getattr(comm, "simulated", False)
        )
        self._schedule: Schedule | None = None
        self._micro_collectives = False

    # -- requires_grad --------------------------------------------------------------------------

    def requires_grad_flags(self) -> tuple[bool, ...]:
        """Every parameter's ``requires_grad``, in one C-level pass. Released stage-3
        parameters would answer each read through ``__torch_function__`` (a Python call per
        parameter, about 1.5 us); with subclass dispatch off for the pass, a read is an
        attribute load (about 0.1 us)."""
        with torch._C.DisableTorchFunctionSubclass():
            return tuple(map(_REQUIRES_GRAD, self.params))

    def check_requires_grad(self) -> None:
        """Raise if a parameter's ``requires_grad`` differs from what ``shard`` planned for.
        Costs one pass over the parameters' flags and one tuple compare per step (no device
        work)."""
        if self.requires_grad_flags() == self.flags:
            return
        changed = [
            (name, was)
            for name, was, param in zip(self.names, self.flags, self.params)
            if param.requires_grad != was
        ]
        listed = ", ".join(f"{name!r} ({was} -> {not was})" for name, was in changed[:5])
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        raise RequiresGradChangedError(
            f"requires_grad changed after fzero.shard for {listed}{more}: shard laid out the "
            "flat buffers, gradient hooks and schedule for the flags it saw, so the step would "
            "train the wrong parameters. Set requires_grad before fzero.shard; to change it "
            "later, set it back, or start again from the weights: load "
            "fzero.full_state_dict(state) into a fresh model, set requires_grad there and shard "
            "that (the optimizer moments start afresh)"
        )

    # -- micro-batch counts ---------------------------------------------------------------------

    def check_count_up_front(self, schedule: Schedule, count: int, device: torch.device) -> None:
        """Before a step's first micro-batch: where its micro-steps issue collectives, compare
        ``count`` across ranks (one small all-reduce) and raise on every rank on a mismatch."""
        if not self.compare_counts or not self.micro_steps_collect(schedule):
            return
        vector = self.one_hot(device) * count
        self.comm.all_reduce(vector).wait()
        counts = [int(c) for c in vector.tolist()]
        if len(set(counts)) > 1:
            raise MicroBatchCountError(count_message(counts, "before the step's first one ran"))

    def micro_steps_collect(self, schedule: Schedule) -> bool:
        """Whether ranks with different micro-batch counts would pair different collectives
        before the step phase: a micro-step that is not the last issues one, or the schedule is
        the untraced one of stages 2 and 3 (whose tracing micro-batch reduces)."""
        if schedule is not self._schedule:
            self._schedule = schedule
            self._micro_collectives = any(
                is_collective(op) for entry in schedule.micro_step for op in entry.ops
            ) or (
                not schedule.traced
                and (schedule.stage >= 2 or schedule.gradient_reduction == "ordered")
            )
        return self._micro_collectives

    def one_hot(self, device: torch.device) -> torch.Tensor:
        vector = torch.zeros(self.comm.world_size, dtype=torch.float32, device=device)
        vector[self.comm.rank] = 1.0
        return vector

    def raise_if_counts_differ(self, counts: torch.Tensor | None, step: int, abort: Any) -> None:
        """After a skipped step: raise ``MicroBatchCountError`` if the step phase found the
        ranks' counts (every rank's, from the scalars reduction) unequal. ``abort`` drops the
        step's gradients first, so the state stays usable."""
        if counts is None:
            return
        values = [int(c) for c in counts.tolist()]
        if len(set(values)) > 1:
            abort()
            raise MicroBatchCountError(
                count_message(values, f"in step {step}; nothing was updated")
            )


def count_message(counts: list[int], when: str) -> str:
    listed = ", ".join(f"rank {rank}: {count}" for rank, count in enumerate(counts))
    return (
        f"ranks ran different numbers of micro-batches ({listed}), {when}. Every rank must run "
        "the same number of micro-batches in a step (N ranks train like one device on the "
        "concatenated batch only then): give each rank the same number, and set "
        "gradient_accumulation_steps so that each rank checks its batch list against it. The "
        "state given to the step is still usable."
    )
