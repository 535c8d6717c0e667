"""Host and file residence of shards: pinned host buffers, the host-memory check and the
file-backed swapper that the offload ops' handlers use (see docs/offload.md)."""

from __future__ import annotations

from fzero.offload.host import HostBuffer, HostMemory, check_host_memory, read_host_memory

__all__ = ["HostBuffer", "HostMemory", "check_host_memory", "read_host_memory"]
