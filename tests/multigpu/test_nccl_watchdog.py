"""The step watchdog across processes (torchrun): a rank that stalls inside a step gives the rank
waiting for it a ``StepTimeoutError`` after ``fzero.step_timeout_s``, naming the stalled rank
and where it is, instead of a wait for the process group's timeout. One process per GPU on NCCL,
skipped where fewer than 2 GPUs exist; and the same worker on gloo CPU ranks, which runs
everywhere (``tests/faults/test_watchdog.py`` covers the gloo cases in depth).

Over NCCL a collective's wait does not block the host: the waiting rank runs on to the step's
host read, where the watchdog's timed wait for the device raises. Over gloo it raises at the
first collective that needs the stalled rank. Either way the parent bounds the whole run and
ends every process it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.multigpu.stall_worker import STALL_S, STEP_TIMEOUT_S

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
WORKER = Path(__file__).with_name("stall_worker.py")
PARENT_TIMEOUT_S = 150.0  # start-up and one good step included; the stall alone is 20 s


def _run_stall(env: dict, out: Path) -> dict:
    """Start two ranks of the worker, wait (bounded) for rank 0's outcome, then end them all."""
    log = out.with_suffix(".log")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", str(WORKER), str(out)]
    with log.open("w") as sink:
        launcher = subprocess.Popen(
            command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + PARENT_TIMEOUT_S
        try:
            while not out.exists() and launcher.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            # The launcher leads a session of its own: its workers go with it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait(timeout=30)
    assert out.exists(), (
        f"rank 0 reported nothing within {PARENT_TIMEOUT_S} s:\n" + (log.read_text()[-4000:])
    )
    return json.loads(out.read_text())


def _check_step_timeout(outcome: dict) -> None:
    assert outcome["raised"] == "StepTimeoutError", outcome
    assert "TimeoutError" in outcome["bases"]  # catchable as the builtin too
    text = outcome["message"]
    assert "rank 0 timed out at step 1," in text, text
    # The stalled rank named, with its position: in block 1's forward, outside fzero's ops.
    assert "rank 1: at step 1, micro-batch 0, outside fzero's ops" in text, text
    assert "after @pre_forward(" in text, text
    # The step timeout, not the group's (a minute longer) nor the stall's end.
    assert STEP_TIMEOUT_S <= outcome["elapsed_s"] < STALL_S - 5, outcome["elapsed_s"]


@pytest.mark.skipif(GPUS < 2, reason=f"needs 2 or more CUDA GPUs, found {GPUS}")
def test_a_stalled_nccl_rank_gives_the_waiting_rank_a_step_timeout_naming_it(tmp_path):
    """Rank 1 sleeps in block 1's forward of step 1. Rank 0, whose collectives queue on the
    device without blocking the host, raises StepTimeoutError at the step's host read after
    ``step_timeout_s``: its own position (the step phase) and rank 1's, in the model's compute
    after a pre_forward trigger."""
    # NVLink multicast stays off: it can take a shared host's GPUs out of service.
    env = dict(
        os.environ,
        NCCL_NVLS_ENABLE="0",
        TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
        NVSHMEM_DISABLE_NVLS="1",
    )
    outcome = _run_stall(env, tmp_path / "rank0.json")
    assert outcome["backend"] == "cuda"
    _check_step_timeout(outcome)
    assert "rank 0 timed out at step 1, the step phase" in outcome["message"]
    assert "the device did not finish the step" in outcome["message"]


def test_the_stall_worker_gives_the_step_timeout_on_gloo_cpu_ranks(tmp_path):
    """The same worker on two gloo CPU ranks (CUDA hidden), so that it runs in CI: rank 0 times
    out at the first collective of micro-batch 0 that needs rank 1."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    outcome = _run_stall(env, tmp_path / "rank0.json")
    assert outcome["backend"] == "cpu"
    _check_step_timeout(outcome)
    assert "rank 0 timed out at step 1, micro-batch 0, @" in outcome["message"]
    assert "ranks that did not arrive at rank 0's op: [1]" in outcome["message"]
