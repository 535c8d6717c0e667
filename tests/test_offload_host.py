"""Host residence: the host-memory check (real /proc and cgroup files, and fakes of each
layout) and host buffers that fall back to pageable memory with one warning."""

from __future__ import annotations

import warnings

import pytest
import torch

from fzero.errors import HostMemoryError, PinnedMemoryWarning, ShardError
from fzero.offload import host
from fzero.offload.host import HostBuffer, HostMemory, check_host_memory, read_host_memory


def fake_root(tmp_path, available_kb: int, cgroup: str | None, files: dict[str, str]):
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/meminfo").write_text(
        f"MemTotal:       99999999 kB\nMemFree:  1 kB\nMemAvailable:   {available_kb} kB\n"
    )
    if cgroup is not None:
        (tmp_path / "proc/self/cgroup").write_text(cgroup)
    for relative, text in files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    return tmp_path


def test_meminfo_alone_when_no_cgroup_limits(tmp_path):
    root = fake_root(tmp_path, 1000, None, {})
    assert read_host_memory(root) == HostMemory(1000 * 1024, 1000 * 1024, None)


@pytest.mark.parametrize(
    ("cgroup", "files", "cgroup_available"),
    [
        ("0::/job\n", {"sys/fs/cgroup/job/memory.max": "600000\n",
                       "sys/fs/cgroup/job/memory.current": "100000\n"}, 500000),
        ("0::/job\n", {"sys/fs/cgroup/job/memory.max": "max\n",
                       "sys/fs/cgroup/job/memory.current": "5\n"}, None),
        ("4:memory:/job\n", {"sys/fs/cgroup/memory/job/memory.limit_in_bytes": "700000",
                             "sys/fs/cgroup/memory/job/memory.usage_in_bytes": "200000"}, 500000),
        # Inside a cgroup namespace the process's own cgroup is the root of the mount.
        ("4:memory:/elsewhere\n", {"sys/fs/cgroup/memory/memory.limit_in_bytes": "400000",
                                   "sys/fs/cgroup/memory/memory.usage_in_bytes": "0"}, 400000),
        ("4:memory:/job\n", {"sys/fs/cgroup/memory/job/memory.limit_in_bytes": str(2**63 - 4096),
                             "sys/fs/cgroup/memory/job/memory.usage_in_bytes": "1"}, None),
    ],
)  # fmt: skip
def test_cgroup_limit_minus_usage_bounds_the_available_memory(
    tmp_path, cgroup, files, cgroup_available
):
    root = fake_root(tmp_path, 1000, cgroup, files)
    memory = read_host_memory(root)
    assert memory.cgroup_available_nbytes == cgroup_available
    assert memory.available_nbytes == min(1024_000, cgroup_available or 1024_000)


def test_this_machine_reports_some_available_memory():
    memory = read_host_memory()
    assert 0 < memory.available_nbytes <= memory.meminfo_available_nbytes


def test_too_little_host_memory_raises_with_needed_and_available_bytes():
    memory = HostMemory(10_000, 10_000, 12_000)
    check_host_memory(10_000, "offload_optimizer", memory=memory)
    with pytest.raises(HostMemoryError) as raised:
        check_host_memory(6_000, "offload_optimizer (master and moments)", ranks_on_host=2,
                          memory=memory)  # fmt: skip
    error = raised.value
    assert isinstance(error, ShardError) and isinstance(error, ValueError)
    assert (error.needed_nbytes, error.available_nbytes) == (12_000, 10_000)
    text = str(error)
    assert "offload_optimizer (master and moments) needs 12,000 bytes" in text
    assert "2 ranks on this host, 6,000 each" in text and "only 10,000 bytes" in text
    assert "cgroup limit leaves 12,000" in text and 'Offload to "nvme"' in text


