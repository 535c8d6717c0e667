"""Streamed gradients under optimizer offload (``fzero/schedule/streamed_grads.py``): each host
unit's reduced gradient is on the device only from its landing to its copy down, in one buffer
of the largest host unit's part, and the global norm is summed unit by unit on the device.

The oracle is the same offload configuration with the whole gradient shard
(``fzero.stream_gradients: false``), which ``tests/test_offload_training.py`` checks against no
offload. Streaming changes only where a gradient waits on the device and the order in which the
squared norm is summed (per unit, then over units, instead of one reduction over the shard), so:

- without gradient clipping the norm reaches no update: parameters, losses, skipped steps and
  loss scales are equal bit for bit (fp32, bf16, fp16 with its overflow step);
- with clipping the clip factor differs in its last bits, and after three steps the parameters
  agree within 1e-6 relative to each tensor's largest value (measured: at most 1.3e-7 over the
  cases below), the reported gradient norms within 1e-6 relative (measured: 1.1e-7), and the
  losses after the first step, which read those parameters, within 1e-6 relative too.

The device's gradient bytes are read after every op from the executor's buffers (CPU tensors
here, whose storage sizes are exact): never more than the largest host unit's part plus the
device units' part of a partial offload.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import fzero
from fzero.collectives import run_ranks
from fzero.errors import ScheduleInvariantError
from fzero.memory import estimate_memory
from fzero.schedule import (
    Knobs,
    UnitInfo,
    compile_schedule,
    presumed_trace,
    schedule_from_json,
    schedule_to_json,
    simulate,
    verify,
)
from fzero.schedule import ops as O
from tests.gloo_pool import GlooPool
from tests.harness import Case, assert_close_to_reference
from tests.models import ToyLM, ToySpec

SPEC = ToySpec(depth=3, width=6, frozen=True)
FP16 = {"fp16": {"enabled": True, "initial_scale_power": 30, "hysteresis": 1}}
CLIP = 0.05


def _config(
    case: Case,
    streamed: bool,
    *,
    params: bool = False,
    ratio: float | None = None,
    nvme_dir=None,
) -> dict:
    config = case.config()
    zero = dict(config["zero_optimization"])
    device = {"device": "cpu"} if nvme_dir is None else {"device": "nvme", "buffer_count": 2}
    if nvme_dir is not None:
        device["nvme_path"] = str(nvme_dir)
    zero["offload_optimizer"] = {**device, **({"ratio": ratio} if ratio is not None else {})}
    if params:
        zero["offload_param"] = {**device, **({"max_in_cpu": 0} if nvme_dir is not None else {})}
    return {
        **config,
        "zero_optimization": zero,
        "gradient_accumulation_steps": case.micro,
        "fzero": {**config["fzero"], "stream_gradients": streamed},
    }


def _probe_device_gradients(state) -> list[int]:
    """After every op the executor runs from now on, the bytes the gradient shard and the
    gradient buffer hold (a test-only wrap of its handler table)."""
    executor = state.runtime.executor
    seen: list[int] = []

    def wrapped(handler):
        def run(op):
            handler(op)
            shard = executor.workspace.grad_shard.untyped_storage().size()
            seen.append(shard + executor.landings.nbytes())

        return run

    for op_type, handler in list(executor.handlers.items()):
        executor.handlers[op_type] = wrapped(handler)
    return seen


def _train_rank(case: Case, config: dict, comm, rank: int, model: torch.nn.Module):
    state = fzero.shard(model, stage=case.stage, config=config, process_group=comm, record_ops=True)
    seen = _probe_device_gradients(state)
    batches = case.batches()
    metrics = []
    for step in range(case.steps):
        micro = batches[step][rank]
        state, m = fzero.train_step(state, micro if case.micro > 1 else micro[0])
        metrics.append((float(m["loss"]), float(m["grad_norm"]), m["skipped"], m["loss_scale"]))
    return fzero.full_state_dict(state), metrics, state, max(seen)


def _expected_peak(state, streamed: bool) -> int:
    """Device gradient bytes: the whole shard, or the largest host unit's part plus the device
    units' part, from the layout (not from the schedule's own numbers)."""
    layout, itemsize = state.runtime.plan.layout, state.runtime.executor.workspace.grad_shard
    itemsize = itemsize.element_size()
    if not streamed:
        return layout.optimizer_numel * itemsize
    host = state.schedule.grad_streaming.host_units
    device_numel = sum(u.optimizer_numel for u in layout.units if u.index not in host)
    largest = max(u.optimizer_numel for u in layout.units if u.index in host)
    return (device_numel + largest) * itemsize


def _check(case: Case, whole, streamed, clip: float) -> None:
    """``streamed`` trains like ``whole`` (per rank: full state, metrics, state, peak)."""
    for (full_a, metrics_a, state_a, peak_a), (full_b, metrics_b, state_b, peak_b) in zip(
        whole, streamed, strict=True
    ):
        assert state_a.schedule.grad_streaming is None
        assert state_b.schedule.grad_streaming is not None
        assert "gradients: streamed to the host" in str(state_b.schedule)
        verify(state_b.schedule)
        ops = state_b.schedule.ops(case.micro)  # what the last step ran
        assert state_b.runtime.executor.executed[-len(ops) :] == ops
        assert peak_a == _expected_peak(state_a, streamed=False)
        assert peak_b == _expected_peak(state_b, streamed=True) < peak_a
        # Skips and loss scales: the norm reaches neither. Losses: without clipping, nor them;
        # with it, a step's loss reads the parameters that earlier clipped updates made, which
        # agree within 1e-6 only (on an AVX2 host: 8e-8 relative at the second step of the
        # stage-1 accumulation case), so the first loss alone is bit for bit.
        assert [m[2:] for m in metrics_a] == [m[2:] for m in metrics_b]
        losses_a, losses_b = [m[0] for m in metrics_a], [m[0] for m in metrics_b]
        if clip == 0:
            assert losses_a == losses_b
        else:
            assert losses_a[0] == losses_b[0]
            assert losses_b == pytest.approx(losses_a, rel=1e-6)
        for (_, norm_a, *_), (_, norm_b, *_) in zip(metrics_a, metrics_b, strict=True):
            assert norm_b == pytest.approx(norm_a, rel=1e-6, nan_ok=True)
        if clip == 0:
            assert full_a.keys() == full_b.keys()
            for name in full_a:
                assert torch.equal(full_a[name], full_b[name]), name
        else:
            assert_close_to_reference(full_b, full_a, rtol=1e-6)


def _run_pair(case: Case, **offload) -> tuple[list, list]:
    results = []
    for streamed in (False, True):
        models = []
        for _ in range(case.world_size):
            torch.manual_seed(0)
            models.append(ToyLM(case.spec))
        config = _config(case, streamed, **offload)
        results.append(
            run_ranks(
                case.world_size,
                lambda comm, config=config, models=models: _train_rank(
                    case, config, comm, comm.rank, models[comm.rank]
                ),
            )
        )
    return results[0], results[1]


CASES = [
    # (stage, world size, micro-batches, parameter offload, ratio, extra config)
    (1, 1, 1, False, None, {}),
    (1, 2, 2, False, None, {}),  # stage 1 reduces once, in the step phase: accumulation streams
    (2, 2, 1, False, None, {}),
    (2, 2, 1, False, None, {"fzero": {"reduce_every_micro_batch": False}}),
    (3, 2, 1, False, None, {}),
    (3, 1, 1, True, None, {"bf16": {"enabled": True}}),
    (3, 2, 1, False, 0.5, {}),
    (2, 2, 1, False, 0.5, {}),
    (1, 2, 2, False, 0.5, {}),
    (2, 2, 1, False, None, {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "bf16"}}),
    # Accumulation (fzero.stream_gradients true): later landings add onto the sum brought up.
    (3, 2, 2, False, None, {}),
    (2, 2, 3, False, None, {}),
    (3, 1, 3, True, None, {"bf16": {"enabled": True}}),
    (3, 2, 2, False, 0.5, {}),
    (3, 2, 2, False, None, {"fzero": {"reduce_every_micro_batch": False}}),
]


@pytest.mark.parametrize("clip", [0.0, CLIP])
@pytest.mark.parametrize("stage, world_size, micro, params, ratio, extra", CASES)
def test_streamed_offload_trains_like_the_whole_gradient_shard(
    stage, world_size, micro, params, ratio, extra, clip
):
    """Bit for bit without clipping, within 1e-6 with it (module docstring); the device holds
    the largest host unit's gradient, not the shard."""
    torch.set_num_threads(1)
    case = Case(SPEC, world_size, stage, micro, steps=3, clip=clip, extra=extra)
    whole, streamed = _run_pair(case, params=params, ratio=ratio)
    _check(case, whole, streamed, clip)


