"""Habits from plain PyTorch on a model fzero owns: refused with an error naming the entry points
(never a silent divergence, never a crash), or made harmless where they are only bookkeeping."""

from __future__ import annotations

import pytest
import torch

import fzero
from fzero.errors import OutsideStepError
from tests.harness import Case
from tests.models import ToyLM, ToySpec, make_batches

SPEC = ToySpec(depth=2, width=6)


def _sharded(stage: int):
    torch.manual_seed(0)
    model = ToyLM(SPEC)
    return model, fzero.shard(model, stage=stage, config=Case(SPEC, 1, stage, 1).config())


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_backward_outside_a_step_names_the_entry_points(stage):
    model, state = _sharded(stage)
    batches = make_batches(SPEC, steps=2, world_size=1, micro=1)
    state, _ = fzero.train_step(state, batches[0][0][0])
    optimizer = torch.optim.AdamW(model.parameters())
    loss = model(*batches[1][0][0])
    with pytest.raises(OutsideStepError, match="fzero.train_step.*fzero.initialize.*Trainer"):
        loss.backward()
    optimizer.zero_grad()
    state, metrics = fzero.train_step(state, batches[1][0][0])  # training goes on
    assert torch.isfinite(metrics["loss"])


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_model_zero_grad_between_steps_changes_nothing(stage):
    """``model.zero_grad()`` sets ``.grad`` to None; stages 0 and 1 accumulate into views of
    their gradient buffers, which the next micro-step points back."""
    batches = make_batches(SPEC, steps=3, world_size=1, micro=1)
    runs = []
    for zero_grad in (False, True):
        model, state = _sharded(stage)
        losses = []
        for step in range(3):
            if zero_grad:
                model.zero_grad()
            state, metrics = fzero.train_step(state, batches[step][0][0])
            losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
        runs.append((losses, fzero.full_state_dict(state)))
    (losses_a, params_a), (losses_b, params_b) = runs
    assert losses_a == losses_b
    assert all(torch.equal(params_a[k], params_b[k]) for k in params_a)


def test_accelerate_prepare_then_backward_is_refused():
    accelerate = pytest.importorskip("accelerate")
    model, state = _sharded(2)
    accelerator = accelerate.Accelerator(cpu=True)
    prepared = accelerator.prepare(model)
    batch = make_batches(SPEC, steps=1, world_size=1, micro=1)[0][0][0]
    with pytest.raises(OutsideStepError):
        accelerator.backward(prepared(*batch))
