"""The step watchdog: a thread per rank that notices a stall and says where every rank is.

The executor keeps this rank's position in an ``OpPosition`` (integer stores only). The
watchdog thread samples it every ``poll_s``; when it has not moved for a quarter of
``fzero.step_timeout_s`` (a healthy step never sits that long at one op), it posts the position
to the process group's store (``StoreChannel``), once per stall. So when a rank gives up waiting
at an op (gloo: its wait times out; a peer's connection closes), the others' positions are
there to read, the stalled rank's included, whether it waits at an op or computes outside one.

``report`` builds the message of a ``StepTimeoutError`` or ``RankLostError``: this rank's op
and wait, each other rank's last post (or that it posted none), and the ranks that are not at
this rank's op. Nothing here runs on the hot path; a healthy step costs the thread one tuple
compare per poll.

Over NCCL a collective's wait only orders streams: the host runs on to the step's one host
read (the skip flag, ``train.apply_step``) and would block there, untimed, until the process
group's timeout. ``wait_for_device`` is that wait with the step timeout: the executor calls it
at the end of the step phase, while the position still says where the step is.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from fzero.errors import StepTimeoutError
from fzero.runtime.position import OpPosition, position_text, same_op

logger = logging.getLogger("fzero")


class Watchdog:
    def __init__(self, position: OpPosition, channel: Any, rank: int, timeout_s: float):
        self.position = position
        self.channel = channel  # a StoreChannel, or None: then only this rank's side is known
        self.rank = rank
        self.timeout_s = timeout_s
        self.post_after_s = timeout_s / 4
        self.poll_s = min(1.0, timeout_s / 20)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="fzero-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        last, since, posted, logged = None, time.monotonic(), False, False
        while not self._stop.wait(self.poll_s):
            snapshot, now = self.position.snapshot(), time.monotonic()
            if snapshot != last or not snapshot[0]:
                last, since, posted, logged = snapshot, now, False, False
                continue
            stalled_s = now - since
            if stalled_s >= self.post_after_s and not posted:
                posted = self.post(stalled_s)
            # Gloo's own wait raises at the timeout and the executor reports. Where the host is
            # not blocked in a timed wait (NCCL, or a collective outside fzero's ops), the
            # report goes to the log before the process group's longer timeout ends the run.
            if stalled_s >= self.timeout_s + 5 * self.poll_s and not logged:
                logged = True
                logger.error("fzero: %s", self.report("stalled", stalled_s, grace_s=0.0))

    def wait_for_device(self, tensor: torch.Tensor | None, world_size: int) -> None:
        """Wait until the device has computed ``tensor`` (the step's skip flag, which the host
        reads next), raising ``StepTimeoutError`` past the step timeout. A no-op off CUDA, where
        the step's collectives were waited for, timed, by the host."""
        if tensor is None or not tensor.is_cuda:
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(tensor.device))
        self.wait_until(event.query, world_size)

    def wait_until(self, ready: Callable[[], bool], world_size: int) -> None:
        """Poll ``ready`` until it is true; past ``timeout_s``, raise ``StepTimeoutError``
        saying where every rank is. Between polls the thread yields the interpreter lock and
        nothing else (as CUDA's own synchronisation spins), so a healthy step's read is not
        delayed."""
        start = time.monotonic()
        while not ready():
            waited_s = time.monotonic() - start
            if waited_s >= self.timeout_s:
                where = self.report("timed out", waited_s, world_size, min(2.0, self.post_after_s))
                raise StepTimeoutError(
                    f"the device did not finish the step within fzero.step_timeout_s "
                    f"({self.timeout_s:g} s): {where}\nOver NCCL a collective's wait does not "
                    "block the host, so a rank that did not arrive shows here, at the step's "
                    "host read: it is stalled (a hang in its data loading, its model code, or "
                    "another collective) or gone; its traceback shows where. The collective is "
                    "still pending on the device, so the process group cannot be used again: "
                    "restart the job from the last checkpoint. Raise fzero.step_timeout_s if a "
                    "step legitimately takes this long."
                )
            time.sleep(0)

    def post(self, waiting_s: float) -> bool:
        """Post this rank's position and how long it has waited there; False if it could not."""
        if self.channel is None:
            return False
        where = self.position.describe()
        where.update(waiting_s=round(waiting_s, 1), posted_at=time.time())
        try:
            self.channel.post(self.rank, json.dumps(where))
        except Exception:  # noqa: BLE001 - the store may be gone with rank 0; report without it
            return False
        return True

    def report(self, what: str, waiting_s: float, world_size: int = 0, grace_s: float = 0.0) -> str:
        """Where every rank is, as text: this rank's position (it has ``waiting_s`` at it), each
        other rank's last post (waiting ``grace_s`` for posts of this step to appear), and the
        ranks not at this rank's op."""
        self.post(waiting_s)
        mine = self.position.describe()
        lines = [f"rank {self.rank} {what} at {position_text(mine)} after {waiting_s:.1f} s"]
        world_size = world_size or 1
        others = [r for r in range(world_size) if r != self.rank]
        posts = self._read(others, mine, grace_s)
        absent = []
        for rank in others:
            where = posts.get(rank)
            if where is None:
                lines.append(
                    f"rank {rank}: no report (gone, unreachable, or not stalled long enough "
                    "to post)"
                )
                absent.append(rank)
                continue
            waited = where.get("waiting_s", 0.0) + max(0.0, time.time() - where["posted_at"])
            lines.append(f"rank {rank}: at {position_text(where)}, {waited:.1f} s there")
            if not same_op(where, mine):
                absent.append(rank)
        if self.channel is None:
            lines.append("(no side channel: other ranks' positions are unknown)")
        elif absent and mine["op"] is not None:
            lines.append(f"ranks that did not arrive at rank {self.rank}'s op: {absent}")
        return "\n  ".join(lines)

    def _read(self, ranks: list[int], mine: dict[str, Any], grace_s: float) -> dict[int, dict]:
        """Each rank's latest post of this step, waiting up to ``grace_s`` for missing ones."""
        posts: dict[int, dict] = {}
        if self.channel is None:
            return posts
        deadline = time.monotonic() + grace_s
        while True:
            for rank in ranks:
                try:
                    text = self.channel.read(rank)
                except Exception:  # noqa: BLE001 - a store that went away reads as no post
                    text = None
                if text is not None:
                    where = json.loads(text)
                    if where.get("step") == mine["step"]:
                        posts[rank] = where
            if len(posts) == len(ranks) or time.monotonic() >= deadline:
                return posts
            time.sleep(0.05)