@pytest.mark.parametrize("micro", [1, 2])
@pytest.mark.parametrize("clip", [0.0, CLIP])
def test_an_fp16_overflow_skips_the_streamed_step_on_every_rank(clip, micro):
    """The overflow flag is the non-finite sum of the per-unit norms: the first step (scale
    2**30) is skipped on both ranks, as with the whole shard, and the loss scales follow; with
    two micro-batches too (the infinite sum comes back up and the second landing adds to it)."""
    torch.set_num_threads(1)
    case = Case(SPEC, 2, 3, micro, steps=3, clip=clip, extra=FP16)
    whole, streamed = _run_pair(case)
    _check(case, whole, streamed, clip)
    for _, metrics, state, _ in streamed:
        assert metrics[0][2], "2**30 overflows on the first step"
        assert int(state.step) == 3 - sum(m[2] for m in metrics)


def test_nvme_offload_streams_through_the_same_copies(tmp_path):
    """NVMe offload takes its gradients from the same copies down: streamed, it trains bit for
    bit like streamed CPU offload, and like NVMe with the whole shard without clipping."""
    torch.set_num_threads(1)
    results = {}
    for name, streamed, clip, nvme in (
        ("nvme", True, CLIP, True),
        ("cpu", True, CLIP, False),
        ("nvme unclipped", True, 0.0, True),
        ("nvme whole", False, 0.0, True),
    ):
        case = Case(SPEC, 1, 3, 1, steps=3, clip=clip)
        directory = tmp_path / name.replace(" ", "_")
        directory.mkdir()
        torch.manual_seed(0)
        model = ToyLM(SPEC)
        config = _config(case, streamed, params=True, nvme_dir=directory if nvme else None)
        results[name] = run_ranks(
            1, lambda comm, c=config, k=case, m=model: _train_rank(k, c, comm, 0, m)
        )
    (nvme,), (cpu,) = results["nvme"], results["cpu"]
    assert nvme[1] == cpu[1]
    for key in nvme[0]:
        assert torch.equal(nvme[0][key], cpu[0][key]), key
    _check(Case(SPEC, 1, 3, 1, clip=0.0), results["nvme whole"], results["nvme unclipped"], 0.0)


