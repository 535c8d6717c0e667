"""Optimizer offload on one CUDA device: the copies down, the CPU steps and the uploads run on
their streams, and the result is the arithmetic of the schedule.

At stage 3 the CPU steps run in the next step's first forward by default
(``fzero.offload_update_in_forward``); with it off they run in the step phase. The two do the
same arithmetic on the same values, so on CUDA too they must agree bit for bit: the losses, the
master weights and the moments, with pinned host buffers and the asynchronous copies. A race
(an upload read before it landed, a gradient copied before its reduction) would show as a
difference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import fzero

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from gpt import GPT, GPTConfig, MarkovCorpus  # noqa: E402

STEPS = 5


def _train(
    stage: int,
    offload: bool,
    in_forward: bool = True,
    bf16: bool = True,
    params: bool = False,
    from_host: bool = False,
):
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=4, n_embd=128, n_head=4, vocab_size=256, block_size=64)
    model = GPT(cfg) if from_host else GPT(cfg).cuda()
    model.register_buffer("marker", torch.arange(4.0, device=model.lm_head.weight.device))
    zero = {"stage3_param_persistence_threshold": 0}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config = {
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1}},
        "gradient_clipping": 1.0,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "fzero": {"offload_update_in_forward": in_forward},
    }
    state = fzero.shard(model, stage=stage, config=config, device="cuda")
    corpus, g = MarkovCorpus(cfg.vocab_size), torch.Generator().manual_seed(3)
    losses = []
    for _ in range(STEPS):
        batch = tuple(t.cuda() for t in corpus.batch(8, cfg.block_size, g))
        state, metrics = fzero.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    full = fzero.full_state_dict(state)  # applies a pending update first
    moments = (state.exp_avg.cpu().clone(), state.exp_avg_sq.cpu().clone())
    return losses, full, moments, state


def test_stage3_updates_in_forward_equal_updates_in_the_step_phase_on_cuda():
    in_forward = _train(3, offload=True, in_forward=True)
    in_step = _train(3, offload=True, in_forward=False)
    assert in_forward[0] == in_step[0]
    for name in in_step[1]:
        assert torch.equal(in_forward[1][name], in_step[1][name]), name
    for a, b in zip(in_forward[2], in_step[2], strict=True):
        assert torch.equal(a, b)
    state = in_forward[3]
    assert not state.master.is_cuda  # the master lives on the host
    assert any(
        type(op).__name__ == "ApplyPendingUpdate"
        for entry in state.schedule.first_micro_extra
        for op in entry.ops
    )


@pytest.mark.parametrize("params", [False, True], ids=["optimizer", "optimizer+params"])
def test_a_model_built_in_host_memory_shards_onto_cuda_and_trains_as_one_built_there(params):
    """A model larger than the GPU is built on the host and sharded from there
    (``shard(model, device="cuda")``): the same values, bit for bit, as the model built on the
    GPU, and the model's buffers move too."""
    on_device = _train(3, offload=True, params=params)
    from_host = _train(3, offload=True, params=params, from_host=True)
    assert from_host[0] == on_device[0]
    for name in on_device[1]:
        assert torch.equal(from_host[1][name], on_device[1][name]), name
    marker = from_host[3].model.marker  # a buffer: moved, and cast as bf16 casts buffers
    assert marker.is_cuda and torch.equal(marker, on_device[3].model.marker)


def _engine_losses(on_host: bool) -> list[float]:
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_embd=64, n_head=2, vocab_size=128, block_size=32)
    model = GPT(cfg) if on_host else GPT(cfg).cuda()
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
    }
    engine, *_ = fzero.initialize(model=model, config=config)
    assert engine.device.type == "cuda" and all(p.is_cuda for p in model.parameters())
    corpus, g = MarkovCorpus(cfg.vocab_size), torch.Generator().manual_seed(3)
    losses = []
    for _ in range(3):
        inputs, targets = (t.cuda() for t in corpus.batch(2, cfg.block_size, g))
        loss = engine(inputs, targets)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return losses


def test_the_engine_shards_a_host_model_onto_cuda():
    """``fzero.initialize`` with a model in host memory (as a DeepSpeed script builds it) shards
    it onto this rank's GPU unit by unit instead of moving it there whole first, and trains
    exactly as a model built on the GPU."""
    assert _engine_losses(on_host=True) == _engine_losses(on_host=False)


@pytest.mark.parametrize("kept", [False, True])
def test_a_host_model_s_own_bytes_count_for_what_is_allocated_after_its_release(monkeypatch, kept):
    """Sharding a host model onto CUDA under optimizer offload frees the model's host
    parameters before the moments and the gradient copy are allocated, so the host check counts
    them as available for those; a parameter whose storage the caller still holds frees
    nothing, and the same memory is refused (the message gives both numbers)."""
    import fzero.offload.host as host

    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_embd=128, n_head=4, vocab_size=256, block_size=64)
    model = GPT(cfg)
    params = list(model.parameters())
    model_nbytes = sum(p.numel() * 4 for p in params)
    numel = sum(p.numel() for p in params)  # the optimizer space, give or take padding
    held = [p.data for p in params] if kept else []
    # Available: the 16 B/element the offload needs, less half of what the model releases.
    available = 16 * numel - model_nbytes // 2
    monkeypatch.setattr(
        host, "read_host_memory", lambda: host.HostMemory(available, available, None)
    )
    config = {
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
    }
    if kept:
        with pytest.raises(fzero.errors.HostMemoryError) as raised:
            fzero.shard(model, config=config, device="cuda")
        assert raised.value.released_nbytes == 0
        assert raised.value.needed_nbytes > available
        assert len(held) == len(params)  # what kept the storages alive through the check
        return
    state = fzero.shard(model, config=config, device="cuda")
    assert state.master.device.type == "cpu"