def test_what_the_model_releases_counts_only_for_what_is_allocated_after_it():
    """A host model sharded onto an accelerator frees its parameters before the gradient copy
    and the moments are allocated: the whole must fit in available plus released, the part
    allocated before the release in available alone; each refusal says which."""
    memory = HostMemory(10_000, 10_000, None)
    # 16,000 needed, 9,000 of it after the release of 7,000: fits (16,000 <= 17,000; 7,000).
    check_host_memory(16_000, "x", memory=memory, released_nbytes=7_000, later_nbytes=9_000)
    with pytest.raises(HostMemoryError) as raised:  # the whole does not fit: 18,000 > 17,000
        check_host_memory(18_000, "x", memory=memory, released_nbytes=7_000, later_nbytes=9_000)
    error = raised.value
    assert (error.needed_nbytes, error.available_nbytes, error.released_nbytes) == (
        18_000,
        10_000,
        7_000,
    )
    assert "only 10,000 bytes" in str(error) and "beside the 7,000 bytes" in str(error)
    assert "of the model's host parameters that shard releases" in str(error)
    with pytest.raises(HostMemoryError) as raised:  # the first 11,000 do not fit beside it
        check_host_memory(16_000, "x", memory=memory, released_nbytes=7_000, later_nbytes=5_000)
    text = str(raised.value)
    assert "11,000 bytes" in text and "while the model's parameters still hold their 7,000" in text
    # Without a release the check is the plain one, whatever comes later.
    with pytest.raises(HostMemoryError, match="only 10,000 bytes .* are available \\(MemAvail"):
        check_host_memory(16_000, "x", memory=memory, later_nbytes=9_000)
    # Two ranks on the host, each releasing its own model copy.
    check_host_memory(
        8_000, "x", ranks_on_host=2, memory=memory, released_nbytes=3_000, later_nbytes=5_000
    )


def test_releasable_bytes_count_storages_only_the_parameters_hold():
    """Each storage once (two parameters viewing one buffer); a storage something else holds
    (a kept ``.data``, a tensor on it) is not freed by the move, so it does not count; nor does
    a parameter off the host."""
    from fzero.offload.host import releasable_nbytes

    alone = torch.nn.Parameter(torch.zeros(100))
    buffer = torch.zeros(60)
    left, right = torch.nn.Parameter(buffer[:30]), torch.nn.Parameter(buffer[30:])
    del buffer
    assert releasable_nbytes([alone]) == 400
    assert releasable_nbytes([alone, left, right]) == 400 + 240
    assert releasable_nbytes([left]) == 0  # ``right`` holds the storage too
    kept = alone.data
    assert releasable_nbytes([alone, left, right]) == 240
    del kept
    assert releasable_nbytes([alone]) == 400
    assert releasable_nbytes([torch.nn.Parameter(torch.zeros(8, device="meta"))]) == 0


def test_host_buffers_are_aligned_and_fall_back_to_pageable_with_one_warning(monkeypatch):
    monkeypatch.setattr(host, "_pinning_warned", False)
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: pinning succeeds (tests/gpu covers it)")
    with pytest.warns(PinnedMemoryWarning, match="cannot be pinned") as caught:
        first = HostBuffer(1000, torch.float32, pin_memory=True)
        second = HostBuffer(3, torch.bfloat16, pin_memory=True)
    assert len(caught) == 1
    for buffer in (first, second):
        assert not buffer.pinned and not buffer.tensor.is_pinned()
        assert buffer.tensor.data_ptr() % 4096 == 0
        assert "pageable" in repr(buffer)
    assert first.tensor.shape == (1000,) and first.nbytes == 4000
    assert second.tensor.dtype == torch.bfloat16 and second.nbytes == 6
    first.tensor.fill_(1.5)
    first.close()
    assert float(first.tensor.sum()) == 1500.0  # still valid memory after close
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HostBuffer(10, torch.float32, pin_memory=False)  # not asked: no warning
    with pytest.raises(ValueError, match="numel -1"):
        HostBuffer(-1, torch.float32, pin_memory=False)
