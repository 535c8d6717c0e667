"""``Runtime``: the machinery a sharded model keeps (the state pytree's static metadata).

It holds the model, the config, the plan and the executor that runs it, the hooks, and the
buffers the model computes with. It holds no progress: step counts, the loss scale and every
buffer value belong to the ``ZeroState`` given to each step. A state is *installed* into the
runtime when a step starts: its values become the ones the model computes with. That is free
for the state the last step returned (its leaves are views of the runtime's buffers); a
``tree_map`` copy is copied in, and the state installed before it first gets private copies of
its values, so it stays valid too.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fzero.collectives import Communicator
from fzero.config import Config
from fzero.errors import DonatedStateError, ShardError
from fzero.loss_scale import LossScaler
from fzero.runtime.cross_rank import check_same_on_all_ranks, schedule_summary
from fzero.runtime.executor import Executor
from fzero.runtime.hooks import HookDriver
from fzero.runtime.plan import Plan
from fzero.runtime.step_checks import StepChecks
from fzero.runtime.watchdog import Watchdog
from fzero.schedule import Trigger
from fzero.state.buffers import is_allocated
from fzero.state.layout import dtype_from_name
from fzero.state.pending import PendingUpdate
from fzero.state.progress import Progress
from fzero.state.split import flat_parts, map_parts
from fzero.state.zero_state import ZeroState


class Runtime:
    def __init__(
        self,
        model: nn.Module,
        config: Config,
        comm: Communicator,
        plan: Plan,
        executor: Executor,
        hooks: HookDriver,
        loss_fn: Callable[[nn.Module, Any], Any] | None,
    ):
        self.model = model
        self.config = config
        self.comm = comm
        self.plan = plan
        self.executor = executor
        self.hooks = hooks
        self.loss_fn = loss_fn
        # The loss scaler's static rule; its position travels in each state's progress.
        self.loss_scale_rule = LossScaler.from_fp16(config.fp16)
        self._donated: weakref.WeakSet[ZeroState] = weakref.WeakSet()
        self._installed: weakref.ref[ZeroState] | None = None
        self.checks = StepChecks(
            plan.layout, executor.unit_params, comm, config.gradient_accumulation_steps
        )
        self.watchdog = start_watchdog(executor, comm, config.fzero.step_timeout_s)
        if self.watchdog is not None:
            weakref.finalize(self, self.watchdog.stop)

    @property
    def layout(self):
        return self.plan.layout

    @property
    def units(self):
        return self.plan.units

    @property
    def compute_itemsize(self) -> int:
        return dtype_from_name(self.config.compute_dtype_name).itemsize

    @property
    def check_finite(self) -> bool:
        """Whether a step looks for non-finite gradients (and so reads one flag on the host)."""
        return self.config.fp16.enabled is True or self.config.fzero.nonfinite_grads != "apply"

    # -- plans ----------------------------------------------------------------------------------

    def retrace(self, trace: tuple[Trigger, ...]) -> None:
        """Compile the schedule for the order a micro-batch ran in, check that every rank
        compiled the same collectives, and install it."""
        plan = self.plan.retraced(trace)
        check_same_on_all_ranks(self.comm, "traced schedule", schedule_summary(plan.schedule))
        self.plan = plan
        self.executor.install(plan.schedule)

    # -- states ---------------------------------------------------------------------------------

    def new_state(self, progress: Progress) -> ZeroState:
        """A state whose leaves are views of the runtime's buffers: installed already."""
        optimizer, workspace = self.executor.optimizer, self.executor.workspace
        master, exp_avg, exp_avg_sq = (
            map_parts(buffer, _alias)
            for buffer in (optimizer.master, optimizer.exp_avg, optimizer.exp_avg_sq)
        )
        grad, lr, scale, armed = map(_alias, optimizer.pending.tensors())
        state = ZeroState(
            master,
            exp_avg,
            exp_avg_sq,
            _alias(optimizer.step),
            param_shards=tuple(map(_alias, workspace.state_leaves())),
            pending=PendingUpdate(grad, lr, scale, armed),
            progress=progress,
            runtime=self,
        )
        self._installed = weakref.ref(state)
        return state

    def is_donated(self, state: ZeroState) -> bool:
        return state in self._donated

    def donate(self, state: ZeroState) -> None:
        self._donated.add(state)

    def install(self, state: ZeroState, *, keep_pending: bool = False) -> None:
        """Make ``state``'s values the ones the model computes with (see the module docstring).
        Installing a state that is not the last one installed is collective at stages 1 and 2
        (the full parameters are gathered again): all ranks switch states together. An update
        the state holds pending is applied (``settle``) unless ``keep_pending``: a step's first
        micro-batch applies it unit by unit in its forward."""
        if state.runtime is not self:
            raise ShardError("this state belongs to another sharded model")
        if self.is_donated(state):
            raise DonatedStateError(
                "this state was donated to fzero.train_step, which may have changed its buffers "
                "in place; use the state train_step returned"
            )
        installed = self._installed() if self._installed is not None else None
        if installed is state:
            if not keep_pending:
                self.executor.settle()
            return
        if installed is not None and not self.is_donated(installed):
            for leaf in _tensor_leaves(installed):  # keep its values its own
                if leaf.numel():
                    leaf.data = leaf.detach().clone()
        for target, source in zip(self._buffers(), _tensor_leaves(state), strict=True):
            if target.shape != source.shape or target.dtype != source.dtype:
                raise ShardError(
                    f"the state does not fit this model: a leaf of shape {tuple(source.shape)} "
                    f"{source.dtype} where {tuple(target.shape)} {target.dtype} belongs"
                )
            if source.data_ptr() != target.data_ptr():
                target.copy_(source)
        if self.executor.host_optimizer is not None:
            self.executor.host_optimizer.restart_pending()  # the copied state's, all of it
        if not keep_pending:
            self.executor.settle()
        self.refresh_parameters()
        self._installed = weakref.ref(state)

    def settle(self, state: ZeroState) -> None:
        """Apply the update ``state`` holds pending, so that its weights can be read as they
        are (``save``); installs ``state``. Its value does not change."""
        if not state.pending.is_armed:
            return
        self.install(state)
        for leaf, buffer in zip(_tensor_leaves(state), self._buffers(), strict=True):
            if leaf.data_ptr() != buffer.data_ptr():  # a state of its own: write it back
                leaf.copy_(buffer)

    def _buffers(self) -> list[torch.Tensor]:
        """The runtime's own buffers, in the order of a state's tensor leaves."""
        optimizer = self.executor.optimizer
        leaves = [
            *flat_parts(optimizer.master),
            *flat_parts(optimizer.exp_avg),
            *flat_parts(optimizer.exp_avg_sq),
            optimizer.step,
        ]
        leaves += optimizer.pending.tensors()
        return leaves + list(self.executor.workspace.state_leaves())

    def refresh_parameters(self) -> None:
        """After the master and shards were written directly (a state copied in, a checkpoint
        loaded): make every value the model computes with agree with the master. Stages 0-2:
        the compute-dtype shard's trainable part becomes the master, cast (nothing when the
        shard is the master itself); stages 1 and 2 then gather every unit, so the full buffers
        hold every rank's values; stage 3 keeps nothing between steps but gathers again a unit
        gathered now. Frozen values have no master: they are written into the shards. A
        collective on every rank of the group: call it on all ranks together."""
        executor, workspace = self.executor, self.executor.workspace
        for unit in self.layout.units:
            out = workspace.param_out(unit.index)
            if out is None:  # a device unit's host shard (partial offload, parameter offload)
                out = workspace.host_copy_out(unit.index)
            if out is not None:  # a unit's range lies inside one part of a split master
                lo = unit.optimizer_offset
                out.copy_(workspace.master[lo : lo + unit.optimizer_numel])
            flat = workspace.param_flats[unit.index]
            if workspace.stage in (1, 2) or (workspace.gathers_params and is_allocated(flat)):
                executor.gather(unit.index).work.wait()


def start_watchdog(executor: Executor, comm: Communicator, timeout_s: float) -> Watchdog | None:
    """Give the communicator's waits the step timeout and start the step watchdog (for more
    than one rank, over a process group with a store to post positions to)."""
    if comm.world_size == 1:
        return None
    if hasattr(comm, "set_step_timeout"):
        comm.set_step_timeout(timeout_s)
    channel = comm.side_channel() if hasattr(comm, "side_channel") else None
    if channel is None:  # in-process ranks: their group has its own timeout, nothing to read
        return None
    executor.watchdog = Watchdog(executor.position, channel, comm.rank, timeout_s)
    return executor.watchdog


def _alias(tensor: torch.Tensor) -> torch.Tensor:
    """Another tensor object over the same memory: what a state holds, so that giving the state
    private copies later (``.data = clone``) leaves the runtime's own buffer in place."""
    return tensor.view_as(tensor)


def _tensor_leaves(state: ZeroState) -> list[torch.Tensor]:
    return [
        *flat_parts(state.master),
        *flat_parts(state.exp_avg),
        *flat_parts(state.exp_avg_sq),
        state.step,
        *state.pending.tensors(),
        *state.param_shards,
    ]
