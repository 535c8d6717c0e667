"""A pool of real gloo processes, started once and reused for many test cases.

Each worker joins a gloo process group, then runs tasks sent to it: a task is a picklable
callable ``fn(rank, world_size, *args)``; its result (or error text) comes back per rank.
Starting processes costs seconds, so tests share one pool per world size for the session.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from typing import Any

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, tasks, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            results.put((rank, True, fn(rank, world_size, *args)))
        except BaseException:  # noqa: BLE001 - reported to the test process
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class GlooPool:
    def __init__(self, world_size: int):
        self.world_size = world_size
        ctx = mp.get_context("spawn")
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        port = _free_port()
        self.procs = [
            ctx.Process(
                target=_worker, daemon=True, args=(r, world_size, port, self.tasks[r], self.results)
            )
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()

    def run(self, fn, *args: Any, timeout_s: float = 120.0) -> list[Any]:
        """Run ``fn(rank, world_size, *args)`` on every rank; results in rank order. A rank's
        exception is raised here as a RuntimeError carrying its traceback."""
        for q in self.tasks:
            q.put((fn, args))
        out: list[Any] = [None] * self.world_size
        failures = []
        deadline = time.monotonic() + timeout_s
        for _ in range(self.world_size):
            while True:
                try:
                    rank, ok, value = self.results.get(timeout=1.0)
                    break
                except queue.Empty:
                    dead = [(r, p.exitcode) for r, p in enumerate(self.procs) if not p.is_alive()]
                    if dead:
                        self.close()
                        raise RuntimeError(f"gloo worker (rank, exit code) {dead} died") from None
                    if time.monotonic() > deadline:
                        self.close()
                        raise TimeoutError(
                            f"gloo workers did not answer within {timeout_s} s"
                        ) from None
            if ok:
                out[rank] = value
            else:
                failures.append((rank, value))
        if failures:
            rank, text = min(failures)
            raise RuntimeError(f"rank {rank} failed:\n{text}")
        return out

    def close(self) -> None:
        for q in self.tasks:
            q.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
