"""Chrome/Perfetto traces of a simulated step, and a memory plot.

``chrome_trace(timeline)`` returns the JSON object that ``chrome://tracing`` and
https://ui.perfetto.dev open: one thread per stream (compute, gather, reduce, and offload's
copy, host and file streams) with complete
events (``ph: "X"``, ``ts``/``dur`` in microseconds), and this rank's memory as a counter track.
``plot_memory`` draws that counter with matplotlib, an optional extra (``pip install fzero[plot]``)
imported only when called.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fzero.schedule.ops import (
    COMPUTE,
    DEVICE_TO_HOST,
    FILE,
    GATHER,
    HOST,
    HOST_TO_DEVICE,
    REDUCE,
)

if TYPE_CHECKING:
    from fzero.schedule.simulated_timeline import Timeline

STREAM_TIDS = {
    COMPUTE: 0,
    GATHER: 1,
    REDUCE: 2,
    DEVICE_TO_HOST: 3,
    HOST_TO_DEVICE: 4,
    HOST: 5,
    FILE: 6,
}
MEMORY_COUNTER = "memory (bytes)"
MEMORY_KINDS = ("parameters", "gradients", "optimizer_state", "persistent_shards")
_MICROSECONDS = 1e6


def chrome_trace(timeline: Timeline) -> dict[str, Any]:
    """The timeline as a Chrome trace object (``{"traceEvents": [...], ...}``)."""
    pid = 0
    events: list[dict[str, Any]] = [
        {
            "name": "process_name",
            "ph": "M",
            "pid": pid,
            "args": {"name": f"fzero ZeRO-{timeline.stage} x{timeline.world_size} (simulated)"},
        },
    ]
    used = {span.stream for span in timeline.spans}
    for stream, tid in STREAM_TIDS.items():
        if stream not in (COMPUTE, GATHER, REDUCE) and stream not in used:
            continue  # offload's streams: only where the step has them
        events.append(
            {"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": stream}}
        )
        events.append(
            {
                "name": "thread_sort_index",
                "ph": "M",
                "pid": pid,
                "tid": tid,
                "args": {"sort_index": tid},
            }
        )
    for span in timeline.spans:
        events.append(
            {
                "name": span.name,
                "cat": span.category,
                "ph": "X",
                "pid": pid,
                "tid": STREAM_TIDS[span.stream],
                "ts": span.start * _MICROSECONDS,
                "dur": span.seconds * _MICROSECONDS,
                "args": {"micro_batch": span.micro_batch},
            }
        )
    last = None
    for sample in timeline.memory:
        values = {kind: getattr(sample, kind) for kind in MEMORY_KINDS}
        if values != last:
            events.append(
                {
                    "name": MEMORY_COUNTER,
                    "ph": "C",
                    "pid": pid,
                    "ts": sample.time * _MICROSECONDS,
                    "args": values,
                }
            )
            last = values
    peak = timeline.peak_memory
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "stage": timeline.stage,
            "world_size": timeline.world_size,
            "micro_batches": timeline.micro_batches,
            "step_seconds": timeline.step_seconds,
            "exposed_communication_seconds": timeline.exposed_communication_seconds,
            "peak_memory_nbytes": peak.total,
        },
    }


def _trace_object(events: Any) -> dict[str, Any]:
    if hasattr(events, "to_chrome_trace"):
        return events.to_chrome_trace()
    if isinstance(events, Mapping):
        if "traceEvents" not in events:
            raise ValueError("a trace object needs a 'traceEvents' list")
        return dict(events)
    if isinstance(events, Sequence) and not isinstance(events, (str, bytes)):
        return {"traceEvents": list(events), "displayTimeUnit": "ms"}
    raise TypeError(
        f"expected a Timeline, a trace object or a list of events, got {type(events).__name__}"
    )


def write_chrome_trace(path: str | Path, events: Any) -> Path:
    """Write ``events`` (a Timeline, a trace object or a list of trace events) as JSON to
    ``path``, for chrome://tracing or ui.perfetto.dev. Returns the path."""
    path = Path(path)
    path.write_text(json.dumps(_trace_object(events)))
    return path


def memory_series(timeline_or_events: Any) -> tuple[list[float], dict[str, list[int]]]:
    """Times (ms) and bytes per memory kind from the trace's memory counter events."""
    trace = _trace_object(timeline_or_events)
    counters = [
        e for e in trace["traceEvents"] if e.get("ph") == "C" and e.get("name") == MEMORY_COUNTER
    ]
    times = [e["ts"] / 1e3 for e in counters]
    series = {kind: [int(e["args"].get(kind, 0)) for e in counters] for kind in MEMORY_KINDS}
    return times, series


def plot_memory(timeline_or_events: Any, path: str | Path) -> Path:
    """Save a stacked step plot of this rank's memory over the step to ``path`` (PNG, SVG, ...
    by extension). Needs matplotlib: ``pip install fzero[plot]``."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plot_memory needs matplotlib: pip install fzero[plot]") from error
    times, series = memory_series(timeline_or_events)
    if not times:
        raise ValueError("no memory counter events to plot")
    figure = Figure(figsize=(8, 3.5))
    axes = figure.subplots()
    gib = float(1 << 30)
    axes.stackplot(
        times,
        *([v / gib for v in series[k]] for k in MEMORY_KINDS),
        labels=[k.replace("_", " ") for k in MEMORY_KINDS],
        step="post",
    )
    axes.set_xlabel("time (ms)")
    axes.set_ylabel("GiB")
    axes.set_title("memory per rank (simulated)")
    axes.legend(loc="upper left", fontsize="small")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    return path
