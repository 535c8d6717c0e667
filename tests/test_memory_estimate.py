"""estimate_memory: the ZeRO paper's per-rank model-state bytes, and agreement with simulate."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fzero.memory import count_parameters, estimate_memory
from fzero.schedule.compile import Knobs, compile_schedule, presumed_trace
from fzero.schedule.memory_model import BytesPerParam, model_states
from fzero.schedule.schedule import UnitInfo
from fzero.schedule.simulate import simulate
from tests.models import ToyLM, ToySpec
from tests.test_verify import traces, unit_lists

PSI, N = 7_500_000_000, 64  # the ZeRO paper's Figure 1: 7.5B parameters on 64 GPUs, K = 12


@pytest.mark.parametrize(("stage", "paper_gb"), [(0, 120), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_reproduces_zero_paper_figure_1(stage, paper_gb):
    estimate = estimate_memory(PSI, N, stage)
    assert estimate.total / 1e9 == pytest.approx(paper_gb, rel=0.02)


def test_paper_formulas_exactly():
    """2 + 2 + K bytes per parameter, divided by N as each stage shards one more state."""
    k = 12
    expected = {
        0: (2 * PSI, 2 * PSI, k * PSI),
        1: (2 * PSI, 2 * PSI, k * PSI // N),
        2: (2 * PSI, 2 * PSI // N, k * PSI // N),
        3: (2 * PSI // N, 2 * PSI // N, k * PSI // N),
    }
    for stage, (parameters, gradients, optimizer_state) in expected.items():
        estimate = estimate_memory(PSI, N, stage)
        assert (estimate.parameters, estimate.gradients, estimate.optimizer_state) == (
            parameters,
            gradients,
            optimizer_state,
        )
        assert estimate.total == parameters + gradients + optimizer_state


def test_str_reports_gigabytes():
    text = str(estimate_memory(PSI, N, 3))
    assert "ZeRO stage 3" in text and "64 rank" in text and "1.88 GB per rank" in text


def test_module_parameters_are_counted_once_when_tied():
    tied = ToyLM(ToySpec(vocab=11, width=7, depth=2, tied=True))
    untied = ToyLM(ToySpec(vocab=11, width=7, depth=2, tied=False))
    assert count_parameters(untied)[0] - count_parameters(tied)[0] == 11 * 7
    unique = {id(p): p.numel() for p in tied.parameters()}
    assert estimate_memory(tied, 1, 0).numel == sum(unique.values())


def test_frozen_parameters_cost_no_gradient_or_optimizer_state():
    model = nn.Linear(10, 10)  # 100 weights + 10 biases
    model.bias.requires_grad_(False)
    estimate = estimate_memory(model, 1, 0)
    assert (estimate.numel, estimate.trainable_numel) == (110, 100)
    assert (estimate.parameters, estimate.gradients, estimate.optimizer_state) == (220, 200, 1200)


def test_dtypes_change_the_bytes_per_parameter():
    fp32 = estimate_memory(1000, 1, 0, compute_dtype="fp32", master_dtype="fp32")
    # fp32 training: the parameters are the master weights; K counts the two moments only.
    assert (fp32.parameters, fp32.gradients, fp32.optimizer_state) == (4000, 4000, 8000)
    accumulate_fp32 = estimate_memory(1000, 4, 2, grad_accum_dtype="fp32")
    assert accumulate_fp32.gradients == 1000 // 4 * 4
    # Stage 0 keeps the fp32 accumulation buffer beside the bf16 gradients.
    assert estimate_memory(1000, 4, 0, grad_accum_dtype="fp32").gradients == 2000 + 4000
    assert estimate_memory(1000, 4, 1, optimizer_state_bytes=16).optimizer_state == 250 * 16


def test_shards_round_up():
    assert estimate_memory(10, 4, 3).parameters == 3 * 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="stage"):
        estimate_memory(10, 4, 4)
    with pytest.raises(ValueError, match="world_size"):
        estimate_memory(10, 0, 1)
    with pytest.raises(ValueError, match="dtype"):
        estimate_memory(10, 4, 1, compute_dtype="int8")
    with pytest.raises(TypeError, match="nn.Module or a parameter count"):
        estimate_memory("7B", 4, 1)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_simulated_model_states_match_the_estimate(data):
    """Before the first op of a step, simulate's parameters (stage 3: the persistent shards),
    gradients and optimizer state are the paper formula's bytes for the schedule's padded
    parameter count, whatever the units, stage, world size and dtypes."""
    world_size = data.draw(st.sampled_from([1, 2, 3, 4, 8]))
    compute = data.draw(st.sampled_from([2, 4]))
    units = data.draw(unit_lists(world_size, compute_itemsize=compute))
    stage = data.draw(st.sampled_from([0, 1, 2, 3]))
    bytes_per_param = BytesPerParam(
        parameter=compute,
        gradient=compute,
        gradient_shard=data.draw(st.sampled_from([2, 4])),
        optimizer_state=data.draw(st.sampled_from([8, 12])),
    )
    padded = sum(u.param_nbytes for u in units) // compute
    trainable = sum(u.param_nbytes for u in units if u.has_trainable) // compute
    shard_world = world_size if stage > 0 else 1
    optimizer_numel = trainable // shard_world
    schedule = compile_schedule(
        units,
        stage=stage,
        world_size=world_size,
        trace=data.draw(traces(units)),
        traced=True,
        optimizer_numel=optimizer_numel,
        grad_shard_nbytes=optimizer_numel * bytes_per_param.gradient_shard,
        knobs=Knobs(prefetch=data.draw(st.booleans())),
    )
    start = simulate(schedule, bytes_per_param=bytes_per_param).memory[0]
    expected = model_states(padded, world_size, stage, bytes_per_param, trainable_numel=trainable)
    parameters = start.persistent_shards if stage == 3 else start.parameters
    assert (parameters, start.gradients, start.optimizer_state) == (
        expected.parameters,
        expected.gradients,
        expected.optimizer_state,
    )
    if trainable == padded and bytes_per_param == BytesPerParam():
        estimate = estimate_memory(padded, world_size, stage)
        assert estimate.total == expected.total


def test_presumed_schedule_matches_estimate_for_a_paper_sized_model():
    """A 7.5B-parameter model in 32 blocks on 64 ranks: simulate's stage-3 model states are the
    paper's 1.9 GB, and its peak adds only the gathered blocks and their gradients."""
    block_numel = PSI // 32
    units = tuple(
        UnitInfo(
            i, f"blocks.{i}", block_numel, 2 * block_numel, 2 * block_numel, 2 * block_numel, True
        )
        for i in range(32)
    )
    schedule = compile_schedule(
        units,
        stage=3,
        world_size=N,
        trace=presumed_trace(units),
        traced=True,
        optimizer_numel=PSI // N,
        grad_shard_nbytes=2 * PSI // N,
    )
    timeline = simulate(schedule)
    start, peak = timeline.memory[0], timeline.peak_memory
    estimate = estimate_memory(PSI, N, 3)
    assert start.total == estimate.total
    assert peak.total - estimate.total <= 3 * 2 * block_numel + 2 * 2 * block_numel
