"""The step benchmark's CPU smoke mode keeps running (no timing is asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step.py"


def test_step_benchmark_cpu_smoke_runs_every_stage():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for impl in ("torch", "fzero:0", "fzero:1", "fzero:2", "fzero:3"):
        assert f"| tiny | {impl} |" in done.stdout
