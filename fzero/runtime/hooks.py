"""Module and autograd hooks that raise the schedule's triggers as the model runs.

- ``pre_forward(u)`` / ``post_forward(u)``: forward pre- and post-hooks on the unit's module
  (the root unit's module is the model itself).
- ``pre_backward(u)``: the unit's outputs pass through an identity autograd function whose
  backward fires first, before any of the unit's own backward work. The root unit's is raised
  by ``fzero.train.backward`` just before it calls ``backward``.
- ``post_backward(u)``: a post-accumulate-grad hook on each trainable parameter counts the
  unit's parameters; the last one fires the trigger. Units whose parameters got no gradient in
  this pass (unused, frozen) fire at the end of backward, in descending unit order.

- ``pre_recompute(u)``: the forward pre-hook again, during backward: activation checkpointing
  (``torch.utils.checkpoint`` around the unit's call, Hugging Face's gradient checkpointing)
  runs the unit's forward once more to rebuild its activations. The forward post-hook raises
  nothing then: the backward that follows owns the unit until ``post_backward(u)``. Where the
  checkpointed function is the module's ``forward`` itself (``checkpoint_wrapper``, fzero's
  ``activation_checkpointing.number_checkpoints``), ``recomputing(u)`` raises it.

The driver's ``phase`` (one enum, as FSDP2's ``TrainingState``) is what tells a forward inside
backward, a recompute, from a forward.

Outside a step (evaluation, ``torch.no_grad()``) the hooks only gather a stage-3 unit
for its forward and free it afterwards, so ``model(x)`` keeps working.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import optree
import torch
from torch import nn

from fzero.errors import OutsideStepError
from fzero.schedule.ops import (
    BACKWARD_END,
    POST_BACKWARD,
    POST_FORWARD,
    PRE_BACKWARD,
    PRE_FORWARD,
    PRE_RECOMPUTE,
    Trigger,
)
from fzero.state.buffers import is_allocated


class _PreBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, driver: HookDriver, unit: int, *tensors: torch.Tensor) -> Any:
        ctx.driver, ctx.unit = driver, unit
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        ctx.driver.fire(ctx.driver.triggers[PRE_BACKWARD][ctx.unit])
        return (None, None, *grads)


OUTSIDE_STEP = (
    "a gradient of a parameter fzero shards was computed outside a fzero step "
    "(loss.backward() with a torch optimizer, a plain Trainer, accelerator.prepare or DDP "
    "around the model): fzero's master weights and the other ranks would never see it. Train "
    "with fzero.train_step, the engine of fzero.initialize (engine.backward / engine.step), or "
    "fzero.integrations.transformers.Trainer"
)


class _OutsideStep(torch.autograd.Function):
    """Marks the output of a unit's forward run outside a step with gradients enabled: its
    backward would read parameters fzero has released (stage 3) or produce gradients no step
    reduces, so it raises ``OutsideStepError`` first."""

    @staticmethod
    def forward(ctx: Any, *tensors: torch.Tensor) -> Any:
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        raise OutsideStepError(OUTSIDE_STEP)


def _wrap_outputs(output: Any, function: Any, *args: Any) -> Any:
    """``output`` with its tensors that require grad passed through ``function``."""
    leaves, spec = optree.tree_flatten(output)
    picked = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.requires_grad]
    if not picked:
        return output
    wrapped = function.apply(*args, *(leaves[i] for i in picked))
    for i, tensor in zip(picked, wrapped):
        leaves[i] = tensor
    return optree.tree_unflatten(spec, leaves)


class Phase(Enum):
    IDLE = "idle"  # outside a micro-step: evaluation gathers unit by unit
    FORWARD = "forward"
    BACKWARD = "backward"  # a unit's forward now is an activation-checkpoint recompute


class HookDriver:
    """Installs the hooks and forwards triggers to the executor while a step is active."""

    def __init__(
        self,
        model: nn.Module,
        unit_modules: dict[int, nn.Module],
        params_per_unit: list[list[nn.Parameter]],
        executor: Any,
        comm: Any,
    ):
        self.model = model
        self.executor = executor
        self.comm = comm
        self.phase = Phase.IDLE
        self.handles: list[Any] = []
        self.root_units = [i for i, m in unit_modules.items() if m is model]
        # Every trigger a hook can raise, built once: a hook hands the executor one of these
        # instead of constructing a frozen record per call (about 0.4 us each, ~100 a step).
        self.triggers = {
            kind: [Trigger(kind, unit) for unit in range(len(params_per_unit))]
            for kind in (PRE_FORWARD, POST_FORWARD, PRE_BACKWARD, POST_BACKWARD, PRE_RECOMPUTE)
        }
        self.backward_end = Trigger(BACKWARD_END)
        self.expected = {
            i: sum(p.requires_grad for p in params) for i, params in enumerate(params_per_unit)
        }
        self.counts: dict[int, int] = {}
        self.started: list[int] = []  # units whose forward ran in this micro-batch, in order
        self.done: set[int] = set()
        self.recomputed: set[int] = set()  # pre_recompute raised, post_backward not yet
        self._eval_gathered: set[int] = set()
        for index, module in unit_modules.items():
            self.handles.append(module.register_forward_pre_hook(self._pre_forward(index)))
            self.handles.append(module.register_forward_hook(self._post_forward(index)))
            for watched in _recompute_watch(module):
                hook = lambda module, args, unit=index: self.recomputing(unit)  # noqa: E731
                self.handles.append(watched.register_forward_pre_hook(hook))
        for index, params in enumerate(params_per_unit):
            for param in params:
                if param.requires_grad:
                    self.handles.append(
                        param.register_post_accumulate_grad_hook(self._accumulated(index))
                    )

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    @property
    def active(self) -> bool:
        """Whether a micro-step is running (its triggers go to the executor)."""
        return self.phase is not Phase.IDLE

    def fire(self, trigger: Trigger) -> None:
        self.executor.fire(trigger)

    def recomputing(self, unit: int) -> None:
        """Called as unit ``unit``'s forward (or a module inside it) starts: during backward
        that is a recompute, raised once until the unit's ``post_backward``. Also called by a
        checkpointed ``forward`` that runs inside the module call, where no module hook sees
        its recompute."""
        if self.phase is Phase.BACKWARD and unit not in self.recomputed:
            self.recomputed.add(unit)
            self.fire(self.triggers[PRE_RECOMPUTE][unit])

    # -- step bracketing (called by train_step) -------------------------------------------------

    def begin_micro_step(self, last: bool = True) -> None:
        """``last``: this is the step's last micro-batch."""
        self.phase = Phase.FORWARD
        self.recomputed = set()
        self.counts = {}
        self.started = []
        self.done = set()
        self.executor.begin_micro_step(last)

    def begin_backward(self) -> None:
        self.phase = Phase.BACKWARD
        for unit in self.root_units:
            self.fire(self.triggers[PRE_BACKWARD][unit])

    def end_backward(self) -> tuple[Trigger, ...] | None:
        """Raise the triggers that end a micro-batch; returns the order it ran in when it was
        the tracing one (see ``Executor.end_micro_step``)."""
        for unit in sorted(set(self.started) - self.done, reverse=True):
            self.done.add(unit)
            self.recomputed.discard(unit)
            self.fire(self.triggers[POST_BACKWARD][unit])
        self.fire(self.backward_end)
        trace = self.executor.end_micro_step()
        self.phase = Phase.IDLE
        return trace

    def deactivate(self) -> None:
        self.phase = Phase.IDLE

    # -- hooks ----------------------------------------------------------------------------------

    def _pre_forward(self, unit: int):
        def hook(module: nn.Module, args: Any) -> None:
            if self.phase is Phase.FORWARD:
                if unit not in self.started:
                    self.started.append(unit)
                self.fire(self.triggers[PRE_FORWARD][unit])
            elif self.phase is Phase.BACKWARD:
                self.recomputing(unit)
            else:
                self._eval_gather(unit)

        return hook

    def _post_forward(self, unit: int):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if self.phase is Phase.IDLE:
                self._eval_release(unit)
                if torch.is_grad_enabled():  # a backward of this would be outside any step
                    return _wrap_outputs(output, _OutsideStep)
                return output
            if self.phase is Phase.FORWARD:
                self.fire(self.triggers[POST_FORWARD][unit])
            if unit in self.root_units or not torch.is_grad_enabled():
                return output
            return _wrap_outputs(output, _PreBackward, self, unit)

        return hook

    def _accumulated(self, unit: int):
        def hook(param: torch.Tensor) -> None:
            if not self.active:
                raise OutsideStepError(OUTSIDE_STEP)
            self.counts[unit] = self.counts.get(unit, 0) + 1
            if self.counts[unit] == self.expected[unit] and unit not in self.done:
                self.done.add(unit)
                self.recomputed.discard(unit)
                self.fire(self.triggers[POST_BACKWARD][unit])

        return hook

    # -- evaluation outside a step --------------------------------------------------------------

    def _eval_gather(self, unit: int) -> None:
        flat = self.executor.workspace.param_flats[unit]
        if is_allocated(flat) or flat.numel() == 0:
            return
        self.executor.gather(unit)[0].wait()
        self._eval_gathered.add(unit)

    def _eval_release(self, unit: int) -> None:
        if unit in self._eval_gathered:
            self._eval_gathered.discard(unit)
            self.executor.release(unit)


def _recompute_watch(module: nn.Module) -> list[nn.Module]:
    """Modules whose calls show that ``module``'s forward is running when activation
    checkpointing recomputes the forward alone, inside the module call (where ``module``'s own
    hooks do not run again): the module torch's ``checkpoint_wrapper`` wraps, or the children
    of a Hugging Face ``GradientCheckpointingLayer`` (which checkpoints its ``forward``)."""
    inner = getattr(module, "_checkpoint_wrapped_module", None)
    if isinstance(inner, nn.Module):
        return [inner]
    if hasattr(module, "gradient_checkpointing"):
        return list(module.children())
    return []
