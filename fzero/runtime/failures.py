"""What a failure inside a step is, said as what it is: a lost rank, a timeout, a collective
error, or running out of memory, never the batch's fault.

``op_failure`` classifies an exception raised by an op's handler (the executor calls it on its
error path only); ``out_of_memory`` turns a ``torch.OutOfMemoryError`` anywhere in a step into
a ``StepOutOfMemoryError`` that says what the schedule predicted and what to change.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from fzero.config.validate import SUPPORTED_OFFLOAD_DEVICES
from fzero.errors import (
    CollectiveError,
    RankLostError,
    ScheduleError,
    StepOutOfMemoryError,
    StepTimeoutError,
)
from fzero.runtime.position import position_text
from fzero.schedule.memory_model import MemoryModel
from fzero.schedule.ops import _size

# How the backends word a peer that went away, and a wait that gave up (gloo, NCCL, c10d).
LOST_MARKERS = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "connection refused",
    "socket closed",
    "remote process exited",
    "nccl communicator was aborted",
)
TIMEOUT_MARKERS = ("timed out", "timeout")
BACKEND_MARKERS = ("gloo", "nccl", "c10d", "processgroup", "distbackenderror", "connection")

# How long a rank that saw a peer's connection close waits for the others to post where they
# are, before naming the ranks that did not as lost.
LOST_GRACE_S = 2.0


def op_failure(error: BaseException, executor: Any) -> BaseException:
    """The fzero error for ``error``, raised by the op at ``executor.position``; ``error``
    itself when it is none of fzero's business (a bug, an out-of-memory error, ...)."""
    if isinstance(error, (ScheduleError, CollectiveError, torch.OutOfMemoryError)):
        return error
    if not isinstance(error, RuntimeError):
        return error
    text = str(error)
    lowered = text.lower()
    watchdog, comm = executor.watchdog, executor.comm
    if any(marker in lowered for marker in LOST_MARKERS):
        grace = min(LOST_GRACE_S, watchdog.timeout_s / 4) if watchdog is not None else 0.0
        where = _where(executor, "lost a peer", 0.0, grace)
        return RankLostError(
            f"a collective failed because a peer went away: {where}\n  backend: "
            f"{_first_line(text)}\nThe process group cannot be used again: restart the job from "
            "the last checkpoint (and look at the lost rank's log for why it died)."
        )
    if any(marker in lowered for marker in TIMEOUT_MARKERS):
        waited = watchdog.timeout_s if watchdog is not None else 0.0
        where = _where(executor, "timed out", waited, 0.0)
        limit = f"fzero.step_timeout_s ({waited:g} s)" if watchdog else "the backend's timeout"
        return StepTimeoutError(
            f"a collective waited longer than {limit}: {where}\n"
            "A rank that did not arrive is stalled (a hang in its data loading, its model code, "
            "or another collective) or gone; its traceback shows where. Raise "
            "fzero.step_timeout_s if a step legitimately waits this long."
        )
    if comm.world_size > 1 and any(marker in lowered for marker in BACKEND_MARKERS):
        where = position_text(executor.position.describe())
        return CollectiveError(f"a collective failed at {where}: {_first_line(text)}")
    return error


def _where(executor: Any, what: str, waited_s: float, grace_s: float) -> str:
    watchdog = executor.watchdog
    if watchdog is None:
        return f"rank {executor.comm.rank} {what} at {position_text(executor.position.describe())}"
    return watchdog.report(what, waited_s, world_size=executor.comm.world_size, grace_s=grace_s)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


REMEDIES = (
    "1. a smaller micro-batch with more gradient_accumulation_steps (activations grow with the "
    "micro-batch; the optimizer step stays the same)",
    "2. activation checkpointing (torch.utils.checkpoint in the model's blocks, or "
    "gradient_checkpointing_enable() on a transformers model)",
)


def _offload_remedy(stage: int) -> str:
    """The guide's third remedy, as far as this build of fzero offers it."""
    if "cpu" in SUPPORTED_OFFLOAD_DEVICES:
        return (
            '3. offload: zero_optimization.offload_optimizer.device "cpu" (and at stage 3 '
            "offload_param)"
        )
    higher = "more ranks" if stage == 3 else "ZeRO stage 3 (parameters sharded too), more ranks"
    return (
        "3. offload (zero_optimization.offload_optimizer / offload_param) is not available in "
        f"fzero yet; what comes nearest: {higher}"
    )


# Reserved-but-free memory at the failure from which the message suggests expandable segments:
# below this a failed allocation is not the cache's fragmentation but memory that is not there.
FRAGMENTED_MIN_NBYTES = 256 << 20


def reserved_free_nbytes(device: torch.device) -> int:
    """Bytes the CUDA caching allocator holds reserved but not allocated on ``device`` (0 off
    CUDA). Read it in the ``except`` block before the micro-steps are aborted: the abort frees
    the failed micro-step's tensors into the cache, which would read as fragmentation."""
    if device.type != "cuda":
        return 0
    return torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _expandable_segments_on() -> bool:
    settings = ",".join(
        os.environ.get(name, "") for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
    )
    return "expandable_segments:true" in settings.replace(" ", "").lower()


def _fragmentation_remedy(reserved_free: int) -> str | None:
    """The allocator's own remedy when the failure left memory reserved but unusable."""
    if reserved_free < FRAGMENTED_MIN_NBYTES or _expandable_segments_on():
        return None
    return (
        f"  the CUDA caching allocator held {_size(reserved_free)} reserved but free, in blocks "
        "too small for the request (fragmentation): try "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True in the environment, set before the "
        "process's first CUDA allocation, so that segments grow in place, before the remedies below"
    )


def out_of_memory(
    runtime: Any, error: torch.OutOfMemoryError, where: str, reserved_free: int = 0
) -> StepOutOfMemoryError:
    """A ``StepOutOfMemoryError`` for ``error`` raised in ``where`` (``micro-batch 0``, ``the
    step phase``): the schedule's predicted peak of gathered parameters, the largest unit, the
    rank's standing optimizer state, and the remedies in the order the guide gives them, after
    the allocator's own when ``reserved_free`` (``reserved_free_nbytes`` at the failure) says
    the cache was fragmented."""
    schedule = runtime.plan.schedule
    largest = max(schedule.units, key=lambda u: u.param_nbytes, default=None)
    model = MemoryModel.from_schedule(schedule)
    lines = [
        f"out of device memory in {where} of the step ({_first_line(str(error))})",
        f"  the schedule (ZeRO stage {schedule.stage}, world size {schedule.world_size}) "
        f"predicts at most {_size(schedule.peak_live_nbytes)} of gathered parameters alive "
        "(schedule.peak_live_nbytes), besides the activations of one micro-batch",
    ]
    if largest is not None:
        lines.append(
            f"  largest unit: unit {largest.index} ({largest.name or '<root>'}), "
            f"{_size(largest.param_nbytes)} gathered, {_size(largest.grad_nbytes)} of gradients"
        )
    lines.append(
        f"  standing on this rank: {_size(model.optimizer_state_nbytes)} of optimizer state "
        "(fzero.memory.estimate_memory gives the whole model-state budget)"
    )
    fragmented = _fragmentation_remedy(reserved_free)
    if fragmented is not None:
        lines.append(fragmented)
    lines.append("  remedies, in order:")
    lines.extend(f"    {remedy}" for remedy in (*REMEDIES, _offload_remedy(schedule.stage)))
    lines.append("  The micro-steps were aborted: the state given to the step is still usable.")
    return StepOutOfMemoryError("\n".join(lines))
