"""The benchmarks run each configuration in a process of its own (so that its peak memory and
its CUDA context are its own); the child prints one line ``RESULT <json>``."""

from __future__ import annotations

import json
import subprocess


def child_args(script: str, impl: str, model: str, steps: int, warmup: int) -> list[str]:
    """The arguments that make ``script`` run one configuration as a child (its ``--one``)."""
    return [script, "--one", impl, "--model", model, "--steps", str(steps), "--warmup", str(warmup)]


def run_child(command: list[str], what: str) -> dict | None:
    """Run ``command``; its last ``RESULT`` line as a dict, or None after printing why not
    (``what`` names the configuration)."""
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        print(f"FAILED {what}:\n{done.stdout[-2000:]}{done.stderr[-3000:]}", flush=True)
        return None
    return json.loads(lines[-1][len("RESULT ") :])


def print_result(payload: dict) -> None:
    """The child's side: the one line its parent reads."""
    print("RESULT " + json.dumps(payload), flush=True)


def importable(name: str) -> bool:
    """Whether package ``name`` can be imported here (a row that needs it is skipped if not)."""
    import importlib.util

    return importlib.util.find_spec(name) is not None
