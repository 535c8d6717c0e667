"""simulate: a schedule replayed against a cost model gives the times and bytes worked out by
hand; Chrome traces and memory plots come out of the timeline."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import pytest
from hypothesis import given, settings

from fzero.errors import ScheduleError
from fzero.schedule import CostModel, simulate
from fzero.schedule import ops as O
from fzero.schedule.memory_model import MemoryModel
from fzero.schedule.schedule import Schedule, UnitInfo
from fzero.schedule.trace_export import (
    MEMORY_COUNTER,
    STREAM_TIDS,
    memory_series,
    plot_memory,
    write_chrome_trace,
)
from fzero.schedule.verify import verify
from tests.test_verify import peak_gathered_nbytes, schedules

# Two 1000-byte blocks on 2 ranks. With no latency and 1000 B/s, a gather takes
# (N-1)/N * 1000 / 1000 = 0.5 s and a 2000-byte reduce-scatter 1 s. Forward 1 s, backward 2 s.
# This rank's shard: 2 * 500 elements / 2 ranks = 500, so its bf16 gradient shard is 1000 bytes.
GRAD_SHARD_NBYTES = 1000
BLOCKS = (
    UnitInfo(0, "blocks.0", 500, 1000, 1000, 2000, True),
    UnitInfo(1, "blocks.1", 500, 1000, 1000, 2000, True),
)
COST = CostModel(
    forward_seconds={0: 1.0, "blocks.1": 1.0},
    backward_seconds=lambda unit: 2.0,
    bandwidth_bytes_per_second=1000.0,
    latency_seconds=0.0,
    optimizer_bytes_per_second=1000.0,
    optimizer_bytes_per_element=1.0,
)
SCALARS_SECONDS = 2 * (0.5 * 8 / 1000)  # an 8-byte all-reduce on 2 ranks
OPTIMIZER_SECONDS = 0.5  # 500 elements, 1 byte each, 1000 B/s


def gather(unit: int) -> tuple[O.Op, ...]:
    return (O.AllGather(unit, BLOCKS[unit].name, 1000), O.WaitGather(unit, BLOCKS[unit].name))


def reduce(unit: int) -> tuple[O.Op, ...]:
    name = BLOCKS[unit].name
    return (
        O.ReduceScatter(unit, name, 2000, packs=True),
        O.WaitReduce(unit, name, 1000),
        O.Release(unit, name, 1000),
    )


def entry(kind: str, unit: int, *ops: O.Op) -> O.Entry:
    return O.Entry(O.Trigger(kind, unit), tuple(ops))


def stage3(prefetch: bool) -> Schedule:
    """Stage 3 by hand; with ``prefetch`` the next block's gather is issued one block early in
    forward and in backward. The gradient shard is allocated right before the first reduction
    and freed after the optimizer step; the step's ``ZeroGradShard`` finds it alive and does
    nothing."""
    ag0, wait0 = gather(0)
    ag1, wait1 = gather(1)
    z0, z1 = O.DropGrads(0, "blocks.0", 1000), O.DropGrads(1, "blocks.1", 1000)
    micro = (
        entry(O.PRE_FORWARD, 0, ag0, wait0, *((ag1,) if prefetch else ())),
        entry(O.POST_FORWARD, 0, O.Release(0, "blocks.0", 1000)),
        entry(O.PRE_FORWARD, 1, *((wait1,) if prefetch else (ag1, wait1))),
        entry(O.POST_FORWARD, 1, O.Release(1, "blocks.1", 1000)),
        entry(O.PRE_BACKWARD, 1, ag1, wait1, z1, *((ag0,) if prefetch else ())),
        entry(O.POST_BACKWARD, 1, O.AllocGradShard(GRAD_SHARD_NBYTES), *reduce(1)),
        entry(O.PRE_BACKWARD, 0, *((wait0,) if prefetch else (ag0, wait0)), z0),
        entry(O.POST_BACKWARD, 0, *reduce(0)),
        entry(O.BACKWARD_END, -1),
    )
    step = (
        entry(
            O.STEP,
            -1,
            O.ZeroGradShard(GRAD_SHARD_NBYTES),
            O.ReduceScalars(),
            O.OptimizerStep(500),
            O.FreeGradShard(GRAD_SHARD_NBYTES),
        ),
    )
    schedule = Schedule(3, 2, BLOCKS, micro, step, traced=True)
    verify(schedule)
    return schedule


def test_ring_collective_times():
    cost = CostModel(bandwidth_bytes_per_second=1e9, latency_seconds=1e-5)
    for n in (1, 2, 3, 8, 64):
        expected = (n - 1) * 1e-5 + (n - 1) / n * 4e6 / 1e9
        assert cost.all_gather(4_000_000, n) == pytest.approx(expected)
        assert cost.reduce_scatter(4_000_000, n) == pytest.approx(expected)
        assert cost.all_reduce(4_000_000, n) == pytest.approx(2 * expected)
    assert cost.all_gather(4_000_000, 1) == 0.0


def test_default_compute_is_proportional_to_numel():
    cost = CostModel(flops_per_second=1e12, tokens_per_micro_batch=1000)
    unit = UnitInfo(0, "", 1_000_000, 0, 0, 0, True)
    assert cost.forward(unit) == pytest.approx(2 * 1e6 * 1000 / 1e12)
    assert cost.backward(unit) == pytest.approx(2 * cost.forward(unit))
    frozen = UnitInfo(1, "frozen", 1_000_000, 0, 0, 0, False)
    assert cost.backward(frozen) == pytest.approx(cost.forward(frozen))


def flat(pairs):
    """(start, end) pairs as one flat list: pytest 9's approx refuses nested sequences."""
    return [t for pair in pairs for t in pair]


