"""Misuses and faults inside a step, on real gloo ranks: each raises on every rank with a
message that says what happened and what to do, and leaves the state usable.

- ranks given different numbers of micro-batches (``gradient_accumulation_steps`` unset);
- ``requires_grad`` changed after ``shard``;
- the device out of memory in a micro-step or in the step phase (injected).

"Usable" is checked against the oracle of a run that never met the fault: after the failed
step, the same good step gives bit for bit the parameters of a fresh run of that step alone.
"""

from __future__ import annotations

import pytest

from tests.gloo_pool import GlooPool

WORLD = 2


@pytest.fixture(scope="module")
def pool():
    pool = GlooPool(WORLD)
    yield pool
    pool.close()


def _config(stage: int, **fzero_keys) -> dict:
    return {
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "fzero": fzero_keys,
    }


def _fault_then_good_step(rank: int, world: int, stage: int, fzero_keys: dict, fault: str):
    """Shard, meet ``fault`` in step 0 (caught), then run the good step; and, as the oracle, a
    fresh model that runs only the good step. Returns (error type, message, steps counted,
    parameters after, oracle parameters)."""
    import torch

    import fzero
    from fzero.schedule import ops as O
    from tests.models import ToyLM, ToySpec, make_batches

    torch.set_num_threads(1)
    spec = ToySpec(depth=3, frozen=True)
    batches = make_batches(spec, steps=1, world_size=world, micro=2)
    good = batches[0][rank]
    cfg = _config(stage, **fzero_keys)

    model = ToyLM(spec)
    state = fzero.shard(model, config=cfg)
    undo = lambda: None  # noqa: E731
    batch = good
    if fault == "counts":  # rank 0 runs 2 micro-batches, rank 1 runs 1
        batch = good[: 2 - rank]
    elif fault in ("freeze", "unfreeze"):
        param = model.blocks[0].linear.weight if fault == "freeze" else model.blocks[0].linear.bias
        param.requires_grad_(not param.requires_grad)
        undo = lambda: param.requires_grad_(not param.requires_grad)  # noqa: E731
    elif fault == "oom_forward":

        def hook(module, args):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        handle = model.blocks[1].register_forward_pre_hook(hook)
        undo = handle.remove
    elif fault == "oom_step_phase":
        handlers = state.runtime.executor.handlers
        original = handlers[O.OptimizerStep]

        def raising(op):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

        handlers[O.OptimizerStep] = raising
        undo = lambda: handlers.__setitem__(O.OptimizerStep, original)  # noqa: E731
    try:
        fzero.train_step(state, batch)
        error_type, message = None, ""
    except Exception as error:  # noqa: BLE001 - what it is, is what the test checks
        error_type = [c.__name__ for c in type(error).__mro__]
        message = str(error)
    undo()
    state, metrics = fzero.train_step(state, good)
    after = fzero.full_state_dict(state)

    oracle_state = fzero.shard(ToyLM(spec), config=cfg)
    oracle_state, _ = fzero.train_step(oracle_state, good)
    return error_type, message, metrics["step"], after, fzero.full_state_dict(oracle_state)


def _check_usable(results) -> None:
    for _, _, steps, after, oracle in results:
        assert steps == 1  # the failed step was not counted
        for name in oracle:
            assert torch_equal(after[name], oracle[name]), name


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


@pytest.mark.parametrize(
    "stage,fzero_keys",
    [
        (0, {}),
        (1, {}),
        (2, {}),
        (3, {}),
        (2, {"reduce_every_micro_batch": False}),
        (1, {"deterministic": True}),
    ],
    ids=["stage0", "stage1", "stage2", "stage3", "stage2-reduce-at-last", "stage1-deterministic"],
)
def test_unequal_micro_batch_counts_raise_on_every_rank_naming_each_count(pool, stage, fzero_keys):
    """Rank 0 gets 2 micro-batches, rank 1 gets 1, with gradient_accumulation_steps unset:
    every rank raises MicroBatchCountError naming both counts (no silent reweighting, no hang:
    stages 0-1 and stage 2 reducing at the last micro-batch find it in the step phase's scalars
    reduction, the others before the first micro-batch), and nothing was updated."""
    results = pool.run(_fault_then_good_step, stage, fzero_keys, "counts")
    for error_type, message, *_ in results:
        assert error_type is not None and "MicroBatchCountError" in error_type, message
        assert "rank 0: 2, rank 1: 1" in message
        assert "gradient_accumulation_steps" in message
    _check_usable(results)


@pytest.mark.parametrize("fault", ["freeze", "unfreeze"])
@pytest.mark.parametrize("stage", [0, 3])
def test_requires_grad_changed_after_shard_raises_naming_the_parameter_and_the_fix(
    pool, stage, fault
):
    """Freezing a trainable weight (or unfreezing a frozen bias) after shard raises
    RequiresGradChangedError on every rank at the next step, naming the parameter and how to
    fix it; setting the flag back, the step trains as if nothing had happened."""
    results = pool.run(_fault_then_good_step, stage, {}, fault)
    name = "blocks.0.linear.weight" if fault == "freeze" else "blocks.0.linear.bias"
    for error_type, message, *_ in results:
        assert error_type is not None and "RequiresGradChangedError" in error_type, message
        assert f"'{name}'" in message and "requires_grad" in message
        assert "before fzero.shard" in message and "full_state_dict" in message
    _check_usable(results)


