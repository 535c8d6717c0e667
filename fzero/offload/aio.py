"""The pieces of NVMe swap that come before any I/O: the ``aio`` settings, aligned host memory,
the bytes the swap files need, the check of ``nvme_path`` at ``shard`` time, and the removal
of swap directories that dead processes left behind.

Direct I/O (``O_DIRECT``) moves data between the device and user memory without the page cache,
which is what lets a swap run at the disk's speed without evicting everything else from host
memory. It needs the memory address, the file offset and the length to be multiples of the
device's block; 4096 bytes satisfies every NVMe device, so that is ``ALIGNMENT_NBYTES``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from collections.abc import Iterable, Mapping
from dataclasses import fields

import torch

from fzero.config.aio_block import AioConfig
from fzero.errors import ConfigError, SwapPathError

ALIGNMENT_NBYTES = 4096
GIB = 1 << 30
# A swapper's directory: fzero-swap-<host>-p<pid>-r<rank>-<random hex>.
SWAP_PREFIX = "fzero-swap"
_RUN_DIRECTORY = re.compile(rf"^{SWAP_PREFIX}-(?P<host>.+)-p(?P<pid>\d+)-r\d+-[0-9a-f]+$")


class AioSettings(AioConfig):
    """DeepSpeed's ``aio`` block, as the swapper uses it: the config block's fields, defaults
    and checks (``fzero/config/aio_block.py``), and what they mean here.

    - ``block_size``: bytes per read or write request; a buffer is cut into requests of this
      size (a multiple of 4096, for direct I/O).
    - ``thread_count`` (newer DeepSpeed: ``intra_op_parallelism``) and ``queue_depth``: the
      swapper keeps ``thread_count * queue_depth`` requests in flight, as libaio would with
      ``thread_count`` threads each submitting ``queue_depth`` requests; it does so with that
      many worker threads each doing one blocking ``pread``/``pwrite`` (they release the GIL).
    - ``single_submit``, ``overlap_events``: libaio batching choices (submit requests one by one
      or in batches; reap completions while submitting). A worker thread submits each request
      on its own and completes it independently, so requests are always submitted singly and
      completions always overlap: the keys are accepted and change nothing.
    - ``io_backend``: ``"async_io"`` or ``"posix"``; both name this thread pool here.
    - ``use_gds``: GPUDirect Storage; not implemented (rejected when true, see docs/offload.md).
    """

    @classmethod
    def from_config(cls, block: Mapping | None, path: str = "aio") -> AioSettings:
        """Build from the JSON ``aio`` block, naming the key of any bad value."""
        block = dict(block or {})
        known = {f.name for f in fields(cls)}
        for key in block:
            if key not in known:
                raise ConfigError(f"{path}.{key}", f"unknown key; expected one of {sorted(known)}")
        settings = cls(**block)
        settings.validate(path)
        return settings

    @property
    def requests_in_flight(self) -> int:
        """Worker threads of the swapper: ``thread_count`` (or ``intra_op_parallelism``) times
        ``queue_depth``."""
        threads = self.intra_op_parallelism or self.thread_count
        return threads * self.queue_depth


def round_up(nbytes: int, multiple: int = ALIGNMENT_NBYTES) -> int:
    return -(-nbytes // multiple) * multiple


def aligned_empty(numel: int, dtype: torch.dtype, alignment: int = ALIGNMENT_NBYTES):
    """A 1-D host tensor whose first byte is ``alignment``-aligned and whose storage extends to a
    multiple of ``alignment`` bytes, so direct I/O can read and write it in place."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    nbytes = round_up(numel * itemsize, alignment)
    raw = torch.empty(nbytes + alignment, dtype=torch.uint8)
    skip = -raw.data_ptr() % alignment
    return raw[skip : skip + nbytes].view(dtype)[:numel]


def swap_nbytes(buffer_nbytes: Iterable[int], writes_in_flight: int) -> int:
    """Bytes the swap files of buffers of ``buffer_nbytes`` need at their peak: each padded to
    4096, plus the largest ``writes_in_flight`` again, since a write goes to a new file that
    replaces the old one only once it is complete."""
    padded = sorted((round_up(n) for n in buffer_nbytes), reverse=True)
    return sum(padded) + sum(padded[: max(writes_in_flight, 0)])


def check_swap_directory(key: str, directory: str | os.PathLike, needed_nbytes: int) -> None:
    """Raise ``SwapPathError`` naming ``key`` and the path unless ``directory`` exists, is a
    writable directory, and its filesystem has ``needed_nbytes`` free."""
    path = os.fspath(directory)
    if not path:
        raise SwapPathError(key, path, "is empty; name a directory on a local NVMe disk")
    if not os.path.exists(path):
        raise SwapPathError(key, path, f"{path!r} does not exist; create it or name another")
    if not os.path.isdir(path):
        raise SwapPathError(key, path, f"{path!r} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise SwapPathError(
            key, path, f"{path!r} is not writable by this user; fix its permissions"
        )
    stats = os.statvfs(path)
    free = stats.f_bavail * stats.f_frsize
    if free < needed_nbytes:
        raise SwapPathError(
            key,
            path,
            f"the filesystem of {path!r} has {free:,} bytes ({free / GIB:.2f} GiB) free but the "
            f"swap files need {needed_nbytes:,} ({needed_nbytes / GIB:.2f} GiB); free space, "
            "name a larger disk, or offload less to nvme",
        )


def remove_stale_swap_directories(directory: str | os.PathLike) -> list[str]:
    """Remove the swap directories that dead processes of this host left in ``directory``;
    return their names. Other hosts' directories (on a shared filesystem) are left alone."""
    removed = []
    host = socket.gethostname()
    for entry in os.scandir(directory):
        match = _RUN_DIRECTORY.match(entry.name)
        if not (match and entry.is_dir() and match["host"] == host):
            continue
        if not _process_alive(int(match["pid"])):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.name)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True