def _gloo_case(rank: int, world_size: int, stage: int, params: bool, ratio) -> bool:
    """Both configurations on a real gloo group (the default process group), with and
    without clipping."""
    torch.set_num_threads(1)
    for clip in (0.0, CLIP):
        case = Case(SPEC, world_size, stage, 1, steps=2, clip=clip)
        pair = []
        for streamed in (False, True):
            torch.manual_seed(0)
            config = _config(case, streamed, params=params, ratio=ratio)
            pair.append([_train_rank(case, config, None, rank, ToyLM(SPEC))])
        _check(case, *pair, clip)
    return True


@pytest.mark.parametrize(
    "world_size, stage, params, ratio", [(2, 2, False, 0.5), (3, 3, True, None)]
)
def test_streamed_offload_on_gloo_ranks(world_size, stage, params, ratio):
    pool = GlooPool(world_size)
    try:
        assert all(pool.run(_gloo_case, stage, params, ratio, timeout_s=120))
    finally:
        pool.close()


# -- the compiler's choice, verify, simulate and the estimate: no training ----------------------


def _schedule_of(config: dict, stage: int = 3):
    return fzero.shard(ToyLM(SPEC), stage=stage, config=config).schedule


@pytest.mark.parametrize(
    "stage, extra, streams",
    [
        (3, {"gradient_accumulation_steps": 1}, True),
        (2, {"gradient_accumulation_steps": 1}, True),
        (1, {}, True),  # reduces once per step whatever the accumulation
        (3, {}, False),  # the count of micro-batches is not known: accumulation may add
        (3, {"gradient_accumulation_steps": 2}, False),
        (3, {"gradient_accumulation_steps": 1, "fzero": {"deterministic": True}}, False),
        (3, {"gradient_accumulation_steps": 1, "fzero": {"stream_gradients": False}}, False),
        # asked for: with accumulation too (the sum comes back up for each later landing)
        (3, {"gradient_accumulation_steps": 2, "fzero": {"stream_gradients": True}}, True),
        (2, {"fzero": {"stream_gradients": True}}, True),
        (3, {"fzero": {"stream_gradients": True, "deterministic": True}}, False),
    ],
)
def test_the_compiler_streams_only_where_each_gradient_lands_once(stage, extra, streams):
    config = {
        "zero_optimization": {"offload_optimizer": {"device": "cpu"}},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        **extra,
    }
    schedule = _schedule_of(config, stage)
    assert (schedule.grad_streaming is not None) == streams
    ops = schedule.ops(1)
    assert any(isinstance(op, O.AllocUnitGrad) for op in ops) == streams
    assert any(isinstance(op, O.ZeroGradShard) for op in ops) != streams  # full offload
    without = {k: v for k, v in config.items() if k != "zero_optimization"}
    assert _schedule_of(without, stage).grad_streaming is None
    # Only where a unit may land twice in a step does its sum come back up.
    accumulates = streams and stage > 1 and extra.get("gradient_accumulation_steps") != 1
    assert any(isinstance(op, O.GradFromHost) for op in ops) == accumulates
    if streams:
        assert schedule.grad_streaming.accumulates == accumulates
        assert ("accumulated through the host" in str(schedule)) == accumulates


