"""Where a training step's GPU time goes, per implementation: the kernels that take the most
device time, and how much of the step the device is busy at all.

    python benchmarks/profile_step.py --model 255m --impls fsdp2 fzero:3

Each implementation runs in its own process (``benchmarks/step.py``'s model and step): warm-up
steps, then ``torch.profiler`` over ``--steps`` steps. Printed per implementation: wall time
per step, the device's busy time per step (the union of kernel intervals, so overlapping
streams count once) and the top kernels by total device time. Side by side, two
implementations' lists show which kernels one spends more time in; a step whose busy time is
well under its wall time is waiting on the host.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from children import child_args  # noqa: E402


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def _child(impl: str, model_name: str, steps: int, warmup: int, top: int) -> None:
    from step import _batches, build_model, make_step
    from torch.profiler import ProfilerActivity, profile

    device = torch.device("cuda")
    model, batch, spec = build_model(model_name, device)
    step, _ = make_step(impl, model, device)
    batches = _batches(batch, spec, device)
    for i in range(warmup):
        step(batches[i % len(batches)])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for i in range(steps):
            step(batches[i % len(batches)])
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / steps
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    intervals = [(e.time_range.start, e.time_range.end) for e in kernels]  # microseconds
    busy = busy_seconds(intervals) / 1e6 / steps
    totals: dict[str, float] = {}
    for event in kernels:
        totals[event.name] = totals.get(event.name, 0.0) + event.time_range.elapsed_us()
    print(
        f"## {impl}: wall {1e3 * wall:.2f} ms per step, device busy {1e3 * busy:.2f} ms "
        f"({100 * busy / wall:.1f}%), {len(kernels) / steps:.0f} kernels per step"
    )
    print("| device ms per step | kernel |\n| ---: | --- |")
    for name, micros in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
        print(f"| {micros / 1e3 / steps:.3f} | {name[:110]} |")
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="255m")
    parser.add_argument("--impls", nargs="+", default=["fsdp2", "fzero:3"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        _child(args.one, args.model, args.steps, args.warmup, args.top)
        return
    for impl in args.impls:
        command = [sys.executable, *child_args(__file__, impl, args.model, args.steps, args.warmup)]
        command += ["--top", str(args.top)]
        done = subprocess.run(command, capture_output=True, text=True)
        print(done.stdout if done.returncode == 0 else f"FAILED {impl}:\n{done.stderr[-3000:]}")


if __name__ == "__main__":
    main()
