"""Measured against simulated: record a real stage-3 step's timeline on the GPU, calibrate the
simulator's cost model from it, and predict a different run.

    python benchmarks/timeline.py --model 255m --out out/

1. Trains the GPT at stage 3 (world size 1, bf16, each block released after forward) with
   ``record_timeline=True``; writes the measured Chrome trace, and reports whether the gather
   of block k+1 ran while block k computed (prefetch overlap, on the gather stream).
2. Builds a CostModel from that step: each unit's own forward and backward time (intervals
   between triggers), and the step phase (optimizer) time.
3. Predicts, with ``fzero.schedule.simulate``, a step with 2 micro-batches and compares it with
   a measured one (a prediction on a run the calibration did not see), and writes the
   simulated trace beside the measured one.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from step import _batches, build_model  # noqa: E402

import fzero  # noqa: E402
from fzero.schedule import CostModel, simulate  # noqa: E402
from fzero.schedule.trace_export import chrome_trace  # noqa: E402


def measure(model_name: str, micro: int, device: torch.device, steps: int = 3):
    model, batch, spec = build_model(model_name, device)
    config = {
        "bf16": {"enabled": device.type == "cuda"},
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0},
    }
    state = fzero.shard(model, stage=3, config=config, record_timeline=True)
    batches = _batches(batch, spec, device, count=micro)
    for _ in range(3):  # warm-up, the first one traces the order
        state, _ = fzero.train_step(state, batches if micro > 1 else batches[0])
    timeline = state.runtime.executor.timeline
    step_seconds = []
    for _ in range(steps):
        timeline.clear()
        state, _ = fzero.train_step(state, batches if micro > 1 else batches[0])
        marks, _ = timeline.resolve()
        step_seconds.append(marks[-1][1] - marks[0][1])
    return state, timeline, sorted(step_seconds)[len(step_seconds) // 2]


def calibrate(state, timeline) -> CostModel:
    forward: dict[int, float] = defaultdict(float)
    backward: dict[int, float] = defaultdict(float)
    root = next((u.index for u in state.schedule.units if u.is_root), 0)
    step_phase = 0.0
    for owner, a, b in timeline.compute_spans():
        kind, _, unit = owner.partition(" ")
        if kind == "forward":
            forward[int(unit)] += b - a
        elif kind == "backward":
            backward[int(unit)] += b - a
        elif owner == "step":
            step_phase += b - a
        elif owner.startswith("post_forward"):  # the loss, after the root's forward
            forward[root] += b - a
        else:  # between the root's backward and the end of backward
            backward[root] += b - a
    numel = state.layout.optimizer_numel
    bytes_per_element = 30.0
    return CostModel(
        forward_seconds=dict(forward),
        backward_seconds=dict(backward),
        optimizer_bytes_per_second=numel * bytes_per_element / max(step_phase, 1e-9),
        optimizer_bytes_per_element=bytes_per_element,
    )


def overlaps(timeline) -> list[str]:
    """Gathers of block k+1 that ran while block k computed its forward."""
    _, spans = timeline.resolve()
    compute = [(o, a, b) for o, a, b in timeline.compute_spans() if o.startswith("forward ")]
    found = []
    for _stream, label, a, b in spans:
        unit = int(label.split()[-1])
        for owner, c, d in compute:
            if owner == f"forward {unit - 1}" and a < d and b > c:
                found.append(
                    f"{label} [{a * 1e3:.3f}, {b * 1e3:.3f}] ms during {owner} "
                    f"[{c * 1e3:.3f}, {d * 1e3:.3f}] ms"
                )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="255m")
    parser.add_argument("--out", type=Path, default=Path("out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state, timeline, measured_one = measure(args.model, 1, device)
    (args.out / "timeline_measured.json").write_text(json.dumps(timeline.chrome_trace()))
    cost = calibrate(state, timeline)
    overlapping = overlaps(timeline)
    print(f"measured step, 1 micro-batch: {measured_one * 1e3:.2f} ms")
    print(f"prefetched gathers overlapping the previous block's forward: {len(overlapping)}")
    for line in overlapping[:3]:
        print("  " + line)
    fit = simulate(state.schedule, cost, micro_batches=1)
    print(f"simulated step, 1 micro-batch (the calibration run): {fit.step_seconds * 1e3:.2f} ms")
    del state, timeline
    torch.cuda.empty_cache() if device.type == "cuda" else None
    state2, timeline2, measured_two = measure(args.model, 2, device)
    predicted = simulate(state2.schedule, cost, micro_batches=2)
    error = abs(predicted.step_seconds - measured_two) / measured_two
    (args.out / "timeline_simulated.json").write_text(json.dumps(chrome_trace(predicted)))
    print(
        f"2 micro-batches: predicted {predicted.step_seconds * 1e3:.2f} ms, measured "
        f"{measured_two * 1e3:.2f} ms, error {100 * error:.1f}%"
    )


if __name__ == "__main__":
    main()
