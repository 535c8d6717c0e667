"""fzero.compile_units: blocks run through torch.compile, training is unchanged."""

from __future__ import annotations

import torch

import fzero
from tests.models import ToyLM, ToySpec, make_batches


def test_compiled_blocks_train_like_eager_blocks_at_stage_3():
    """Stage 3 frees and refills the blocks' parameter storage around every use; the compiled
    forward must see the refilled values. Same losses and parameters as eager (1e-6)."""
    torch.manual_seed(0)
    spec = ToySpec(depth=2, width=16, vocab=20)
    config = {
        "zero_optimization": {
            "stage3_param_persistence_threshold": 0,
            "stage3_max_reuse_distance": 0,
        }
    }
    compiled = fzero.shard(
        ToyLM(spec), stage=3, config={**config, "fzero": {"compile_units": True}}
    )
    eager = fzero.shard(ToyLM(spec), stage=3, config=config)
    assert all(
        hasattr(b.forward, "_torchdynamo_orig_callable") or "compile" in repr(b.forward)
        for b in compiled.model.blocks
    )
    batches = make_batches(spec, steps=3, world_size=1, micro=1)
    for step in range(3):
        compiled, a = fzero.train_step(compiled, batches[step][0][0])
        eager, b = fzero.train_step(eager, batches[step][0][0])
        assert abs(float(a["loss"]) - float(b["loss"])) <= 1e-6 * abs(float(b["loss"]))
    got, want = fzero.full_state_dict(compiled), fzero.full_state_dict(eager)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-6)
