"""Host and file residence of shards: pinned host buffers, the host-memory check, the
file-backed swapper, and NVMe offload's mapped swap files and staging buffers, which the
offload ops' handlers use (see docs/offload.md)."""

from __future__ import annotations

from fzero.offload.aio import (
    AioSettings,
    aligned_empty,
    check_swap_directory,
    remove_stale_swap_directories,
    swap_nbytes,
)
from fzero.offload.files import FileResidence
from fzero.offload.host import HostBuffer, HostMemory, check_host_memory, read_host_memory
from fzero.offload.mapped import MappedFile
from fzero.offload.swap import NvmeSwapper, SwapHandle

__all__ = [
    "AioSettings",
    "FileResidence",
    "HostBuffer",
    "HostMemory",
    "MappedFile",
    "NvmeSwapper",
    "SwapHandle",
    "aligned_empty",
    "check_host_memory",
    "check_swap_directory",
    "read_host_memory",
    "remove_stale_swap_directories",
    "swap_nbytes",
]
