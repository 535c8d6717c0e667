"""Partial optimizer offload (``zero_optimization.offload_optimizer.ratio`` < 1): the last units'
optimizer state lives and steps on the host, the first units' on the device, in the same step.

The oracles are the two configurations each part computes like: a device unit steps with the
device AdamW on the same gradient and scalars as without offload, a host unit with torch's fused
CPU AdamW as under full offload (``ratio: 1``). The two kernels round the update differently (an
fp32 ulp on some elements, ``tests/test_offload_training.py``), so after the first update each
part must equal its oracle bit for bit (master and both moments); once the parts have computed
with each other's values the runs drift apart by that rounding, so after three steps the
parameters are compared with the no-offload run within 1e-6 relative to each tensor's largest
value, the tolerance ``test_offload_training.py`` measured for full offload (measured here: at
most 1.8e-7).
"""

from __future__ import annotations

import pytest
import torch

import fzero
from fzero.collectives import run_ranks
from fzero.errors import ConfigError
from fzero.memory import estimate_memory
from fzero.schedule import ops as O
from fzero.schedule import schedule_from_json, schedule_to_json, simulate, verify
from fzero.schedule.offload_split import split_units
from fzero.state.split import SplitFlat, as_flat
from tests.gloo_pool import GlooPool
from tests.harness import Case, assert_close_to_reference, assert_copy_trains_like_original
from tests.models import ToyLM
from tests.ratio_cases import KINDS, SPEC, compare_parts, offloaded, train_rank


def _schedule_says_where_units_step(state, micro: int) -> None:
    schedule = state.schedule
    verify(schedule)
    assert simulate(schedule, micro_batches=micro).step_seconds > 0
    split = state.master
    ops = schedule.ops(micro)
    (device_step,) = [op for op in ops if isinstance(op, O.OptimizerStep)]
    host_steps = {
        op.unit for op in ops if isinstance(op, (O.HostOptimizerStep, O.ApplyPendingUpdate))
    }
    copied = {op.unit for op in ops if isinstance(op, O.CopyGradToHost)}
    assert device_step.shard_numel == split.split_numel
    assert not host_steps & set(device_step.units)
    assert copied <= host_steps
    units = state.layout.units
    assert sum(units[u].optimizer_numel for u in host_steps) == split.on_host.numel()
    assert min(host_steps) > max(device_step.units)  # the last units are the host's
    assert "on the host" in str(schedule) and "on the device" in str(schedule)
    assert schedule_from_json(schedule_to_json(schedule)) == schedule


CASES = [
    # (stage, world size, micro-batches, ratio, extra config)
    (1, 2, 1, 0.5, {}),
    (2, 1, 2, 0.5, {}),
    (2, 3, 1, 0.3, {"fzero": {"reduce_every_micro_batch": False}}),
    (3, 2, 2, 0.5, {}),
    (3, 1, 1, 0.6, {"bf16": {"enabled": True}}),
    (3, 1, 1, 0.5, {"fzero": {"offload_update_in_forward": False}}),
]


@pytest.mark.parametrize("stage, world_size, micro, ratio, extra", CASES)
def test_device_units_step_like_no_offload_and_host_units_like_full_offload(
    stage, world_size, micro, ratio, extra
):
    torch.set_num_threads(1)
    case = Case(SPEC, world_size, stage, micro, steps=3, clip=0.05, extra=extra)

    def rank(comm):
        plain, _, split = compare_parts(case, ratio, comm.rank, comm, steps=1)
        _schedule_says_where_units_step(split[3], micro)
        # Three steps: the parts have computed with each other's values.
        plain = train_rank(case, None, comm.rank, comm, 3)
        split = train_rank(case, ratio, comm.rank, comm, 3)
        assert_close_to_reference(split[1], plain[1], rtol=1e-6)
        return split[3].master.on_host.device.type

    assert run_ranks(world_size, rank) == ["cpu"] * world_size


def test_an_fp16_overflow_skips_both_parts():
    """The first two steps overflow (loss scale 2**16, then 2**15): neither part moves and the
    step count stays; the third step's update is each part's oracle's again."""
    torch.set_num_threads(1)
    fp16 = {"fp16": {"enabled": True, "initial_scale_power": 16, "hysteresis": 1}}
    case = Case(SPEC, 2, 2, 1, steps=3, extra=fp16)

    def rank(comm):
        _, _, split = compare_parts(case, 0.5, comm.rank, comm, steps=3)
        assert [skipped for _, skipped, _ in split[2]] == [True, True, False]
        assert int(split[3].step) == 1

    run_ranks(2, rank)


def _gloo_case(rank: int, world_size: int, stage: int, ratio: float) -> bool:
    """On a real gloo group (the default process group: ``process_group=None``)."""
    case = Case(SPEC, world_size, stage, 2, steps=1, clip=0.05)
    compare_parts(case, ratio, rank, None, steps=1)
    return True


