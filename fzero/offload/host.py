"""Host residence of shards: flat buffers in (pinned) host memory, and the host-memory check.

``HostBuffer`` is one flat tensor in host memory. Pinned (page-locked) memory is what lets a
copy to or from the device run asynchronously on a copy stream at full PCIe speed, so offload
asks for it when ``pin_memory`` is set. It is pinned in place with ``cudaHostRegister`` rather
than allocated by torch's pinned allocator, which rounds every block up to a power of two (a
5 GiB shard would hold 8 GiB). Where pinning fails (no CUDA, a locked-memory limit, the driver
refusing), the buffer stays pageable and one ``PinnedMemoryWarning`` says so per process.

``check_host_memory`` runs at ``shard`` time: the bytes an offload will hold on this host
against ``MemAvailable`` of ``/proc/meminfo`` and the cgroup's memory limit (v1 or v2), raising
``HostMemoryError`` with both numbers instead of an out-of-memory kill mid-run.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from fzero.errors import HostMemoryError, PinnedMemoryWarning
from fzero.offload.aio import aligned_empty

GIB = 1 << 30
HOST_REMEDY = (
    'Offload to "nvme" instead, offload less (offload_optimizer.ratio), or shard over more hosts.'
)
# cgroup v1 writes "no limit" as a page-aligned value near 2**63.
_UNLIMITED_NBYTES = 1 << 60

_pinning_warned = False


class HostMemory(NamedTuple):
    """What this process may still allocate on the host, and where each bound comes from."""

    available_nbytes: int  # the smaller of the two below
    meminfo_available_nbytes: int  # MemAvailable of /proc/meminfo
    cgroup_available_nbytes: int | None  # cgroup limit minus usage; None without a limit


def read_host_memory(root: str | Path = "/") -> HostMemory:
    """Read the host's available memory (``root`` is ``/`` except in tests)."""
    root = Path(root)
    meminfo = _meminfo_available(root / "proc" / "meminfo")
    cgroup = _cgroup_available(root)
    available = meminfo if cgroup is None else min(meminfo, cgroup)
    return HostMemory(available, meminfo, cgroup)


