"""Partial optimizer offload with parameter offload (``offload_optimizer.ratio`` < 1 and
``offload_param.device: "cpu"``, stage 3): every unit's compute-dtype shard lives on the host,
the device units' master and moments live and step on the device, and ``CopyParamsToHost``
writes their stepped values into the host shard before their next upload.

The oracles are those of ``tests/test_offload_ratio.py``: after the first update the device
part (master and both moments) equals the run without offload bit for bit, and the host part
equals full offload with parameter offload (``ratio: 1``) bit for bit; the host shard holds each
unit's master cast to the compute dtype (the device units' written by the copy, the host units'
by the CPU step). After three steps the parts have computed with each other's values, so the
parameters are compared with the run without offload within 1e-6 relative to each tensor's
largest value, the tolerance ``test_offload_training.py`` measured for full offload.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import fzero
from fzero.collectives import run_ranks
from fzero.errors import ConfigError, ScheduleInvariantError
from fzero.memory import estimate_memory
from fzero.schedule import ops as O
from fzero.schedule import schedule_from_json, schedule_to_json, simulate, verify
from fzero.state.split import SplitFlat, as_flat
from tests.gloo_pool import GlooPool
from tests.harness import Case, assert_close_to_reference, assert_copy_trains_like_original
from tests.models import ToyLM
from tests.ratio_cases import (
    KINDS,
    SPEC,
    compare_parts,
    host_shard_holds_the_cast_master,
    offloaded,
    train_rank,
)


def _schedule_copies_the_device_units_down(state, micro: int) -> None:
    schedule = state.schedule
    verify(schedule)
    assert simulate(schedule, micro_batches=micro).step_seconds > 0
    ops = schedule.ops(micro)
    (device_step,) = [op for op in ops if isinstance(op, O.OptimizerStep)]
    (copy,) = [op for op in ops if isinstance(op, O.CopyParamsToHost)]
    assert ops.index(copy) == ops.index(device_step) + 1
    assert copy.units == device_step.units
    itemsize = state.runtime.executor.workspace.param_shard.element_size()
    assert copy.nbytes == device_step.shard_numel * itemsize
    assert not any(isinstance(op, O.CopyParamsToDevice) for op in ops)
    assert f"CopyParamsToHost units {', '.join(map(str, copy.units))}" in str(schedule)
    assert schedule_from_json(schedule_to_json(schedule)) == schedule


CASES = [
    # (world size, micro-batches, extra config); clipping in every case
    (1, 1, {}),
    (2, 2, {}),
    (1, 1, {"bf16": {"enabled": True}}),
    (1, 2, {"fzero": {"offload_update_in_forward": False}}),
    # The blocks stay gathered: the step phase uploads and re-gathers them after the copy.
    (1, 1, {"zero_optimization": {"stage3_param_persistence_threshold": 60}}),
]


@pytest.mark.parametrize("world_size, micro, extra", CASES)
def test_device_units_step_like_no_offload_and_host_units_like_full_param_offload(
    world_size, micro, extra
):
    torch.set_num_threads(1)
    case = Case(SPEC, world_size, 3, micro, steps=3, clip=0.05, extra=extra)

    def rank(comm):
        _, _, split = compare_parts(case, 0.5, comm.rank, comm, steps=1, params=True)
        _schedule_copies_the_device_units_down(split[3], micro)
        plain = train_rank(case, None, comm.rank, comm, 3)
        split = train_rank(case, 0.5, comm.rank, comm, 3, params=True)
        assert_close_to_reference(split[1], plain[1], rtol=1e-6)
        # Where the shards live changes no value: the same partial offload without parameter
        # offload computes the same numbers.
        resident = train_rank(case, 0.5, comm.rank, comm, 3)
        assert all(torch.equal(split[1][name], resident[1][name]) for name in resident[1])
        return split[3].runtime.executor.workspace.param_shard.device.type

    assert run_ranks(world_size, rank) == ["cpu"] * world_size


def test_an_fp16_overflow_skips_both_parts_and_copies_nothing():
    """The first two steps overflow: neither part moves and a skipped step's
    ``CopyParamsToHost`` writes nothing into the host shard; the third step's update is each
    part's oracle's."""
    torch.set_num_threads(1)
    fp16 = {"fp16": {"enabled": True, "initial_scale_power": 16, "hysteresis": 1}}
    case = Case(SPEC, 1, 3, 1, steps=3, extra=fp16)

    def rank(comm):
        torch.manual_seed(0)
        state = fzero.shard(ToyLM(SPEC), stage=3, config=offloaded(case.config(), 0.5, params=True))
        state, metrics = fzero.train_step(state, case.batches()[0][0][0])
        assert metrics["skipped"]
        executor = state.runtime.executor
        copy = next(op for op in state.schedule.ops(1) if isinstance(op, O.CopyParamsToHost))
        target = executor.workspace.host_copy_out(copy.units[0])
        kept = target.clone()
        target.fill_(7.0)  # whatever the copy would write over
        executor.host_optimizer.copy_params_to_host(copy)  # the skipped step's copy, again
        assert torch.all(target == 7.0)
        target.copy_(kept)
        _, _, split = compare_parts(case, 0.5, comm.rank, comm, steps=3, params=True)
        assert [skipped for _, skipped, _ in split[2]] == [True, True, False]
        assert int(split[3].step) == 1

    run_ranks(1, rank)


def _gloo_case(rank: int, world_size: int, micro: int) -> bool:
    """On a real gloo group (the default process group: ``process_group=None``)."""
    case = Case(SPEC, world_size, 3, micro, steps=1, clip=0.05)
    compare_parts(case, 0.5, rank, None, steps=1, params=True)
    return True


def test_partial_offload_with_parameter_offload_on_gloo_ranks():
    pool = GlooPool(3)
    try:
        assert all(pool.run(_gloo_case, 2, timeout_s=120))
    finally:
        pool.close()


def test_a_tree_map_copy_trains_bitwise_like_the_original():
    """The host shard and both parts of the split buffers are leaves: a copy taken with an
    update pending trains the same two steps to the same leaves and losses."""
    torch.set_num_threads(1)
    case = Case(SPEC, 1, 3, 1, steps=3)
    batches = case.batches()
    torch.manual_seed(0)
    state = fzero.shard(ToyLM(SPEC), stage=3, config=offloaded(case.config(), 0.5, params=True))
    state, _ = fzero.train_step(state, batches[0][0][0])
    assert state.pending.is_armed and isinstance(state.master, SplitFlat)
    assert_copy_trains_like_original(state, [batches[step][0][0] for step in (1, 2)])


@pytest.mark.parametrize(
    "saved, loaded",
    [((0.5, True), (None, False)), ((None, False), (0.5, True)), ((1.0, True), (0.5, True))],
)
def test_checkpoints_move_to_and_from_partial_parameter_offload(tmp_path, saved, loaded):
    """A checkpoint holds whole flat buffers: one saved here loads without offload, and ones
    saved without offload or with full offload load here, each with the saved values bit for
    bit; the loaded host shard is the master cast, and the next step trains the same."""
    torch.set_num_threads(1)
    case = Case(SPEC, 1, 3, 1, steps=2)
    batches = case.batches()
    torch.manual_seed(0)
    state = fzero.shard(ToyLM(SPEC), stage=3, config=offloaded(case.config(), *saved))
    state, _ = fzero.train_step(state, batches[0][0][0])
    fzero.save(state, tmp_path)
    saved_flats = {kind: as_flat(getattr(state, kind)).clone() for kind in KINDS}
    state, expected = fzero.train_step(state, batches[1][0][0])
    config = offloaded(case.config(), *loaded)
    loaded_state = fzero.load(tmp_path, ToyLM(SPEC), config=config)
    assert isinstance(loaded_state.master, SplitFlat) == (loaded[0] == 0.5)
    for kind in KINDS:
        assert torch.equal(as_flat(getattr(loaded_state, kind)), saved_flats[kind])
    if loaded[1]:
        host_shard_holds_the_cast_master(loaded_state)
    loaded_state, metrics = fzero.train_step(loaded_state, batches[1][0][0])
    assert float(metrics["loss"]) == float(expected["loss"])
    assert_close_to_reference(
        fzero.full_state_dict(loaded_state), fzero.full_state_dict(state), 1e-6
    )


def test_verify_refuses_a_device_unit_uploaded_before_its_copy_to_host():
    state = fzero.shard(ToyLM(SPEC), stage=3, config=offloaded({}, 0.5, params=True))
    schedule = state.schedule
    verify(schedule)
    (step,) = schedule.step
    without = tuple(op for op in step.ops if not isinstance(op, O.CopyParamsToHost))
    assert len(without) == len(step.ops) - 1
    missing = replace(schedule, step=(replace(step, ops=without),))
    with pytest.raises(ScheduleInvariantError, match="uploaded before CopyParamsToHost"):
        verify(missing)
    copy = next(op for op in step.ops if isinstance(op, O.CopyParamsToHost))
    early = (copy, *without)  # before the device step it copies the old values
    with pytest.raises(ScheduleInvariantError, match="no device OptimizerStep stepped"):
        verify(replace(schedule, step=(replace(step, ops=early),)))


def test_simulate_prices_the_copy_on_the_device_to_host_stream():
    """The copy runs on the device-to-host stream, priced by ``CostModel.download``, after the
    device step it copies; the step lasts until it landed."""
    state = fzero.shard(ToyLM(SPEC), stage=3, config=offloaded({}, 0.5, params=True))
    timeline = simulate(state.schedule, micro_batches=1)
    (copy,) = [s for s in timeline.spans if s.name.startswith("CopyParamsToHost")]
    (device_step,) = [s for s in timeline.spans if s.name.startswith("OptimizerStep")]
    assert copy.stream == O.DEVICE_TO_HOST and copy.end > copy.start >= device_step.end
    assert timeline.step_seconds >= copy.end


def test_ratio_zero_with_parameter_offload_is_refused_naming_the_ratio():
    zero = {
        "offload_optimizer": {"device": "cpu", "ratio": 0.0},
        "offload_param": {"device": "cpu"},
    }
    with pytest.raises(ConfigError, match="ratio.*ratio 0 keeps the whole optimizer"):
        fzero.shard(ToyLM(SPEC), stage=3, config={"zero_optimization": zero})


def test_nvme_parameter_offload_with_a_ratio_is_refused_naming_why(tmp_path):
    zero = {
        "offload_optimizer": {"device": "cpu", "ratio": 0.5},
        "offload_param": {"device": "nvme", "nvme_path": str(tmp_path)},
    }
    with pytest.raises(ConfigError, match=r'ratio.*offload_param.device "nvme".*staging'):
        fzero.shard(ToyLM(SPEC), stage=3, config={"zero_optimization": zero})
    with pytest.raises(ValueError, match='offload_param "none" or "cpu"'):
        estimate_memory(
            10**6, 4, 3, offload_optimizer="cpu", offload_param="nvme", offload_ratio=0.5
        )


def test_memory_counts_the_whole_shard_on_the_host_and_the_device_units_state_on_the_device(
    monkeypatch,
):
    asked = []
    monkeypatch.setattr(
        "fzero.offload.plan.check_host_memory", lambda nbytes, *_, **__: asked.append(nbytes)
    )
    state = fzero.shard(ToyLM(SPEC), stage=3, config=offloaded({}, 0.5, params=True))
    host_numel = state.master.on_host.numel()
    shard_numel = state.layout.shard_numel
    # fp32: master, moments and gradient copy of the host units, and the whole fp32 shard.
    assert asked == [host_numel * 16 + shard_numel * 4]
    full = estimate_memory(10**6, 4, 3, offload_optimizer="cpu", offload_param="cpu")
    half = estimate_memory(
        10**6, 4, 3, offload_optimizer="cpu", offload_param="cpu", offload_ratio=0.5
    )
    assert half.parameters == full.parameters == 0  # nothing between uses
    assert half.host.parameters == full.host.parameters > 0  # the whole compute-dtype shard
    assert half.optimizer_state == half.host.optimizer_state == 12 * 125_000
    assert half.host.gradients * 2 == full.host.gradients
    # simulate's standing bytes: the device units' master and moments, no parameter shard.
    from fzero.schedule.memory_model import BytesPerParam, MemoryModel

    b = BytesPerParam.from_dtypes("fp32", "fp32", "fp32")
    model = MemoryModel.from_schedule(state.schedule, b)
    assert model.optimizer_state_nbytes == state.master.split_numel * b.optimizer_state
    assert model.parameter_shard_nbytes == 0


def test_readers_write_the_host_shard_of_every_unit(tmp_path):
    """``load_pretrained`` writes each unit's values into the part of the master that holds it
    and into the host shard (the device units' too); so does ``refresh_parameters`` after the
    master was written directly."""
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    source = ToyLM(SPEC)  # its values, changed so that loading them changes every unit
    values = {name: tensor.detach() * 0.5 + 0.25 for name, tensor in source.state_dict().items()}
    save_file(values, str(tmp_path / "model.safetensors"))
    torch.manual_seed(0)
    state = fzero.shard(ToyLM(SPEC), stage=3, config=offloaded({}, 0.5, params=True))
    state = fzero.load_pretrained(tmp_path, state)
    host_shard_holds_the_cast_master(state)
    loaded = fzero.full_state_dict(state)
    assert all(torch.equal(loaded[name], values[name]) for name in values)
    state.master.on_device.add_(1.0)  # written directly: refresh_parameters casts it down
    fzero.checkpoint.refresh_parameters(state)
    host_shard_holds_the_cast_master(state)