def test_on_demand_stage_3_timeline_by_hand():
    """Every gather and reduction is waited for at once: all communication is exposed."""
    timeline = simulate(stage3(prefetch=False), COST)
    exposed = 4 * 0.5 + 2 * 1.0 + SCALARS_SECONDS
    compute = 2 * 1.0 + 2 * 2.0 + OPTIMIZER_SECONDS
    assert timeline.exposed_communication_seconds == pytest.approx(exposed)
    assert timeline.compute_seconds == pytest.approx(compute)
    assert timeline.step_seconds == pytest.approx(exposed + compute)
    gathers = [(s.start, s.end) for s in timeline.spans if s.stream == O.GATHER]
    assert flat(gathers) == pytest.approx(flat([(0.0, 0.5), (1.5, 2.0), (3.0, 3.5), (6.5, 7.0)]))
    reductions = [(s.start, s.end) for s in timeline.spans if s.stream == O.REDUCE]
    assert flat(reductions[:2]) == pytest.approx(flat([(5.5, 6.5), (9.0, 10.0)]))
    forward = [s for s in timeline.spans if s.name.startswith("forward")]
    assert flat([(s.start, s.end) for s in forward]) == pytest.approx(
        flat([(0.5, 1.5), (2.0, 3.0)])
    )


def test_prefetch_hides_the_next_gather_behind_compute():
    timeline = simulate(stage3(prefetch=True), COST)
    exposed = 2 * 0.5 + 2 * 1.0 + SCALARS_SECONDS  # only the first gather of each pass shows
    assert timeline.exposed_communication_seconds == pytest.approx(exposed)
    assert timeline.step_seconds == pytest.approx(exposed + timeline.compute_seconds)
    waits = [s for s in timeline.spans if s.category == "wait"]
    assert [s.name for s in waits] == [
        "WaitGather unit 0 (blocks.0)",
        "WaitGather unit 1 (blocks.1)",
        "WaitReduce unit 1 (blocks.1) frees 1000 B",
        "WaitReduce unit 0 (blocks.0) frees 1000 B",
        "ReduceScalars loss, grad_norm^2 8 B",
    ]