@pytest.mark.parametrize("world_size, stage, ratio", [(2, 2, 0.5), (3, 3, 0.4)])
def test_partial_offload_on_gloo_ranks(world_size, stage, ratio):
    pool = GlooPool(world_size)
    try:
        assert all(pool.run(_gloo_case, stage, ratio, timeout_s=120))
    finally:
        pool.close()


def test_a_tree_map_copy_of_a_split_state_trains_bitwise_like_the_original():
    """Both parts are leaves: a copy taken with an update pending (stage 3) trains the same
    two steps to the same leaves and losses."""
    torch.set_num_threads(1)
    case = Case(SPEC, 1, 3, 1, steps=3)
    batches = case.batches()
    torch.manual_seed(0)
    state = fzero.shard(ToyLM(SPEC), stage=3, config=offloaded(case.config(), 0.5))
    state, _ = fzero.train_step(state, batches[0][0][0])
    assert state.pending.is_armed and isinstance(state.master, SplitFlat)
    assert_copy_trains_like_original(state, [batches[step][0][0] for step in (1, 2)])


@pytest.mark.parametrize("saved, loaded", [(0.5, 1.0), (0.5, None), (None, 0.5), (1.0, 0.5)])
def test_checkpoints_move_between_split_and_whole_states(tmp_path, saved, loaded):
    """A checkpoint holds whole flat buffers: a split state's loads without offload and under
    full offload, and theirs load split, each with the saved values bit for bit."""
    torch.set_num_threads(1)
    case = Case(SPEC, 1, 3, 1, steps=2)
    batches = case.batches()
    torch.manual_seed(0)
    state = fzero.shard(ToyLM(SPEC), stage=3, config=offloaded(case.config(), saved))
    state, _ = fzero.train_step(state, batches[0][0][0])
    fzero.save(state, tmp_path)
    saved_flats = {kind: as_flat(getattr(state, kind)).clone() for kind in KINDS}
    state, expected = fzero.train_step(state, batches[1][0][0])
    loaded_state = fzero.load(tmp_path, ToyLM(SPEC), config=offloaded(case.config(), loaded))
    assert isinstance(loaded_state.master, SplitFlat) == (loaded == 0.5)
    for kind in KINDS:
        assert torch.equal(as_flat(getattr(loaded_state, kind)), saved_flats[kind])
    loaded_state, metrics = fzero.train_step(loaded_state, batches[1][0][0])
    assert float(metrics["loss"]) == float(expected["loss"])
    assert_close_to_reference(
        fzero.full_state_dict(loaded_state), fzero.full_state_dict(state), 1e-6
    )


def test_ratio_zero_is_no_optimizer_offload():
    """Ratio 0 keeps every unit's optimizer on the device, as DeepSpeed does: the state, the
    schedule and the training are those without offload, bit for bit."""
    torch.set_num_threads(1)
    case = Case(SPEC, 1, 2, 1, steps=2)

    def rank(comm):
        plain = train_rank(case, None, 0, comm, 2)
        zero = train_rank(case, 0.0, 0, comm, 2)
        assert isinstance(zero[3].master, torch.Tensor)
        assert str(zero[3].schedule) == str(plain[3].schedule)
        assert all(torch.equal(zero[0][k], plain[0][k]) for k in KINDS)

    run_ranks(1, rank)


def test_split_rule_keeps_the_last_units_on_the_host():
    """DeepSpeed-like rounding: the device keeps the first units within (1 - ratio) of the
    elements; the host's share is rounded up to whole units."""
    units = [(0, 40), (1, 30), (2, 20), (3, 10)]
    half = split_units(units, 0.5)
    assert half.device_units == {0} and half.host_units == {1, 2, 3}
    assert half.device_numel == 40 and half.host_fraction == 0.6
    assert split_units(units, 0.3).device_units == {0, 1}
    assert split_units(units, 1.0).device_numel == 0
    assert split_units(units, 0.0).host_units == frozenset()
    assert split_units(units, 0.05).host_units == {3}
    assert split_units(units, 1e-18).host_units == {3}  # 1 - ratio rounds to 1
    assert "60.0%" in str(half) and "units 1-3" in str(half)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        split_units(units, 1.5)


@pytest.mark.parametrize(
    "zero, match",
    [
        ({"offload_optimizer": {"device": "cpu", "ratio": 1.5}}, "ratio"),
        ({"offload_optimizer": {"device": "none", "ratio": 0.5}}, 'ratio.*"none"'),
        (
            {
                "offload_optimizer": {"device": "cpu", "ratio": 0.5},
                "offload_param": {"device": "nvme", "nvme_path": "/tmp"},
            },
            'ratio.*offload_param.device "nvme"',
        ),
    ],
)
def test_bad_ratios_name_the_key(zero, match):
    with pytest.raises(ConfigError, match=match):
        fzero.shard(ToyLM(SPEC), stage=3, config={"zero_optimization": zero})


