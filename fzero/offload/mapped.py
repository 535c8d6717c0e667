"""A flat tensor that lives in a file: NVMe offload's residence for a state leaf.

``MappedFile`` creates a file in the swapper's directory, reserves its space with
``posix_fallocate`` (so a disk that fills later cannot fail a write into it: every block is
allocated before the first step), and maps it into memory with
``torch.from_file(shared=True)``. The tensor is a real CPU tensor, so every reader of the state
(checkpoints, ``full_state_dict``, ``gathered``, ``tree_map`` copies) works unchanged, and host
memory holds only the page cache the kernel can reclaim.

The step does not go through the mapping: ``read`` and ``write`` move a range of elements
between the file and a 4096-aligned staging buffer with the swapper's (direct, where the
filesystem takes it) I/O. A range rarely starts or ends on a 4096-byte page; a read takes the
whole pages around it, and a write sends only the pages that lie wholly inside the range to the
file directly and copies the partial pages at its two ends through the mapping, so a write
never touches bytes of a neighbouring range (which another staging buffer may hold, read but not
yet written back).

Coherence: Linux keeps direct I/O and a shared mapping of the same file coherent as long as
nobody writes through the mapping while a direct transfer of the same pages runs. A direct read
first writes back dirty cached pages of its range, and a direct write drops the cached pages of
its range afterwards, so the mapping sees it on the next access. The only writes through the
mapping during a step are the partial end pages, which no direct write touches; readers of the
mapping between steps run after every write was waited for (``WaitFileWrites``, and
``Runtime.settle``).
"""

from __future__ import annotations

import ctypes
import errno
import os
import warnings

import torch

from fzero.errors import ResidencyWarning, SwapIOError
from fzero.offload.aio import ALIGNMENT_NBYTES, round_up
from fzero.offload.swap import NvmeSwapper, SwapHandle

PAGE = ALIGNMENT_NBYTES


class MappedFile:
    """File ``name`` of ``swapper``'s directory holding ``numel`` elements of ``dtype``;
    ``tensor`` is its memory mapping (zeros until written)."""

    def __init__(self, swapper: NvmeSwapper, name: str, numel: int, dtype: torch.dtype):
        self.swapper, self.name, self.dtype = swapper, name, dtype
        self.itemsize = torch.empty(0, dtype=dtype).element_size()
        self.nbytes = numel * self.itemsize
        self.reserved_nbytes = round_up(self.nbytes)
        self.path = swapper.directory / name
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if self.reserved_nbytes:
                os.posix_fallocate(fd, 0, self.reserved_nbytes)
        except OSError as error:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            full = " (the disk is full)" if error.errno == errno.ENOSPC else ""
            raise SwapIOError(
                f"cannot reserve {self.reserved_nbytes:,} bytes for swap file {self.path}{full}: "
                f"{error}. Free space or name a larger nvme_path."
            ) from error
        os.close(fd)
        if numel:
            self.tensor = torch.from_file(str(self.path), shared=True, size=numel, dtype=dtype)
        else:
            self.tensor = torch.empty(0, dtype=dtype)
        self._bytes = self.tensor.view(torch.uint8)
        self._fd: int | None = swapper.open_file(name)

    def __repr__(self) -> str:
        return f"MappedFile({str(self.path)!r}, {self.tensor.numel():,} x {self.dtype})"

    def window(self, lo: int, hi: int) -> tuple[int, int]:
        """The whole pages around elements ``lo:hi``: (first byte, bytes)."""
        start = lo * self.itemsize // PAGE * PAGE
        return start, round_up(hi * self.itemsize) - start

    @staticmethod
    def staging_nbytes(numel: int, itemsize: int) -> int:
        """Bytes of a staging buffer that holds the pages around any range of ``numel``
        elements of ``itemsize`` bytes."""
        return round_up(numel * itemsize) + PAGE

    def view(self, lo: int, hi: int, staging: torch.Tensor) -> torch.Tensor:
        """Elements ``lo:hi`` inside ``staging`` (uint8, holding their pages from byte 0)."""
        start, _ = self.window(lo, hi)
        head = lo * self.itemsize - start
        return staging[head : head + (hi - lo) * self.itemsize].view(self.dtype)

    def read(self, lo: int, hi: int, staging: torch.Tensor) -> SwapHandle | None:
        """Start reading the pages around elements ``lo:hi`` into ``staging`` (uint8,
        4096-aligned); ``view`` finds the elements there once the handle is waited for."""
        if hi <= lo:
            return None
        start, length = self.window(lo, hi)
        return self.swapper.read_at(self.name, self._descriptor(), start, staging[:length])

    def write(self, lo: int, hi: int, staging: torch.Tensor) -> SwapHandle | None:
        """Start writing elements ``lo:hi`` from ``staging`` (laid out as ``read`` leaves it)
        back: whole pages directly, the partial pages at either end through the mapping."""
        if hi <= lo:
            return None
        start, _ = self.window(lo, hi)
        first, last = lo * self.itemsize, hi * self.itemsize
        inner_first, inner_last = round_up(first), last // PAGE * PAGE
        if inner_first >= inner_last:  # no whole page: all of it through the mapping
            self._bytes[first:last].copy_(staging[first - start : last - start])
            return None
        self._bytes[first:inner_first].copy_(staging[first - start : inner_first - start])
        self._bytes[inner_last:last].copy_(staging[inner_last - start : last - start])
        inner = staging[inner_first - start : inner_last - start]
        return self.swapper.write_at(self.name, self._descriptor(), inner_first, inner)

    def keep_in_memory(self, lo: int, hi: int) -> None:
        """Lock the mapping's pages around elements ``lo:hi`` in memory (``mlock``), so the
        kernel never evicts them: ``offload_param.max_in_cpu``'s shards. Where the locked-memory
        limit refuses it, one ``ResidencyWarning`` says so and the pages stay ordinary page
        cache (correct, only evictable)."""
        if hi <= lo:
            return
        start, length = self.window(lo, hi)
        address = self._bytes.data_ptr() + start
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mlock(ctypes.c_void_p(address), ctypes.c_size_t(length)) != 0:
            error = ctypes.get_errno()
            warnings.warn(
                f"cannot lock {length:,} bytes of {self.path} in memory ({os.strerror(error)}): "
                "offload_param.max_in_cpu's parameter shards stay in the page cache, which the "
                "kernel may evict under memory pressure. Raise the locked-memory limit "
                "(ulimit -l) or lower max_in_cpu.",
                ResidencyWarning,
                stacklevel=3,
            )

    def _descriptor(self) -> int:
        if self._fd is None:
            raise RuntimeError(f"swap file {self.path} is closed")
        return self._fd

    def close(self) -> None:
        """Close the file's descriptor. The mapping stays valid while a tensor refers to it;
        the swapper removes the file, whose space the kernel frees once the last mapping of it
        is gone."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
