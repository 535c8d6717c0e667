"""Host and file residence of shards: pinned host buffers, the host-memory check and the
file-backed swapper that the offload ops' handlers use (see docs/offload.md)."""

from __future__ import annotations

from fzero.offload.aio import (
    AioSettings,
    aligned_empty,
    check_swap_directory,
    remove_stale_swap_directories,
    swap_nbytes,
)
from fzero.offload.host import HostBuffer, HostMemory, check_host_memory, read_host_memory
from fzero.offload.swap import NvmeSwapper, SwapHandle

__all__ = [
    "AioSettings",
    "HostBuffer",
    "HostMemory",
    "NvmeSwapper",
    "SwapHandle",
    "aligned_empty",
    "check_host_memory",
    "check_swap_directory",
    "read_host_memory",
    "remove_stale_swap_directories",
    "swap_nbytes",
]
