"""fzero's host cost per step, on CPU: a 24-block GPT of tiny width at stage 3, world size 1,
where the model's compute is small and the host work fzero adds to it shows.

    python benchmarks/host_cost.py                      # this tree
    python benchmarks/host_cost.py --baseline HEAD~3    # a git revision and this tree, one run

Reported per tree, best of ``--rounds`` rounds of ``--steps`` steps: ``train_step``'s wall time
per step, the executor's host time inside its ops per step (``Executor.host_seconds``, the
number ``benchmarks/step.py`` reports as ``executor_host_ms_per_step``), and two of its parts
timed alone: the class switch of every released unit's parameters (a release and a gather of
each unit outside the schedule, buffer free, allocation and copy included; the same in both
trees, so a difference is the switch), and the once-per-step ``requires_grad`` check. With
``--baseline`` the revision is exported with ``git archive`` and each tree runs in a process
of its own, alternating, so that both see the same machine load; threads are pinned to one.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from children import print_result, run_child  # noqa: E402


def _child(tree: Path, layers: int, steps: int, rounds: int) -> None:
    sys.path[:0] = [str(tree), str(tree / "examples")]
    import torch
    from gpt import GPT, GPTConfig

    import fzero

    assert Path(fzero.__file__).resolve().is_relative_to(tree.resolve()), fzero.__file__
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=layers, n_embd=8, n_head=1, vocab_size=16, block_size=8))
    config = {
        "zero_optimization": {"stage3_param_persistence_threshold": 0},  # every block released
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
    }
    state = fzero.shard(model, stage=3, config=config)
    batch = (torch.randint(0, 16, (1, 8)), torch.randint(0, 16, (1, 8)))
    for _ in range(5):
        state, _ = fzero.train_step(state, batch)
    best = {"step_ms": float("inf"), "executor_host_ms": float("inf")}
    for _ in range(rounds):
        executor = state.runtime.executor
        host, start = executor.host_seconds, time.perf_counter()
        for _ in range(steps):
            state, metrics = fzero.train_step(state, batch)
        wall = time.perf_counter() - start
        best["step_ms"] = min(best["step_ms"], 1e3 * wall / steps)
        best["executor_host_ms"] = min(
            best["executor_host_ms"], 1e3 * (executor.host_seconds - host) / steps
        )
    runtime = state.runtime
    units = sorted(runtime.executor.released_units)
    best["switch_us_per_step"] = 1e6 * _best_of(rounds, steps, lambda: _cycle(runtime, units))
    best["requires_grad_check_us"] = 1e6 * _best_of(
        rounds, steps, runtime.checks.check_requires_grad
    )
    best["released_units"] = len(units)
    best["loss"] = float(metrics["loss"])
    print_result(best)


def _cycle(runtime, units: list[int]) -> None:
    """Gather and release every released unit once, as a step does."""
    executor = runtime.executor
    for unit in units:
        executor.gather(unit).work.wait()
        executor.release(unit)


def _best_of(rounds: int, calls: int, function) -> float:
    """Seconds per call of ``function``, best of ``rounds`` rounds of ``calls`` calls."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            function()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def _export(revision: str, into: Path) -> Path:
    """The tree of ``revision`` (fzero/ and examples/) under ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision, "fzero", "examples"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="a git revision to time beside this tree")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="processes per tree, alternating")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child: the tree to time
    args = parser.parse_args()
    if args.one:
        _child(Path(args.one), args.layers, args.steps, args.rounds)
        return
    with tempfile.TemporaryDirectory() as scratch:
        trees = {"this tree": ROOT}
        if args.baseline:
            trees = {args.baseline: _export(args.baseline, Path(scratch)), **trees}
        results: dict[str, list[dict]] = {name: [] for name in trees}
        for _ in range(args.repeats):
            for name, tree in trees.items():
                command = [sys.executable, __file__, "--one", str(tree), "--layers"]
                command += [str(args.layers), "--steps", str(args.steps)]
                command += ["--rounds", str(args.rounds)]
                result = run_child(command, name)
                if result is not None:
                    results[name].append(result)
    print(
        f"{args.layers}-block GPT (n_embd 8), stage 3, world size 1, CPU, one thread; best of "
        f"{args.repeats} processes x {args.rounds} rounds x {args.steps} steps\n"
    )
    print("| tree | step ms | executor host ms | class switch us/step | requires_grad check us |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, rows in results.items():
        if not rows:
            continue
        best = {key: min(row[key] for row in rows) for key in rows[0] if key != "loss"}
        print(
            f"| {name} | {best['step_ms']:.2f} | {best['executor_host_ms']:.3f} | "
            f"{best['switch_us_per_step']:.1f} | {best['requires_grad_check_us']:.1f} |"
        )


if __name__ == "__main__":
    main()