def test_micro_batches_repeat_the_micro_step():
    one, three = simulate(stage3(False), COST), simulate(stage3(False), COST, micro_batches=3)
    per_micro = one.step_seconds - SCALARS_SECONDS - OPTIMIZER_SECONDS
    assert three.step_seconds == pytest.approx(3 * per_micro + SCALARS_SECONDS + OPTIMIZER_SECONDS)
    assert {s.micro_batch for s in three.spans} == {0, 1, 2, -1}
    with pytest.raises(ValueError, match="micro_batches"):
        simulate(stage3(False), COST, micro_batches=0)


def after(schedule: Schedule, kind: type, micro_batches: int = 1) -> int:
    """Index in ``Timeline.memory`` of the sample taken right after the first ``kind`` op
    (``memory[0]`` is before the first op)."""
    ops = schedule.ops(micro_batches)
    return 1 + next(i for i, op in enumerate(ops) if isinstance(op, kind))


def test_memory_by_hand():
    """Bytes from the MemoryModel (hand-picked: 10, 20 and 30, each in its own field) last the
    whole step; gathered parameters, gradient buffers and the gradient shard come and go with
    the ops; prefetch holds two blocks at once."""
    memory = MemoryModel(
        parameter_shard_nbytes=10, gradient_shard_nbytes=20, optimizer_state_nbytes=30
    )
    schedule = stage3(prefetch=False)
    plain = simulate(schedule, COST, memory=memory)
    first = plain.memory[0]
    assert (first.parameters, first.gradients, first.optimizer_state) == (0, 20, 30)
    assert first.persistent_shards == 10 and first.total == 60
    # The gradient shard appears at post_backward(1), while block 1 is still gathered and its
    # gradient not yet reduced: 1000 B of parameters, 1000 (gradient) + 1000 (shard) + 20.
    peak = plain.peak_memory
    assert (peak.parameters, peak.gradients) == (1000, 2020)
    assert peak.total == 1000 + 2020 + 30 + 10
    # At the optimizer step the gradient shard is the only gradient left: 1000 + 20.
    assert plain.memory[after(schedule, O.OptimizerStep)].gradients == 1020
    last = plain.memory[-1]  # after FreeGradShard
    assert (last.parameters, last.gradients, last.total) == (0, 20, 60)
    prefetched = simulate(stage3(prefetch=True), COST, memory=memory)
    assert max(s.parameters for s in prefetched.memory) == 2000
    # At post_backward(1): blocks 1 and 0 (prefetched) gathered, block 1's gradient, the shard.
    assert prefetched.peak_memory.total == 2000 + (1000 + 1000 + 20) + 30 + 10


def test_gradient_shard_is_counted_once_per_step():
    """The micro-step's AllocGradShard finds the shard alive on micro-batches 2 and 3 and the
    step's finds it alive too: the shard's 1000 bytes are counted once, and only until the
    FreeGradShard."""
    schedule = stage3(prefetch=False)
    timeline = simulate(schedule, COST, micro_batches=3, memory=MemoryModel())
    # Most gradient bytes: one block's gradient buffer (1000) plus the shard (1000).
    assert max(s.gradients for s in timeline.memory) == 1000 + 1000
    assert timeline.memory[after(schedule, O.OptimizerStep, 3)].gradients == 1000
    assert timeline.memory[-1].gradients == 0


