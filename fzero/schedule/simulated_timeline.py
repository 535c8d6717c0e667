"""What ``simulate`` returns: a ``Timeline`` of ``Span``s on each stream and ``MemorySample``s.

The report of one simulated optimizer step, in seconds from the step's start and bytes of this
rank: every piece of work on every stream, the memory after every op, and the totals that
compare schedules (step time, compute, exposed communication, peak memory). ``print`` gives the
summary, ``to_chrome_trace`` the Chrome/Perfetto trace (``trace_export.py``). The measured
counterpart, recorded on the device, is ``fzero.runtime.timeline.MeasuredTimeline``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """One piece of work on one stream, in seconds from the start of the step.

    ``category``: compute, collective, wait (compute blocked on a collective) or op (a
    bookkeeping op that takes no time). ``micro_batch`` is -1 in the step phase.
    """

    name: str
    stream: str
    category: str
    start: float
    end: float
    micro_batch: int

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class MemorySample:
    """This rank's bytes at ``time``, by what holds them.

    ``parameters``: full (gathered) parameter buffers; below stage 3 they are always there.
    ``gradients``: unit gradient buffers plus the gradient shard while it is alive.
    ``persistent_shards``: the ``MemoryModel``'s compute-dtype parameter shard (in fzero only
    stage 3's frozen parameters keep one: trainable ones are gathered from the master).
    """

    time: float
    parameters: int
    gradients: int
    optimizer_state: int
    persistent_shards: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state + self.persistent_shards


@dataclass(frozen=True)
class Timeline:
    """What ``simulate`` returns: every span, the memory after every op, and the totals."""

    stage: int
    world_size: int
    micro_batches: int
    spans: tuple[Span, ...]
    memory: tuple[MemorySample, ...]  # memory[0] is before the first op
    step_seconds: float
    compute_seconds: float  # forward, backward and optimizer, excluding waits
    exposed_communication_seconds: float  # compute blocked in waits

    @property
    def peak_memory(self) -> MemorySample:
        """The sample with the most bytes (the first, on ties)."""
        return max(self.memory, key=lambda sample: sample.total)

    def to_chrome_trace(self) -> dict:
        """Chrome/Perfetto JSON: one thread per stream, memory as counters."""
        from fzero.schedule.trace_export import chrome_trace

        return chrome_trace(self)

    def __str__(self) -> str:
        peak = self.peak_memory
        gib = 1 << 30
        return (
            f"Timeline: ZeRO stage {self.stage}, world size {self.world_size}, "
            f"{self.micro_batches} micro-batch(es)\n"
            f"  step {self.step_seconds * 1e3:.3f} ms, compute {self.compute_seconds * 1e3:.3f} "
            f"ms, exposed communication {self.exposed_communication_seconds * 1e3:.3f} ms\n"
            f"  peak memory {peak.total / gib:.3f} GiB at {peak.time * 1e3:.3f} ms: parameters "
            f"{peak.parameters / gib:.3f}, gradients {peak.gradients / gib:.3f}, optimizer state "
            f"{peak.optimizer_state / gib:.3f}, persistent shards "
            f"{peak.persistent_shards / gib:.3f} GiB"
        )