@pytest.mark.parametrize("fault", ["oom_forward", "oom_step_phase"])
@pytest.mark.parametrize("stage", [0, 3])
def test_out_of_memory_in_a_step_says_the_predicted_peak_and_the_remedies(pool, stage, fault):
    """An out-of-memory error in a micro-batch's forward or in the step phase is re-raised as
    StepOutOfMemoryError (still a torch.OutOfMemoryError) with the schedule's predicted peak,
    the largest unit and the guide's remedies in order; the state stays usable."""
    results = pool.run(_fault_then_good_step, stage, {}, fault)
    where = "micro-batch 0" if fault == "oom_forward" else "the step phase"
    for error_type, message, *_ in results:
        assert error_type is not None and "StepOutOfMemoryError" in error_type, message
        assert "OutOfMemoryError" in error_type
        assert f"out of device memory in {where} of the step (CUDA out of memory." in message
        assert "predicts at most" in message and "schedule.peak_live_nbytes" in message
        assert "largest unit: unit" in message
        first = message.index("1. a smaller micro-batch with more gradient_accumulation_steps")
        second = message.index("2. activation checkpointing")
        third = message.index("3. offload")
        assert first < second < third
    _check_usable(results)


@pytest.mark.parametrize("stage", [0, 3])
def test_a_simulated_world_is_not_mistaken_for_unequal_counts(stage):
    """``simulate_world_size`` has no peers: its reductions keep this rank's value alone, so the
    count check (which would read the others' counts as 0) stays off and steps run."""
    import fzero
    from tests.models import ToyLM, ToySpec, make_batches

    spec = ToySpec()
    state = fzero.shard(ToyLM(spec), stage=stage, simulate_world_size=4)
    batch = make_batches(spec, steps=1, world_size=1, micro=2)[0][0]
    for _ in range(2):
        state, metrics = fzero.train_step(state, batch)
    assert metrics["step"] == 2 and not metrics["skipped"]


@pytest.mark.parametrize(
    "reserved_free,env,suggested",
    [
        (3 << 30, "", True),  # a fragmented cache: the allocator's remedy comes first
        (100 << 20, "", False),  # too little held back to be the cause
        (3 << 30, "expandable_segments:True", False),  # already on
    ],
)
@pytest.mark.parametrize("fault", ["oom_forward", "oom_step_phase"])
def test_a_fragmented_cuda_cache_suggests_expandable_segments_first(
    monkeypatch, fault, reserved_free, env, suggested
):
    """When the allocator held memory reserved but free at the failure, the message says how
    much and suggests expandable segments before the guide's remedies, unless they are on.
    The cache is read before the abort, which frees the failed micro-step's tensors into it.
    One rank in this process: the CUDA allocator's figures are faked, the error is injected."""
    import torch

    import fzero
    import fzero.train
    from fzero.errors import StepOutOfMemoryError
    from fzero.schedule import ops as O
    from tests.models import ToyLM, ToySpec, make_batches

    spec = ToySpec(depth=3)
    good = make_batches(spec, steps=1, world_size=1, micro=1)[0][0]
    state = fzero.shard(ToyLM(spec), config=_config(3))
    events = []

    def reserved(device):
        events.append("read")
        return reserved_free

    monkeypatch.setattr(fzero.train, "reserved_free_nbytes", reserved)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", env)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    executor = state.runtime.executor
    if fault == "oom_forward":
        abort = fzero.train.abort_micro_steps
        monkeypatch.setattr(
            fzero.train, "abort_micro_steps", lambda s: (events.append("abort"), abort(s))
        )

        def hook(module, args):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        handle = state.runtime.model.blocks[1].register_forward_pre_hook(hook)
    else:
        abort = executor.abort
        monkeypatch.setattr(executor, "abort", lambda: (events.append("abort"), abort()))
        original = executor.handlers[O.OptimizerStep]

        def raising(op):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

        executor.handlers[O.OptimizerStep] = raising
    with pytest.raises(StepOutOfMemoryError) as caught:
        fzero.train_step(state, good)
    message = str(caught.value)
    assert events == ["read", "abort"]
    line = "the CUDA caching allocator held 3.00 GiB reserved but free"
    assert (line in message) is suggested, message
    if suggested:
        assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in message
        assert message.index(line) < message.index("remedies, in order:")
    assert message.index("1. a smaller micro-batch") < message.index("3. offload")
    if fault == "oom_forward":
        handle.remove()
    else:
        executor.handlers[O.OptimizerStep] = original
    state, metrics = fzero.train_step(state, good)  # still usable
    assert metrics["step"] == 1
