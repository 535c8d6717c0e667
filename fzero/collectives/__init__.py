"""Collectives: the only package that talks to ``torch.distributed``."""

from __future__ import annotations

from typing import Any

from fzero.collectives.base import (
    Communicator,
    DoneWork,
    SingleProcess,
    Work,
    wait_all_unless_failed,
)
from fzero.collectives.fake import FakeWorld
from fzero.collectives.threads import ThreadCommunicator, ThreadGroup, run_ranks
from fzero.collectives.torch_dist import (
    ProcessGroupCommunicator,
    init_from_env,
    is_process_group,
    join_from_env,
    shutdown,
)

__all__ = [
    "Communicator",
    "DoneWork",
    "FakeWorld",
    "ProcessGroupCommunicator",
    "SingleProcess",
    "ThreadCommunicator",
    "ThreadGroup",
    "Work",
    "make_communicator",
    "init_from_env",
    "join_from_env",
    "run_ranks",
    "shutdown",
    "wait_all_unless_failed",
]


def make_communicator(process_group: Any = None) -> Communicator:
    """A communicator for ``process_group``: a torch ProcessGroup, an fzero communicator, or
    None: the default process group, joined first when a launcher started this process as one
    of several ranks (``init_from_env``); world size 1 when the process runs alone."""
    if process_group is None:
        return join_from_env() or SingleProcess()
    if is_process_group(process_group):
        return ProcessGroupCommunicator(process_group)
    if all(hasattr(process_group, name) for name in ("all_gather", "reduce_scatter", "rank")):
        return process_group
    raise TypeError(
        f"process_group must be a torch.distributed ProcessGroup, an fzero communicator or None, "
        f"got {type(process_group).__name__}"
    )
