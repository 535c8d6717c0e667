"""``fzero.load_pretrained``: fill a sharded model's parameters from a Hugging Face checkpoint
folder, each rank reading only the bytes of its own slices.

For every unit, this rank owns ``[r * S, (r + 1) * S)`` of the unit's flat buffer; the
parameters overlapping that range are a few contiguous element ranges of a few stored tensors,
read with ``safetensors_ranges`` and cast to fp32 one piece at a time. So a rank holds its
shard, plus one unit's shard in fp32 while it is written, plus one piece of one tensor: never
the model. Used with a model built on the meta device, no rank ever holds the full model.

Names: a parameter is found under any of its names (tied parameters have several, and a
checkpoint stores one of them), as is, or with the model's ``base_model_prefix`` (``model.``,
``transformer.``) removed or added, so a base model loads from a checkpoint of its
``...ForCausalLM`` and the other way round.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import torch
from torch import nn

from fzero.api import shard
from fzero.checkpoint.refresh import refresh_parameters
from fzero.checkpoint.safetensors_ranges import RangeReader, StoredTensor, open_folder
from fzero.errors import CheckpointError, CheckpointMismatchError
from fzero.state.zero_state import ZeroState

logger = logging.getLogger("fzero")


def load_pretrained(
    path: str | os.PathLike,
    model_or_state: nn.Module | ZeroState,
    config: Any = None,
    *,
    strict: bool = True,
    **shard_options: Any,
) -> ZeroState:
    """Fill the parameters (and persistent buffers) of a sharded model from the Hugging Face
    checkpoint folder ``path`` (``model.safetensors``, or shards listed in
    ``model.safetensors.index.json``; a single ``.safetensors`` file also works). Call it on
    every rank; returns the state, ready for ``train_step``.

    ``model_or_state``: a model not yet sharded (built on the meta device, so that no rank
    holds it whole, or on a real one); it is sharded first with ``fzero.shard(model, config=
    config, **shard_options)`` (``stage``, ``process_group``, ``units``, ``device``, ...). Or the
    state ``fzero.shard`` returned (then give no ``config`` or shard options): its parameters
    are replaced in place, the optimizer moments and step count are left as they are.
    ``strict``: checkpoint tensors the model has no place for, and model parameters the
    checkpoint lacks, raise ``CheckpointMismatchError`` naming them (except those the model
    class lists in ``_keys_to_ignore_on_load_unexpected`` / ``_keys_to_ignore_on_load_missing``);
    with ``strict=False`` they are logged, and missing ones keep their initial values.
    """
    if isinstance(model_or_state, ZeroState):
        if config is not None or shard_options:
            raise TypeError(
                "load_pretrained got a sharded state and shard options "
                f"({['config'] if config is not None else []}{sorted(shard_options)}): "
                "pass the unsharded model instead, or drop the options"
            )
        state = model_or_state
    elif isinstance(model_or_state, nn.Module):
        state = shard(model_or_state, config=config, **shard_options)
    else:
        raise TypeError(
            f"load_pretrained needs a model or a ZeroState, got {type(model_or_state).__name__}"
        )
    state.check_live()
    state.runtime.settle(state)  # an update still pending applies before weights are replaced
    stored = open_folder(path)
    plan = _match(state, stored, strict, path)

    reader = RangeReader()
    failure: BaseException | None = None
    try:
        _fill_parameters(state, plan, reader)
        _fill_buffers(state, plan, reader)
    except Exception as error:  # noqa: BLE001 - every rank must reach the collective below
        failure = error
    finally:
        reader.close()
    comm = state.runtime.comm
    outcomes = comm.all_gather_object(None if failure is None else str(failure))
    if failure is not None:
        raise failure
    for rank, outcome in enumerate(outcomes):
        if outcome is not None:
            raise CheckpointError(f"rank {rank} could not load {path}: {outcome}")
    refresh_parameters(state)
    return state


def _match(state: ZeroState, stored: dict[str, StoredTensor], strict: bool, path: Any) -> dict:
    """Model name -> stored tensor, for every parameter slot (by its canonical name) and every
    persistent buffer; checks shapes and reports missing and unexpected names."""
    runtime = state.runtime
    model = runtime.model
    prefix = getattr(model, "base_model_prefix", "") or ""
    used: set[str] = set()
    plan: dict[str, StoredTensor] = {}
    missing: list[str] = []
    slots = [(slot.names, slot.shape) for unit in runtime.layout.units for slot in unit.params]
    param_names = {name for names, _ in slots for name in names}
    buffers = [
        ((name,), tuple(tensor.shape))
        for name, tensor in model.state_dict(keep_vars=True).items()
        if name not in param_names
    ]
    for names, shape in slots + buffers:
        found = [key for name in names for key in _candidates(name, prefix) if key in stored]
        if not found:
            missing.append(names[0])
            continue
        used.update(found)
        tensor = stored[found[0]]
        if tensor.shape != tuple(shape):
            raise CheckpointMismatchError(
                f"{path}: {found[0]!r} has shape {list(tensor.shape)}, the model's {names[0]!r} "
                f"has {list(shape)}: the checkpoint is for a different configuration"
            )
        plan[names[0]] = tensor
    unexpected = sorted(set(stored) - used)
    unexpected = [k for k in unexpected if not _ignored(model, "unexpected", k)]
    missing = [k for k in missing if not _ignored(model, "missing", k)]
    if missing or unexpected:
        message = (
            f"{path} does not fit the model: missing (in the model, not the checkpoint): "
            f"{missing}; unexpected (in the checkpoint, not the model): {unexpected}"
        )
        if strict:
            raise CheckpointMismatchError(
                message + ". Check that the checkpoint is for this model class and config, or "
                "pass strict=False to load what matches"
            )
        logger.warning(message)
    return plan


def _candidates(name: str, prefix: str) -> list[str]:
    names = [name]
    if prefix:
        if name.startswith(prefix + "."):
            names.append(name[len(prefix) + 1 :])
        else:
            names.append(f"{prefix}.{name}")
    return names


def _ignored(model: nn.Module, which: str, key: str) -> bool:
    patterns = getattr(model, f"_keys_to_ignore_on_load_{which}", None) or ()
    return any(re.search(pattern, key) for pattern in patterns)


def _fill_parameters(state: ZeroState, plan: dict[str, StoredTensor], reader: RangeReader) -> None:
    """Write this rank's owned range of every unit: the trainable part into the master, the
    frozen rest into the compute-dtype leaf that keeps it."""
    layout = state.runtime.layout
    for unit in layout.units:
        start, end = layout.owned_range(unit)
        owned = None  # fp32 values of [start, end), built only where the checkpoint has them
        for slot in unit.params:
            stored = plan.get(slot.names[0])
            lo, hi = max(slot.offset, start), min(slot.offset + slot.numel, end)
            if stored is None or lo >= hi:
                continue
            if owned is None:
                owned = _current_owned(state, unit)
            piece = reader.read(stored, lo - slot.offset, hi - slot.offset)
            owned[lo - start : hi - start].copy_(piece)
            del piece
        if owned is None:
            continue
        span = slice(unit.optimizer_offset, unit.optimizer_offset + unit.optimizer_numel)
        state.master[span].copy_(owned[: unit.optimizer_numel])
        if state.param_shards:
            leaf = state.param_shards[unit.index]
            leaf.copy_(owned[owned.numel() - leaf.numel() :])


def _current_owned(state: ZeroState, unit: Any) -> torch.Tensor:
    """This rank's shard of ``unit`` in fp32 as it is now (kept where the checkpoint has
    nothing, with ``strict=False``)."""
    return state.runtime.executor.workspace.owned_fp32(unit.index).cpu()


def _fill_buffers(state: ZeroState, plan: dict[str, StoredTensor], reader: RangeReader) -> None:
    model = state.runtime.model
    params = {
        name for unit in state.runtime.layout.units for slot in unit.params for name in slot.names
    }
    for name, buffer in model.state_dict(keep_vars=True).items():
        if name in params or name not in plan:
            continue
        stored = plan[name]
        buffer.copy_(reader.read(stored, 0, stored.numel).view(stored.shape))
