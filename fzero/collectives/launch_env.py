"""Which rank this process is, read from the variables the launchers set.

- torchrun, the ``fzero`` launcher, ``accelerate launch --multi_gpu`` (torchrun underneath) and
  DeepSpeed's ``deepspeed`` launcher: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
  ``MASTER_PORT``.
- ``mpirun`` (how ``accelerate launch`` starts several CPU processes with an MPI hostfile, and
  one of DeepSpeed's multi-node runners): Open MPI's ``OMPI_COMM_WORLD_*``, MPICH / Intel MPI's
  ``PMI_RANK`` / ``PMI_SIZE`` / ``MPI_LOCALRANKID``, MVAPICH's ``MV2_COMM_WORLD_*``. MPI does
  not say where rank 0 listens, so ``MASTER_ADDR`` / ``MASTER_PORT`` must be set (accelerate
  sets them).

``accelerate launch --num_processes N`` without ``--multi_gpu`` on a machine without GPUs starts
only one process (accelerate's "simple" launcher) and tells it nothing but ``MASTER_ADDR``;
training on would silently be one rank where N were asked for, so that case is an error naming
the fix. Pure: the functions read a mapping, they never touch the process group.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from fzero.errors import LauncherError

# (launcher, rank, world size, local rank) variable names, in the order they are tried.
_SOURCES = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("MVAPICH", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"),
    ("MPICH / Intel MPI", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
)
# accelerate's simple launcher sets these in every process it starts.
_ACCELERATE_MARKERS = ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND")


class LaunchEnvironment(NamedTuple):
    """This process's place in the job, and the launcher that said so."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str


def read_launch_environment(environ: Mapping[str, str]) -> LaunchEnvironment | None:
    """The rank the environment describes, or None when no launcher started this process."""
    for launcher, rank_name, size_name, local_name in _SOURCES:
        if rank_name not in environ or size_name not in environ:
            continue
        rank = _integer(environ, rank_name)
        world_size = _integer(environ, size_name)
        local_rank = _integer(environ, local_name) if local_name in environ else 0
        if world_size < 1 or not 0 <= rank < world_size:
            raise LauncherError(
                f"{rank_name}={rank} and {size_name}={world_size} do not describe a rank of a job"
            )
        if launcher != "torchrun" and world_size > 1:
            missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in environ]
            if missing:
                raise LauncherError(
                    f"started by {launcher} (rank {rank} of {world_size}) but "
                    f"{' and '.join(missing)} is not set: MPI does not say where rank 0 "
                    "listens; export MASTER_ADDR (the first host) and MASTER_PORT (a free "
                    "port) to every process"
                )
        return LaunchEnvironment(rank, world_size, local_rank, launcher)
    if "MASTER_ADDR" in environ and any(name in environ for name in _ACCELERATE_MARKERS):
        raise LauncherError(
            "accelerate launch started this script as a single process although several were "
            "asked for: without GPUs its default launcher runs one process (or uses mpirun with "
            "an MPI hostfile). Run `accelerate launch --multi_gpu --num_processes N script.py` "
            "(torchrun underneath, gloo on CPU), `fzero --num_procs N script.py`, or "
            "`torchrun --nproc-per-node N script.py`"
        )
    return None


def _integer(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise LauncherError(f"{name}={environ[name]!r} is not an integer") from None
