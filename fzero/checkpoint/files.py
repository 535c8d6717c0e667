"""Bytes on disk: a streaming safetensors writer that hashes as it writes, and the fsync and
rename steps that make a write durable and atomic.

The writer streams one tensor at a time (a CUDA shard is copied to the host tensor by tensor),
so saving costs no second copy of the shard in memory, and it computes the file's sha256 from
the bytes it writes, so no second read is needed. The file is ordinary safetensors: the
``safetensors`` package reads it (with byte-range reads for slices).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch

# safetensors' dtype names.
DTYPE_NAMES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
}
CHUNK_NBYTES = 64 << 20  # written (and hashed) in pieces this large


def _write_chunk(file: BinaryIO, data: memoryview) -> None:
    """The one place bytes reach a file (tests replace it to simulate a full disk)."""
    file.write(data)


def write_safetensors(
    path: Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    produce: Callable[[str], torch.Tensor] | None = None,
) -> tuple[str, int]:
    """Write ``tensors`` to ``path`` as safetensors, fsync it, and return (sha256, nbytes).

    Tensors are laid out by element size, largest first, as the safetensors library does, so
    every tensor starts at a multiple of its element size (the header is padded to 8 bytes).
    ``produce(name)``: when given, ``tensors`` only describe shapes and dtypes (meta tensors
    will do) and each tensor's values are asked for when it is written, so the file is written
    holding one tensor at a time.
    """
    order = sorted(tensors, key=lambda name: -tensors[name].element_size())
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name in order:
        tensor = tensors[name]
        if tensor.dtype not in DTYPE_NAMES:
            raise TypeError(f"{name}: dtype {tensor.dtype} cannot be stored in safetensors")
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as file:
        for piece in (struct.pack("<Q", len(text)), text):
            digest.update(piece)
            _write_chunk(file, memoryview(piece))
        for name in order:
            value = produce(name) if produce is not None else tensors[name]
            if value.shape != tensors[name].shape or value.dtype != tensors[name].dtype:
                raise ValueError(
                    f"{name}: produced {value.dtype} {list(value.shape)}, not as described"
                )
            raw = value.detach().reshape(-1).contiguous().cpu().view(torch.uint8)
            view = memoryview(raw.numpy()).cast("B")
            for start in range(0, len(view), CHUNK_NBYTES):
                piece = view[start : start + CHUNK_NBYTES]
                digest.update(piece)
                _write_chunk(file, piece)
        file.flush()
        os.fsync(file.fileno())
    return digest.hexdigest(), 8 + len(text) + offset


HASH_CHUNK_NBYTES = 1 << 20  # read into one reused buffer: checking a file costs this much


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(HASH_CHUNK_NBYTES)
    view = memoryview(buffer)
    with open(path, "rb") as file:
        while count := file.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (files created or renamed in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a reader sees the old or the new file, never a
    torn one: write a temporary file beside it, fsync, rename over, fsync the directory."""
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)
    fsync_dir(path.parent)
