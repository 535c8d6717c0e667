"""The ``fzero`` command: DeepSpeed's launcher flags, run by torch's elastic launcher.

``fzero --num_gpus=4 train.py --deepspeed ds_config.json`` does what ``deepspeed`` does on one
node: one process per GPU, each told its rank through torchrun's variables (``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and, unless
``--no_local_rank``, a ``--local_rank=N`` argument. The processes are started, watched and
stopped by ``torch.distributed.run`` (what ``torchrun`` is); this module only translates flags.

Several nodes: fzero never logs into other hosts (DeepSpeed's pdsh/MPI runners). Run the same
``fzero`` command on every node with ``--node_rank`` (DeepSpeed's ``--no_ssh`` mode): with
``--hostfile`` the node count, this node's slots and the master address come from the file;
without it give ``--num_nodes`` and ``--master_addr``. ``--elastic_training`` maps to torchrun's
``--nnodes MIN:MAX`` with the c10d rendezvous at ``--master_addr:--master_port``.

Without a GPU, ``--num_gpus`` is refused (there is nothing to count); ``--num_procs N`` starts N
processes that train on the CPU over gloo (``--num_procs`` also works with GPUs, one per process).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NamedTuple

from fzero.errors import LauncherError
from fzero.integrations.resources import LOCAL_HOSTS, Pool, filter_pool, read_hostfile

logger = logging.getLogger("fzero.launcher")

DEFAULT_MASTER_PORT = 29500
# DeepSpeed launcher flags that have no torchrun counterpart, with what to do instead.
REFUSED_FLAGS = {
    "launcher": "fzero starts local processes through torchrun only; on a cluster run `fzero` "
    "on every node with --node_rank (or use srun/mpirun to start torchrun yourself)",
    "launcher_args": "there is no multi-node runner to pass arguments to; see --launcher",
    "force_multi": "fzero never logs into hosts; run `fzero --node_rank R` on each node",
    "no_ssh_check": "fzero never uses ssh, so there is nothing to check; drop the flag",
    "ssh_port": "fzero never uses ssh; run `fzero --node_rank R` on each node",
    "venv_script": "activate the environment before running `fzero` on each node",
    "save_pid": "torchrun's agent is the process to watch: `fzero` runs it in its own process",
    "autotuning": "fzero has no autotuner; `python -m fzero.schedule` prints and simulates "
    "a schedule for a config instead",
    "bind_cores_to_rank": "bind with `numactl` around `fzero`, or torchrun's --numa-binding",
    "bind_core_list": "bind with `numactl` around `fzero`, or torchrun's --numa-binding",
}

# Those of them that DeepSpeed defines as switches (the others take a value).
_REFUSED_SWITCHES = ("force_multi", "no_ssh_check", "save_pid", "bind_cores_to_rank")


class LaunchPlan(NamedTuple):
    """What ``main`` runs: torchrun's argument list and the variables to set first."""

    torchrun_args: list[str]
    environment: dict[str, str]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fzero",
        description="Launch a training script on this node's GPUs (or CPU processes) with "
        "DeepSpeed's launcher flags, through torch.distributed.run.",
    )
    add = parser.add_argument
    add("-H", "--hostfile", default=None, help="MPI-style hostfile: one 'HOST slots=N' a line")
    add("-i", "--include", default="", help="resources to use: HOST[:SLOT,SLOT][@HOST...]")
    add("-e", "--exclude", default="", help="resources not to use (same format as --include)")
    add("--num_nodes", type=int, default=-1, help="number of nodes (the hostfile's first N)")
    add("--num_gpus", "--num_accelerators", type=int, default=-1, help="GPUs per node, ids 0..N-1")
    add("--num_procs", type=int, default=-1, help="processes per node (on CPU: gloo processes)")
    add("--node_rank", type=int, default=-1, help="this node's index, 0..num_nodes-1")
    add("--master_addr", default="", help="address of node 0 (default: this host, one node)")
    add("--master_port", type=int, default=DEFAULT_MASTER_PORT, help="port on node 0")
    add("--no_ssh", action="store_true", help="accepted: fzero always runs this node only")
    add("--elastic_training", action="store_true", help="elastic node count (c10d rendezvous)")
    add("--min_elastic_nodes", type=int, default=-1)
    add("--max_elastic_nodes", type=int, default=-1)
    add("--module", action="store_true", help="run the script as a module (python -m)")
    add("--no_python", action="store_true", help="run the script as an executable")
    add("--no_local_rank", action="store_true", help="do not pass --local_rank=N to the script")
    add("--enable_each_rank_log", default=None, help="directory for one log file per rank")
    add("--log_level", default="info", choices=["debug", "info", "warning", "error", "critical"])
    add("-q", "--quiet", action="store_true", help="the same as --log_level error")
    for name in REFUSED_FLAGS:
        if name in _REFUSED_SWITCHES:
            add(f"--{name}", default=None, action="store_const", const=True, help=argparse.SUPPRESS)
        else:
            add(f"--{name}", default=None, help=argparse.SUPPRESS)
    add("user_script", help="the training script, followed by its own arguments")
    add("user_args", nargs=argparse.REMAINDER)
    return parser


