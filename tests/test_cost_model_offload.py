"""The cost model's offload terms: PCIe copies, the CPU AdamW step and swap-file I/O."""

from __future__ import annotations

import dataclasses

import pytest

import fzero
from fzero.schedule import CostModel, simulate
from fzero.schedule import ops as O
from tests.models import ToyLM, ToySpec, make_batches


def test_default_offload_costs_are_the_measured_rates():
    """53 GB/s each way over PCIe; 122 GB/s at 28 bytes per element for the CPU step, so the
    issue's 1.42B-parameter model steps in about 0.33 s on the CPU; the H200 machine's disk
    reads 1.5 and writes 1.9 GB/s."""
    cost = CostModel()
    assert cost.upload(53_000_000_000) == pytest.approx(1.0)
    assert cost.download(26_500_000_000) == pytest.approx(0.5)
    assert cost.cpu_optimizer(1_000_000_000) == pytest.approx(28 / 122)
    assert cost.cpu_optimizer(1_420_000_000) == pytest.approx(0.326, abs=0.001)
    assert cost.file_read(3_000_000_000) == pytest.approx(2.0)
    assert cost.file_write(3_800_000_000) == pytest.approx(2.0)


def test_offload_costs_follow_their_fields():
    cost = CostModel(
        host_to_device_bytes_per_second=10.0,
        device_to_host_bytes_per_second=5.0,
        cpu_optimizer_bytes_per_second=56.0,
        cpu_optimizer_bytes_per_element=14.0,
        file_read_bytes_per_second=2.0,
        file_write_bytes_per_second=4.0,
    )
    assert (cost.upload(30), cost.download(30)) == (3.0, 6.0)
    assert cost.cpu_optimizer(8) == 2.0
    assert (cost.file_read(8), cost.file_write(8)) == (4.0, 2.0)
    assert cost.optimizer(100) == CostModel().optimizer(100)  # the device step is unchanged


def _offloaded_schedule(in_forward: bool):
    """A stage-3 schedule with optimizer offload on one rank, after its first step traced it."""
    spec = ToySpec(depth=3, width=6)
    config = {
        "zero_optimization": {
            "stage": 3,
            "offload_optimizer": {"device": "cpu"},
            "stage3_param_persistence_threshold": 0,  # every unit gathered: updates deferred
            "stage3_prefetch_bucket_size": 0,  # gathered one unit ahead, as the benchmarks do
        },
        "fzero": {"offload_update_in_forward": in_forward},
    }
    state = fzero.shard(ToyLM(spec), config=config)
    state, _ = fzero.train_step(state, make_batches(spec, steps=1, world_size=1, micro=1)[0][0][0])
    return state.schedule


# Copies cost next to nothing; the largest unit's CPU step takes 1 s (rate set per test).
HOST_BOUND = CostModel(
    forward_seconds=lambda unit: 1.0,
    backward_seconds=lambda unit: 2.0,
    host_to_device_bytes_per_second=1e12,
    device_to_host_bytes_per_second=1e12,
    cpu_optimizer_bytes_per_element=1.0,
)


def test_cpu_steps_in_the_forward_overlap_the_device_work_issued_before_them():
    """The host thread steps unit k while the device runs the forward issued before: the
    simulated step is shorter than with the CPU steps in the step phase (where nothing is left
    on the device to overlap), and a host span overlaps a compute span in time."""
    in_forward, in_step = _offloaded_schedule(True), _offloaded_schedule(False)
    largest = max(u.optimizer_numel for u in in_forward.units)
    cost = dataclasses.replace(HOST_BOUND, cpu_optimizer_bytes_per_second=float(largest))
    overlapped, serial = simulate(in_forward, cost), simulate(in_step, cost)
    assert overlapped.step_seconds < serial.step_seconds
    host = [s for s in overlapped.spans if s.stream == O.HOST]
    compute = [s for s in overlapped.spans if s.stream == O.COMPUTE and s.category == "compute"]
    assert host and any(h.start < c.end and c.start < h.end for h in host for c in compute)
    # Nothing overlaps in the step phase: the host steps start after the device finished.
    last_compute = max(
        s.end for s in serial.spans if s.stream == O.COMPUTE and s.category == "compute"
    )
    assert all(s.start >= last_compute - 1e-12 for s in serial.spans if s.stream == O.HOST)
