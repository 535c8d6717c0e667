"""What is alive at a training step's peak: CUDA allocations at the moment of the highest
allocated memory, grouped by the code that made them, for fzero and FSDP2 on the same GPT.

    python benchmarks/memory_peak.py --model 255m --impls fsdp2 fzero:3

Each implementation runs in its own process (``benchmarks/step.py``'s model and step). The
allocator's history (``torch.cuda.memory._record_memory_history``) is recorded from before the
model is built, through the warm-up steps and ``--steps`` timed steps, whose peak is taken. The
trace is replayed (an allocation counts from its ``alloc`` event to
its ``free_requested``, as ``memory_allocated`` does), and at the peak the live blocks are
listed: total bytes per call site (the innermost frame in the model, fzero, FSDP or the
benchmark, with the frames below it that explain it), largest first. Two implementations'
lists side by side show where their peaks differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from children import child_args, print_result, run_child  # noqa: E402

INTERESTING = ("fzero/", "examples/gpt.py", "torch/distributed/fsdp", "benchmarks/", "deepspeed/")


def _site(frames: list[dict]) -> str:
    """The innermost frame of ours or of the peer's library, with one frame of context."""
    names = [f"{Path(f['filename']).name}:{f['line']}:{f['name']}" for f in frames]
    for i, frame in enumerate(frames):
        if any(part in frame["filename"] for part in INTERESTING):
            return " < ".join(names[max(0, i - 1) : i + 2])
    return " < ".join(names[:3]) or "?"


def live_at_peak(trace: list[dict], start: int = 0) -> tuple[int, int, dict[str, list[int]]]:
    """Replays an allocator trace that began before the first allocation; returns (peak bytes,
    event index, live blocks at the peak grouped by site), the peak taken over events from
    ``start`` on. An allocation counts from ``alloc`` to ``free_requested``, as
    ``torch.cuda.memory_allocated`` counts it."""
    live: dict[int, tuple[int, str]] = {}
    current = peak = peak_index = 0
    best: dict[int, tuple[int, str]] = {}
    for index, event in enumerate(trace):
        action, addr, size = event["action"], event["addr"], event["size"]
        if action == "alloc":
            live[addr] = (size, _site(event.get("frames", [])))
            current += size
            if index >= start and current > peak:
                peak, peak_index, best = current, index, dict(live)
        elif action == "free_requested" and addr in live:
            current -= live.pop(addr)[0]
    groups: dict[str, list[int]] = defaultdict(list)
    for size, site in best.values():
        groups[site].append(size)
    return peak, peak_index, groups


def _child(impl: str, model_name: str, steps: int, warmup: int) -> None:
    from step import _batches, build_model, make_step

    device = torch.device("cuda")
    # Recording starts before the first allocation, so every live block has its call site.
    torch.cuda.memory._record_memory_history(max_entries=4_000_000, stacks="python")
    model, batch, spec = build_model(model_name, device)
    step, _ = make_step(impl, model, device)
    batches = _batches(batch, spec, device)
    for i in range(warmup):
        step(batches[i % len(batches)])
    torch.cuda.synchronize()
    start = len(torch.cuda.memory._snapshot()["device_traces"][0])
    # Near the peak (the logits' gradient has just been made), the allocator's blocks: where a
    # block is larger than what was asked for, that slack counts in max_memory_allocated too.
    near_peak: dict = {}

    def snapshot_once(grad):
        if not near_peak:
            near_peak.update(torch.cuda.memory._snapshot())
        return grad

    def on_logits(module, inputs, output) -> None:  # returns None: the output stays as it is
        output.register_hook(snapshot_once)

    model.lm_head.register_forward_hook(on_logits)
    torch.cuda.reset_peak_memory_stats()
    for i in range(steps):
        step(batches[i % len(batches)])
    torch.cuda.synchronize()
    trace = torch.cuda.memory._snapshot()["device_traces"][0]
    torch.cuda.memory._record_memory_history(enabled=None)
    peak, index, groups = live_at_peak(trace, start)
    slack: dict[str, int] = defaultdict(int)
    for segment in near_peak.get("segments", []):
        for block in segment["blocks"]:
            if block["state"] == "active_allocated" and block["size"] > block["requested_size"]:
                slack[_site(block.get("frames", []))] += block["size"] - block["requested_size"]
    rows = sorted(((sum(sizes), len(sizes), site) for site, sizes in groups.items()), reverse=True)
    print_result(
        {
            "impl": impl,
            "max_memory_allocated": torch.cuda.max_memory_allocated(),
            "replayed_peak": peak,
            "peak_event": index,
            "events": len(trace),
            "timed_from_event": start,
            "rows": rows,
            "slack_near_peak": sorted(((b, s) for s, b in slack.items()), reverse=True),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="255m")
    parser.add_argument("--impls", nargs="+", default=["fsdp2", "fzero:3"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        _child(args.one, args.model, args.steps, args.warmup)
        return
    results = []
    for impl in args.impls:
        command = [sys.executable, *child_args(__file__, impl, args.model, args.steps, args.warmup)]
        result = run_child(command, impl)
        if result is None:
            continue
        results.append(result)
        mib = 2**20
        print(
            f"\n## {impl}: max_memory_allocated {result['max_memory_allocated'] / mib:.1f} MiB; "
            f"replayed peak {result['replayed_peak'] / mib:.1f} MiB at event "
            f"{result['peak_event']} of {result['events']} "
            f"(timed steps from {result['timed_from_event']})"
        )
        print("| MiB | blocks | site |\n| ---: | ---: | --- |")
        for total, count, site in result["rows"][: args.top]:
            print(f"| {total / mib:.2f} | {count} | {site} |")
        slack = result["slack_near_peak"]
        print(
            f"\nblocks larger than requested when the logits' gradient was made: "
            f"{sum(b for b, _ in slack) / mib:.2f} MiB in all; largest by site:"
        )
        for nbytes, site in slack[:8]:
            print(f"  {nbytes / mib:.3f} MiB  {site}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
