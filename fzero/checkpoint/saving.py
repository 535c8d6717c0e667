"""``fzero.save``: every rank writes its own shard, in parallel; rank 0 publishes atomically.

1. Every rank writes ``rank<r>.safetensors`` (master, moments, step, compute-dtype shards,
   buffers, RNG state, the user's ``data_state``) into ``root/.step-<n>.tmp/``, under a
   temporary name that it renames once the file is fsynced.
2. One ``all_gather_object`` brings every rank's file size and sha256 (or its error) to all.
   If any rank failed, every rank raises ``CheckpointWriteError`` and rank 0 removes the
   partial directory.
3. Rank 0 writes ``manifest.json`` last, renames the directory to ``root/step-<n>/``, fsyncs,
   points ``root/latest`` at it, then drops old checkpoints beyond ``keep_last`` and leftovers of
   interrupted saves. A second ``all_gather_object`` tells every rank how that went.

A save that dies anywhere before the rename leaves only a ``.tmp`` directory, which ``load``
never picks; the previous checkpoint and ``latest`` are untouched until the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from fzero.checkpoint.files import fsync_dir, write_safetensors, write_text_atomic
from fzero.checkpoint.manifest import (
    FORMAT,
    LATEST,
    MANIFEST,
    VERSION,
    describe_units,
    finished_checkpoints,
    open_checkpoint,
    rank_file_name,
    rank_units,
    state_dict_entries,
    step_dir_name,
)
from fzero.checkpoint.sources import ShardReader
from fzero.errors import CheckpointError, CheckpointWriteError
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
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int)):
        raise TypeError(f"keep_last must be an int >= 1 or None, got {keep_last!r}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    runtime = state.runtime
    comm = runtime.comm
    root = Path(path)
    name = step_dir_name(state.progress.step_count)
    staging, final = root / f".{name}.tmp", root / name

    entry: dict[str, Any] | None = None
    failure: BaseException | None = None
    try:
        staging.mkdir(parents=True, exist_ok=True)
        if comm.rank == 0:  # left by a save that died between its manifest and its rename
            (staging / MANIFEST).unlink(missing_ok=True)
        entry = _write_rank_file(state, staging, data_state)
    except Exception as error:  # noqa: BLE001 - every rank must reach the collective below
        failure = error
    outcomes = comm.all_gather_object(entry if failure is None else _describe(failure))
    failed = [(rank, o) for rank, o in enumerate(outcomes) if "error" in o]
    if failed:
        if comm.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        rank, outcome = failed[0]
        raise CheckpointWriteError(
            f"saving {final} failed on rank {rank}: {outcome['error']}. Nothing was published: "
            "the partial checkpoint was removed and the previous one is untouched"
        ) from failure

    failure, report = None, None
    if comm.rank == 0:
        try:
            _publish(root, staging, final, _manifest(state, outcomes), keep_last)
        except Exception as error:  # noqa: BLE001 - reported to every rank below
            failure = error
            report = _describe(error)
            if staging.exists():  # not renamed: nothing was published
                shutil.rmtree(staging, ignore_errors=True)
                report["after"] = "The previous checkpoint is untouched"
            else:
                report["after"] = (
                    f"{final} itself is complete and loads, but '{LATEST}' or the removal of "
                    "older checkpoints may be behind"
                )
    report = comm.all_gather_object(report)[0]
    if report is not None:
        raise CheckpointWriteError(
            f"saving {final} failed on rank 0 while publishing it: {report['error']}. "
            f"{report['after']}"
        ) from failure
    return final


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
        "master": state.master,
        "exp_avg": state.exp_avg,
        "exp_avg_sq": state.exp_avg_sq,
        "step": state.step,
    }
    for index, shard in enumerate(state.param_shards):
        tensors[f"param_shard.{index}"] = shard
    # Buffers are replicated, but every rank keeps its own copy (they may differ per rank).
    for name, buffer in _buffers(runtime).items():
        tensors[f"buffer.{name}"] = buffer
    tensors["rng.cpu"] = torch.get_rng_state()
    if state.master.is_cuda:
        tensors["rng.cuda"] = torch.cuda.get_rng_state(state.master.device)

    file_name = rank_file_name(rank)
    partial = staging / f".{file_name}.partial"
    try:
        sha256, nbytes = write_safetensors(partial, tensors, metadata)
        os.replace(partial, staging / file_name)
    except BaseException:
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
        "device": state.master.device.type,
        "numel": layout.numel,
        "trainable_numel": layout.trainable_param_numel,
        "config": config.to_dict(),
        "config_fingerprint": config.fingerprint(),
        "units": describe_units(layout),
        "state_dict": state_dict_entries(runtime.model, params),
        "ranks": ranks,
    }


def _publish(
    root: Path, staging: Path, final: Path, manifest: dict[str, Any], keep_last: int | None
) -> None:
    """Rank 0, once every rank's file is durable: the manifest, the rename that publishes the
    checkpoint, then ``latest`` and the removal of older checkpoints."""
    expected = {entry["file"] for entry in manifest["ranks"]}
    for stray in staging.iterdir():  # e.g. more rank files, from a bigger earlier attempt
        if stray.name not in expected:
            _remove(stray)
    # Compact: per-rank tables grow with world size x units (``info`` prints it for people).
    write_text_atomic(staging / MANIFEST, json.dumps(manifest, separators=(",", ":")) + "\n")
    replaced = None
    if final.exists():  # the same step saved again: move the old one aside first
        replaced = root / f".{final.name}.old"
        _remove(replaced)
        os.replace(final, replaced)
    try:
        os.replace(staging, final)
    except BaseException:
        if replaced is not None:
            os.replace(replaced, final)
        raise
    fsync_dir(root)
    write_text_atomic(root / LATEST, final.name + "\n")
    if replaced is not None:
        _remove(replaced)
    if keep_last is not None:
        finished = [d for _, d in finished_checkpoints(root) if d != final]
        for directory in finished[: max(len(finished) - (keep_last - 1), 0)]:
            _remove(directory)
    for leftover in root.glob(".step-*.tmp"):  # interrupted saves: no rank is writing there now
        _remove(leftover)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _describe(error: BaseException) -> dict[str, str]:
    return {"error": f"{type(error).__name__}: {error}"}
