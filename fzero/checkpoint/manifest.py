"""The manifest: what a checkpoint holds, written last, so that its presence means "complete".

A checkpoint is a directory ``step-000123/`` with one safetensors file per rank
(``rank00003.safetensors``), ``manifest.json`` (the world size, stage, config, the layout: units
with their parameters' names, shapes and offsets in the unit's flat buffer; where each rank's
shard of each unit lies in its file, and every file's size and sha256) and ``commit.json``,
written after the manifest, holding the manifest's own sha256 (``commit.py``). Directories
without a commit record are interrupted saves and are never loaded.

A checkpoint root holds such directories and a ``latest`` file naming the newest one
(``locate.py`` says how a root is read, ``publish.py`` how a save makes one appear).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fzero.checkpoint.commit import COMMIT, check_manifest_bytes, read_commit
from fzero.errors import CheckpointCorruptError, CheckpointError, CheckpointMismatchError

FORMAT = "fzero-checkpoint"
VERSION = 2  # 2: the manifest has a commit record (commit.json) and a save sequence number
MANIFEST = "manifest.json"
LATEST = "latest"
STEP_DIR = re.compile(r"^step-(\d+)$")
STAGING_DIR = re.compile(r"^\.step-(\d+)\.tmp$")  # where a save writes before it publishes
ASIDE_DIR = re.compile(r"^\.step-(\d+)\.old$")  # the earlier copy, while a step is saved again
REMOVING_PREFIX = ".removing."  # a directory renamed out of the way, then deleted


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def staging_dir_name(step: int) -> str:
    return f".{step_dir_name(step)}.tmp"


def aside_dir_name(step: int) -> str:
    return f".{step_dir_name(step)}.old"


def rank_file_name(rank: int) -> str:
    return f"rank{rank:05d}.safetensors"


def describe_units(layout: Any) -> list[dict[str, Any]]:
    """The layout in JSON: what is the same on every rank (sizes and parameter slots)."""
    return [
        {
            "name": unit.name,
            "numel": unit.numel,
            "padded_numel": unit.padded_numel,
            "shard_numel": unit.shard_numel,
            "trainable_numel": unit.trainable_numel,
            "params": [
                {
                    "names": list(slot.names),
                    "shape": list(slot.shape),
                    "offset": slot.offset,
                    "requires_grad": slot.requires_grad,
                }
                for slot in unit.params
            ],
        }
        for unit in layout.units
    ]


def rank_units(layout: Any, param_shards: tuple[torch.Tensor, ...]) -> list[list[int]]:
    """Per unit, where this rank's part lies: ``[owned_start, optimizer_offset,
    optimizer_numel, compute_numel]``. The unit flat's ``[owned_start, owned_start +
    optimizer_numel)`` is ``master[optimizer_offset:]`` (and the moments); its compute-dtype
    values ``param_shard.<unit>`` (``compute_numel`` long, 0 when none are kept) cover the end
    of the shard, ``[owned_start + shard_numel - compute_numel, owned_start + shard_numel)``."""
    rows = []
    for unit in layout.units:
        start, _ = layout.owned_range(unit)
        compute = param_shards[unit.index].numel() if param_shards else 0
        rows.append([start, unit.optimizer_offset, unit.optimizer_numel, compute])
    return rows


def state_dict_entries(model: nn.Module, param_names: set[str]) -> list[dict[str, Any]]:
    """The model's ``state_dict`` names in order, each marked parameter or buffer."""
    return [
        {
            "name": name,
            "kind": "param" if name in param_names else "buffer",
            "shape": list(tensor.shape),
        }
        for name, tensor in model.state_dict(keep_vars=True).items()
    ]


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint: its directory and its parsed, verified manifest."""

    directory: Path
    manifest: dict[str, Any]

    @property
    def world_size(self) -> int:
        return self.manifest["world_size"]

    @property
    def stage(self) -> int:
        return self.manifest["stage"]

    @property
    def step(self) -> int:
        return self.manifest["step"]

    @property
    def shard_world(self) -> int:
        return self.manifest["shard_world"]

    @property
    def units(self) -> list[dict[str, Any]]:
        return self.manifest["units"]

    def rank_entry(self, rank: int) -> dict[str, Any]:
        return self.manifest["ranks"][rank]

    def file(self, rank: int) -> Path:
        return self.directory / self.rank_entry(rank)["file"]


def read_checkpoint(directory: Path) -> Checkpoint:
    """The checkpoint in ``directory``, once its commit record says it is complete and its
    manifest matches the digest that record holds."""
    if not (directory / COMMIT).exists() and (directory / MANIFEST).is_file():
        version = _peek_version(directory / MANIFEST)
        if version is not None and version != VERSION:
            raise CheckpointError(
                f"{directory / MANIFEST} has format version {version}; this fzero reads version "
                f"{VERSION} (checkpoints with a {COMMIT} record)"
            )
    record = read_commit(directory)
    path = directory / MANIFEST
    try:
        manifest = json.loads(check_manifest_bytes(directory, MANIFEST, record))
    except ValueError as error:
        raise CheckpointCorruptError(f"cannot read {path}: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an fzero checkpoint manifest")
    if manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has format version {manifest.get('version')}; this fzero "
            f"reads version {VERSION}"
        )
    if (manifest.get("step"), manifest.get("sequence")) != (record.step, record.sequence):
        raise CheckpointCorruptError(
            f"{directory / COMMIT} says step {record.step}, save {record.sequence}, but {path} "
            f"says step {manifest.get('step')}, save {manifest.get('sequence')}: the commit "
            "record was changed after the save wrote it"
        )
    return Checkpoint(directory, manifest)


def _peek_version(path: Path) -> Any:
    try:
        return json.loads(path.read_text()).get("version")
    except (OSError, ValueError, AttributeError):
        return None


# -- model comparison ---------------------------------------------------------------------------


def model_differences(checkpoint: Checkpoint, model: nn.Module) -> list[str]:
    """How ``model`` differs from the checkpoint's: parameter names, shapes, trainable or
    frozen, ties, and buffers. Empty when they match."""
    saved: dict[str, tuple[list[int], bool]] = {}
    saved_ties = set()
    for unit in checkpoint.units:
        for slot in unit["params"]:
            for name in slot["names"]:
                saved[name] = (slot["shape"], slot["requires_grad"])
            saved_ties.add(frozenset(slot["names"]))
    current: dict[str, tuple[list[int], bool]] = {}
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        current[name] = (list(param.shape), param.requires_grad)
        names_of.setdefault(id(param), []).append(name)
    current_ties = {frozenset(names) for names in names_of.values()}

    out = [f"{n}: in the checkpoint, not in the model" for n in saved if n not in current]
    out += [f"{n}: in the model, not in the checkpoint" for n in current if n not in saved]
    for name in (n for n in saved if n in current):
        (shape, trainable), (now_shape, now_trainable) = saved[name], current[name]
        if shape != now_shape:
            out.append(f"{name}: shape {tuple(shape)} in the checkpoint, {tuple(now_shape)} now")
        elif trainable != now_trainable:
            state = {True: "trainable", False: "frozen"}
            out.append(f"{name}: {state[trainable]} in the checkpoint, {state[now_trainable]} now")
    out += _buffer_differences(checkpoint, model, set(current))
    if not out:
        for names in sorted(saved_ties - current_ties, key=sorted):
            if len(names) > 1:
                out.append(f"{', '.join(sorted(names))}: tied in the checkpoint, not in the model")
        for names in sorted(current_ties - saved_ties, key=sorted):
            if len(names) > 1:
                out.append(f"{', '.join(sorted(names))}: tied in the model, not in the checkpoint")
    return out


def _buffer_differences(checkpoint: Checkpoint, model: nn.Module, params: set[str]) -> list[str]:
    saved = {
        e["name"]: e["shape"] for e in checkpoint.manifest["state_dict"] if e["kind"] == "buffer"
    }
    current = {
        name: list(tensor.shape)
        for name, tensor in model.state_dict(keep_vars=True).items()
        if name not in params
    }
    out = [f"buffer {n}: in the checkpoint, not in the model" for n in saved if n not in current]
    out += [f"buffer {n}: in the model, not in the checkpoint" for n in current if n not in saved]
    for name in (n for n in saved if n in current and saved[n] != current[n]):
        out.append(
            f"buffer {name}: shape {tuple(saved[name])} in the checkpoint, "
            f"{tuple(current[name])} now"
        )
    return out


def check_model(checkpoint: Checkpoint, model: nn.Module, limit: int = 8) -> None:
    differences = model_differences(checkpoint, model)
    if differences:
        shown = "; ".join(differences[:limit])
        more = f" (and {len(differences) - limit} more)" if len(differences) > limit else ""
        raise CheckpointMismatchError(
            f"{checkpoint.directory} was written for a different model: {shown}{more}"
        )


def check_layout(checkpoint: Checkpoint, layout: Any) -> None:
    """The freshly sharded model groups parameters into the same units at the same offsets (a
    checkpoint maps unit flats, so this must hold for any world size)."""
    strip = ("padded_numel", "shard_numel", "trainable_numel")  # depend on the world size
    saved = [{k: v for k, v in u.items() if k not in strip} for u in checkpoint.units]
    now = [{k: v for k, v in u.items() if k not in strip} for u in describe_units(layout)]
    if saved == now:
        return
    for index, (a, b) in enumerate(zip(saved, now)):
        if a != b:
            raise CheckpointMismatchError(
                f"{checkpoint.directory}: unit {index} differs between the checkpoint "
                f"({a['name'] or '<root>'!r}, {len(a['params'])} parameters) and the model "
                f"({b['name'] or '<root>'!r}, {len(b['params'])} parameters); group the parameters "
                "into units as when it was saved (pass load the same units= as shard)"
            )
    raise CheckpointMismatchError(
        f"{checkpoint.directory}: {len(saved)} units in the checkpoint, {len(now)} in the model"
    )
