"""estimate_memory: the ZeRO paper's per-rank model-state bytes, fzero's own, and agreement with
simulate."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fzero.memory import count_parameters, estimate_memory
from fzero.schedule import ops as O
from fzero.schedule import simulate
from fzero.schedule.compile import Knobs, compile_schedule, presumed_trace
from fzero.schedule.memory_model import BytesPerParam, model_states
from fzero.schedule.schedule import UnitInfo
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


def test_fzero_formulas_exactly():
    """fzero at the optimizer step and between steps, bf16 gradients, K = 12 (P = Psi / N):
    stage 0 2 + 2 + 12 always; stage 1 2 + 2 + (2 + 12) P, 2 + 2 + 12 P between steps;
    stage 2 2 + (2 + 12) P, then 2 + 12 P; stage 3 (2 + 12) P, then 12 P: no bf16 shard, and
    the gradient shard (2 P) lives only from the first reduction to the optimizer step."""
    shard = PSI // N  # 7.5e9 / 64 = 117,187,500 exactly
    expected = {  # (parameters, gradients, optimizer state, transient gradients)
        0: (2 * PSI, 2 * PSI, 12 * PSI, 0),
        1: (2 * PSI, 2 * PSI + 2 * shard, 12 * shard, 2 * shard),
        2: (2 * PSI, 2 * shard, 12 * shard, 2 * shard),
        3: (0, 2 * shard, 12 * shard, 2 * shard),
    }
    for stage, (parameters, gradients, optimizer_state, transient) in expected.items():
        estimate = estimate_memory(PSI, N, stage, layout="fzero")
        assert (
            estimate.parameters,
            estimate.gradients,
            estimate.optimizer_state,
            estimate.transient_gradients,
        ) == (parameters, gradients, optimizer_state, transient)
        assert estimate.between_steps == parameters + gradients + optimizer_state - transient
    fzero = {stage: estimate_memory(PSI, N, stage, layout="fzero") for stage in range(4)}
    paper = {stage: estimate_memory(PSI, N, stage) for stage in range(4)}
    assert fzero[0].total == fzero[0].between_steps == paper[0].total  # 16 Psi = 120 GB
    assert fzero[1].between_steps == paper[1].total  # (2 + 2) Psi + 12 P
    assert fzero[1].total == paper[1].total + 2 * shard
    assert fzero[2].total == paper[2].total  # 2 Psi + (2 + 12) P
    assert fzero[2].between_steps == paper[2].total - 2 * shard
    assert fzero[3].total == paper[3].total - 2 * shard  # (2 + 12) P = 1.64 GB, not 1.88
    assert fzero[3].total == 14 * shard == 1_640_625_000
    assert fzero[3].between_steps == 12 * shard
    # Accumulating in fp32 (fzero's default config) makes the gradient shard 4 P.
    fp32_accumulation = estimate_memory(PSI, N, 2, grad_accum_dtype="fp32", layout="fzero")
    assert fp32_accumulation.total == 2 * PSI + (4 + 12) * shard
    assert fp32_accumulation.between_steps == 2 * PSI + 12 * shard


def test_fzero_estimate_in_fp32_and_with_frozen_parameters():
    """In fp32, stages 1-3 keep the fp32 master apart from the parameters (K = 4 + 8), while
    stage 0's master is its parameters (K = 8); stage 3 keeps a compute-dtype shard of its
    frozen parameters only."""
    stage0 = estimate_memory(1000, 4, 0, compute_dtype="fp32", layout="fzero")
    assert (stage0.parameters, stage0.gradients, stage0.optimizer_state) == (4000, 4000, 8000)
    stage2 = estimate_memory(1000, 4, 2, compute_dtype="fp32", layout="fzero")
    # 4 * 1000 parameters; 4 * 250 gradient shard; (4 + 8) * 250 master and moments.
    assert (stage2.parameters, stage2.gradients, stage2.optimizer_state) == (4000, 1000, 3000)
    stage3 = estimate_memory(1000, 4, 3, compute_dtype="fp32", layout="fzero")
    assert (stage3.parameters, stage3.gradients, stage3.optimizer_state) == (0, 1000, 3000)
    model = nn.Linear(10, 10)  # 100 weights + 10 frozen biases, on 2 ranks
    model.bias.requires_grad_(False)
    frozen = estimate_memory(model, 2, 3, layout="fzero")
    # bf16 shard of the 10 frozen elements: 5 * 2; gradient shard 50 * 2; K: 50 * 12.
    assert (frozen.parameters, frozen.gradients, frozen.optimizer_state) == (10, 100, 600)
    assert frozen.between_steps == 10 + 600
    with pytest.raises(ValueError, match="layout"):
        estimate_memory(10, 4, 1, layout="deepspeed")


def test_str_reports_gigabytes():
    text = str(estimate_memory(PSI, N, 3))
    assert "ZeRO stage 3" in text and "64 rank" in text and "1.88 GB per rank" in text
    assert "between steps" not in text
    text = str(estimate_memory(PSI, N, 3, layout="fzero"))
    assert "(fzero)" in text and "1.64 GB per rank, 1.41 GB between steps" in text


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
    """Before the first op of a step, simulate's parameters (stage 3: the persistent shards of
    frozen units), gradients and optimizer state are fzero's formula between steps for the
    schedule's padded parameter count, and right after OptimizerStep they are its formula at
    the optimizer step, whatever the units, stage, world size and dtypes."""
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
    memory = simulate(schedule, bytes_per_param=bytes_per_param).memory
    optimizer = next(i for i, op in enumerate(schedule.ops()) if isinstance(op, O.OptimizerStep))
    at_optimizer = memory[1 + optimizer]  # memory[0] is before the first op
    expected = model_states(
        padded, world_size, stage, bytes_per_param, trainable_numel=trainable, layout="fzero"
    )
    for sample, transient in ((memory[0], expected.transient_gradients), (at_optimizer, 0)):
        # Stage 3 has released every unit by then: only frozen units' shards hold parameters.
        parameters = sample.persistent_shards if stage == 3 else sample.parameters
        assert (parameters, sample.gradients + transient, sample.optimizer_state) == (
            expected.parameters,
            expected.gradients,
            expected.optimizer_state,
        )
    assert memory[0].total == expected.between_steps
    assert at_optimizer.total == expected.total
    assert memory[-1].total == expected.between_steps
    if trainable == padded and bytes_per_param == BytesPerParam():
        estimate = estimate_memory(padded, world_size, stage, layout="fzero")
        assert estimate.total == expected.total


def test_presumed_schedule_matches_estimate_for_a_paper_sized_model():
    """A 7.5B-parameter model in 32 blocks on 64 ranks: simulate's stage-3 model states are
    fzero's estimate, K Psi / N = 1.41 GB between steps (the paper's 1.9 GB less the bf16 shard
    and the gradient shard), and its peak adds only the gathered blocks and their gradients to
    (2 + K) Psi / N = 1.64 GB."""
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
    estimate = estimate_memory(PSI, N, 3, layout="fzero")
    assert start.total == estimate.between_steps == 12 * (PSI // N)
    assert estimate_memory(PSI, N, 3).total - start.total == (2 + 2) * (PSI // N)
    assert peak.total - estimate.total <= 3 * 2 * block_numel + 2 * 2 * block_numel