def _meminfo_available(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            value, unit = line.split()[1:3]
            return int(value) * (1024 if unit == "kB" else 1)
    raise RuntimeError(f"{path} has no MemAvailable line (Linux 3.14 or later has one)")


def _cgroup_available(root: Path) -> int | None:
    """Limit minus usage of this process's memory cgroup, or None where there is no limit."""
    try:
        entries = (root / "proc" / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    candidates: list[tuple[Path, str, str]] = []
    for entry in entries:
        _, controllers, relative = entry.split(":", 2)
        relative = relative.lstrip("/")
        if controllers == "":  # cgroup v2: one unified hierarchy
            for base in (root / "sys/fs/cgroup" / relative, root / "sys/fs/cgroup"):
                candidates.append((base, "memory.max", "memory.current"))
        elif "memory" in controllers.split(","):
            for base in (root / "sys/fs/cgroup/memory" / relative, root / "sys/fs/cgroup/memory"):
                candidates.append((base, "memory.limit_in_bytes", "memory.usage_in_bytes"))
    for base, limit_name, usage_name in candidates:
        try:
            limit_text = (base / limit_name).read_text().strip()
            usage = int((base / usage_name).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_text == "max" or int(limit_text) >= _UNLIMITED_NBYTES:
            return None
        return max(int(limit_text) - usage, 0)
    return None


def releasable_nbytes(tensors: list[torch.Tensor]) -> int:
    """Host bytes that go free when ``tensors`` (a model's parameters, which ``shard`` points
    into its own buffers) let go of their storages: each storage counted once, and only when
    nothing but these tensors holds it. A storage some other tensor or object still holds (a
    ``param.data`` kept by the caller, autograd's saved tensors, a tied copy outside the list)
    stays allocated, so it is not counted; neither is anything where this torch cannot say how
    many hold a storage."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return 0
    storages: dict[int, list] = {}  # data pointer -> [storage, tensors of the list on it]
    for tensor in tensors:
        if tensor.device.type != "cpu":
            continue
        storage = tensor.untyped_storage()
        storages.setdefault(storage.data_ptr(), [storage, 0])[1] += 1
    # A storage's count is one per tensor on it and one for its Python object, held here.
    return sum(
        storage.nbytes()
        for storage, holders in storages.values()
        if use_count(storage._cdata) <= holders + 1
    )


def check_host_memory(
    needed_nbytes: int,
    what: str,
    *,
    ranks_on_host: int = 1,
    memory: HostMemory | None = None,
    remedy: str = HOST_REMEDY,
    released_nbytes: int = 0,
    later_nbytes: int = 0,
) -> None:
    """Raise ``HostMemoryError`` unless ``ranks_on_host`` ranks each holding ``needed_nbytes``
    fit in the host's available memory. ``what`` says what the bytes are for (it starts the
    message, e.g. ``"offload_optimizer (fp32 master weights and moments of 1.4e9 elements)"``);
    ``remedy`` ends it.

    ``released_nbytes``: host memory each rank's ``shard`` frees before it allocates the last
    ``later_nbytes`` of ``needed_nbytes`` (the model's own host parameters, moved into fzero's
    buffers unit by unit): the whole must fit in what is available plus what is released, and
    the part allocated before the release (``needed_nbytes - later_nbytes``) in what is
    available alone.
    """
    memory = read_host_memory() if memory is None else memory
    total = needed_nbytes * ranks_on_host
    released = min(released_nbytes, needed_nbytes) * ranks_on_host
    before = (needed_nbytes - later_nbytes) * ranks_on_host
    available = memory.available_nbytes
    if total <= available + released and before <= available:
        return
    per_rank = f" ({ranks_on_host} ranks on this host, {needed_nbytes:,} each)"
    cgroup = (
        f", cgroup limit leaves {memory.cgroup_available_nbytes:,}"
        if memory.cgroup_available_nbytes is not None
        else ""
    )
    if released and total <= available + released:  # the whole fits; its first part does not
        shortfall = (
            f"{before:,} bytes ({before / GIB:.2f} GiB) of them are allocated while the model's "
            f"parameters still hold their {released:,} bytes ({released / GIB:.2f} GiB), and "
            f"only {available:,} bytes ({available / GIB:.2f} GiB) are available"
        )
    else:
        credit = (
            f" beside the {released:,} bytes ({released / GIB:.2f} GiB) of the model's host "
            "parameters that shard releases"
            if released
            else ""
        )
        shortfall = f"only {available:,} bytes ({available / GIB:.2f} GiB) are available{credit}"
    raise HostMemoryError(
        f"{what} needs {total:,} bytes ({total / GIB:.2f} GiB) of host memory"
        f"{per_rank if ranks_on_host > 1 else ''}, but {shortfall} (MemAvailable "
        f"{memory.meminfo_available_nbytes:,}{cgroup}). {remedy}",
        needed_nbytes=total,
        available_nbytes=available,
        released_nbytes=released,
    )


class HostBuffer:
    """One flat host tensor of ``numel`` elements of ``dtype``, pinned in place when asked and
    possible. ``tensor`` is the buffer; ``pinned`` says whether the device can copy it
    asynchronously. ``close()`` unpins it (also done when the object is collected); the tensor
    stays valid, pageable, for as long as something holds it."""

    _registered_pointer: int | None = None  # set once pinned; read by __del__ even after a failure

    def __init__(self, numel: int, dtype: torch.dtype, *, pin_memory: bool):
        if numel < 0:
            raise ValueError(f"a host buffer cannot have numel {numel}")
        # 4096-aligned, so the NVMe swapper can read and write it with direct I/O in place.
        self.tensor = aligned_empty(numel, dtype)
        self.nbytes = numel * self.tensor.element_size()
        self.pinned = bool(pin_memory) and self.nbytes > 0 and _register(self.tensor)
        self._registered_pointer = self.tensor.data_ptr() if self.pinned else None

    def close(self) -> None:
        if self._registered_pointer is not None:
            torch.cuda.cudart().cudaHostUnregister(self._registered_pointer)
            self._registered_pointer = None
            self.pinned = False

    def __del__(self) -> None:
        # At interpreter exit CUDA may already be torn down, and then there is nothing to free.
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        kind = "pinned" if self.pinned else "pageable"
        return f"HostBuffer({self.tensor.numel():,} x {self.tensor.dtype}, {kind})"


def _register(tensor: torch.Tensor) -> bool:
    """Page-lock ``tensor``'s memory for the device; False (and one warning) where that fails."""
    reason = None
    if not torch.cuda.is_available():
        reason = "CUDA is not available"
    else:
        try:
            # 0: cudaHostRegisterDefault. Returns a cudaError; 0 is success.
            error = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), _nbytes(tensor), 0)
            if int(error) == 0:
                return True
            reason = f"cudaHostRegister returned {error}"
        except RuntimeError as exception:
            reason = f"cudaHostRegister raised {exception}"
    _warn_pageable(reason)
    return False


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _warn_pageable(reason: str) -> None:
    global _pinning_warned
    if _pinning_warned:
        return
    _pinning_warned = True
    warnings.warn(
        f"pin_memory is set but host buffers cannot be pinned ({reason}); they stay pageable, "
        "so host-device copies are synchronous and slower. Set pin_memory to false to silence "
        "this, or raise the locked-memory limit (ulimit -l).",
        PinnedMemoryWarning,
        stacklevel=3,
    )
