"""Leave a benchmark row only so much host memory: a separate process holds the rest.

``--gpu-memory-gib`` caps the CUDA allocator to stand in for a smaller card; this is the
host's counterpart, for rows that must show what fits in less host memory than the machine
has (NVMe offload training a model whose CPU offload does not fit). The holder allocates
anonymous memory until ``MemAvailable`` (``/proc/meminfo``) is down to the memory left, touching
every page so that it is resident, and keeps it until its standard input closes. It asks the
kernel to spare it when memory runs out (``oom_score_adj`` -1000, where it may), so that a row
that needs more than it was left fails instead of the holder being killed; the parent checks
that the holder is still alive after the row all the same (``HostCap.check``), and a row
measured after the holder died is reported as such, not as a capped row.

    python benchmarks/host_cap.py --leave-gib 40     # holds all but 40 GiB until stdin closes
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fzero.offload.host import read_host_memory  # noqa: E402

GIB = 1 << 30
CHUNK = 256 << 20  # allocated and touched a chunk at a time, so MemAvailable is re-read often


def mem_available() -> int:
    """What fzero's shard-time host check reads as available (``MemAvailable``, bounded by the
    cgroup's limit), in bytes."""
    return read_host_memory().available_nbytes


class HostCap:
    """The holder process for one row: ``with HostCap(leave_gib) as cap:`` starts it and waits
    until it holds its memory; ``cap.report`` says what it held and what was left."""

    def __init__(self, leave_gib: float):
        self.leave_gib = leave_gib
        self.process: subprocess.Popen | None = None
        self.report: dict = {}

    def __enter__(self) -> HostCap:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--leave-gib", str(self.leave_gib)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.process.stdout.readline()
        if not line.startswith("HELD "):
            self.process.kill()
            raise RuntimeError(f"the host memory holder did not start: {line!r}")
        held, left, spared = line.split()[1:]
        self.report = {
            "host_cap_gib": self.leave_gib,
            "host_held_gib": int(held) / GIB,
            "host_available_gib": int(left) / GIB,  # MemAvailable when the row started
            "host_holder_spared": spared == "1",  # oom_score_adj -1000 took
        }
        return self

    def check(self) -> str | None:
        """None while the holder lives; otherwise why the row did not run under the cap."""
        if self.process is None or self.process.poll() is None:
            return None
        return (
            f"the host memory holder exited (status {self.process.returncode}) during the row, "
            "so the row did not run under the cap (the kernel's OOM killer may have chosen it)"
        )

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.stdin.close()
            self.process.wait(timeout=120)


def hold(leave_nbytes: int) -> list:
    """Allocate and touch memory until MemAvailable is at most ``leave_nbytes``."""
    import torch

    chunks = []
    while (gap := mem_available() - leave_nbytes) > 0:
        chunks.append(torch.ones(min(CHUNK, gap), dtype=torch.uint8))  # ones: every page touched
    return chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--leave-gib", type=float, required=True)
    args = parser.parse_args()
    try:  # the kernel's OOM killer should take the row, not the holder
        Path("/proc/self/oom_score_adj").write_text("-1000")
        spared = 1
    except OSError:
        spared = 0
    chunks = hold(int(args.leave_gib * GIB))
    held = sum(c.numel() for c in chunks)
    print(f"HELD {held} {mem_available()} {spared}", flush=True)
    sys.stdin.read()  # until the parent closes it


if __name__ == "__main__":
    main()
