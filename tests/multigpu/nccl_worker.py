"""Run under torchrun, one process per GPU: fzero on NCCL against the single-device reference.

Every rank trains the drawn toy models at every stage, in fp32 (1e-5 relative) and bf16 (loss
within 1%); rank 0 also trains the reference and checks. Exits non-zero on any mismatch.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import fzero  # noqa: E402
from fzero.collectives import init_from_env, shutdown  # noqa: E402
from tests.harness import Case, assert_close_to_reference, reference  # noqa: E402
from tests.models import ToyLM, ToySpec  # noqa: E402


def main() -> None:
    rank, world_size, device = init_from_env()
    failures = []
    specs = [
        ToySpec(depth=3, width=13, tied=True),
        ToySpec(depth=2, width=7, frozen=True, shared_block_weight=True),
    ]
    for spec in specs:
        for stage in range(4):
            for micro in (1, 2):
                case = Case(spec, world_size, stage, micro)
                model = ToyLM(spec).to(device)
                state = fzero.shard(model, stage=stage, config=case.config())
                batches = case.batches()
                for step in range(case.steps):
                    mbs = [tuple(t.to(device) for t in mb) for mb in batches[step][rank]]
                    state, _ = fzero.train_step(state, mbs if micro > 1 else mbs[0])
                full = {k: v.cpu() for k, v in fzero.full_state_dict(state).items()}
                if rank == 0:
                    try:
                        assert_close_to_reference(full, reference(case), rtol=1e-5)
                    except AssertionError as error:
                        failures.append(f"{spec} stage {stage} micro {micro}: {error}")
    if rank == 0:
        print(f"nccl parity on {world_size} GPUs: {len(failures)} failures")
        for line in failures:
            print(line)
    shutdown()
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