def plan_launch(
    args: argparse.Namespace, *, cuda_device_count: int, environ: dict[str, str]
) -> LaunchPlan:
    """Translate parsed ``fzero`` flags into torchrun's (pure: no process is started)."""
    for name, instead in REFUSED_FLAGS.items():
        if getattr(args, name) is not None:
            raise LauncherError(f"--{name} is DeepSpeed-launcher only: {instead}")
    if args.num_gpus >= 0 and args.num_procs >= 0:
        raise LauncherError("give --num_gpus or --num_procs, not both")
    if (args.num_gpus >= 0 or args.num_nodes >= 0) and (args.include or args.exclude):
        raise LauncherError(
            "--num_gpus/--num_nodes cannot be combined with --include/--exclude (as in "
            "DeepSpeed): name the devices with --include, or count them with --num_gpus"
        )
    if args.no_python and not args.no_local_rank:
        raise LauncherError(
            "--no_python runs an executable that cannot be handed a per-rank --local_rank: add "
            "--no_local_rank (the program reads LOCAL_RANK from its environment)"
        )
    if args.module and args.no_python:
        raise LauncherError("--module and --no_python cannot be combined")
    environment: dict[str, str] = {}
    pool = _pool(args, cuda_device_count)
    hosts = list(pool)
    if args.num_nodes >= 0:
        if args.num_nodes < 1:
            raise LauncherError(f"--num_nodes must be >= 1, got {args.num_nodes}")
        if args.hostfile is not None:
            if args.num_nodes > len(hosts):
                raise LauncherError(
                    f"--num_nodes {args.num_nodes} but --hostfile {args.hostfile} lists "
                    f"{len(hosts)} hosts"
                )
            hosts = hosts[: args.num_nodes]
    num_nodes = args.num_nodes if args.hostfile is None and args.num_nodes >= 1 else len(hosts)
    if num_nodes > 1 and args.node_rank < 0:
        raise LauncherError(
            f"{num_nodes} nodes but no --node_rank: fzero never logs into other hosts; run the "
            "same `fzero` command on every node with --node_rank 0..N-1 (DeepSpeed's --no_ssh "
            "mode), or start torchrun on each node with your cluster's launcher"
        )
    if args.node_rank >= max(num_nodes, 1):
        raise LauncherError(f"--node_rank {args.node_rank} but there are {num_nodes} node(s)")
    node_rank = max(args.node_rank, 0)
    this_host = hosts[node_rank] if args.hostfile is not None else hosts[0]
    slots = pool[this_host]
    if cuda_device_count > 0:
        if args.num_gpus >= 0 or args.num_procs >= 0:
            count = max(args.num_gpus, args.num_procs)
            if count < 1 or count > len(slots):
                raise LauncherError(
                    f"--num_gpus {count}: this node has {len(slots)} GPU slot(s) "
                    f"(CUDA devices visible: {cuda_device_count})"
                )
            slots = slots[:count]
        if slots != list(range(cuda_device_count)):
            environment["CUDA_VISIBLE_DEVICES"] = _visible_devices(slots, environ)
        processes = len(slots)
    else:
        processes = len(slots) if args.num_procs < 0 else args.num_procs
        if processes < 1:
            raise LauncherError(f"--num_procs must be >= 1, got {args.num_procs}")
    master_addr = args.master_addr or (this_host if args.hostfile is None else hosts[0])
    if num_nodes > 1 and not args.master_addr and args.hostfile is None:
        raise LauncherError(
            f"--num_nodes {num_nodes} needs --master_addr (the address of node 0) on every node"
        )
    if master_addr == "localhost":
        master_addr = "127.0.0.1"
    torchrun = [f"--nproc-per-node={processes}"]
    if args.elastic_training:
        low = args.min_elastic_nodes if args.min_elastic_nodes > 0 else 1
        high = args.max_elastic_nodes if args.max_elastic_nodes > 0 else num_nodes
        if low > high:
            raise LauncherError(f"--min_elastic_nodes {low} > --max_elastic_nodes {high}")
        torchrun += [
            f"--nnodes={low}:{high}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={master_addr}:{args.master_port}",
        ]
    else:
        if args.min_elastic_nodes > 0 or args.max_elastic_nodes > 0:
            raise LauncherError("--min/max_elastic_nodes need --elastic_training")
        torchrun += [
            f"--nnodes={num_nodes}",
            f"--node-rank={node_rank}",
            f"--master-addr={master_addr}",
            f"--master-port={args.master_port}",
        ]
    if args.enable_each_rank_log:
        torchrun += [f"--log-dir={args.enable_each_rank_log}", "--redirects=3"]
    if args.no_python:
        torchrun += ["--no-python", args.user_script]
    elif args.no_local_rank:
        torchrun += (["--module"] if args.module else []) + [args.user_script]
    else:
        # A tiny module appends --local_rank=$LOCAL_RANK in each process, as DeepSpeed does.
        torchrun += ["--module", "fzero.integrations.local_rank"]
        torchrun += (["--module"] if args.module else []) + [args.user_script]
    return LaunchPlan(torchrun + list(args.user_args), environment)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fzero`` console script."""
    import torch

    args = build_parser().parse_args(argv)
    level = "error" if args.quiet else args.log_level
    logging.basicConfig(format="[fzero] %(message)s", level=level.upper())
    try:
        plan = plan_launch(
            args,
            cuda_device_count=torch.cuda.device_count() if torch.cuda.is_available() else 0,
            environ=dict(os.environ),
        )
    except LauncherError as error:
        print(f"fzero: error: {error}", file=sys.stderr)
        return 2
    os.environ.update(plan.environment)
    shown = "".join(f"{name}={value} " for name, value in plan.environment.items())
    logger.info("running: %storchrun %s", shown, " ".join(plan.torchrun_args))
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(plan.torchrun_args)
    except ChildFailedError:
        return 1  # torchrun has printed which rank failed and why
    return 0


# -- helpers ------------------------------------------------------------------------------------


def _pool(args: argparse.Namespace, cuda_device_count: int) -> Pool:
    if args.hostfile is not None:
        pool = read_hostfile(args.hostfile)
    elif cuda_device_count > 0:
        pool = {"localhost": list(range(cuda_device_count))}
    else:
        if args.num_gpus >= 0:
            raise LauncherError(
                f"--num_gpus {args.num_gpus}: no CUDA device is visible; use --num_procs "
                f"{max(args.num_gpus, 1)} to run that many CPU processes over gloo"
            )
        if args.include or args.exclude:
            raise LauncherError(
                "--include/--exclude name GPU slots but no CUDA device is visible; use "
                "--num_procs N for CPU processes"
            )
        return {"localhost": [0]}
    if not (args.include or args.exclude):
        return pool
    if args.hostfile is None:
        # Without a hostfile the pool is this machine; DeepSpeed calls it localhost.
        for spec in (args.include or args.exclude).split("@"):
            host = spec.partition(":")[0]
            if host not in LOCAL_HOSTS:
                raise LauncherError(
                    f"{'--include' if args.include else '--exclude'}: host {host!r} needs a "
                    "--hostfile that lists it; without one the only host is 'localhost'"
                )
        text = (args.include or args.exclude).replace("127.0.0.1", "localhost")
        return filter_pool(pool, text if args.include else "", text if args.exclude else "")
    return filter_pool(pool, args.include, args.exclude)


def _visible_devices(slots: list[int], environ: dict[str, str]) -> str:
    """Slot numbers as ``CUDA_VISIBLE_DEVICES``; slots index an existing mask when one is set."""
    existing = environ.get("CUDA_VISIBLE_DEVICES")
    if existing:
        visible = [device.strip() for device in existing.split(",") if device.strip()]
        return ",".join(visible[slot] for slot in slots if slot < len(visible))
    return ",".join(str(slot) for slot in slots)


if __name__ == "__main__":
    sys.exit(main())
