"""Run under torchrun, one process per GPU (NCCL), or per CPU rank (gloo): one good stage-3 step,
then a step in which rank 1 stalls (sleeps) inside block 1's forward. Rank 0 writes what its
step raised, as JSON, to the path given, and leaves at once without tearing the group down (a
collective is still pending there); the test's parent ends the others.

    python -m torch.distributed.run --nproc_per_node=2 tests/multigpu/stall_worker.py OUT.json
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

STEP_TIMEOUT_S = 2.0
STALL_S = 20.0
STALLED_RANK = 1


def main(out: Path) -> None:
    import fzero
    from fzero.collectives import init_from_env
    from tests.models import ToyLM, ToySpec, make_batches

    rank, world_size, device = init_from_env(STEP_TIMEOUT_S)
    spec = ToySpec(depth=3)
    model = ToyLM(spec).to(device)
    config = {
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        "zero_optimization": {"stage3_param_persistence_threshold": 0},
        "fzero": {"step_timeout_s": STEP_TIMEOUT_S},
    }
    state = fzero.shard(model, stage=3, config=config)
    batches = make_batches(spec, steps=2, world_size=world_size, micro=1)
    first, second = (tuple(t.to(device) for t in batches[i][rank][0]) for i in (0, 1))
    state, metrics = fzero.train_step(state, first)
    float(metrics["loss"])  # the good step is done on the device too
    if rank == STALLED_RANK:
        model.blocks[1].register_forward_pre_hook(lambda module, args: time.sleep(STALL_S))
    start = time.monotonic()
    result: dict = {"rank": rank, "backend": device.type, "raised": None}
    try:
        fzero.train_step(state, second)
    except Exception as error:  # noqa: BLE001 - what it is, is what the test checks
        result.update(
            raised=type(error).__name__,
            bases=[c.__name__ for c in type(error).__mro__],
            message=f"{error}\n{traceback.format_exc()}",
        )
    result["elapsed_s"] = time.monotonic() - start
    if rank == 0:
        partial = out.with_suffix(".partial")
        partial.write_text(json.dumps(result))
        partial.rename(out)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
