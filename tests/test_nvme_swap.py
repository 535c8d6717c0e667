"""The NVMe swapper: byte-exact round trips with and without O_DIRECT, per-run files, cleanup of
its own and of dead processes' files, the checks of nvme_path, and a disk that fills (a real
1 MiB tmpfs) leaving the previous contents readable."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fzero.errors import ConfigError, SwapIOError, SwapPathError
from fzero.offload.aio import AioSettings, aligned_empty, check_swap_directory, swap_nbytes
from fzero.offload.swap import NvmeSwapper

KEY = "zero_optimization.offload_optimizer.nvme_path"
SMALL_BLOCKS = AioSettings(block_size=8192, queue_depth=3, thread_count=2)


def swapper(directory, **kwargs) -> NvmeSwapper:
    kwargs.setdefault("aio", SMALL_BLOCKS)
    return NvmeSwapper(directory, key=KEY, needed_nbytes=1 << 20, **kwargs)


def random_tensor(numel: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("direct_io", [True, False])
def test_round_trips_are_byte_exact_for_any_size_dtype_and_alignment(tmp_path, direct_io):
    """Sizes around the 4096-byte block and the 8192-byte request, empty ones, bf16, aligned
    host buffers read in place and tensors at odd addresses staged through 2 staging blocks."""
    swap = swapper(tmp_path, direct_io=direct_io, buffer_count=2)
    assert swap.direct == direct_io  # ext4 under tmp_path takes O_DIRECT
    cases = {}
    for index, (numel, dtype) in enumerate(
        [(0, torch.float32), (1, torch.float32), (1023, torch.float32), (1024, torch.float32),
         (2048, torch.float32), (5000, torch.bfloat16), (70_001, torch.float32)]
    ):  # fmt: skip
        aligned = aligned_empty(numel, dtype).copy_(random_tensor(numel, dtype, index))
        odd = torch.empty(numel + 1, dtype=dtype)[1:].copy_(aligned)  # 2 or 4 bytes off
        cases[f"aligned{index}"], cases[f"odd{index}"] = aligned, odd
    handles = [swap.write(name, tensor) for name, tensor in cases.items()]
    for handle in handles:
        handle.wait()
        assert handle.done() and handle.kind == "write"
    reads = {}
    for name, tensor in cases.items():
        target = aligned_empty(tensor.numel(), tensor.dtype) if "odd" in name else (
            torch.empty(tensor.numel() + 1, dtype=tensor.dtype)[1:])  # fmt: skip
        reads[name] = (swap.read(name, target), target)
    for name, (handle, target) in reads.items():
        handle.wait()
        assert torch.equal(target.view(torch.uint8), cases[name].view(torch.uint8)), name
        assert swap.nbytes(name) == cases[name].numel() * cases[name].element_size()
    swap.close()


def test_each_run_has_its_own_directory_and_removes_it_on_close(tmp_path):
    first, second = swapper(tmp_path), swapper(tmp_path)
    assert first.directory != second.directory
    for index, swap in enumerate((first, second)):
        swap.write("master", torch.full((100,), float(index))).wait()
    target = torch.empty(100)
    first.read("master", target).wait()
    assert torch.equal(target, torch.zeros(100))
    first.close()
    assert not first.directory.exists() and second.directory.exists()
    first.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        first.write("master", target)
    second.close()
    assert list(tmp_path.iterdir()) == []


def test_normal_exit_removes_the_files_and_the_next_start_removes_a_dead_runs(tmp_path):
    """A process that exits normally leaves nothing; one killed leaves its directory, which the
    next swapper on this host removes. A live process's and another host's are kept."""
    script = (
        "import sys, os; from fzero.offload.swap import NvmeSwapper; import torch\n"
        "s = NvmeSwapper(sys.argv[1], key='k', needed_nbytes=0)\n"
        "s.write('x', torch.ones(10)).wait(); print(s.directory, flush=True)\n"
        "if sys.argv[2] == 'kill': os._exit(0)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    runs = {}
    for how in ("exit", "kill"):
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path), how], env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        runs[how] = Path(done.stdout.strip())
    assert not runs["exit"].exists() and (runs["kill"] / "x").exists()
    host = socket.gethostname()
    live = tmp_path / f"fzero-swap-{host}-p{os.getpid()}-r0-abcd"
    other_host = tmp_path / f"fzero-swap-{host}x-p{2**22 + 1}-r0-abcd"
    live.mkdir(), other_host.mkdir()
    swap = swapper(tmp_path)
    assert swap.removed_stale == [runs["kill"].name]
    assert not runs["kill"].exists() and live.exists() and other_host.exists()
    swap.close()


def test_bad_nvme_paths_name_the_key_and_the_path(tmp_path):
    with pytest.raises(SwapPathError, match=f"{KEY}: .*does not exist") as raised:
        check_swap_directory(KEY, tmp_path / "missing", 0)
    assert isinstance(raised.value, ConfigError) and raised.value.path == KEY
    (tmp_path / "file").write_text("")
    with pytest.raises(SwapPathError, match="is not a directory"):
        check_swap_directory(KEY, tmp_path / "file", 0)
    with pytest.raises(SwapPathError, match="is empty"):
        check_swap_directory(KEY, "", 0)
    stats = os.statvfs(tmp_path)
    free = stats.f_bavail * stats.f_frsize
    with pytest.raises(SwapPathError, match=f"{free:,} bytes .* need {2 * free:,}"):
        NvmeSwapper(tmp_path, key=KEY, needed_nbytes=2 * free)
    assert swap_nbytes([1, 4096, 10_000], writes_in_flight=1) == 4096 + 4096 + 12288 + 12288


def test_aio_settings_are_validated_by_key():
    assert AioSettings.from_config(None) == AioSettings()
    settings = AioSettings.from_config({"thread_count": 2, "queue_depth": 4, "single_submit": True})
    assert settings.requests_in_flight == 8
    assert AioSettings(intra_op_parallelism=3, queue_depth=2).requests_in_flight == 6
    for block, key in [
        ({"block_size": 1000}, "aio.block_size"),
        ({"queue_depth": 0}, "aio.queue_depth"),
        ({"use_gds": True}, "aio.use_gds"),
        ({"io_backend": "uring"}, "aio.io_backend"),
        ({"depth": 1}, "aio.depth"),
    ]:
        with pytest.raises(ConfigError, match=key):
            AioSettings.from_config(block)  # fmt: skip


def test_misuse_is_refused(tmp_path):
    swap = swapper(tmp_path)
    with pytest.raises(KeyError, match="no complete write"):
        swap.read("never", torch.empty(4))
    swap.write("a", torch.ones(4)).wait()
    with pytest.raises(ValueError, match="holds 16 bytes, the tensor 20"):
        swap.read("a", torch.empty(5))
    with pytest.raises(ValueError, match="contiguous host"):
        swap.write("b", torch.ones(4, 2).t())
    with pytest.raises(ValueError, match="plain file names"):
        swap.write("../escape", torch.ones(4))
    big = torch.ones(1 << 20)
    handle = swap.write("big", big)
    if not handle.done():
        with pytest.raises(RuntimeError, match="still in flight"):
            swap.write("big", big)
    handle.wait()
    swap.close()


def test_a_failed_read_raises_on_wait(tmp_path):
    swap = swapper(tmp_path, direct_io=False)
    swap.write("a", torch.ones(10_000)).wait()
    os.truncate(swap.directory / "a", 100)  # the file lost its data behind the swapper's back
    handle = swap.read("a", torch.empty(10_000))
    with pytest.raises(SwapIOError, match="swap read of 'a'"):
        handle.wait()
    swap.close()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 1 MiB tmpfs (needs the right to mount; skipped without it)."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_a_disk_that_fills_fails_the_write_and_keeps_the_previous_contents(small_tmpfs):
    swap = NvmeSwapper(small_tmpfs, key=KEY, needed_nbytes=600_000, aio=SMALL_BLOCKS)
    first = random_tensor(150_000, torch.float32, 0)  # 600 KB of the 1 MiB
    swap.write("master", first).wait()
    with pytest.raises(SwapIOError, match="'master'.*disk is full.*previous contents are intact"):
        swap.write("master", random_tensor(150_000, torch.float32, 1))
    target = torch.empty(150_000)
    swap.read("master", target).wait()
    assert torch.equal(target, first)
    assert sorted(p.name for p in swap.directory.iterdir()) == ["master"]  # no partial file
    swap.close()
    with pytest.raises(SwapPathError, match="need 2,000,000"):
        NvmeSwapper(small_tmpfs, key=KEY, needed_nbytes=2_000_000)
