"""``fzero.load``: shard a fresh model, then fill its buffers from a checkpoint, at any world size
and stage.

Each rank asks for exactly its own part: for every unit, its owned range of the unit flat
(optimizer part and compute-dtype part), which ``ShardReader`` maps to slices of the old ranks'
files. With the same world size and stage that is this rank's own file, read whole, so training
resumes bitwise where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch
from torch import nn

import fzero.errors as errors_module
from fzero.api import shard
from fzero.checkpoint.locate import open_checkpoint
from fzero.checkpoint.manifest import Checkpoint, check_layout, check_model
from fzero.checkpoint.refresh import refresh_parameters
from fzero.checkpoint.sources import OPTIMIZER_KINDS, ShardReader
from fzero.config import Config, names_stage
from fzero.errors import CheckpointError
from fzero.loss_scale import LossScaler
from fzero.state.progress import Progress
from fzero.state.zero_state import ZeroState

RNG_NAMES = ("rng.cpu", "rng.cuda")

logger = logging.getLogger("fzero")


def load(
    path: str | os.PathLike,
    model: nn.Module,
    config: Config | dict | str | None = None,
    *,
    stage: int | None = None,
    process_group: Any = None,
    loss_fn: Any = None,
    units: list[nn.Module | str] | None = None,
    verify: bool = True,
) -> ZeroState:
    """Shard ``model`` (fresh, as built) with ``fzero.shard`` and fill it from the checkpoint at
    ``path``: a ``step-*`` directory, or a checkpoint root (its ``latest`` one). Call it on every
    rank. Returns the state, ready for ``train_step``.

    ``config``: None uses the saved config (the batch size re-derived for this world size);
    ``stage``: None uses the config's, or the checkpoint's when the config names none. A change
    of stage or world size is logged at WARNING with both values. Any world size and stage can
    load any checkpoint of the same model. ``units``: as given to ``shard`` when the checkpoint
    was written (the grouping must match; the sizes need not). ``verify`` checks the sha256 of
    every file this rank reads. On an error the model is left sharded but unfilled: build a
    fresh one to try again.
    """
    checkpoint = open_checkpoint(path)
    check_model(checkpoint, model)
    if stage is None and config is not None and not names_stage(config):
        stage = checkpoint.stage  # an exact resume unless a stage is asked for
    state = shard(
        model,
        stage,
        config=_saved_config(checkpoint) if config is None else config,
        loss_fn=loss_fn,
        process_group=process_group,
        units=units,
    )
    return _fill_from(state, checkpoint, verify)


def load_into(state: ZeroState, path: str | os.PathLike, *, verify: bool = True) -> ZeroState:
    """Fill an existing sharded ``state`` from the checkpoint at ``path`` (as ``load`` does for a
    fresh model: any world size and stage of the same model) and return the state to train on;
    ``state`` is donated. Call it on every rank. For shells that own a sharded model already,
    such as the engine's ``load_checkpoint``."""
    state.check_live()
    checkpoint = open_checkpoint(path)
    check_model(checkpoint, state.runtime.model)
    state.runtime.install(state)
    filled = _fill_from(state, checkpoint, verify)
    state.runtime.donate(state)
    return filled