def test_memory_counts_each_part_where_it_lives(monkeypatch):
    """The host check asks for the host units' bytes only, and the estimate moves ratio x the
    optimizer state to the host."""
    asked = []
    monkeypatch.setattr(
        "fzero.offload.plan.check_host_memory", lambda nbytes, *_, **__: asked.append(nbytes)
    )
    states = [
        fzero.shard(ToyLM(SPEC), stage=2, config=offloaded({}, ratio)) for ratio in (1.0, 0.5)
    ]
    host_numel = states[1].master.on_host.numel()
    assert host_numel < states[0].master.numel()
    # Master, moments and gradient copy (fp32); the upload sends the master itself.
    assert asked == [states[0].master.numel() * 16, host_numel * 16]
    whole = estimate_memory(10**6, 4, 3, offload_optimizer="cpu")
    half = estimate_memory(10**6, 4, 3, offload_optimizer="cpu", offload_ratio=0.5)
    assert whole.optimizer_state == 0 and whole.host.optimizer_state == 12 * 250_000
    assert half.optimizer_state == half.host.optimizer_state == 12 * 125_000
    assert half.host.gradients * 2 == whole.host.gradients
    assert half.parameters == whole.parameters  # stage 3's compute-dtype shard, either way
    none = estimate_memory(10**6, 4, 3, offload_optimizer="cpu", offload_ratio=0.0)
    plain = estimate_memory(10**6, 4, 3, layout="fzero")
    assert (none.total, none.host_nbytes) == (plain.total, 0)
    assert "ratio 0.5" in str(half)


def test_readers_route_each_unit_to_its_part(tmp_path):
    """``load_pretrained`` and ``gathered(modifier_rank=0)`` write each unit's range into the
    part that holds it; ``full_state_dict`` reads both."""
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    source = ToyLM(SPEC)  # its values, changed so that loading them changes every unit
    values = {name: tensor.detach() * 0.5 + 0.25 for name, tensor in source.state_dict().items()}
    save_file(values, str(tmp_path / "model.safetensors"))
    torch.manual_seed(0)
    state = fzero.shard(ToyLM(SPEC), stage=2, config=offloaded({}, 0.5))
    before = state.master.full()
    state = fzero.load_pretrained(tmp_path, state)
    assert isinstance(state.master, SplitFlat)
    after = state.master.full()
    cut = state.master.split_numel
    assert not torch.equal(after[:cut], before[:cut])
    assert not torch.equal(after[cut:], before[cut:])
    loaded = fzero.full_state_dict(state)
    assert all(torch.equal(loaded[name], values[name]) for name in values)
    with fzero.gathered(state, modifier_rank=0):
        for param in state.model.parameters():
            param.data.add_(1.0)
    shifted = fzero.full_state_dict(state)
    for name, value in values.items():
        is_parameter = any(name in slot.names for u in state.layout.units for slot in u.params)
        assert torch.equal(shifted[name], value + 1.0 if is_parameter else value), name


def test_the_schedules_memory_model_keeps_the_device_units_state_on_the_device():
    """``simulate``'s standing bytes: the master and moments of the device units only (none
    under full offload), and at stage 3 the compute-dtype shard the gathers read."""
    from fzero.schedule.memory_model import BytesPerParam, MemoryModel

    b = BytesPerParam.from_dtypes("fp32", "fp32", "fp32")
    models = {}
    for ratio in (None, 1.0, 0.5):
        state = fzero.shard(ToyLM(SPEC), stage=3, config=offloaded({}, ratio))
        models[ratio] = (MemoryModel.from_schedule(state.schedule, b), state)
    split = models[0.5][1].master
    assert models[0.5][0].optimizer_state_nbytes == split.split_numel * b.optimizer_state
    assert models[1.0][0].optimizer_state_nbytes == 0
    assert models[None][0].optimizer_state_nbytes == split.numel() * b.optimizer_state
    shard_nbytes = models[0.5][1].layout.shard_numel * b.parameter
    assert models[0.5][0].parameter_shard_nbytes == models[1.0][0].parameter_shard_nbytes
    assert models[0.5][0].parameter_shard_nbytes == shard_nbytes


def test_verify_refuses_a_unit_stepped_on_both_sides_or_before_the_step_is_counted():
    from dataclasses import replace

    from fzero.errors import ScheduleInvariantError

    state = fzero.shard(ToyLM(SPEC), stage=2, config=offloaded({}, 0.5))
    schedule = state.schedule
    (step,) = schedule.step
    device_step = next(op for op in step.ops if isinstance(op, O.OptimizerStep))
    unit = state.layout.units[device_step.units[0]]
    twice = O.HostOptimizerStep(unit.index, unit.name, unit.optimizer_numel)
    index = step.ops.index(device_step)
    both = step.ops[: index + 1] + (twice,) + step.ops[index + 1 :]
    with pytest.raises(ScheduleInvariantError, match="HostOptimizerStep runs twice"):
        verify(replace(schedule, step=(replace(step, ops=both),)))
    early = [op for op in step.ops if op is not device_step]
    early.insert(early.index(O.ScalarsToHost()), device_step)
    with pytest.raises(ScheduleInvariantError, match="before ScalarsToHost"):
        verify(replace(schedule, step=(replace(step, ops=tuple(early)),)))
