"""Turn a sharded checkpoint into the model's own full ``state_dict``, without the training job.

``consolidate`` reads the rank files directly (no process group) and writes safetensors with the
model's parameter names, in the Hugging Face layout: one ``model.safetensors``, or above
``max_shard_bytes`` several ``model-00001-of-00003.safetensors`` plus
``model.safetensors.index.json`` mapping each name to its file. ``describe`` summarises a
checkpoint for ``python -m fzero.checkpoint info``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from fzero.checkpoint.files import fsync_dir, write_safetensors
from fzero.checkpoint.locate import open_checkpoint
from fzero.checkpoint.manifest import LATEST, Checkpoint
from fzero.checkpoint.sources import ShardReader
from fzero.errors import CheckpointError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's default "5GB"
INDEX = "model.safetensors.index.json"


def consolidate(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "fp32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    verify: bool = True,
) -> list[Path]:
    """Write the checkpoint at ``path`` as full tensors under the model's ``state_dict`` names
    into the new directory ``out``; returns the files written.

    Parameters are written in ``dtype`` (default fp32: the master weights exactly, which is what
    ``fzero.full_state_dict`` returns); buffers as saved. Tied parameters are written under every
    name the model's ``state_dict`` has, so ``model.load_state_dict`` works even with
    ``strict=True``. ``out`` must not exist or be empty; it appears only once complete.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    checkpoint = open_checkpoint(path)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} exists and is not an empty directory; choose a new one")
    reader = ShardReader(checkpoint, prefer=0, verify=verify)
    slots = _slots(checkpoint)
    entries = checkpoint.manifest["state_dict"]
    groups = _plan(entries, _entry_nbytes(reader, entries, DTYPES[dtype]), max_shard_bytes)

    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        weight_map, total_nbytes = {}, 0
        for index, group in enumerate(groups):
            name = (
                "model.safetensors"
                if len(groups) == 1
                else f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
            )
            tensors = {e["name"]: _value(reader, e, slots, DTYPES[dtype]) for e in group}
            write_safetensors(staging / name, tensors, {"format": "pt"})
            total_nbytes += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update(dict.fromkeys(tensors, name))
        if len(groups) > 1:
            index_text = {"metadata": {"total_size": total_nbytes}, "weight_map": weight_map}
            (staging / INDEX).write_text(json.dumps(index_text, indent=2) + "\n")
        fsync_dir(staging)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sorted(out.iterdir())


def describe(path: str | os.PathLike) -> str:
    """What a checkpoint holds: step, world size, stage, units, parameter counts and files."""
    checkpoint = open_checkpoint(path)
    m = checkpoint.manifest
    lines = [f"checkpoint {checkpoint.directory}"]
    pointer = Path(path) / LATEST
    if pointer.is_file():
        named = pointer.read_text().strip()
        lines.append(f"  (the newest complete checkpoint under {path}; {pointer} names {named})")
    lines += [
        f"step {m['step']}, world size {m['world_size']}, stage {m['stage']}, "
        f"compute dtype {m['compute_dtype']}, saved on {m['device']}",
        f"written by fzero {m['fzero_version']} with torch {m['torch_version']}",
        f"parameters: {m['numel']:,} elements ({m['trainable_numel']:,} trainable), "
        f"{sum(len(u['params']) for u in m['units'])} tensors in {len(m['units'])} units; "
        f"{sum(e['kind'] == 'buffer' for e in m['state_dict'])} buffers",
        "units:",
    ]
    for index, unit in enumerate(m["units"]):
        lines.append(
            f"  {index:>3} {unit['name'] or '<root>':<24} {len(unit['params']):>4} params "
            f"{unit['numel']:>14,} elements (padded {unit['padded_numel']:,})"
        )
    total = sum(entry["nbytes"] for entry in m["ranks"])
    lines.append(f"files: {len(m['ranks'])} rank files, {_human(total)}")
    for entry in m["ranks"]:
        lines.append(f"  {entry['file']}  {_human(entry['nbytes']):>10}  sha256 {entry['sha256']}")
    return "\n".join(lines)


def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"500MiB"``, ``"1e6"`` or an int, as bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.e+]+)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read {text!r} as a size (e.g. 5GB, 500MiB, 1000000)")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    powers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    powers.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    return int(number * powers[unit])


# -- helpers ------------------------------------------------------------------------------------


def _slots(checkpoint: Checkpoint) -> dict[str, tuple[int, dict[str, Any]]]:
    """Every parameter name -> (unit index, its slot)."""
    return {
        name: (index, slot)
        for index, unit in enumerate(checkpoint.units)
        for slot in unit["params"]
        for name in slot["names"]
    }


def _entry_nbytes(
    reader: ShardReader, entries: list[dict[str, Any]], dtype: torch.dtype
) -> list[int]:
    sizes = []
    for entry in entries:
        numel = 1
        for d in entry["shape"]:
            numel *= d
        if entry["kind"] == "param":
            sizes.append(numel * dtype.itemsize)
        else:
            sizes.append(reader.tensor(reader.prefer, f"buffer.{entry['name']}").nbytes)
    return sizes


def _plan(entries: list[Any], sizes: list[int], max_shard_bytes: int) -> list[list[Any]]:
    """Split ``entries`` (in order) into files of at most ``max_shard_bytes`` each (a tensor
    larger than that gets a file of its own)."""
    groups: list[list[Any]] = [[]]
    used = 0
    for entry, nbytes in zip(entries, sizes):
        if groups[-1] and used + nbytes > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(entry)
        used += nbytes
    return groups


def _value(
    reader: ShardReader,
    entry: dict[str, Any],
    slots: dict[str, tuple[int, dict[str, Any]]],
    dtype: torch.dtype,
) -> torch.Tensor:
    if entry["kind"] == "buffer":
        return reader.tensor(reader.prefer, f"buffer.{entry['name']}")
    unit, slot = slots[entry["name"]]
    numel = 1
    for d in slot["shape"]:
        numel *= d
    values = torch.zeros(numel, dtype=torch.float32)
    reader.read(unit, slot["offset"], slot["offset"] + numel, "values", values)
    return values.view(slot["shape"]).to(dtype)


def _human(nbytes: int) -> str:
    if nbytes < 1024:
        return f"{nbytes} B"
    size = float(nbytes)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024 or unit == "TiB":
            break
    return f"{size:.1f} {unit}"
