"""The cost model's offload terms: PCIe copies, the CPU AdamW step and swap-file I/O."""

from __future__ import annotations

import pytest

from fzero.schedule import CostModel


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
