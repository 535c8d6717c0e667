"""The simulator's cost model: how long compute, collectives, copies and the CPU step take.

Separate from ``simulate.py`` so that calibrating it (``benchmarks/timeline.py``) and replaying
a schedule against it read as two things. Times are seconds; sizes bytes unless the name says
``numel``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from fzero.schedule.schedule import UnitInfo

UnitSeconds = Mapping[int | str, float] | Callable[[UnitInfo], float] | None


@dataclass(frozen=True)
class CostModel:
    """How long things take, in seconds.

    ``forward_seconds``/``backward_seconds``: per unit, a mapping (unit index or name to
    seconds) or a function of ``UnitInfo``; units they leave out cost ``2 * numel * tokens``
    FLOPs forward and twice that backward (once, for input gradients only, when frozen) at
    ``flops_per_second``. Collectives cost ``latency_seconds`` per ring hop plus bytes over
    ``bandwidth_bytes_per_second`` (per-rank link bandwidth). The optimizer streams
    ``optimizer_bytes_per_element`` (master, moments, gradient, parameter) per shard element
    at ``optimizer_bytes_per_second``.

    Offload: copies between host and device run at ``host_to_device_bytes_per_second`` and
    ``device_to_host_bytes_per_second`` (PCIe 5 x16 moves about 53 GB/s each way, measured on
    the H200), the CPU AdamW step streams ``cpu_optimizer_bytes_per_element`` per element at
    ``cpu_optimizer_bytes_per_second`` (torch's fused CPU AdamW, 16 cores: 122 GB/s at 28 B per
    element), and swap files are read and written at ``file_read_bytes_per_second`` and
    ``file_write_bytes_per_second`` (the H200 machine's disk with direct I/O: 1.5 and 1.9
    GB/s; calibrate them for another with ``benchmarks/nvme_swap.py``).
    """

    forward_seconds: UnitSeconds = None
    backward_seconds: UnitSeconds = None
    flops_per_second: float = 100e12
    tokens_per_micro_batch: int = 4096
    bandwidth_bytes_per_second: float = 100e9
    latency_seconds: float = 10e-6
    optimizer_bytes_per_second: float = 1e12
    optimizer_bytes_per_element: float = 30.0
    host_to_device_bytes_per_second: float = 53e9
    device_to_host_bytes_per_second: float = 53e9
    cpu_optimizer_bytes_per_second: float = 122e9
    cpu_optimizer_bytes_per_element: float = 28.0
    file_read_bytes_per_second: float = 1.5e9
    file_write_bytes_per_second: float = 1.9e9

    def forward(self, unit: UnitInfo) -> float:
        default = 2.0 * unit.numel * self.tokens_per_micro_batch / self.flops_per_second
        return _lookup(self.forward_seconds, unit, default)

    def backward(self, unit: UnitInfo) -> float:
        factor = 2.0 if unit.has_trainable else 1.0
        return _lookup(self.backward_seconds, unit, factor * self.forward(unit))

    def all_gather(self, nbytes: int, world_size: int) -> float:
        """Ring all-gather of a ``nbytes`` output buffer."""
        hops = world_size - 1
        return (
            hops * self.latency_seconds
            + hops / world_size * nbytes / self.bandwidth_bytes_per_second
        )

    def reduce_scatter(self, nbytes: int, world_size: int) -> float:
        """Ring reduce-scatter of a ``nbytes`` input buffer: the all-gather's mirror image."""
        return self.all_gather(nbytes, world_size)

    def all_reduce(self, nbytes: int, world_size: int) -> float:
        """Ring all-reduce: a reduce-scatter followed by an all-gather."""
        return 2 * self.all_gather(nbytes, world_size)

    def optimizer(self, shard_numel: int) -> float:
        return shard_numel * self.optimizer_bytes_per_element / self.optimizer_bytes_per_second

    def upload(self, nbytes: int) -> float:
        """A host-to-device copy of ``nbytes`` (pinned host memory)."""
        return nbytes / self.host_to_device_bytes_per_second

    def download(self, nbytes: int) -> float:
        """A device-to-host copy of ``nbytes`` (pinned host memory)."""
        return nbytes / self.device_to_host_bytes_per_second

    def cpu_optimizer(self, shard_numel: int) -> float:
        """The CPU AdamW step over ``shard_numel`` elements of a host shard."""
        return (
            shard_numel * self.cpu_optimizer_bytes_per_element / self.cpu_optimizer_bytes_per_second
        )

    def host_cast(self, numel: int, nbytes: int) -> float:
        """Writing ``numel`` updated fp32 master elements into ``nbytes`` of a compute-dtype
        host shard (parameter offload): one more pass at the CPU step's bandwidth."""
        return (4 * numel + nbytes) / self.cpu_optimizer_bytes_per_second

    def file_read(self, nbytes: int) -> float:
        return nbytes / self.file_read_bytes_per_second

    def file_write(self, nbytes: int) -> float:
        return nbytes / self.file_write_bytes_per_second


def _lookup(table: UnitSeconds, unit: UnitInfo, default: float) -> float:
    if table is None:
        return default
    if callable(table):
        return float(table(unit))
    for key in (unit.index, unit.name):
        if key in table:
            return float(table[key])
    return default
