"""What ``train_step`` does with a batch before the model sees it, what the optimizer block's
DeepSpeed keys change in the update, and the defaults ``shard`` and ``load`` fill in.

- floating-point inputs are cast to the compute dtype (bf16, fp16) unless
  ``fzero.cast_forward_inputs`` is false; ``fp16.auto_cast`` casts to fp16 even then;
- batches of the wrong kind (a generator, an iterator, a list inside the list of micro-batches,
  a set) are refused naming the type and what to pass;
- ``bias_correction: false`` is FusedAdam's update without the ``1 - beta**step`` divisors;
- ``shard(total_num_steps=...)`` fills a scheduler's ``"auto"``;
- ``load`` with a config that names no stage resumes at the checkpoint's stage, and a change
  of stage or world size is logged at WARNING with both values.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import NamedTuple

import pytest
import torch
from torch import nn

import fzero
from fzero.collectives import run_ranks
from fzero.errors import BatchError, ConfigError
from fzero.inputs import cast_floating_inputs
from tests.models import ToyLM, ToySpec

SPEC = ToySpec(vocab=11, width=8, depth=2)


class Regression(nn.Module):
    """A model whose inputs are floating-point: x -> mse(linear(x), y)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((self.linear(x).float() - y.float()) ** 2).mean()


def _float_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, generator=generator), torch.randn(3, 1, generator=generator)


# -- casting ------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_float_batch_trains_a_low_precision_model(precision):
    state = fzero.shard(Regression(), stage=0, config={precision: {"enabled": True}})
    state, metrics = fzero.train_step(state, _float_batch())
    assert torch.isfinite(metrics["loss"])


def test_turning_the_cast_off_passes_the_batch_as_given():
    config = {"bf16": {"enabled": True}, "fzero": {"cast_forward_inputs": False}}
    state = fzero.shard(Regression(), stage=0, config=config)
    with pytest.raises(BatchError, match="dtype"):
        fzero.train_step(state, _float_batch())


def test_fp16_auto_cast_casts_to_fp16_even_with_the_fzero_cast_off():
    seen: list[torch.dtype] = []
    model = Regression()
    model.linear.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    config = {"fp16": {"enabled": True, "auto_cast": True}, "fzero": {"cast_forward_inputs": False}}
    state = fzero.shard(model, stage=0, config=config)
    fzero.train_step(state, _float_batch())
    assert seen == [torch.float16]


class Pair(NamedTuple):
    x: torch.Tensor
    ids: torch.Tensor


def test_cast_reaches_nested_containers_and_leaves_integers_alone():
    x, ids = torch.randn(2), torch.arange(2)
    batch = {"a": [x, (x, ids)], "b": OrderedDict(c=x), "pair": Pair(x, ids), "n": 3}
    cast = cast_floating_inputs(batch, torch.bfloat16)
    assert cast["a"][0].dtype == cast["a"][1][0].dtype == torch.bfloat16
    assert cast["a"][1][1].dtype == torch.int64 and isinstance(cast["b"], OrderedDict)
    assert isinstance(cast["pair"], Pair) and cast["pair"].x.dtype == torch.bfloat16
    assert cast["n"] == 3 and batch["a"][0].dtype == torch.float32
    assert cast_floating_inputs(batch, None) is batch


# -- batch kinds --------------------------------------------------------------------------------


def _toy_batch():
    return (torch.randint(SPEC.vocab, (2, 3)), torch.randint(SPEC.vocab, (2, 3)))


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda: (_toy_batch() for _ in range(2)), "generator"),
        (lambda: iter([_toy_batch()]), "list_iterator"),
        (lambda: [[*_toy_batch()]], "a list inside the list of micro-batches"),
        (lambda: [_toy_batch(), iter([_toy_batch()])], "micro-batch 1 is a list_iterator"),
        (lambda: {1, 2}, "set"),
    ],
    ids=["generator", "iterator", "list-in-list", "iterator-in-list", "set"],
)
def test_a_batch_of_the_wrong_kind_is_refused_naming_its_type(make, named):
    state = fzero.shard(ToyLM(SPEC), stage=0)
    with pytest.raises(BatchError, match=named) as info:
        fzero.train_step(state, make())
    assert "tuple" in str(info.value)  # says what to pass instead
    state, metrics = fzero.train_step(state, _toy_batch())  # the state is still usable
    assert torch.isfinite(metrics["loss"])


def test_loss_fn_reads_micro_batches_of_any_kind():
    def loss_fn(model, batch):
        ids, targets = batch
        return model(ids, targets)

    state = fzero.shard(ToyLM(SPEC), stage=0, loss_fn=loss_fn)
    state, metrics = fzero.train_step(state, [[*_toy_batch()], [*_toy_batch()]])
    assert torch.isfinite(metrics["loss"])


# -- optimizer keys -----------------------------------------------------------------------------


