"""The compile-time knobs move ops around; they never change what is trained, and the live
gathered bytes the executor measures respect the cap the schedule was compiled under."""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fzero.schedule import simulate, verify
from tests.harness import train_threads
from tests.strategies import cases, schedule_knobs


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(stages=(3,), steps=2), data=st.data())
def test_knobs_do_not_change_training_bitwise(case, data):
    """Prefetch, reuse distance and persistence only move gathers and releases: two drawn
    settings train bit for bit the same parameters (the reductions, and their order, are the
    same ops in the same order)."""
    torch.set_num_threads(1)
    other = dataclasses.replace(case, extra={"zero_optimization": schedule_knobs(data.draw)})
    for (a, _, _), (b, _, _) in zip(train_threads(case), train_threads(other)):
        for name in a:
            assert torch.equal(a[name], b[name]), name


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(stages=(3,), steps=2), blocks=st.integers(2, 4), data=st.data())
def test_measured_gathered_bytes_stay_under_the_live_parameter_cap(case, blocks, data):
    """With stage3_max_live_parameters set to a few units' worth, the compiled schedule
    verifies under that cap and the parameter bytes the executor finds allocated after every
    trigger never exceed it."""
    torch.set_num_threads(1)
    probe = train_threads(dataclasses.replace(case, steps=1))[0][1].schedule
    # Gathered buffers are padded; the cap counts their elements (fp32: 4 bytes each).
    largest = max(u.param_nbytes // 4 for u in probe.units)
    root = sum(u.param_nbytes // 4 for u in probe.units if u.is_root)
    cap = root + blocks * largest  # elements; the root and one block must always fit
    knobs = {
        **schedule_knobs(data.draw),
        "stage3_max_live_parameters": cap,
        "stage3_param_persistence_threshold": 0,
    }
    capped = dataclasses.replace(case, extra={"zero_optimization": knobs})
    for _, state, _ in train_threads(capped, record=True):
        executor = state.runtime.executor
        itemsize = 4  # fp32 compute
        verify(state.schedule, max_live_nbytes=cap * itemsize)
        assert max(params for _, params, _ in executor.live_log) <= cap * itemsize


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(stages=(3,), steps=2))
def test_simulated_parameter_peak_equals_the_measured_one(case):
    """For the schedule a run compiled, the simulator's peak of gathered parameter bytes equals
    the peak the executor found allocated after its triggers (the same ops, replayed)."""
    torch.set_num_threads(1)
    for _, state, _ in train_threads(case, record=True):
        executor = state.runtime.executor
        compiled = executor.live_log[len(state.schedule.micro_step) :]  # after the traced step
        measured = max(params for _, params, _ in compiled)
        simulated = max(sample.parameters for sample in simulate(state.schedule).memory)
        assert simulated == measured
