"""Read element ranges of tensors out of safetensors files, touching only those bytes.

The format: an 8-byte little-endian header length, a JSON header mapping each tensor name to
its ``dtype``, ``shape`` and ``data_offsets`` (begin and end, relative to the byte after the
header), then the data, row-major. So elements ``[lo, hi)`` of a tensor's flattening are one
byte range, read with ``os.preadv`` into memory of that size: a rank that needs a slice of a
tensor never holds the tensor. A Hugging Face folder holds ``model.safetensors`` or, sharded,
``model.safetensors.index.json`` whose ``weight_map`` names each tensor's file.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from fzero.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_NBYTES = 100 << 20  # the safetensors library's own limit


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie: ``data_start`` is absolute in ``path``."""

    name: str
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    data_start: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file, from its header alone."""
    with open(path, "rb") as file:
        head = file.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path} is too short to be a safetensors file")
        (header_nbytes,) = struct.unpack("<Q", head)
        if header_nbytes > MAX_HEADER_NBYTES:
            raise CheckpointError(f"{path}: header of {header_nbytes} bytes; not safetensors")
        try:
            header = json.loads(file.read(header_nbytes))
        except ValueError as error:
            raise CheckpointError(f"{path}: its header is not JSON ({error})") from None
    file_nbytes = path.stat().st_size
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {info['dtype']}, which fzero cannot read "
                f"(it reads {sorted(DTYPES)})"
            )
        begin, end = info["data_offsets"]
        stored = StoredTensor(
            name,
            path,
            DTYPES[info["dtype"]],
            tuple(info["shape"]),
            8 + header_nbytes + begin,
            end - begin,
        )
        if (
            stored.numel * stored.dtype.itemsize != stored.nbytes
            or stored.data_start + stored.nbytes > file_nbytes
        ):
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {list(stored.shape)} but its data offsets "
                f"{info['data_offsets']} do not fit it (or the file is truncated)"
            )
        tensors[name] = stored
    return tensors


def open_folder(folder: str | os.PathLike) -> dict[str, StoredTensor]:
    """Every tensor of a Hugging Face checkpoint folder (or of one ``.safetensors`` file)."""
    folder = Path(folder)
    if folder.is_file():
        return read_header(folder)
    if (folder / INDEX_FILE).is_file():
        index = json.loads((folder / INDEX_FILE).read_text())
        tensors: dict[str, StoredTensor] = {}
        for file_name in sorted(set(index["weight_map"].values())):
            path = folder / file_name
            if not path.is_file():
                raise CheckpointError(f"{path} is missing ({INDEX_FILE} lists it)")
            tensors.update(read_header(path))
        absent = sorted(set(index["weight_map"]) - set(tensors))
        if absent:
            raise CheckpointError(f"{folder}: {INDEX_FILE} lists tensors no file holds: {absent}")
        return tensors
    if (folder / SINGLE_FILE).is_file():
        return read_header(folder / SINGLE_FILE)
    raise CheckpointError(
        f"{folder} holds neither {SINGLE_FILE} nor {INDEX_FILE}: give the folder that "
        "save_pretrained wrote (only safetensors weights are read)"
    )


class RangeReader:
    """Reads element ranges, keeping each file open once."""

    def __init__(self) -> None:
        self._descriptors: dict[Path, int] = {}

    def read(self, stored: StoredTensor, lo: int, hi: int) -> torch.Tensor:
        """Elements ``[lo, hi)`` of ``stored``'s flattening, in its own dtype."""
        itemsize = stored.dtype.itemsize
        raw = bytearray((hi - lo) * itemsize)
        view, offset = memoryview(raw), stored.data_start + lo * itemsize
        fd = self._descriptor(stored.path)
        done = 0
        while done < len(raw):
            count = os.preadv(fd, [view[done:]], offset + done)
            if count == 0:
                raise CheckpointError(f"{stored.path} ended early while reading {stored.name!r}")
            done += count
        if not raw:
            return torch.empty(0, dtype=stored.dtype)
        return torch.frombuffer(raw, dtype=stored.dtype)

    def _descriptor(self, path: Path) -> int:
        if path not in self._descriptors:
            self._descriptors[path] = os.open(path, os.O_RDONLY)
        return self._descriptors[path]

    def close(self) -> None:
        for fd in self._descriptors.values():
            os.close(fd)
        self._descriptors.clear()
