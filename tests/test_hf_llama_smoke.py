"""The Hugging Face Llama benchmark's CPU smoke mode keeps running (no timing is asserted):
fzero with Hugging Face activation checkpointing, and the Trainer beside train_step."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "hf_llama.py"


def test_hf_llama_benchmark_cpu_smoke_runs_fzero_and_the_trainer_beside_train_step(tmp_path):
    """Each row trains; the Trainer and the train_step loop over its dataloader, with the config
    it resolves, end on the same loss (they train the same steps on the same batches)."""
    out = tmp_path / "rows.json"
    rows_run = ["fzero:3+ckpt", "trainer:3+ckpt", "train_step:3+ckpt"]
    command = [sys.executable, str(SCRIPT), "--cpu-smoke", "--impls", *rows_run]
    done = subprocess.run(
        [*command, "--json", str(out)], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {row["impl"]: row for row in json.loads(out.read_text())}
    assert set(rows) == set(rows_run)
    assert all(row["tokens_per_s"] > 0 and math.isfinite(row["loss"]) for row in rows.values())
    trainer, train_step = rows["trainer:3+ckpt"], rows["train_step:3+ckpt"]
    assert math.isclose(trainer["loss"], train_step["loss"], rel_tol=1e-6)
    assert "| trainer:3+ckpt |" in done.stdout and "| train_step:3+ckpt |" in done.stdout
