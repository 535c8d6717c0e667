"""NVMe offload on one CUDA device equals CPU offload of the same configuration bit for bit.

The step reads each unit's state from the files into pinned staging buffers, steps it there,
writes it back and uploads from the staged master on the upload stream; gathers upload the
staged parameter shard on the gather stream. A staging buffer reused before its upload landed,
or a read that overtook a write, would show as a difference from CPU offload, which runs the
same CPU AdamW on the same values.
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

STEPS = 4


def _train(stage: int, device: str, params: bool, directory: Path):
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=4, n_embd=128, n_head=4, vocab_size=256, block_size=64)
    model = GPT(cfg).cuda()
    offload = {"device": device, "pin_memory": True, "nvme_path": str(directory)}
    zero = {"stage3_param_persistence_threshold": 0, "offload_optimizer": offload}
    if params:
        zero["offload_param"] = {**offload, "max_in_cpu": 0}  # every shard in the file
    config = {
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1}},
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "zero_optimization": zero,
        "gradient_accumulation_steps": 2,
    }
    state = fzero.shard(model, stage=stage, config=config)
    corpus, g = MarkovCorpus(cfg.vocab_size), torch.Generator().manual_seed(3)
    losses = []
    for _ in range(STEPS):
        micro = [tuple(t.cuda() for t in corpus.batch(4, cfg.block_size, g)) for _ in range(2)]
        state, metrics = fzero.train_step(state, micro)
        losses.append(float(metrics["loss"]))
    full = fzero.full_state_dict(state)
    leaves = [t.clone() for t in (state.master, state.exp_avg, state.exp_avg_sq)]
    return losses, full, leaves, state


@pytest.mark.parametrize("stage, params", [(2, False), (3, False), (3, True)])
def test_nvme_offload_equals_cpu_offload_on_cuda(tmp_path, stage, params):
    expected = _train(stage, "cpu", params, tmp_path)
    got = _train(stage, "nvme", params, tmp_path)
    assert got[0] == expected[0]
    for name, value in expected[1].items():
        assert torch.equal(got[1][name], value), name
    for a, b in zip(expected[2], got[2], strict=True):
        assert torch.equal(a, b)
    state = got[3]
    assert state.master.untyped_storage().filename is not None
    staging = state.runtime.executor.host_optimizer.files.optimizer
    slots = [*staging.free, *staging.retiring, *staging.by_unit.values()]
    assert slots and all(buffer.pinned for slot in slots for buffer in slot.buffers)