def _units(count: int = 6, numel: int = 1000) -> tuple[UnitInfo, ...]:
    return tuple(
        UnitInfo(
            i,
            f"blocks.{i}" if i else "",
            numel,
            2 * numel,
            2 * numel,
            2 * numel,
            True,
            optimizer_numel=numel // 2,
            shard_nbytes=numel,
        )  # fmt: skip
        for i in range(count)
    )


def _compiled(streamed: bool, host_units=None, world_size: int = 2, accumulates: bool = False):
    units = _units()
    optimizer_numel = sum(u.optimizer_numel for u in units)
    knobs = Knobs(
        offload_optimizer=True,
        stream_gradients=streamed,
        accumulate_streamed_grads=accumulates,
        host_step_units=host_units,
        offload_update_in_forward=True,
    )
    return compile_schedule(
        units,
        stage=3,
        world_size=world_size,
        trace=presumed_trace(units),
        traced=True,
        optimizer_numel=optimizer_numel,
        grad_shard_nbytes=optimizer_numel * 4,
        knobs=knobs,
    )


@pytest.mark.parametrize("world_size", [1, 2])
def test_simulate_counts_one_units_gradient_instead_of_the_shard(world_size):
    """simulate's gradient peak drops by the shard less one unit's part (full offload), and by
    the host units' part less one of them (partial); serialising keeps the streaming."""
    whole = simulate(_compiled(False, world_size=world_size)).peak_memory.gradients
    streamed_schedule = _compiled(True, world_size=world_size)
    verify(streamed_schedule)
    streamed = simulate(streamed_schedule).peak_memory.gradients
    unit_part, shard = 500 * 4, 6 * 500 * 4
    assert whole - streamed == shard - unit_part
    partial = _compiled(True, frozenset({3, 4, 5}), world_size)
    verify(partial)
    assert partial.grad_streaming.shard_nbytes == 3 * unit_part
    assert whole - simulate(partial).peak_memory.gradients == 3 * unit_part - unit_part
    assert schedule_from_json(schedule_to_json(partial)) == partial
    with pytest.raises(ValueError, match="one micro-batch per step"):
        simulate(streamed_schedule, micro_batches=2)


@pytest.mark.parametrize("world_size", [1, 2])
def test_an_accumulating_schedule_brings_each_sum_up_after_the_first_micro_batch(world_size):
    """Compiled for accumulation, the schedule verifies over steps of 1-3 micro-batches, holds
    the same one-unit gradient peak, and simulate counts a GradFromHost upload of every host
    unit in each micro-batch after the first (none in the first: nothing went down yet)."""
    schedule = _compiled(True, world_size=world_size, accumulates=True)
    verify(schedule)
    assert schedule.grad_streaming.accumulates and not schedule.grad_streaming.one_micro_batch
    one = simulate(_compiled(True, world_size=world_size))
    timeline = simulate(schedule, micro_batches=3)
    assert timeline.peak_memory.gradients == one.peak_memory.gradients
    uploads = [s for s in timeline.spans if s.name.startswith("GradFromHost")]
    copies = [s for s in uploads if s.stream == O.HOST_TO_DEVICE]
    assert sorted({s.micro_batch for s in copies}) == [1, 2] and len(copies) == 2 * 6
    assert all(s.end > s.start for s in copies)
    assert timeline.step_seconds > simulate(schedule, micro_batches=1).step_seconds
    assert schedule_from_json(schedule_to_json(schedule)) == schedule


