"""``with fzero.gathered(state):``: the full parameters for a block of ordinary code.

DeepSpeed's ``GatheredParameters``: outside a step, stage 3 keeps only this rank's shard of each
unit, and its parameters refuse reads (``fzero/state/released.py``). Inside the block every
selected unit is gathered and its parameters are plain tensors holding the full values, so
``model.state_dict()``, ``save_pretrained``, ``generate``, evaluation and logging behave as on
an unsharded model. On exit the units gathered for the block are released again.

``modifier_rank=r`` makes the block a write: the values rank r holds on exit are broadcast to
every rank and written into each rank's shard, its fp32 master weights included. Below stage 3
the parameters are always full, so entering costs nothing, but a write still needs the
broadcast and the master update: without ``modifier_rank`` a change made inside the block is
not kept (stage 3 drops it at the release, stages 0-2 at the next optimizer step, which writes
the parameters from the master).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from fzero.errors import ShardError
from fzero.runtime import Runtime
from fzero.state.buffers import is_allocated
from fzero.state.split import flat_parts
from fzero.state.zero_state import ZeroState

ModulesOrParams = nn.Module | nn.Parameter | Iterable[nn.Module | nn.Parameter] | None


@contextmanager
def gathered(
    state: ZeroState,
    modules_or_params: ModulesOrParams = None,
    modifier_rank: int | None = None,
    enabled: bool = True,
) -> Iterator[None]:
    """Gather the full parameters of ``modules_or_params`` (default: the whole model) for the
    block; with ``modifier_rank=r``, write rank r's values back into every rank's shard and
    master weights on exit. Collective: every rank enters and leaves the block together (a
    rank that raises inside a writing block leaves the others waiting in the broadcast).
    Modify parameters in place (``p.copy_(...)``, ``p.mul_(...)``), never by assigning
    ``p.data``. Not for training: run ``fzero.train_step`` outside the block. ``enabled=False``
    makes the block a no-op (as DeepSpeed's ``enabled``)."""
    if not enabled:
        yield
        return
    state.check_live()
    runtime: Runtime = state.runtime
    if runtime.hooks.active:
        raise ShardError(
            "fzero.gathered inside a micro-step: the step's own ops gather and release units; "
            "enter the block before or after train_step"
        )
    world_size = runtime.comm.world_size
    if modifier_rank is not None and (
        isinstance(modifier_rank, bool)
        or not isinstance(modifier_rank, int)
        or not 0 <= modifier_rank < world_size
    ):
        raise ShardError(
            f"modifier_rank must be None or a rank in 0..{world_size - 1}, got {modifier_rank!r}"
        )
    runtime.install(state)
    units = _selected_units(runtime, modules_or_params)
    executor, workspace = runtime.executor, runtime.executor.workspace
    gathered_here = []
    for unit in units:
        flat = workspace.param_flats[unit]
        if not is_allocated(flat) and flat.numel() > 0:
            executor.gather(unit).work.wait()
            gathered_here.append(unit)
    try:
        yield
        if modifier_rank is not None:
            _check_views(runtime, units)
            for unit in units:
                _write_back(runtime, unit, modifier_rank)
            _copy_into_state(runtime, state)
    finally:
        for unit in gathered_here:
            executor.release(unit)


def _selected_units(runtime: Runtime, modules_or_params: ModulesOrParams) -> list[int]:
    """The indices of the units holding the given parameters (all units for None)."""
    unit_params = runtime.executor.unit_params
    if modules_or_params is None:
        return list(range(len(unit_params)))
    items = (
        [modules_or_params]
        if isinstance(modules_or_params, (nn.Module, torch.Tensor))
        else list(modules_or_params)
    )
    unit_of = {id(p): index for index, params in enumerate(unit_params) for p in params}
    selected: set[int] = set()
    for item in items:
        if isinstance(item, nn.Module):
            params = list(item.parameters())
        elif isinstance(item, torch.Tensor):
            params = [item]
        else:
            raise ShardError(
                f"fzero.gathered takes modules and parameters of the sharded model, got a "
                f"{type(item).__name__}"
            )
        for param in params:
            if id(param) not in unit_of:
                raise ShardError(
                    f"a parameter of shape {tuple(param.shape)} given to fzero.gathered is not "
                    "one of this sharded model's parameters; pass the model's own modules or "
                    "parameters"
                )
            selected.add(unit_of[id(param)])
    return sorted(selected)


def _check_views(runtime: Runtime, units: list[int]) -> None:
    """Every parameter must still be a view of its unit's buffer: a ``p.data = ...`` inside
    the block would leave the value outside what the write-back reads."""
    workspace = runtime.executor.workspace
    for unit in units:
        flat = workspace.param_flats[unit]
        slots = runtime.layout.units[unit].params
        for slot, param in zip(slots, runtime.executor.unit_params[unit]):
            expected = flat.data_ptr() + slot.offset * flat.element_size()
            if param.data_ptr() != expected:
                raise ShardError(
                    f"parameter {slot.names[0]!r} was replaced inside fzero.gathered (its .data "
                    "no longer points into fzero's buffer); modify parameters in place, e.g. "
                    "p.copy_(new_value)"
                )


def _write_back(runtime: Runtime, unit: int, source_rank: int) -> None:
    """Broadcast unit ``unit``'s full buffer from ``source_rank`` and write this rank's slice
    of it into the master weights and the compute-dtype shard. In a compute dtype narrower
    than fp32, only the elements that differ from the master's rounded value are written, so a
    parameter left alone keeps its fp32 master bits."""
    workspace, layout = runtime.executor.workspace, runtime.layout
    flat = workspace.param_flats[unit]
    runtime.comm.broadcast(flat, src=source_rank)
    info = layout.units[unit]
    lo, _ = layout.owned_range(info)
    new = flat[lo : lo + info.optimizer_numel]
    master = workspace.master[info.optimizer_offset : info.optimizer_offset + info.optimizer_numel]
    if new.data_ptr() != master.data_ptr():  # else the master is the buffer: written already
        if new.dtype == master.dtype:
            master.copy_(new)
        else:
            changed = new != master.to(new.dtype)
            master[changed] = new[changed].to(master.dtype)
    # The compute-dtype shard: stages 0-2 keep it inside (or as) the full buffer, which the
    # broadcast wrote; stage 3 under offload keeps a standing shard (on the device, on the
    # host or in a file), otherwise only the frozen tail past the master part.
    standing = workspace.standing_shard(unit) if workspace.stage == 3 else None
    if standing is not None:
        standing.copy_(flat[lo : lo + standing.numel()])
    elif workspace.stage == 3:
        tail = workspace.frozen_tails[unit]
        start = lo + info.optimizer_numel
        tail.copy_(flat[start : start + tail.numel()])


def _copy_into_state(runtime: Runtime, state: ZeroState) -> None:
    """A state copied into the runtime (a ``tree_map`` copy) keeps leaves of its own: give
    them the written values too."""
    executor = runtime.executor
    ours = (*flat_parts(executor.optimizer.master), *executor.workspace.state_leaves())
    theirs = (*flat_parts(state.master), *state.param_shards)
    for target, source in zip(theirs, ours, strict=True):
        if target.data_ptr() != source.data_ptr():
            target.copy_(source)