def _fill_from(state: ZeroState, checkpoint: Checkpoint, verify: bool) -> ZeroState:
    """Read this rank's part of ``checkpoint`` into ``state``; returns the filled state."""
    runtime = state.runtime
    comm = runtime.comm
    check_layout(checkpoint, runtime.layout)
    if (runtime.config.stage, comm.world_size) != (checkpoint.stage, checkpoint.world_size):
        logger.warning(
            "loading %s: saved at stage %d on %d rank(s), loaded at stage %d on %d rank(s); "
            "the shards are re-cut, so training continues from the same values but is not "
            "bitwise the run that saved it",
            checkpoint.directory,
            checkpoint.stage,
            checkpoint.world_size,
            runtime.config.stage,
            comm.world_size,
        )

    reader = ShardReader(checkpoint, prefer=comm.rank, verify=verify)
    failure: BaseException | None = None
    rng: dict[str, torch.Tensor] = {}
    try:
        _fill(state, reader)
        if checkpoint.world_size == comm.world_size:  # RNG streams are per rank
            rng = {n: reader.tensor(comm.rank, n) for n in RNG_NAMES if reader.has(comm.rank, n)}
    except Exception as error:  # noqa: BLE001 - every rank must reach the collective below
        failure = error
    outcomes = comm.all_gather_object(
        None if failure is None else (type(failure).__name__, str(failure))
    )
    if failure is not None:
        raise failure
    for rank, outcome in enumerate(outcomes):
        if outcome is not None:
            raise _error_from(rank, *outcome)

    refresh_parameters(state)
    scaler = restored_loss_scaler(runtime.loss_scale_rule, checkpoint.manifest)
    skipped = checkpoint.manifest.get("skipped_steps", 0)
    state = runtime.new_state(Progress.of(checkpoint.step, skipped, scaler))
    if "rng.cpu" in rng:
        torch.set_rng_state(rng["rng.cpu"])
    if "rng.cuda" in rng and state.device.type == "cuda":
        torch.cuda.set_rng_state(rng["rng.cuda"], state.device)
    return state


def _fill(state: ZeroState, reader: ShardReader) -> None:
    """Write this rank's master, moments, step, compute-dtype shards and buffers in place."""
    layout = state.runtime.layout
    for unit in layout.units:
        start, end = layout.owned_range(unit)
        span = slice(unit.optimizer_offset, unit.optimizer_offset + unit.optimizer_numel)
        for kind in OPTIMIZER_KINDS:
            target = getattr(state, kind)[span]
            staged = torch.zeros(target.numel(), dtype=target.dtype)
            reader.read(unit.index, start, start + unit.optimizer_numel, kind, staged)
            target.copy_(staged)
        if not state.param_shards:
            continue
        # The compute-dtype values cover the end of the shard: trainable ones are the master
        # cast (the optimizer writes exactly that), overwritten by saved ones where they exist.
        leaf = state.param_shards[unit.index]
        leaf_start = end - leaf.numel()
        staged = torch.zeros(leaf.numel(), dtype=leaf.dtype)
        trainable_end = start + unit.optimizer_numel
        if leaf_start < trainable_end:
            staged[: trainable_end - leaf_start].copy_(state.master[span][leaf_start - start :])
        reader.read(unit.index, leaf_start, end, "compute", staged)
        leaf.copy_(staged)
    state.step.copy_(reader.tensor(reader.prefer, "step"))
    for name, buffer in _model_buffers(state).items():
        buffer.copy_(reader.tensor(reader.prefer, f"buffer.{name}"))


def _model_buffers(state: ZeroState) -> dict[str, torch.Tensor]:
    runtime = state.runtime
    params = {name for unit in runtime.layout.units for slot in unit.params for name in slot.names}
    return {
        name: tensor
        for name, tensor in runtime.model.state_dict(keep_vars=True).items()
        if name not in params
    }


def _saved_config(checkpoint: Checkpoint) -> Config:
    data = dict(checkpoint.manifest["config"])
    if data.get("train_micro_batch_size_per_gpu") is not None:
        # Saved resolved for the old world size; derived again from micro x accumulation.
        data["train_batch_size"] = None
    return Config.from_dict(data)


def _error_from(rank: int, name: str, message: str) -> CheckpointError:
    """Another rank's load error, raised here too so that every rank fails alike."""
    kind = getattr(errors_module, name, None)
    if not (isinstance(kind, type) and issubclass(kind, CheckpointError)):
        kind = CheckpointError
        message = f"{name}: {message}"
    return kind(f"rank {rank} could not load: {message}")


def restored_loss_scaler(current: LossScaler, manifest: dict[str, Any]) -> LossScaler:
    """The loss scale and its progress (iteration, last overflow, hysteresis left) from the
    checkpoint, under the current config's rule, when both are dynamic fp16 scalers; else the
    current config's scaler (a static or disabled scale has no progress to restore)."""
    saved = manifest.get("loss_scaler")
    if not saved or not saved.get("dynamic") or not current.dynamic:
        return current
    progress = {key: saved[key] for key in ("scale", "iteration", "last_overflow")}
    left = min(saved["hysteresis_left"], current.hysteresis)
    return dataclasses.replace(current, hysteresis_left=left, **progress)