def test_verify_refuses_a_second_landing_without_its_sum_brought_up():
    with pytest.raises(ScheduleInvariantError, match="lands again in this step"):
        verify(_without(_compiled(True, accumulates=True), O.GradFromHost, 3))


def _without(schedule, op_type, unit: int = -1):
    """``schedule`` with one kind of op (of ``unit``, or every one) dropped from every phase."""

    def keep(op) -> bool:
        return not (isinstance(op, op_type) and unit in (-1, getattr(op, "unit", -1)))

    def strip(entries):
        return tuple(replace(e, ops=tuple(op for op in e.ops if keep(op))) for e in entries)

    return replace(schedule, micro_step=strip(schedule.micro_step), step=strip(schedule.step))


@pytest.mark.parametrize(
    "op_type, unit, match",
    [
        (O.AccumulateGradNorm, 2, "copied down before AccumulateGradNorm"),
        (O.CopyGradToHost, 3, "was\\s+not copied down yet"),
        (O.AllocUnitGrad, 4, "AllocUnitGrad missing"),
        (O.FreeGradBuffer, -1, "FreeGradBuffer missing"),
    ],
)
def test_verify_refuses_a_broken_streamed_schedule(op_type, unit, match):
    with pytest.raises(ScheduleInvariantError, match=match):
        verify(_without(_compiled(True), op_type, unit))


def test_verify_refuses_a_shard_norm_under_streaming():
    schedule = _compiled(True)
    step = tuple(
        replace(
            e,
            ops=tuple(O.ReduceScalars() if isinstance(op, O.ReduceScalars) else op for op in e.ops),
        )  # fmt: skip
        for e in schedule.step
    )
    with pytest.raises(ScheduleInvariantError, match="summed_per_unit missing"):
        verify(replace(schedule, step=step))


def test_estimate_counts_the_largest_units_gradient_under_offload():
    """fp32 accumulation, 8 ranks: the GPU's transient gradient is one unit's part (plus the
    device part of a partial offload), the whole shard with accumulation or deterministic."""
    psi, n, unit = 8_000_000, 8, 1_000_000
    common = dict(grad_accum_dtype="fp32", offload_optimizer="cpu", largest_unit_numel=unit)
    streamed = estimate_memory(psi, n, 3, **common)
    assert streamed.transient_gradients == streamed.gradients == 4 * unit // n
    for other in ({"gradient_accumulation_steps": 2}, {"deterministic": True}):
        assert estimate_memory(psi, n, 3, **common, **other).transient_gradients == 4 * psi // n
    asked = estimate_memory(
        psi, n, 3, **common, gradient_accumulation_steps=2, stream_gradients=True
    )
    assert asked.transient_gradients == 4 * unit // n  # accumulated through the host
    assert estimate_memory(psi, n, 1, **common, gradient_accumulation_steps=4).gradients == (
        2 * psi + 4 * unit // n
    )
    partial = estimate_memory(psi, n, 3, **common, offload_ratio=0.5)
    assert partial.transient_gradients == 4 * (psi // n // 2 + unit // n)


def test_the_streamed_excerpt_in_docs_is_what_fzero_prints():
    """docs/offload.md's excerpt: the 2-block GPT of docs/schedule.md on 2 ranks, optimizer
    offload, one micro-batch per step."""
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "examples"))
    from gpt import GPT, GPTConfig

    text = (root / "docs" / "offload.md").read_text()
    excerpts = []
    for marker in ("```\n  gradients: streamed", "```\n  @backward_end"):
        start = text.index(marker) + len("```\n")
        excerpts.append(text[start : text.index("```", start)].rstrip("\n"))
    torch.manual_seed(0)
    models = [GPT(GPTConfig(n_layer=2, n_embd=64, block_size=32, n_head=4)) for _ in range(2)]
    zero = {
        "stage3_max_reuse_distance": 0,
        "stage3_prefetch_bucket_size": 0,
        "stage3_param_persistence_threshold": 0,
        "offload_optimizer": {"device": "cpu"},
    }
    config = {
        "bf16": {"enabled": True},
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
    }
    ids = torch.randint(64, (2, 32))

    def rank(comm):
        state = fzero.shard(models[comm.rank], stage=3, config=config, process_group=comm)
        state, _ = fzero.train_step(state, (ids, ids))
        return str(state.schedule)

    printed = run_ranks(2, rank)[0]
    for excerpt in excerpts:
        assert excerpt in printed


