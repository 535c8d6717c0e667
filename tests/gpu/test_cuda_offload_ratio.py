"""Partial optimizer offload (``offload_optimizer.ratio``) on one CUDA device: the device units
step with the CUDA AdamW kernel while the host units step on the CPU, with pinned buffers and
the asynchronous copies.

After one update each part equals its oracle bit for bit (the device part the run without
offload, the host part the run with ``ratio: 1``), and at stage 3 the CPU steps in the next
forward equal them in the step phase bit for bit over several steps: a race (an upload read
before it landed, a device step reading a gradient the host copy had not finished with) would
show as a difference.

With parameter offload too (stage 3) every unit's bf16 shard is in pinned host memory and the
device units' stepped values come down by ``CopyParamsToHost``, asynchronously on the compute
stream: the parts equal their oracles (full offload now with parameter offload) after one
update, and over several steps the run equals the same partial offload without parameter
offload bit for bit, so an upload that read the host shard before the copy landed would show.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import fzero
from fzero.state.split import SplitFlat, as_flat

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from gpt import GPT, GPTConfig, MarkovCorpus  # noqa: E402

KINDS = ("master", "exp_avg", "exp_avg_sq")


def _train(
    stage: int, ratio: float | None, steps: int, in_forward: bool = True, params: bool = False
):
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=4, n_embd=128, n_head=4, vocab_size=256, block_size=64)
    model = GPT(cfg).cuda()
    zero = {"stage3_param_persistence_threshold": 0}
    if ratio is not None:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True, "ratio": ratio}
    if params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config = {
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1}},
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "zero_optimization": zero,
        "fzero": {"offload_update_in_forward": in_forward},
    }
    state = fzero.shard(model, stage=stage, config=config)
    corpus, g = MarkovCorpus(cfg.vocab_size), torch.Generator().manual_seed(3)
    losses = []
    for _ in range(steps):
        batch = tuple(t.cuda() for t in corpus.batch(8, cfg.block_size, g))
        state, metrics = fzero.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    fzero.full_state_dict(state)  # applies a pending update first
    flats = {kind: as_flat(getattr(state, kind)).cpu().clone() for kind in KINDS}
    return losses, flats, state


@pytest.mark.parametrize("stage", [2, 3])
def test_each_part_steps_like_its_oracle_on_cuda(stage):
    plain, full, split = (_train(stage, ratio, 1) for ratio in (None, 1.0, 0.5))
    master = split[2].master
    assert isinstance(master, SplitFlat) and master.is_cuda and not master.on_host.is_cuda
    cut = master.split_numel
    for kind in KINDS:
        assert torch.equal(split[1][kind][:cut], plain[1][kind][:cut]), kind
        assert torch.equal(split[1][kind][cut:], full[1][kind][cut:]), kind


def test_stage3_partial_updates_in_forward_equal_updates_in_the_step_phase_on_cuda():
    in_forward = _train(3, 0.5, 5, in_forward=True)
    in_step = _train(3, 0.5, 5, in_forward=False)
    assert in_forward[0] == in_step[0]
    for kind in KINDS:
        assert torch.equal(in_forward[1][kind], in_step[1][kind]), kind


def test_partial_offload_with_parameter_offload_steps_each_part_like_its_oracle_on_cuda():
    plain = _train(3, None, 1)
    full = _train(3, 1.0, 1, params=True)
    split = _train(3, 0.5, 1, params=True)
    master = split[2].master
    workspace = split[2].runtime.executor.workspace
    shard = workspace.param_shard
    assert isinstance(master, SplitFlat) and master.is_cuda
    # Not Tensor.is_pinned(): it knows only torch's own pinned allocator, not memory pinned in
    # place with cudaHostRegister, as HostBuffer pins it.
    backing = [b for b in workspace.host_buffers if b.tensor.data_ptr() == shard.data_ptr()]
    assert shard.device.type == "cpu" and len(backing) == 1 and backing[0].pinned
    cut = master.split_numel
    for kind in KINDS:
        assert torch.equal(split[1][kind][:cut], plain[1][kind][:cut]), kind
        assert torch.equal(split[1][kind][cut:], full[1][kind][cut:]), kind


@pytest.mark.parametrize("in_forward", [True, False])
def test_partial_offload_trains_alike_with_and_without_parameter_offload_on_cuda(in_forward):
    resident = _train(3, 0.5, 5, in_forward=in_forward)
    offloaded = _train(3, 0.5, 5, in_forward=in_forward, params=True)
    assert offloaded[0] == resident[0]
    for kind in KINDS:
        assert torch.equal(offloaded[1][kind], resident[1][kind]), kind
    state = offloaded[2]
    state.runtime.settle(state)  # a host reader: the last copies to the host shard landed
    shard = state.runtime.executor.workspace.param_shard
    for unit in state.layout.units:
        lo = unit.optimizer_offset
        master = state.master[lo : lo + unit.optimizer_numel].cpu()
        mine = shard[unit.shard_offset : unit.shard_offset + unit.optimizer_numel]
        assert torch.equal(mine, master.to(mine.dtype)), unit.index
