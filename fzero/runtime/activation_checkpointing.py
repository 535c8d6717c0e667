"""fzero's own activation checkpointing (``activation_checkpointing.number_checkpoints``).

A checkpointed unit's ``forward`` runs under ``torch.utils.checkpoint`` (non-reentrant): autograd
keeps only its inputs, and backward runs the forward again to rebuild the activations it needs.
The recompute happens inside the module call, where no module hook sees it, so the wrapped
function tells the hook driver itself (``HookDriver.recomputing``): the schedule's
``pre_recompute(u)`` trigger, which gathers the unit at stage 3. With ``cpu_checkpointing`` the
inputs autograd keeps for the recompute are saved to pinned host memory
(``torch.autograd.graph.save_on_cpu``) and copied back when backward needs them: the checkpoint
saves its inputs through the saved-tensor hooks active around it.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fzero.config import Config
from fzero.state.layout import FlatLayout


def checkpointed_units(layout: FlatLayout, config: Config) -> frozenset[int]:
    """The units fzero checkpoints: the first ``number_checkpoints`` block units (every unit
    but the root, which is the model itself), in model order."""
    count = config.activation_checkpointing.number_checkpoints or 0
    blocks = [unit.index for unit in layout.units if unit.name != ""]
    return frozenset(blocks[:count])


def checkpoint_units(
    modules: dict[int, nn.Module], units: frozenset[int], hooks: Any, cpu_checkpointing: bool
) -> None:
    """Wrap the ``forward`` of each unit in ``units`` (see the module docstring)."""
    for index in sorted(units):
        module = modules[index]
        module.forward = _checkpointed(module.forward, index, hooks, cpu_checkpointing)


def _checkpointed(forward: Any, unit: int, hooks: Any, cpu_checkpointing: bool) -> Any:
    def run(*args: Any, **kwargs: Any) -> Any:
        hooks.recomputing(unit)  # a trigger only when this call is the recompute, in backward
        return forward(*args, **kwargs)

    def checkpointed_forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # evaluation: nothing to recompute
            return forward(*args, **kwargs)
        saving = torch.autograd.graph.save_on_cpu(pin_memory=True) if cpu_checkpointing else None
        with saving if saving is not None else nullcontext():
            return checkpoint(run, *args, use_reentrant=False, **kwargs)

    return checkpointed_forward