def test_default_memory_model_reads_the_schedule():
    """fzero's stage 3 keeps no compute-dtype shard and no gradient shard between steps; the
    optimizer shard comes from OptimizerStep, the gradient shard from ZeroGradShard."""
    schedule = stage3(False)
    timeline = simulate(schedule, COST)  # 2 bytes per parameter, K = 12
    first = timeline.memory[0]
    assert first.persistent_shards == 0  # gathers cast the master; no block is frozen
    assert first.optimizer_state == 500 * 12  # OptimizerStep(500), K = 12
    assert first.gradients == 0  # the gradient shard is freed between steps
    assert first.total == 6000
    at_optimizer = timeline.memory[after(schedule, O.OptimizerStep)]
    assert at_optimizer.gradients == 1000  # the ZeroGradShard's bytes
    assert at_optimizer.total == 1000 + 6000  # (2 + 12) bytes for each of the 500 elements


def test_unknown_op_is_refused():
    @dataclass(frozen=True)
    class Mystery(O.Op):
        pass

    schedule = stage3(False)
    bad = Schedule(3, 2, BLOCKS, schedule.micro_step, (entry(O.STEP, -1, Mystery()),), True)
    with pytest.raises(ScheduleError, match="Mystery"):
        simulate(bad, COST)


@settings(max_examples=100, deadline=None)
@given(schedules())
def test_compiled_schedules_simulate_consistently(drawn):
    """For any compiled schedule: the step is compute plus exposed waits (nothing is in flight
    at the end), each stream runs one thing at a time, the simulated peak of gathered bytes is
    the schedule's, and one rank alone never waits."""
    schedule, _ = drawn
    timeline = simulate(schedule, CostModel(), micro_batches=2)
    assert timeline.step_seconds == pytest.approx(
        timeline.compute_seconds + timeline.exposed_communication_seconds
    )
    for stream in STREAM_TIDS:
        spans = sorted((s for s in timeline.spans if s.stream == stream), key=lambda s: s.start)
        for before, after in zip(spans, spans[1:]):
            assert after.start >= before.end - 1e-12
    if schedule.stage == 3:
        assert max(s.parameters for s in timeline.memory) == peak_gathered_nbytes(schedule)
    if schedule.world_size == 1:
        assert timeline.exposed_communication_seconds == 0.0


# -- Chrome traces and plots --------------------------------------------------------------------


def test_chrome_trace_has_one_thread_per_stream_and_microsecond_spans(tmp_path):
    timeline = simulate(stage3(prefetch=True), COST)
    trace = timeline.to_chrome_trace()
    events = trace["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert names == {0: "compute", 1: "gather", 2: "reduce"}
    complete = [e for e in events if e["ph"] == "X"]
    assert len(complete) == len(timeline.spans)
    forward = next(e for e in complete if e["name"] == "forward unit 0 (blocks.0)")
    assert (forward["ts"], forward["dur"], forward["tid"]) == pytest.approx((0.5e6, 1e6, 0))
    assert all(e["tid"] == 1 for e in complete if e["name"].startswith("AllGather"))
    counters = [e for e in events if e["ph"] == "C"]
    assert counters and all(e["name"] == MEMORY_COUNTER for e in counters)
    assert trace["otherData"]["step_seconds"] == timeline.step_seconds

    path = write_chrome_trace(tmp_path / "step.json", timeline)
    assert json.loads(path.read_text()) == json.loads(json.dumps(trace))
    write_chrome_trace(tmp_path / "events.json", events)
    assert json.loads((tmp_path / "events.json").read_text())["traceEvents"] == events
    with pytest.raises(TypeError):
        write_chrome_trace(tmp_path / "bad.json", 3)


def test_memory_series_reads_the_counters():
    timeline = simulate(stage3(prefetch=True), COST)
    times, series = memory_series(timeline.to_chrome_trace())
    assert times[0] == 0.0 and max(series["parameters"]) == 2000
    assert memory_series(timeline) == (times, series)


def test_plot_memory_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install fzero\[plot\]"):
        plot_memory(simulate(stage3(False), COST), tmp_path / "memory.png")


def test_plot_memory_writes_an_image(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is an optional extra (fzero[plot])")
    path = plot_memory(simulate(stage3(True), COST), tmp_path / "memory.png")
    assert path.stat().st_size > 0
