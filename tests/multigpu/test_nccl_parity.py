"""Parity across processes (torchrun): one per GPU on NCCL, skipped where fewer than 2 GPUs
exist; and the same worker on gloo CPU ranks, which runs everywhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.skipif(GPUS < 2, reason=f"needs 2 or more CUDA GPUs, found {GPUS}")
@pytest.mark.parametrize("world_size", sorted({n for n in (2, 4, 8) if n <= GPUS}))
def test_every_stage_matches_reference_on_nccl(world_size):
    worker = Path(__file__).with_name("nccl_worker.py")
    # NVLink multicast stays off: it can take a shared host's GPUs out of service.
    env = dict(
        os.environ,
        NCCL_NVLS_ENABLE="0",
        TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
        NVSHMEM_DISABLE_NVLS="1",
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={world_size}",
            str(worker),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


@pytest.mark.parametrize("world_size", [2, 3])
def test_the_parity_worker_passes_on_gloo_cpu_ranks(world_size):
    """The same worker, one process per CPU rank over gloo (CUDA hidden), so it runs in CI:
    the multi-GPU test exercises no code that only a multi-GPU machine has ever run."""
    worker = Path(__file__).with_name("nccl_worker.py")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc_per_node={world_size}", str(worker)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert f"parity on {world_size} ranks (cpu): 0 failures" in result.stdout
