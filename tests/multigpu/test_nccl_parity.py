"""NCCL parity, one process per GPU (torchrun). Skipped where fewer than 2 GPUs exist."""

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
