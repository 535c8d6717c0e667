"""The ``fzero`` launcher's flags become torchrun's as DeepSpeed's launcher means them; what
cannot be mapped is refused with the flag's name and what to do instead. Pure: no process."""

from __future__ import annotations

import argparse

import pytest

from fzero.errors import ConfigError, LauncherError
from fzero.integrations.arguments import add_config_arguments, config_path_from_args
from fzero.integrations.launcher import build_parser, plan_launch


def _plan(command: str, cuda: int = 4, environ: dict[str, str] | None = None):
    args = build_parser().parse_args(command.split())
    return plan_launch(args, cuda_device_count=cuda, environ=environ or {})


def test_guide_command_one_process_per_gpu():
    plan = _plan("--num_gpus=4 train.py --deepspeed ds_config.json")
    assert plan.torchrun_args == [
        "--nproc-per-node=4",
        "--nnodes=1",
        "--node-rank=0",
        "--master-addr=127.0.0.1",
        "--master-port=29500",
        "--module",
        "fzero.integrations.local_rank",
        "train.py",
        "--deepspeed",
        "ds_config.json",
    ]
    assert plan.environment == {}


def test_fewer_gpus_and_include_set_visible_devices():
    assert _plan("--num_gpus 2 t.py").environment == {"CUDA_VISIBLE_DEVICES": "0,1"}
    plan = _plan("--include localhost:1,3 t.py")
    assert plan.environment == {"CUDA_VISIBLE_DEVICES": "1,3"}
    assert plan.torchrun_args[0] == "--nproc-per-node=2"
    assert _plan("--exclude localhost:0 t.py").environment == {"CUDA_VISIBLE_DEVICES": "1,2,3"}
    # Slots index the devices already visible, as CUDA numbers them inside the mask.
    masked = _plan("--include localhost:1 t.py", environ={"CUDA_VISIBLE_DEVICES": "4,6,7,9"})
    assert masked.environment == {"CUDA_VISIBLE_DEVICES": "6"}


def test_script_flags():
    assert _plan("--no_local_rank t.py -x").torchrun_args[-2:] == ["t.py", "-x"]
    module = _plan("--module pkg.train --lr 1").torchrun_args
    assert module[-5:] == ["fzero.integrations.local_rank", "--module", "pkg.train", "--lr", "1"]
    assert _plan("--no_python --no_local_rank ./run.sh").torchrun_args[-2:] == [
        "--no-python",
        "./run.sh",
    ]
    logs = _plan("--enable_each_rank_log /tmp/logs t.py").torchrun_args
    assert "--log-dir=/tmp/logs" in logs and "--redirects=3" in logs


def test_multi_node_with_hostfile(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nworker-0 slots=8\nworker-1 slots=4\n")
    plan = _plan(f"--hostfile {hostfile} --node_rank 1 t.py", cuda=4)
    assert plan.torchrun_args[:5] == [
        "--nproc-per-node=4",
        "--nnodes=2",
        "--node-rank=1",
        "--master-addr=worker-0",
        "--master-port=29500",
    ]
    with pytest.raises(LauncherError, match="no --node_rank.*every node"):
        _plan(f"--hostfile {hostfile} t.py")
    first = _plan(f"--hostfile {hostfile} --num_nodes 1 t.py", cuda=8)
    assert first.torchrun_args[:2] == ["--nproc-per-node=8", "--nnodes=1"]


def test_multi_node_without_hostfile_and_elastic():
    plan = _plan("--num_nodes 2 --node_rank 0 --master_addr 10.0.0.1 --master_port 7000 t.py")
    assert plan.torchrun_args[1:5] == [
        "--nnodes=2",
        "--node-rank=0",
        "--master-addr=10.0.0.1",
        "--master-port=7000",
    ]
    with pytest.raises(LauncherError, match="needs --master_addr"):
        _plan("--num_nodes 2 --node_rank 1 t.py")
    elastic = _plan(
        "--elastic_training --min_elastic_nodes 1 --max_elastic_nodes 3 --num_nodes 3 "
        "--node_rank 0 --master_addr 10.0.0.1 t.py"
    )
    assert elastic.torchrun_args[1:4] == [
        "--nnodes=1:3",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=10.0.0.1:29500",
    ]


def test_cpu_processes():
    assert _plan("--num_procs 2 t.py", cuda=0).torchrun_args[0] == "--nproc-per-node=2"
    assert _plan("t.py", cuda=0).torchrun_args[0] == "--nproc-per-node=1"
    with pytest.raises(LauncherError, match="no CUDA device.*--num_procs 2"):
        _plan("--num_gpus 2 t.py", cuda=0)


@pytest.mark.parametrize(
    "command, message",
    [
        ("--launcher openmpi t.py", "--launcher is DeepSpeed-launcher only"),
        ("--ssh_port 22 t.py", "--ssh_port is DeepSpeed-launcher only"),
        ("--autotuning tune t.py", "--autotuning is DeepSpeed-launcher only"),
        ("--bind_cores_to_rank t.py", "numactl"),
        ("--num_gpus 2 --num_procs 2 t.py", "not both"),
        ("--num_gpus 2 --include localhost:0 t.py", "cannot be combined"),
        ("--include localhost:0 --exclude localhost:1 t.py", "cannot be combined"),
        ("--include worker-3:0 t.py", "needs a --hostfile"),
        ("--include localhost:7 t.py", "has no slot 7"),
        ("--exclude localhost:0,1,2,3 t.py", "leaves no device"),
        ("--num_gpus 9 t.py", "has 4 GPU slot"),
        ("--no_python ./run.sh", "add --no_local_rank"),
        ("--node_rank 3 t.py", "--node_rank 3 but there are 1 node"),
        ("--min_elastic_nodes 2 t.py", "need --elastic_training"),
        ("--hostfile /nonexistent/hostfile t.py", "no such file"),
    ],
)
def test_refusals_name_the_flag(command, message):
    with pytest.raises(LauncherError, match=message):
        _plan(command)


def test_bad_hostfile_line(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-0 slots=two\n")
    with pytest.raises(LauncherError, match="line 1.*not 'HOST slots=N'"):
        _plan(f"--hostfile {hostfile} t.py")


def test_add_config_arguments_deepspeed_flags():
    parser = add_config_arguments(argparse.ArgumentParser())
    parser.add_argument("--local_rank", type=int, default=-1)
    plain = parser.parse_args([])
    assert (plain.deepspeed, plain.deepspeed_config, plain.deepscale, plain.fzero) == (
        False,
        None,
        False,
        None,
    )
    assert config_path_from_args(plain) is None
    flag = parser.parse_args(["--deepspeed", "--deepspeed_config", "ds.json", "--local_rank=1"])
    assert flag.deepspeed is True and config_path_from_args(flag) == "ds.json"
    assert config_path_from_args(parser.parse_args(["--deepspeed", "ds.json"])) == "ds.json"
    assert config_path_from_args(parser.parse_args(["--fzero", "f.json"])) == "f.json"
    assert config_path_from_args(parser.parse_args(["--deepscale_config", "d.json"])) == "d.json"
    both = parser.parse_args(["--fzero", "a.json", "--deepspeed_config", "b.json"])
    with pytest.raises(ConfigError, match="--fzero a.json, --deepspeed_config b.json"):
        config_path_from_args(both)
