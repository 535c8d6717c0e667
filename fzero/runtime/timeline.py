"""A measured timeline: when each trigger was reached and when each gather ran, on the device.

The executor records into it when asked (``fzero.shard(..., record_timeline=True)``): a mark
after the ops of every trigger on the compute stream, and a span for every gather on the
stream that ran it. On CUDA these are CUDA events, resolved after a synchronize, so recording
adds no host sync to the step; on CPU they are host clock readings. ``chrome_trace()`` writes
the result in the same Chrome/Perfetto format as a simulated timeline
(``fzero.schedule.trace_export``), so the two can be opened side by side.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class MeasuredTimeline:
    device: torch.device
    marks: list[tuple[str, Any]] = field(default_factory=list)  # (label, event or seconds)
    spans: list[tuple[str, str, Any, Any]] = field(
        default_factory=list
    )  # stream, label, start, end

    def _stamp(self, stream: Any = None) -> Any:
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def mark(self, label: str) -> None:
        self.marks.append((label, self._stamp()))

    def begin(self, stream: Any = None) -> Any:
        return self._stamp(stream)

    def end(self, stream_name: str, label: str, start: Any, stream: Any = None) -> None:
        self.spans.append((stream_name, label, start, self._stamp(stream)))

    def clear(self) -> None:
        self.marks.clear()
        self.spans.clear()

    def resolve(self) -> tuple[list[tuple[str, float]], list[tuple[str, str, float, float]]]:
        """Marks and spans in seconds from the first mark (synchronises the device once)."""
        if not self.marks:
            return [], []
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            origin = self.marks[0][1]

            def seconds(stamp: Any) -> float:
                return origin.elapsed_time(stamp) / 1e3

        else:
            origin = self.marks[0][1]

            def seconds(stamp: Any) -> float:
                return stamp - origin

        marks = [(label, seconds(stamp)) for label, stamp in self.marks]
        spans = [(s, label, seconds(a), seconds(b)) for s, label, a, b in self.spans]
        return marks, spans

    def compute_spans(self) -> list[tuple[str, float, float]]:
        """Intervals between consecutive marks, each given to the unit whose trigger pair
        encloses it most closely (the root unit's own work excludes its blocks')."""
        marks, _ = self.resolve()
        stack: list[str] = []
        out = []
        for (label, t0), (_, t1) in zip(marks, marks[1:]):
            kind, _, rest = label.partition("(")
            unit = rest.rstrip(")")
            if kind in ("pre_forward", "pre_backward"):
                stack.append(f"{kind.removeprefix('pre_')} {unit}")
            elif kind in ("post_forward", "post_backward") and stack:
                stack.pop()
            owner = stack[-1] if stack else label
            out.append((owner, t0, t1))
        return out

    def chrome_trace(self) -> dict[str, Any]:
        """Chrome/Perfetto trace events: compute intervals per unit on one thread, gathers on
        another; times in microseconds."""
        _, spans = self.resolve()
        events = [
            {
                "name": owner,
                "ph": "X",
                "pid": 0,
                "tid": "compute",
                "ts": 1e6 * a,
                "dur": 1e6 * (b - a),
            }
            for owner, a, b in self.compute_spans()
        ]
        events += [
            {"name": label, "ph": "X", "pid": 0, "tid": stream, "ts": 1e6 * a, "dur": 1e6 * (b - a)}
            for stream, label, a, b in spans
        ]
        return {"traceEvents": events, "displayTimeUnit": "ms"}
