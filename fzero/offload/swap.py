"""File-backed swap of flat host buffers under ``nvme_path``: asynchronous, aligned, direct I/O.

``NvmeSwapper.write(name, tensor)`` and ``read(name, tensor)`` cut the buffer into requests of
``aio.block_size`` bytes and hand them to ``aio.requests_in_flight`` worker threads, each doing
a blocking ``pwrite``/``pread`` (which release the GIL); they return a ``SwapHandle`` to wait on.
Files are opened with ``O_DIRECT`` where the filesystem takes it (a probe at construction says;
``io_note`` tells why not, e.g. on an old tmpfs), so the swap bypasses the page cache. Memory
that is 4096-aligned (``HostBuffer``, ``aligned_empty``) is read and written in place; other
memory and a buffer's last partial block go through ``buffer_count`` aligned staging blocks.
``read_at`` and ``write_at`` move a byte range of an open file in place instead (NVMe offload's
mapped files, ``fzero/offload/mapped.py``, whose space is reserved when they are created).

Nothing is lost when the disk fills: a write goes to a new file, whose space is reserved with
``posix_fallocate`` before any data is written, and replaces the buffer's file (``os.replace``)
only once every request has succeeded. A failed write raises ``SwapIOError`` and leaves the last
complete version readable, so a step that fails mid-swap can be retried from the state it began
with. Each swapper writes under a directory of its own, named by host, process id, rank and a
random token, so processes sharing ``nvme_path`` never touch each other's files; ``close()`` (and
``atexit``) removes it, and a new swapper removes the directories of dead processes of its host.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import os
import queue
import secrets
import shutil
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import torch

from fzero.errors import SwapIOError
from fzero.offload.aio import (
    ALIGNMENT_NBYTES,
    SWAP_PREFIX,
    AioSettings,
    aligned_empty,
    check_swap_directory,
    remove_stale_swap_directories,
)
from fzero.offload.aio import round_up as _round_up


class _Transfer:
    """One buffer's requests: the last to finish runs ``on_complete`` (commit or clean up) and
    releases the waiters; the first error is kept."""

    def __init__(self, requests: int, on_complete):
        self._remaining = requests
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._on_complete = on_complete
        self.error: BaseException | None = None
        if requests == 0:
            self._finish()

    def request_done(self, error: BaseException | None) -> None:
        with self._lock:
            if error is not None and self.error is None:
                self.error = error
            self._remaining -= 1
            last = self._remaining == 0
        if last:
            self._finish()

    def _finish(self) -> None:
        try:
            self._on_complete(self.error)
        except BaseException as error:  # a failed commit is the transfer's error
            self.error = self.error or error
        self._done.set()


class SwapHandle(NamedTuple):
    """An asynchronous read or write of one buffer. ``wait()`` blocks until it is complete and
    raises ``SwapIOError`` if it failed; the tensor must not be touched before then."""

    name: str
    kind: str  # "read" or "write"
    nbytes: int
    transfer: _Transfer

    def done(self) -> bool:
        return self.transfer._done.is_set()

    def wait(self, timeout_seconds: float | None = None) -> None:
        if not self.transfer._done.wait(timeout_seconds):
            raise TimeoutError(f"swap {self.kind} of {self.name!r} still running")
        error = self.transfer.error
        if error is None:
            return
        if isinstance(error, SwapIOError):
            raise error
        kept = "; its previous contents are intact" if self.kind == "write" else ""
        raise SwapIOError(
            f"swap {self.kind} of {self.name!r} ({self.nbytes:,} bytes) failed: {error}{kept}"
        ) from error


class NvmeSwapper:
    """Swap files of named flat buffers under ``directory`` (the value of config key ``key``).

    ``needed_nbytes`` is checked against the free space at construction (``swap_nbytes`` gives
    it for a set of buffers). ``direct_io=False`` skips ``O_DIRECT`` even where it works.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        key: str,
        needed_nbytes: int,
        rank: int = 0,
        aio: AioSettings | None = None,
        buffer_count: int = 4,
        direct_io: bool = True,
    ):
        aio = AioSettings() if aio is None else aio
        aio.validate()
        check_swap_directory(key, directory, needed_nbytes)
        self.removed_stale = remove_stale_swap_directories(directory)
        name = f"{SWAP_PREFIX}-{socket.gethostname()}-p{os.getpid()}-r{rank}-{secrets.token_hex(4)}"
        self.directory = Path(directory) / name
        self.directory.mkdir(mode=0o700)
        self.aio = aio
        self.direct, self.io_note = _probe_direct(self.directory) if direct_io else (False, "")
        self._pool = ThreadPoolExecutor(aio.requests_in_flight, thread_name_prefix="fzero-swap")
        self._staging: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()
        for _ in range(max(buffer_count, 1) if self.direct else 0):
            self._staging.put(aligned_empty(aio.block_size, torch.uint8))
        self._nbytes: dict[str, int] = {}  # committed files
        self._writing: dict[str, SwapHandle] = {}
        self._sequence = 0
        self._closed = False
        atexit.register(self.close)

    def __repr__(self) -> str:
        mode = "O_DIRECT" if self.direct else f"buffered ({self.io_note})"
        return f"NvmeSwapper({str(self.directory)!r}, {mode}, {len(self._nbytes)} file(s))"

    def nbytes(self, name: str) -> int:
        """Bytes of the last complete write of ``name``."""
        return self._nbytes[name]

    def write(self, name: str, tensor: torch.Tensor) -> SwapHandle:
        """Start writing ``tensor`` as ``name``; raises ``SwapIOError`` at once when the disk
        cannot hold the new copy (nothing is written then and the old copy stays)."""
        data = self._bytes_of(tensor)
        previous = self._writing.get(name)
        if previous is not None and not previous.done():
            raise RuntimeError(f"a write of {name!r} is still in flight; wait on its handle first")
        if "/" in name or name.startswith("."):
            raise ValueError(f"swap buffer names are plain file names, got {name!r}")
        self._sequence += 1
        partial = self.directory / f".{name}.{self._sequence}.partial"
        final = self.directory / name
        fd = _open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | self._flags)
        try:
            if data.numel():  # reserve the space now: a full disk fails here, before any data
                os.posix_fallocate(fd, 0, _round_up(data.numel()))
        except OSError as error:
            os.close(fd)
            partial.unlink(missing_ok=True)
            stats = os.statvfs(self.directory)
            full = " (the disk is full)" if error.errno == errno.ENOSPC else ""
            raise SwapIOError(
                f"cannot write swap buffer {name!r}: {data.numel():,} bytes do not fit in "
                f"{self.directory}{full}, {stats.f_bavail * stats.f_frsize:,} bytes free; its "
                "previous contents are intact. Free space or name a larger nvme_path."
            ) from error

        def commit(error: BaseException | None) -> None:
            os.close(fd)
            if error is not None:
                partial.unlink(missing_ok=True)
                return
            os.replace(partial, final)
            self._nbytes[name] = data.numel()

        handle = self._submit(name, "write", data, fd, commit)
        self._writing[name] = handle
        return handle

    def read(self, name: str, tensor: torch.Tensor) -> SwapHandle:
        """Start reading the last complete write of ``name`` into ``tensor`` (same bytes)."""
        data = self._bytes_of(tensor)
        if name not in self._nbytes:
            raise KeyError(f"no complete write of swap buffer {name!r} (wait on its write first)")
        if self._nbytes[name] != data.numel():
            raise ValueError(
                f"swap buffer {name!r} holds {self._nbytes[name]:,} bytes, the tensor "
                f"{data.numel():,}"
            )
        fd = _open(self.directory / name, os.O_RDONLY | self._flags)
        return self._submit(name, "read", data, fd, lambda error: os.close(fd))

    def close(self) -> None:
        """Finish in-flight requests, then remove this swapper's files. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        shutil.rmtree(self.directory, ignore_errors=True)
        atexit.unregister(self.close)

    @property
    def _flags(self) -> int:
        return os.O_DIRECT if self.direct else 0

    def _bytes_of(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._closed:
            raise RuntimeError("the swapper is closed")
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError(
                f"swap buffers are contiguous host tensors, got {tensor.device} "
                f"{'contiguous' if tensor.is_contiguous() else 'strided'}"
            )
        return tensor.reshape(-1).view(torch.uint8)

    def read_at(self, name: str, fd: int, file_offset: int, data: torch.Tensor) -> SwapHandle:
        """Start reading ``data.numel()`` bytes at ``file_offset`` of the open file ``fd`` into
        the uint8 tensor ``data`` (a mapped file's range: ``fzero/offload/mapped.py``)."""
        return self._submit(name, "read", data, fd, _nothing, file_offset)

    def write_at(self, name: str, fd: int, file_offset: int, data: torch.Tensor) -> SwapHandle:
        """Start writing the uint8 tensor ``data`` at ``file_offset`` of the open file ``fd``,
        in place (the file's space is reserved already)."""
        return self._submit(name, "write", data, fd, _nothing, file_offset)

    def open_file(self, name: str) -> int:
        """A read-write descriptor of file ``name`` of this swapper, direct where it can be."""
        return _open(self.directory / name, os.O_RDWR | self._flags)

    def _submit(self, name: str, kind: str, data, fd: int, on_complete, file_offset: int = 0):
        block = self.aio.block_size
        offsets = range(0, data.numel(), block)
        transfer = _Transfer(len(offsets), on_complete)
        for offset in offsets:
            length = min(block, data.numel() - offset)
            future = self._pool.submit(
                self._request, kind, fd, data, offset, length, file_offset + offset
            )
            future.add_done_callback(lambda f: transfer.request_done(f.exception()))
        return SwapHandle(name, kind, data.numel(), transfer)

    def _request(
        self, kind: str, fd: int, data: torch.Tensor, offset: int, length: int, at: int
    ) -> None:
        """One request (bytes ``offset:offset + length`` of ``data``, at byte ``at`` of the
        file); through a staging block where direct I/O cannot use ``data`` in place."""
        in_place = not self.direct or (
            (data.data_ptr() + offset) % ALIGNMENT_NBYTES == 0 and length % ALIGNMENT_NBYTES == 0
        )
        if in_place:
            _transfer_all(kind, fd, data.data_ptr() + offset, length, at)
            return
        staging = self._staging.get()
        try:
            padded = _round_up(length)
            if kind == "write":
                staging[:length].copy_(data[offset : offset + length])
                _transfer_all(kind, fd, staging.data_ptr(), padded, at)
            else:
                _transfer_all(kind, fd, staging.data_ptr(), padded, at, at_least=length)
                data[offset : offset + length].copy_(staging[:length])
        finally:
            self._staging.put(staging)


def _nothing(error: BaseException | None) -> None:
    """A ranged transfer's completion: the descriptor stays open for the next one."""


def _open(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags, 0o600)
    except OSError as error:
        raise SwapIOError(f"cannot open swap file {path}: {error}") from error


def _transfer_all(
    kind: str, fd: int, address: int, length: int, offset: int, at_least: int | None = None
) -> None:
    """``pwrite``/``pread`` until ``length`` bytes moved (a read may stop at end of file after
    ``at_least``); system calls may move fewer bytes than asked."""
    view = memoryview((ctypes.c_char * length).from_address(address)).cast("B")
    done = 0
    while done < length:
        if kind == "write":
            moved = os.pwrite(fd, view[done:], offset + done)
        else:
            moved = os.preadv(fd, [view[done:]], offset + done)
        if moved == 0:
            if kind == "read" and done >= (at_least if at_least is not None else length):
                return
            raise OSError(errno.EIO, f"{kind} stopped at byte {offset + done} of the file")
        done += moved


def _probe_direct(directory: Path) -> tuple[bool, str]:
    """Whether ``O_DIRECT`` writes and reads work in ``directory``, and a note if not."""
    probe = directory / ".direct-probe"
    buffer = aligned_empty(ALIGNMENT_NBYTES, torch.uint8).fill_(7)
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
        try:
            _transfer_all("write", fd, buffer.data_ptr(), ALIGNMENT_NBYTES, 0)
            _transfer_all("read", fd, buffer.data_ptr(), ALIGNMENT_NBYTES, 0)
        finally:
            os.close(fd)
    except (OSError, AttributeError) as error:  # EINVAL: no O_DIRECT on this filesystem
        return False, f"O_DIRECT is not supported in {directory.parent} ({error}); page cache used"
    finally:
        probe.unlink(missing_ok=True)
    return True, ""
