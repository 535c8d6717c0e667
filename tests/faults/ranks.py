"""Fault tests' ranks: fresh gloo processes for one test that may kill, stall or wreck them.

``run_ranks(world_size, fn, *args, timeout_s=)`` starts ``world_size`` processes in one gloo
group, runs ``fn(rank, world_size, *args)`` on each and returns, per rank, what came back: the
value, the exception (type name and message) or nothing (the rank died or stalled past
``timeout_s``). The parent bounds the whole run and kills every process it started at the end,
so a test that would hang fails in time instead.
"""

from __future__ import annotations

import os
import queue
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch.multiprocessing as mp

from tests.gloo_pool import _free_port


@dataclass
class Outcome:
    value: Any = None
    error_type: str | None = None  # the exception's class name, None when fn returned
    message: str = ""
    error_bases: tuple[str, ...] = ()  # names of its classes (its MRO), to check what it is
    elapsed_s: float = 0.0


def _worker(rank: int, world_size: int, port: int, fn, args, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    start = time.monotonic()
    try:
        outcome = Outcome(value=fn(rank, world_size, *args))
    except BaseException as error:  # noqa: BLE001 - reported to the test process
        outcome = Outcome(
            error_type=type(error).__name__,
            message=f"{error}\n{traceback.format_exc()}",
            error_bases=tuple(c.__name__ for c in type(error).__mro__),
        )
    outcome.elapsed_s = time.monotonic() - start
    results.put((rank, outcome))
    # Leave without tearing the group down: peers may still be stuck in it.
    time.sleep(0.5)
    os._exit(0)


def run_ranks(
    world_size: int,
    fn,
    *args: Any,
    timeout_s: float = 60.0,
    wait_for: tuple[int, ...] | None = None,
) -> list[Outcome | None]:
    """``wait_for``: the ranks whose outcome the test needs (default: all); the others are
    killed once those answered."""
    needed = range(world_size) if wait_for is None else wait_for
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, daemon=True, args=(r, world_size, port, fn, args, results))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outcomes: list[Outcome | None] = [None] * world_size
    deadline = time.monotonic() + timeout_s
    try:
        while any(outcomes[r] is None for r in needed) and time.monotonic() < deadline:
            try:
                rank, outcome = results.get(timeout=0.2)
                outcomes[rank] = outcome
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)
    return outcomes
