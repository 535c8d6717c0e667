"""The examples run under the launchers the guide uses, in real processes on CPU gloo: ``fzero``
(DeepSpeed's flags, the guide's commands) and ``accelerate launch``; plain ``torchrun`` too.
Each launch has a timeout enforced here; two-process runs must agree exactly across launchers."""

from __future__ import annotations

import ast
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _run(command: list[str], timeout_s: float = 240.0) -> subprocess.CompletedProcess:
    environment = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(name, None)
    return subprocess.run(
        command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout_s
    )


def _result(process: subprocess.CompletedProcess) -> dict[str, object]:
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    line = next(line for line in process.stdout.splitlines() if line.startswith("RESULT "))
    return {
        key: ast.literal_eval(value) for key, value in re.findall(r"(\w+)=(\[[^]]*\]|\S+)", line)
    }


def _accelerate(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", *arguments]


def test_standalone_under_fzero_and_accelerate_agree():
    port = ["--master_port", _port()]
    launcher = [sys.executable, "-m", "fzero.integrations.launcher", "--num_procs", "2", *port]
    ours = _result(_run([*launcher, "examples/standalone.py", "--steps", "3"]))
    accelerate = _accelerate("--multi_gpu", "--num_processes", "2", "--main_process_port", _port())
    theirs = _result(_run([*accelerate, "examples/standalone.py", "--steps", "3"]))
    assert ours["world_size"] == theirs["world_size"] == 2
    assert ours["losses"] == theirs["losses"] and len(ours["losses"]) == 3
    assert ours["losses"][-1] < ours["losses"][0]


def test_accelerate_single_process_launch_is_refused(tmp_path):
    """Without --multi_gpu accelerate starts one CPU process for two: fzero refuses to train."""
    script = tmp_path / "join.py"
    script.write_text("from fzero.collectives import init_from_env\ninit_from_env()\n")
    process = _run(_accelerate("--num_processes", "2", str(script)))
    assert process.returncode != 0
    assert "accelerate launch --multi_gpu --num_processes N" in process.stderr


def test_hf_trainer_example_with_the_guides_command():
    """`deepspeed --num_gpus=4 train.py --deepspeed ds_config.json ...` with fzero for deepspeed."""
    launcher = [sys.executable, "-m", "fzero.integrations.launcher", "--num_procs", "2"]
    launcher += ["--master_port", _port(), "examples/hf_trainer.py"]
    guide = ["--deepspeed", "examples/ds_config_hf.json", "--per_device_train_batch_size", "2"]
    guide += ["--gradient_accumulation_steps", "2"]
    ours = ["--max_steps", "2", "--logging_steps", "1", "--output_dir", "/tmp/fzero-hf-example"]
    result = _result(_run([*launcher, *guide, *ours]))
    assert result["steps"] == 2 and len(result["losses"]) == 2
    assert (Path("/tmp/fzero-hf-example") / "model.safetensors").is_file()


def test_shard_joins_the_launchers_group(tmp_path):
    """Under torchrun a script that only calls fzero.shard trains on 2 ranks."""
    script = tmp_path / "shard.py"
    script.write_text(
        "import sys, torch, fzero\n"
        "state = fzero.shard(torch.nn.Linear(4, 4), stage=1)\n"
        "comm = state.runtime.comm\n"
        "print(f'RANK_SEEN {comm.rank} {comm.world_size} {sys.argv[1:]}')\n"
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    process = _run([*torchrun, "--master-port", _port(), str(script), "--flag"], timeout_s=120)
    assert process.returncode == 0, process.stderr[-3000:]
    # The two ranks share one stdout: their lines can arrive run together.
    seen = sorted(re.findall(r"RANK_SEEN \d+ \d+ \[[^\]]*\]", process.stdout))
    assert seen == [
        "RANK_SEEN 0 2 ['--flag']",
        "RANK_SEEN 1 2 ['--flag']",
    ]


def test_console_script_is_the_launcher():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["fzero"].partition(":")
    from importlib import import_module

    assert getattr(import_module(module), function).__module__ == "fzero.integrations.launcher"
