"""``fzero.save``: every rank writes its own shard, in parallel; rank 0 commits and publishes.

1. Rank 0 settles what an interrupted earlier save left (``publish.recover``) and makes a fresh
   ``root/.step-<n>.tmp/``. One ``all_gather_object`` checks that every rank saves the same step
   and that this went well.
2. Every rank writes ``rank<r>.safetensors`` (master, moments, step, compute-dtype shards,
   buffers, RNG state, the user's ``data_state``) into it, under a temporary name that it
   renames once the file is fsynced.
3. A second ``all_gather_object`` brings every rank's file size and sha256 (or its error) to all.
   If any rank failed, every rank raises ``CheckpointWriteError`` and rank 0 removes the
   partial directory.
4. Rank 0 writes ``manifest.json``, then ``commit.json`` (the manifest's sha256: from here on the
   checkpoint is complete), points ``latest`` at it, renames the directory to ``step-<n>/`` and
   drops checkpoints beyond ``keep_last`` (``publish.py``). A third ``all_gather_object`` tells
   every rank how that went.

A save that dies anywhere leaves a root from which ``fzero.load`` takes the newest complete
checkpoint: the previous one before the commit, the new one after it (``locate.py``;
docs/checkpoints.md lists every window). ``crash_points`` names the points tests stop a rank at.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from fzero.checkpoint import publish
from fzero.checkpoint.crash_points import reach
from fzero.checkpoint.files import fsync_dir, write_safetensors
from fzero.checkpoint.locate import open_checkpoint
from fzero.checkpoint.manifest import (
    FORMAT,
    LATEST,
    VERSION,
    describe_units,
    rank_file_name,
    rank_units,
    staging_dir_name,
    state_dict_entries,
    step_dir_name,
)
from fzero.checkpoint.sources import ShardReader
from fzero.errors import CheckpointError, CheckpointWriteError
from fzero.state.split import as_flat
from fzero.state.zero_state import ZeroState


def save(
    state: ZeroState,
    path: str | os.PathLike,
    *,
    keep_last: int | None = None,
    data_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint of ``state`` to ``path/step-<step>/`` and point ``path/latest`` at
    it; returns that directory. Call it on every rank (it is collective); each rank writes only
    its own shard, nothing is gathered.

    ``keep_last``: keep only this many finished checkpoints under ``path`` (by step; the new one
    is always kept). ``data_state``: a JSON-serialisable dict of this rank's own (e.g. the data
    loader's position), read back with ``fzero.checkpoint.load_data_state``. The state stays
    usable; its buffers are only read.
    """
    state.check_live()
    state.runtime.settle(state)  # a pending update (optimizer offload) is applied first
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int)):
        raise TypeError(f"keep_last must be an int >= 1 or None, got {keep_last!r}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    runtime = state.runtime
    comm = runtime.comm
    root = Path(path)
    step = state.progress.step_count
    staging, final = root / staging_dir_name(step), root / step_dir_name(step)

    failure: BaseException | None = None
    if comm.rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            publish.recover(root)
            staging.mkdir()
        except Exception as error:  # noqa: BLE001 - every rank must reach the collective below
            failure = error
        reach("recovered")
    reach("collective.begin")
    begun = comm.all_gather_object({"step": step, **(_describe(failure) if failure else {})})
    try:
        _check_begun(begun, final, failure)
    except CheckpointWriteError:
        if comm.rank == 0:
            publish.discard(staging)
        raise

    entry: dict[str, Any] | None = None
    try:
        staging.mkdir(parents=True, exist_ok=True)  # made by rank 0; here for a local disk
        reach("staging_ready")
        entry = _write_rank_file(state, staging, data_state)
        reach("rank_file_renamed")
    except Exception as error:  # noqa: BLE001 - every rank must reach the collective below
        failure = error
    reach("collective.files")
    outcomes = comm.all_gather_object(entry if failure is None else _describe(failure))
    failed = [(rank, o) for rank, o in enumerate(outcomes) if "error" in o]
    if failed:
        if comm.rank == 0:
            publish.discard(staging)
        rank, outcome = failed[0]
        raise CheckpointWriteError(
            f"saving {final} failed on rank {rank}: {outcome['error']}. Nothing was published: "
            "the partial checkpoint was removed and the previous one is untouched"
        ) from failure

    failure, report = None, None
    if comm.rank == 0:
        try:
            publish.commit(staging, _manifest(state, outcomes), publish.next_sequence(root))
            publish.publish(root, step)
            if keep_last is not None:
                publish.rotate(root, keep_last, final)
            reach("cleaned")
        except Exception as error:  # noqa: BLE001 - reported to every rank below
            failure = error
            report = _describe(error)
            if publish.uncommitted(staging):  # nothing was published
                publish.discard(staging)
                report["after"] = "Nothing was published: the previous checkpoint is untouched"
            else:
                report["after"] = (
                    f"The new checkpoint was committed: it is complete and fzero.load takes it, "
                    f"but moving it to {final}, '{LATEST}' or the removal of older checkpoints "
                    "may be behind (the next save finishes them)"
                )
    reach("collective.published")
    report = comm.all_gather_object(report)[0]
    if report is not None:
        raise CheckpointWriteError(
            f"saving {final} failed on rank 0 while publishing it: {report['error']}. "
            f"{report['after']}"
        ) from failure
    return final


def _check_begun(begun: list[dict[str, Any]], final: Path, failure: BaseException | None) -> None:
    """Every rank saves the same step, and rank 0 made the staging directory."""
    steps = [outcome["step"] for outcome in begun]
    if len(set(steps)) > 1:
        listed = ", ".join(f"rank {rank}: step {s}" for rank, s in enumerate(steps))
        raise CheckpointWriteError(
            f"saving {final}: the ranks are at different steps ({listed}); call fzero.save on "
            "every rank at the same step. Nothing was written"
        )
    if "error" in begun[0]:
        raise CheckpointWriteError(
            f"saving {final} failed on rank 0: {begun[0]['error']}. Nothing was published: "
            "the previous checkpoint is untouched"
        ) from failure


def load_data_state(path: str | os.PathLike, rank: int = 0) -> dict[str, Any] | None:
    """The ``data_state`` rank ``rank`` passed to ``save`` (None when it passed none)."""
    checkpoint = open_checkpoint(path)
    if not 0 <= rank < checkpoint.world_size:
        raise CheckpointError(
            f"{checkpoint.directory} was saved by {checkpoint.world_size} ranks; no rank {rank}"
        )
    text = ShardReader(checkpoint).file(rank).metadata().get("data_state")
    return None if text is None else json.loads(text)


# -- helpers ------------------------------------------------------------------------------------


def _write_rank_file(state: ZeroState, staging: Path, data_state: Any) -> dict[str, Any]:
    runtime = state.runtime
    rank = runtime.comm.rank
    metadata = {"format": FORMAT, "rank": str(rank), "step": str(state.progress.step_count)}
    if data_state is not None:
        if not isinstance(data_state, dict):
            raise TypeError(f"data_state must be a dict, got {type(data_state).__name__}")
        try:
            metadata["data_state"] = json.dumps(data_state)
        except (TypeError, ValueError) as error:
            raise TypeError(f"data_state must be JSON-serialisable: {error}") from error
    tensors: dict[str, torch.Tensor] = {
        # Whole flat buffers, however the state keeps them (a split one is joined), so a
        # checkpoint loads with or without offload.
        "master": as_flat(state.master),
        "exp_avg": as_flat(state.exp_avg),
        "exp_avg_sq": as_flat(state.exp_avg_sq),
        "step": state.step,
    }
    for index, shard in enumerate(state.param_shards):
        tensors[f"param_shard.{index}"] = shard
    # Buffers are replicated, but every rank keeps its own copy (they may differ per rank).
    for name, buffer in _buffers(runtime).items():
        tensors[f"buffer.{name}"] = buffer
    tensors["rng.cpu"] = torch.get_rng_state()
    if state.device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(state.device)

    file_name = rank_file_name(rank)
    partial = staging / f".{file_name}.partial"
    try:
        sha256, nbytes = write_safetensors(partial, tensors, metadata)
        reach("rank_file_partial")
        os.replace(partial, staging / file_name)
    except Exception:
        partial.unlink(missing_ok=True)
        raise
    fsync_dir(staging)
    return {
        "file": file_name,
        "nbytes": nbytes,
        "sha256": sha256,
        "units": rank_units(runtime.layout, state.param_shards),
    }


def _buffers(runtime: Any) -> dict[str, torch.Tensor]:
    """The model's ``state_dict`` entries that are not parameters, under their names."""
    params = {name for unit in runtime.layout.units for slot in unit.params for name in slot.names}
    return {
        name: tensor.detach()
        for name, tensor in runtime.model.state_dict(keep_vars=True).items()
        if name not in params
    }


def _manifest(state: ZeroState, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    import fzero

    runtime = state.runtime
    layout, config = runtime.layout, runtime.config
    params = {name for unit in layout.units for slot in unit.params for name in slot.names}
    return {
        "format": FORMAT,
        "version": VERSION,
        "fzero_version": fzero.__version__,
        "torch_version": torch.__version__,
        "step": state.progress.step_count,
        "skipped_steps": state.progress.skipped_count,
        "loss_scaler": state.progress.scaler(runtime.loss_scale_rule).state_dict(),
        "world_size": runtime.comm.world_size,
        "stage": config.stage,
        "shard_world": layout.shard_world,
        "alignment": layout.alignment,
        "compute_dtype": config.compute_dtype_name,
        "device": state.device.type,
        "numel": layout.numel,
        "trainable_numel": layout.trainable_param_numel,
        "config": config.to_dict(),
        "config_fingerprint": config.fingerprint(),
        "units": describe_units(layout),
        "state_dict": state_dict_entries(runtime.model, params),
        "ranks": ranks,
    }


def _describe(error: BaseException) -> dict[str, str]:
    return {"error": f"{type(error).__name__}: {error}"}
