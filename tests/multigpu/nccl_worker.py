"""Run under torchrun, one process per GPU (or per CPU rank with gloo): fzero across processes
against single-device runs.

fp32: every stage, 1 and 2 micro-batches, the full parameters within 1e-5 (relative to each
tensor's largest value) of plain PyTorch AdamW on the concatenated micro-batches.

bf16 (fp32 master weights and reductions): the same runs against fzero itself on one device
(a one-rank communicator) given every rank's micro-batches as one step's list, the same
micro-batch grouping, within 2e-2. The two differ in bf16 rounding only: one device scales
each micro-batch's loss by 1/(N x micro) before its bf16 backward where N ranks divide by N
after reducing (exact only when N is a power of two); stages 0 and 1 accumulate a step's
micro-batches in the compute dtype, and one device accumulates N times as many; and a master
weight one fp32 ulp off can round to another bf16 value for the next forward. Measured on CPU
with gloo, worlds 2-4: at most 4.6e-3 (world 3, stages 2 and 3, a LayerNorm bias) and 5.9e-3
(stages 0 and 1); a lost or doubled gradient is off by far more.

bf16 with ``fzero.deterministic``: the N processes against the same N ranks run as threads of
one process (rank 0, on its own device), bit for bit (``torch.equal``): the reductions sum in
a fixed order on both, so only the transport differs.

Exits non-zero on any mismatch; rank 0 prints one line per failure.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import fzero  # noqa: E402
from fzero.collectives import ThreadGroup, init_from_env, run_ranks, shutdown  # noqa: E402
from tests.harness import Case, assert_close_to_reference, reference  # noqa: E402
from tests.models import ToyLM, ToySpec  # noqa: E402

BF16 = {"bf16": {"enabled": True}}
MODES = ("fp32", "bf16", "bf16 deterministic")


def train(case: Case, device, steps: list[list], process_group=None, model=None) -> dict:
    """``steps[i]``: step i's micro-batches on this rank."""
    model = (model if model is not None else ToyLM(case.spec)).to(device)
    state = fzero.shard(model, stage=case.stage, config=case.config(), process_group=process_group)
    for micro_batches in steps:
        mbs = [tuple(t.to(device) for t in mb) for mb in micro_batches]
        state, _ = fzero.train_step(state, mbs if len(mbs) > 1 else mbs[0])
    return {k: v.cpu() for k, v in fzero.full_state_dict(state).items()}


def thread_rank(case: Case, device, batches, models, comm) -> dict:
    """One of the in-process ranks that the deterministic runs are checked against."""
    steps = [step[comm.rank] for step in batches]
    return train(case, device, steps, process_group=comm, model=models[comm.rank])


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
                for mode in MODES:
                    bf16, ordered = mode != "fp32", mode.endswith("deterministic")
                    extra = BF16 if bf16 else {}
                    case = Case(spec, world_size, stage, micro, deterministic=ordered, extra=extra)
                    batches = case.batches()
                    full = train(case, device, [step[rank] for step in batches])
                    if rank != 0:
                        continue
                    name = f"{spec} stage {stage} micro {micro} {mode}"
                    if ordered:
                        # Models first: torch's global RNG is not per thread.
                        models = [ToyLM(spec) for _ in range(world_size)]
                        expected = run_ranks(
                            world_size, partial(thread_rank, case, device, batches, models)
                        )[0]
                        rtol = 0.0
                    elif bf16:
                        one = ThreadGroup(1).communicator(0)
                        every_rank = [[mb for mbs in step for mb in mbs] for step in batches]
                        expected = train(case, device, every_rank, process_group=one)
                        rtol = 2e-2
                    else:
                        expected, rtol = reference(case), 1e-5
                    if rtol == 0.0:
                        unequal = [k for k in expected if not torch.equal(full[k], expected[k])]
                        if unequal:
                            failures.append(f"{name}: not bitwise equal: {unequal}")
                        continue
                    try:
                        assert_close_to_reference(full, expected, rtol=rtol)
                    except AssertionError as error:
                        failures.append(f"{name}: {error}")
    if rank == 0:
        print(f"parity on {world_size} ranks ({device.type}): {len(failures)} failures")
        for line in failures:
            print(line)
    shutdown()
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
