"""Where an offloaded step's host time goes: the CPU AdamW steps inside the step (by op type,
wall time of their handlers) against the same kernel on the same buffers alone, and the step.

    python benchmarks/offload_host_step.py --model 1.4b [--stepphase]

Run on the GPU machine; it shards examples/gpt.py's GPT at stage 3 with optimizer offload (the
offload benchmark's config), times ``--steps`` steps after warm-up, then times torch's fused CPU
AdamW over the whole shard in one call with no GPU work running (``alone``), so the two show
how much slower the CPU step runs inside the step (copies and the GPU's work compete for host
memory bandwidth) and how much of the step it takes.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))

from offload import make_step  # noqa: E402
from step import _batches, build_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="1.4b")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--stepphase", action="store_true", help="CPU steps in the step phase")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from fzero.offload.optimizer import HostOptimizer

    spent: dict[str, float] = defaultdict(float)
    timing = [False]  # the handlers are bound at shard time: patch first, count when set
    originals = {}
    for name in ("apply_pending_update", "host_optimizer_step", "upload_update"):
        original = getattr(HostOptimizer, name)
        originals[name] = original

        def timed(self, op, _original=original, _name=name):
            start = time.perf_counter()
            _original(self, op)
            if timing[0]:
                spent[_name] += time.perf_counter() - start

        setattr(HostOptimizer, name, timed)
    model, batch, spec = build_model(args.model, device)
    impl = "fzero:3+opt" + ("+stepphase" if args.stepphase else "")
    step, _ = make_step(impl, model, device)
    batches = _batches(batch, spec, device)
    for i in range(args.warmup):
        step(batches[i % len(batches)])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    timing[0] = True
    start = time.perf_counter()
    for i in range(args.steps):
        step(batches[i % len(batches)])
    sync()
    step_s = (time.perf_counter() - start) / args.steps
    # The same kernel over a shard-sized set of host buffers, nothing else running.
    numel = sum(p.numel() for p in model.parameters())
    buffers = [torch.randn(numel) for _ in range(4)]
    step_count = torch.ones(())
    alone = []
    for _ in range(3):
        begin = time.perf_counter()
        torch._fused_adamw_(
            [buffers[0]],
            [buffers[1]],
            [buffers[2]],
            [buffers[3].abs_()],
            [],
            [step_count],
            lr=1e-4,
            beta1=0.9,
            beta2=0.95,
            weight_decay=0.1,
            eps=1e-8,
            amsgrad=False,
            maximize=False,
        )
        alone.append(time.perf_counter() - begin)
    alone_s = min(alone)
    print(f"{impl}: {numel:,} parameters, torch threads {torch.get_num_threads()}")
    print(f"step {1e3 * step_s:.1f} ms")
    for name, seconds in spent.items():
        print(f"  {name}: {1e3 * seconds / args.steps:.1f} ms a step")
    cpu = (spent["apply_pending_update"] + spent["host_optimizer_step"]) / args.steps
    print(f"CPU AdamW inside the step {1e3 * cpu:.1f} ms = {28 * numel / cpu / 1e9:.1f} GB/s")
    print(f"CPU AdamW alone {1e3 * alone_s:.1f} ms = {28 * numel / alone_s / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