def _adam_by_hand(steps: int, lr: float, beta1: float, beta2: float, eps: float, correct: bool):
    """One weight w = 1 under the loss w**2 (gradient 2w), Adam written out."""
    weight, m, v = 1.0, 0.0, 0.0
    for step in range(1, steps + 1):
        grad = 2 * weight
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad * grad
        m_hat, v_hat = (m / (1 - beta1**step), v / (1 - beta2**step)) if correct else (m, v)
        weight -= lr * m_hat / (v_hat**0.5 + eps)
    return weight


@pytest.mark.parametrize("bias_correction", [False, True])
def test_bias_correction_false_is_adam_without_the_divisors(bias_correction):
    lr, (beta1, beta2), eps = 0.01, (0.9, 0.999), 1e-3
    params = {"lr": lr, "betas": [beta1, beta2], "eps": eps, "bias_correction": bias_correction}
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    config = {"optimizer": {"type": "Adam", "params": params}}
    state = fzero.shard(model, stage=0, config=config, loss_fn=lambda m, x: (m(x) ** 2).sum())
    for _ in range(3):
        state, _ = fzero.train_step(state, torch.ones(1, 1))
    weight = fzero.full_state_dict(state)["weight"].item()
    expected = _adam_by_hand(3, lr, beta1, beta2, eps, correct=bias_correction)
    other = _adam_by_hand(3, lr, beta1, beta2, eps, correct=not bias_correction)
    assert weight == pytest.approx(expected, rel=1e-6)
    assert abs(expected - other) > 0.02  # the two updates are far apart here


def test_shard_fills_auto_total_num_steps_and_says_which_argument_is_missing():
    config = {
        "optimizer": {"params": {"lr": 0.01}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": "auto"}},
    }
    with pytest.raises(ConfigError, match=r"fzero\.shard\(\.\.\., total_num_steps=N\)"):
        fzero.shard(ToyLM(SPEC), stage=0, config=config)
    state = fzero.shard(ToyLM(SPEC), stage=0, config=config, total_num_steps=40)
    assert state.runtime.config.scheduler.total_num_steps == 40


# -- load defaults ------------------------------------------------------------------------------


def _save_at_stage(root, stage: int, world_size: int) -> None:
    def body(comm):
        state = fzero.shard(ToyLM(SPEC), stage=stage, process_group=comm)
        state, _ = fzero.train_step(state, _toy_batch())
        fzero.save(state, root)

    run_ranks(world_size, body)


def test_load_with_a_config_naming_no_stage_resumes_at_the_checkpoints_stage(tmp_path, caplog):
    _save_at_stage(tmp_path, stage=3, world_size=2)
    config = {"optimizer": {"params": {"lr": 1e-3}}}

    def body(comm):
        return fzero.load(tmp_path, ToyLM(SPEC), config=config, process_group=comm)

    with caplog.at_level(logging.WARNING, logger="fzero"):
        states = run_ranks(2, body)
    assert [s.runtime.config.stage for s in states] == [3, 3]
    assert not [r for r in caplog.records if "saved at stage" in r.getMessage()]


def test_a_change_of_stage_or_world_size_on_load_is_a_warning_with_both_values(tmp_path, caplog):
    _save_at_stage(tmp_path, stage=3, world_size=2)
    with caplog.at_level(logging.WARNING, logger="fzero"):
        state = fzero.load(tmp_path, ToyLM(SPEC), config={"zero_optimization": {"stage": 1}})
    assert state.runtime.config.stage == 1
    [record] = [r for r in caplog.records if "saved at stage" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "stage 3 on 2 rank(s)" in record.getMessage()
    assert "stage 1 on 1 rank(s)" in record.getMessage()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_bias_correction_false_is_the_same_on_every_kernel(device):
    """The CPU path and the CUDA (Triton) kernel against the reference, without corrections."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA (the Triton kernel)")
    from fzero.kernels import WeightDecaySegments, adamw_reference, adamw_step

    generator = torch.Generator().manual_seed(0)
    numel = 3000
    tensors = [torch.randn(numel, generator=generator) for _ in range(3)]
    master, grad, exp_avg = tensors
    exp_avg_sq = torch.rand(numel, generator=generator)
    decay = WeightDecaySegments(((0, 1000, 0.0), (1000, numel, 0.1)), numel)
    hyper = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "bias_correction": False}
    results = []
    for step_function, where in ((adamw_reference, "cpu"), (adamw_step, device)):
        state = [t.clone().to(where) for t in (master, grad, exp_avg, exp_avg_sq)]
        step = torch.tensor(3.0, device=where)
        step_function(*state, step=step, decay=decay, **hyper)
        results.append([t.cpu() for t in state])
    for expected, got in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    corrected = master.clone()
    adamw_reference(corrected, grad, exp_avg.clone(), exp_avg_sq.clone(), step=torch.tensor(3.0),
                    decay=decay, **(hyper | {"bias_correction": True}))  # fmt: skip
    assert (corrected - results[0][0]).abs().max() > 1e-3
