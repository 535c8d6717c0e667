"""Module and autograd hooks that raise the schedule's triggers as the model runs.

- ``pre_forward(u)`` / ``post_forward(u)``: forward pre- and post-hooks on the unit's module
  (the root unit's module is the model itself).
- ``pre_backward(u)``: the unit's outputs pass through an identity autograd function whose
  backward fires first, before any of the unit's own backward work. The root unit's is raised
  by ``fzero.train.backward`` just before it calls ``backward``.
- ``post_backward(u)``: a post-accumulate-grad hook on each trainable parameter counts the
  unit's parameters; the last one fires the trigger. Units whose parameters got no gradient in
  this pass (unused, frozen) fire at the end of backward, in descending unit order.

Outside a step (evaluation, ``torch.no_grad()``) the hooks only gather a stage-3 unit
for its forward and free it afterwards, so ``model(x)`` keeps working.
"""

from __future__ import annotations

from typing import Any

import optree
import torch
from torch import nn

from fzero.schedule.ops import (
    BACKWARD_END,
    POST_BACKWARD,
    POST_FORWARD,
    PRE_BACKWARD,
    PRE_FORWARD,
    Trigger,
)
from fzero.state.buffers import free_storage, is_allocated


class _PreBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, driver: HookDriver, unit: int, *tensors: torch.Tensor) -> Any:
        ctx.driver, ctx.unit = driver, unit
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        ctx.driver.fire(Trigger(PRE_BACKWARD, ctx.unit))
        return (None, None, *grads)


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
        self.active = False
        self.handles: list[Any] = []
        self.root_units = [i for i, m in unit_modules.items() if m is model]
        self.expected = {
            i: sum(p.requires_grad for p in params) for i, params in enumerate(params_per_unit)
        }
        self.counts: dict[int, int] = {}
        self.started: list[int] = []  # units whose forward ran in this micro-batch, in order
        self.done: set[int] = set()
        self._eval_gathered: set[int] = set()
        for index, module in unit_modules.items():
            self.handles.append(module.register_forward_pre_hook(self._pre_forward(index)))
            self.handles.append(module.register_forward_hook(self._post_forward(index)))
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

    def fire(self, trigger: Trigger) -> None:
        self.executor.fire(trigger)

    # -- step bracketing (called by train_step) -------------------------------------------------

    def begin_micro_step(self, last: bool = True) -> None:
        """``last``: this is the step's last micro-batch."""
        self.active = True
        self.counts = {}
        self.started = []
        self.done = set()
        self.executor.begin_micro_step(last)

    def begin_backward(self) -> None:
        for unit in self.root_units:
            self.fire(Trigger(PRE_BACKWARD, unit))

    def end_backward(self) -> tuple[Trigger, ...] | None:
        """Raise the triggers that end a micro-batch; returns the order it ran in when it was
        the tracing one (see ``Executor.end_micro_step``)."""
        for unit in sorted(set(self.started) - self.done, reverse=True):
            self.done.add(unit)
            self.fire(Trigger(POST_BACKWARD, unit))
        self.fire(Trigger(BACKWARD_END))
        trace = self.executor.end_micro_step()
        self.active = False
        return trace

    def deactivate(self) -> None:
        self.active = False

    # -- hooks ----------------------------------------------------------------------------------

    def _pre_forward(self, unit: int):
        def hook(module: nn.Module, args: Any) -> None:
            if self.active:
                if unit not in self.started:
                    self.started.append(unit)
                self.fire(Trigger(PRE_FORWARD, unit))
            else:
                self._eval_gather(unit)

        return hook

    def _post_forward(self, unit: int):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if not self.active:
                self._eval_release(unit)
                return output
            self.fire(Trigger(POST_FORWARD, unit))
            if unit in self.root_units or not torch.is_grad_enabled():
                return output
            leaves, spec = optree.tree_flatten(output)
            picked = [
                i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.requires_grad
            ]
            if not picked:
                return output
            wrapped = _PreBackward.apply(self, unit, *(leaves[i] for i in picked))
            for i, tensor in zip(picked, wrapped):
                leaves[i] = tensor
            return optree.tree_unflatten(spec, leaves)

        return hook

    def _accumulated(self, unit: int):
        def hook(param: torch.Tensor) -> None:
            if not self.active:
                return
            self.counts[unit] = self.counts.get(unit, 0) + 1
            if self.counts[unit] == self.expected[unit] and unit not in self.done:
                self.done.add(unit)
                self.fire(Trigger(POST_BACKWARD, unit))

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
            free_storage(self.executor.workspace.param_flats[unit])