class _SkipsABlock(torch.nn.Module):
    """Three blocks, the middle one unused: its unit is never reduced in a step."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        for index, block in enumerate(self.blocks):
            if index != 1:
                x = torch.tanh(block(x))
        return x.square().mean()


@pytest.mark.parametrize("stage, world_size", [(1, 2), (2, 2), (3, 1), (3, 2)])
def test_a_unit_no_reduction_wrote_steps_on_a_zero_gradient(stage, world_size):
    """No copy brings the unused block's gradient: the host steps it on zeros (weight decay
    only), as the whole shard's zeroed slice does, bit for bit."""
    torch.set_num_threads(1)

    def run(streamed: bool):
        models = []
        for _ in range(world_size):  # built here: rank threads share torch's global generator
            torch.manual_seed(0)
            models.append(_SkipsABlock())

        def rank(comm):
            config = {
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}},
                "gradient_accumulation_steps": 1,
                "zero_optimization": {
                    "stage3_param_persistence_threshold": 0,
                    "offload_optimizer": {"device": "cpu"},
                },
                "fzero": {"stream_gradients": streamed},
            }
            model = models[comm.rank]
            state = fzero.shard(model, stage=stage, config=config, process_group=comm)
            assert (state.schedule.grad_streaming is not None) == streamed
            generator = torch.Generator().manual_seed(comm.rank)
            for _ in range(3):
                state, _ = fzero.train_step(state, torch.randn(4, 8, generator=generator))
            return fzero.full_state_dict(state)

        return run_ranks(world_size, rank)

    whole, streamed = run(False), run(True)
    for full_a, full_b in zip(whole, streamed, strict=True):
        for name in full_a:
            assert torch.equal(full_a[name], full_b[name]), name


def test_a_micro_batch_failing_in_backward_leaves_the_streamed_state_usable():
    """Blocks 2 and 1 have landed and gone down when block 0's backward fails: the abort frees
    the buffer and drops the partial norm, and the run goes on bit for bit like one that never
    failed (the failed attempt's copies are overwritten by the retried step's)."""
    torch.set_num_threads(1)
    case = Case(SPEC, 1, 3, 1, steps=3, clip=CLIP)
    batches = case.batches()
    config = _config(case, streamed=True)

    def train(fail_at: int | None):
        model = ToyLM(SPEC)
        armed = [False]

        def fail_once(grad):
            if armed[0]:
                armed[0] = False
                raise RuntimeError("injected backward failure")
            return grad

        def hook_output(module, args, out) -> None:
            out.register_hook(fail_once)

        model.blocks[0].register_forward_hook(hook_output)
        state = fzero.shard(model, stage=3, config=config)
        losses = []
        for step in range(case.steps):
            ids_targets = batches[step][0][0]
            if step == fail_at:
                armed[0] = True
                with pytest.raises(RuntimeError, match="injected backward failure"):
                    fzero.train_step(state, ids_targets)
                assert state.runtime.executor.landings.nbytes() == 0
                assert state.runtime.executor.step_phase.unit_squares == {}
            state, metrics = fzero.train_step(state, ids_targets)
            losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
        return fzero.full_state_dict(state), losses

    reference, failed = train(None), train(1)
    assert reference[1] == failed[1]
    for name in reference[0]:
        assert torch.equal(reference[0][name], failed[0][name]), name


def test_a_checkpoint_moves_between_streamed_and_whole_shard_states(tmp_path):
    """The gradient buffer is machinery, not state: a streamed state saves like any other, and
    loaded under the whole-shard configuration it trains on as the saved one does (without
    clipping, bit for bit), and the other way round."""
    torch.set_num_threads(1)
    case = Case(SPEC, 1, 3, 1, steps=3, clip=0.0)
    batches = case.batches()
    for saved_streamed in (True, False):
        directory = tmp_path / f"saved_streamed_{saved_streamed}"
        state = fzero.shard(ToyLM(SPEC), stage=3, config=_config(case, saved_streamed))
        state, _ = fzero.train_step(state, batches[0][0][0])
        fzero.save(state, directory)
        state, expected = fzero.train_step(state, batches[1][0][0])
        loaded = fzero.load(directory, ToyLM(SPEC), config=_config(case, not saved_streamed))
        assert (loaded.schedule.grad_streaming is None) == saved_streamed
        loaded, metrics = fzero.train_step(loaded, batches[1][0][0])
        assert float(metrics["loss"]) == float(expected["loss"])
        full, reference = fzero.full_state_dict(loaded), fzero.full_state_dict(state)
        for name in reference:
            assert torch.equal(full[name], reference[name]), name
