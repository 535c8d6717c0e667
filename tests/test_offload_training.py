"""CPU optimizer offload (stages 1-3) and parameter offload (stage 3) train like the same
configuration without offload.

The host step is torch's fused CPU AdamW (``torch._fused_adamw_``), which divides the gradient
by its ``grad_scale`` (fzero's device kernel multiplies by the inverse) and orders the update's
division differently, so the master can differ from the device kernel's by an fp32 ulp on some
elements per step. The comparison is therefore against the same configuration without offload,
within 1e-6 relative to each tensor's largest value after three steps (measured: at most 1.2e-7 on
every case), and the losses of the first step, which no update has touched yet, must be equal
bit for bit.
"""

from __future__ import annotations

import pytest
import torch

import fzero
from fzero.collectives import run_ranks
from fzero.errors import ConfigError
from fzero.schedule import ops as O
from fzero.schedule import simulate, verify
from tests.harness import Case, assert_close_to_reference
from tests.models import ToyLM, ToySpec

SPEC = ToySpec(depth=3, width=6, frozen=True)


def _offloaded(config: dict, params: bool = False) -> dict:
    zero = dict(config.get("zero_optimization", {}))
    zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {**config, "zero_optimization": zero}


def _train(case: Case, config: dict, world_size: int, record: bool = False):
    models = [ToyLM(case.spec) for _ in range(world_size)]
    batches = case.batches()

    def rank(comm):
        state = fzero.shard(
            models[comm.rank],
            stage=case.stage,
            config=config,
            process_group=comm,
            record_ops=record,
        )
        losses = []
        for step in range(case.steps):
            micro = batches[step][comm.rank]
            state, metrics = fzero.train_step(state, micro if case.micro > 1 else micro[0])
            losses.append((float(metrics["loss"]), metrics["skipped"], metrics["loss_scale"]))
        return fzero.full_state_dict(state), losses, state

    return run_ranks(world_size, rank)


CASES = [
    # (stage, world size, micro-batches, offload parameters too, extra config)
    (1, 2, 1, False, {}),
    (2, 2, 2, False, {}),
    (2, 3, 1, False, {"fzero": {"reduce_every_micro_batch": False}}),
    (3, 2, 2, False, {}),
    (3, 3, 1, True, {}),
    (3, 1, 2, True, {"bf16": {"enabled": True}}),
    (1, 1, 1, False, {"bf16": {"enabled": True}}),
    # bf16 gradients: the host step widens each unit's slice to fp32 for torch's kernel
    (2, 2, 1, False, {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "bf16"}}),
]


@pytest.mark.parametrize("stage, world_size, micro, params, extra", CASES)
def test_offload_trains_like_the_same_configuration_without_it(
    stage, world_size, micro, params, extra
):
    torch.set_num_threads(1)
    case = Case(SPEC, world_size, stage, micro, steps=3, clip=0.05, extra=extra)
    torch.manual_seed(0)
    plain = _train(case, case.config(), world_size)
    torch.manual_seed(0)
    offloaded = _train(case, _offloaded(case.config(), params), world_size, record=True)
    for (full_a, losses_a, _), (full_b, losses_b, state) in zip(plain, offloaded, strict=True):
        assert losses_a[0] == losses_b[0]
        assert_close_to_reference(full_b, full_a, rtol=1e-6)
        # The state lives where the config says, and the schedule says what ran.
        assert not state.master.is_cuda and not state.exp_avg.is_cuda
        schedule = state.schedule
        verify(schedule)
        ops = schedule.ops(micro)
        host_steps = (O.HostOptimizerStep, O.ApplyPendingUpdate)
        assert any(isinstance(op, host_steps) for op in ops)
        # Stage 3 runs its CPU steps in the next first forward (offload_update_in_forward).
        assert any(isinstance(op, O.ApplyPendingUpdate) for op in ops) == (stage == 3)
        assert not any(isinstance(op, O.OptimizerStep) for op in ops)
        assert any(isinstance(op, O.UploadShard) for op in ops) == params
        assert simulate(schedule, micro_batches=micro).step_seconds > 0
        executed = state.runtime.executor.executed
        assert executed[-len(schedule.ops(micro)) :] == ops


def test_fp16_overflow_skips_the_host_step_on_every_rank():
    torch.set_num_threads(1)
    fp16 = {"fp16": {"enabled": True, "initial_scale_power": 30, "hysteresis": 1}}
    case = Case(SPEC, 2, 2, 1, steps=3, extra=fp16)
    torch.manual_seed(0)
    plain = _train(case, case.config(), 2)
    torch.manual_seed(0)
    offloaded = _train(case, _offloaded(case.config()), 2)
    for (full_a, losses_a, _), (full_b, losses_b, state) in zip(plain, offloaded, strict=True):
        assert [s for _, s, _ in losses_b] == [s for _, s, _ in losses_a]
        assert losses_b[0][1], "2**30 overflows on the first step"
        assert [scale for *_, scale in losses_b] == [scale for *_, scale in losses_a]
        assert_close_to_reference(full_b, full_a, rtol=1e-6)
        assert int(state.step) == 3 - sum(s for _, s, _ in losses_b)


def test_offload_errors_name_the_key():
    model = ToyLM(SPEC)
    with pytest.raises(ConfigError, match="offload_optimizer.device.*stage 1, 2 or 3"):
        fzero.shard(model, stage=0, config=_offloaded({}))
    only_params = {"zero_optimization": {"offload_param": {"device": "cpu"}}}
    with pytest.raises(ConfigError, match="offload_param.device.*optimizer offload"):
        fzero.shard(ToyLM(SPEC), stage=3, config=only_params)
    with pytest.raises(ConfigError, match="offload_param.device: parameter offload needs stage 3"):
        fzero.shard(ToyLM(SPEC), stage=2, config=_offloaded({}, params=True))


def test_the_host_memory_check_refuses_an_offload_that_does_not_fit(monkeypatch):
    from fzero.errors import HostMemoryError
    from fzero.offload import host

    tiny = host.HostMemory(1000, 1000, None)
    monkeypatch.setattr(host, "read_host_memory", lambda root="/": tiny)
    with pytest.raises(HostMemoryError, match="offload_optimizer.*needs .* bytes.*only 1,000"):
        fzero.shard(ToyLM(SPEC), stage=2, config=_offloaded({}))


@pytest.mark.parametrize("saved_offloaded", [True, False])
def test_checkpoints_move_between_offloaded_and_device_states(tmp_path, saved_offloaded):
    """An offloaded state saves and loads like any other: loaded with or without offload, it
    trains on exactly like the state that was saved."""
    torch.set_num_threads(1)
    case = Case(SPEC, 1, 3, 1, steps=3)
    plain, offloaded = case.config(), _offloaded(case.config(), params=True)
    saved_config, loaded_config = (offloaded, plain) if saved_offloaded else (plain, offloaded)
    batches = case.batches()
    torch.manual_seed(0)
    state = fzero.shard(ToyLM(SPEC), stage=3, config=saved_config)
    state, _ = fzero.train_step(state, batches[0][0][0])
    fzero.save(state, tmp_path)
    state, expected = fzero.train_step(state, batches[1][0][0])
    loaded = fzero.load(tmp_path, ToyLM(SPEC), config=loaded_config)
    assert loaded.master.device.type == "cpu"
    loaded, metrics = fzero.train_step(loaded, batches[1][0][0])
    assert float(metrics["loss"]) == float(expected["loss"])
    assert_close_to_reference(fzero.full_state_dict(loaded), fzero.full_state_dict(state), 1e-6)
