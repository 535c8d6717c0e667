"""``Runtime``: what a sharded model keeps that never changes between steps (the state
pytree's static metadata), and how it compiles its schedule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from fzero.collectives import Communicator
from fzero.config import Config
from fzero.cross_rank import check_same_on_all_ranks, schedule_summary
from fzero.executor import Executor
from fzero.hooks import HookDriver
from fzero.loss_scale import LossScaler
from fzero.schedule import Knobs, Schedule, Trigger, UnitInfo, compile_schedule
from fzero.state.layout import FlatLayout, dtype_from_name
from fzero.state.zero_state import ZeroState


@dataclass(eq=False, repr=False)
class Runtime:
    """Everything static about a sharded model: the pytree's metadata (hashed by identity)."""

    model: nn.Module
    config: Config
    layout: FlatLayout
    comm: Communicator
    executor: Executor
    hooks: HookDriver
    loss_fn: Callable[[nn.Module, Any], Any] | None
    units: tuple[UnitInfo, ...]
    step_count: int = 0  # train_step calls, skipped steps included
    skipped_steps: int = 0  # steps whose gradients were not finite (nothing was updated)
    loss_scaler: LossScaler = field(default_factory=LossScaler)
    live_state: ZeroState | None = field(default=None, repr=False)

    def compile(self, trace: tuple[Trigger, ...], traced: bool) -> Schedule:
        zero = self.config.zero_optimization
        reduction = ""  # the stage's default
        if self.config.fzero.deterministic:
            reduction = "ordered"
        elif self.config.stage >= 2 and not self.config.reduce_every_micro_batch:
            reduction = "last_micro_batch"
        gather_numel = sum(u.padded_numel for u in self.layout.units if u.has_trainable)
        knobs = Knobs(
            prefetch=zero.overlap_comm,
            max_live_nbytes=zero.stage3_max_live_parameters * self.compute_itemsize,
            max_reuse_numel=zero.stage3_max_reuse_distance,
            prefetch_bucket_numel=zero.stage3_prefetch_bucket_size,
            overlap_reductions=zero.overlap_comm,
            reduce_bucket_numel=zero.reduce_bucket_size,
            gather_bucket_numel=zero.allgather_bucket_size,
            gradient_reduction=reduction,
            grad_gather_nbytes=gather_numel * self.grad_itemsize,
        )
        schedule = compile_schedule(
            self.units,
            stage=self.config.stage,
            world_size=self.comm.world_size,
            trace=trace,
            traced=traced,
            optimizer_numel=self.layout.optimizer_numel,
            grad_shard_nbytes=self.layout.optimizer_numel * self.grad_itemsize,
            knobs=knobs,
        )
        if traced:
            check_same_on_all_ranks(self.comm, "traced schedule", schedule_summary(schedule))
        return schedule

    @property
    def compute_itemsize(self) -> int:
        return dtype_from_name(self.config.compute_dtype_name).itemsize

    @property
    def grad_itemsize(self) -> int:
        return dtype_from_name(self.config.grad_accum_dtype_name).itemsize

    @property
    def check_finite(self) -> bool:
        """Whether a step looks for non-finite gradients (and so reads one flag on the host)."""
        return self.config.fp16.enabled is True or self.config.fzero.nonfinite_grads != "apply"
