"""fzero reads its rank from every launcher's variables, and refuses accelerate's one-process
launch of a several-process job instead of training as one rank."""

from __future__ import annotations

import pytest

from fzero.collectives.launch_env import LaunchEnvironment, read_launch_environment
from fzero.errors import LauncherError

MASTER = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, None),
        (
            {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", **MASTER},
            LaunchEnvironment(3, 4, 1, "torchrun"),
        ),
        (
            {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", **MASTER},
            LaunchEnvironment(1, 2, 0, "Open MPI"),
        ),
        (
            {"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1", **MASTER},
            LaunchEnvironment(5, 8, 1, "MPICH / Intel MPI"),
        ),
        (
            {"MV2_COMM_WORLD_RANK": "0", "MV2_COMM_WORLD_SIZE": "1"},
            LaunchEnvironment(0, 1, 0, "MVAPICH"),
        ),
    ],
)
def test_launchers_variables(environ, expected):
    assert read_launch_environment(environ) == expected


def test_mpi_without_master_address_is_refused():
    with pytest.raises(LauncherError, match="Open MPI.*MASTER_ADDR and MASTER_PORT is not set"):
        read_launch_environment({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"})


def test_accelerate_single_process_for_several_is_refused():
    environ = {"ACCELERATE_MIXED_PRECISION": "no", **MASTER}
    with pytest.raises(LauncherError, match="accelerate launch --multi_gpu --num_processes N"):
        read_launch_environment(environ)
    # accelerate with one process sets no MASTER_ADDR: that is a plain single-process run.
    assert read_launch_environment({"ACCELERATE_MIXED_PRECISION": "no"}) is None


def test_bad_values():
    with pytest.raises(LauncherError, match="RANK=4 and WORLD_SIZE=4"):
        read_launch_environment({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(LauncherError, match="'two' is not an integer"):
        read_launch_environment({"RANK": "0", "WORLD_SIZE": "two"})
