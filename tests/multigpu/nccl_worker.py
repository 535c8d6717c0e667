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

CPU offload (``zero_optimization.offload_optimizer.device: "cpu"``, pinned): the master weights
and moments live on the host and step with torch's fused CPU AdamW while the model, the gathers
and the reductions stay on the device, so a device-side buffer placed by the master's device
would put NCCL's buffers on the host. Optimizer offload at stages 1, 2 and 3 and with
``offload_param`` at stage 3, on the second (smaller) spec; ``ratio: 0.5`` at stage 3 on the
first, whose units split on every world size (the second's first unit holds most of a shard,
so it would stay whole on the host). 1 and 2 micro-batches, fp32 and bf16. Each run's master is
where the config puts it (on the host; split between the device and the host under ``ratio``)
and its first loss, which no update has touched, equals the same configuration's without
offload bit for bit. The parameters after three steps are within 1e-6 of that run without
offload (fp32 and bf16), the tolerance ``tests/test_offload_training.py`` states for CPU offload
against no offload. It is measured, not derived: the CPU kernel rounds each update differently
(``tests/test_cpu_adamw.py`` bounds one step by ``2**-22 |update|`` plus one ulp) and the runs
then drift by that rounding; measured there at most 1.2e-7, here on gloo (worlds 2 and 3) at
most 2.7e-7. fp32 also against the plain PyTorch reference with the no-offload runs' 1e-5
(measured on gloo: at most 3.6e-7).

Exits non-zero on any mismatch; rank 0 prints one line per failure.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import fzero  # noqa: E402
from fzero.collectives import ThreadGroup, init_from_env, run_ranks, shutdown  # noqa: E402
from fzero.state.split import SplitFlat  # noqa: E402
from tests.harness import Case, assert_close_to_reference, reference  # noqa: E402
from tests.models import ToyLM, ToySpec  # noqa: E402

BF16 = {"bf16": {"enabled": True}}
MODES = ("fp32", "bf16", "bf16 deterministic")
SPECS = [
    ToySpec(depth=3, width=13, tied=True),
    ToySpec(depth=2, width=7, frozen=True, shared_block_weight=True),
]
HOST = {"device": "cpu", "pin_memory": True}
# (spec, stage, name, zero_optimization block; Case.config adds the block's keys to its own).
# The smaller spec keeps gloo cheap; ratio 0.5 needs the larger (module docstring).
OFFLOADS = [
    (SPECS[1], 1, "optimizer", {"offload_optimizer": HOST}),
    (SPECS[1], 2, "optimizer", {"offload_optimizer": HOST}),
    (SPECS[1], 3, "optimizer", {"offload_optimizer": HOST}),
    (SPECS[1], 3, "optimizer + parameters", {"offload_optimizer": HOST, "offload_param": HOST}),
    (SPECS[0], 3, "optimizer ratio 0.5", {"offload_optimizer": {**HOST, "ratio": 0.5}}),
]
OFFLOAD_MODES = ("fp32", "bf16")


class Run(NamedTuple):
    params: dict[str, torch.Tensor]  # the full parameters, on the host
    losses: list[float]  # each step's
    state: fzero.ZeroState


def train(case: Case, device, steps: list[list], process_group=None, model=None) -> Run:
    """``steps[i]``: step i's micro-batches on this rank."""
    model = (model if model is not None else ToyLM(case.spec)).to(device)
    state = fzero.shard(model, stage=case.stage, config=case.config(), process_group=process_group)
    losses = []
    for micro_batches in steps:
        mbs = [tuple(t.to(device) for t in mb) for mb in micro_batches]
        state, metrics = fzero.train_step(state, mbs if len(mbs) > 1 else mbs[0])
        losses.append(float(metrics["loss"]))
    params = {k: v.cpu() for k, v in fzero.full_state_dict(state).items()}
    return Run(params, losses, state)


def thread_rank(case: Case, device, batches, models, comm) -> dict:
    """One of the in-process ranks that the deterministic runs are checked against."""
    steps = [step[comm.rank] for step in batches]
    return train(case, device, steps, process_group=comm, model=models[comm.rank]).params


def misplaced(name: str, state: fzero.ZeroState, device: torch.device, split: bool) -> list[str]:
    """The failure, if any, of an offload run whose master is not where its config puts it:
    all on the host, or (``split``, under ``ratio``) split between ``device`` and the host."""
    master = state.master
    if isinstance(master, SplitFlat):
        where = (master.on_device.device.type, master.on_host.device.type)
        parts = (master.split_numel, master.on_host.numel())
        if where == (device.type, "cpu") and min(parts) > 0:
            return []
        return [f"{name}: master split {parts} elements on {where}"]
    if split:
        return [f"{name}: master not split, all on {master.device}"]
    return [] if master.device.type == "cpu" else [f"{name}: master on {master.device}"]


def mismatch(name: str, full: dict, expected: dict, rtol: float) -> list[str]:
    """The failure, if any: bit for bit when ``rtol`` is 0, otherwise ``rtol`` relative to each
    tensor's largest value."""
    if rtol == 0.0:
        unequal = [k for k in expected if not torch.equal(full[k], expected[k])]
        return [f"{name}: not bitwise equal: {unequal}"] if unequal else []
    try:
        assert_close_to_reference(full, expected, rtol=rtol)
    except AssertionError as error:
        return [f"{name}: {error}"]
    return []


def main() -> None:
    rank, world_size, device = init_from_env()
    failures = []
    plain = {}  # (spec, stage, micro, mode) -> the run without offload, on rank 0
    for spec in SPECS:
        for stage in range(4):
            for micro in (1, 2):
                for mode in MODES:
                    bf16, ordered = mode != "fp32", mode.endswith("deterministic")
                    extra = BF16 if bf16 else {}
                    case = Case(spec, world_size, stage, micro, deterministic=ordered, extra=extra)
                    batches = case.batches()
                    run = train(case, device, [step[rank] for step in batches])
                    if rank != 0:
                        continue
                    plain[spec, stage, micro, mode] = run
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
                        expected = train(case, device, every_rank, process_group=one).params
                        rtol = 2e-2
                    else:
                        expected, rtol = reference(case), 1e-5
                    failures += mismatch(name, run.params, expected, rtol)
    for spec, stage, offload, zero in OFFLOADS:
        for micro in (1, 2):
            for mode in OFFLOAD_MODES:
                extra = {**(BF16 if mode == "bf16" else {}), "zero_optimization": zero}
                case = Case(spec, world_size, stage, micro, extra=extra)
                run = train(case, device, [step[rank] for step in case.batches()])
                if rank != 0:
                    continue
                name = f"{spec} stage {stage} micro {micro} {mode} offload {offload}"
                without = plain[spec, stage, micro, mode]
                split = "ratio" in zero["offload_optimizer"]
                failures += misplaced(name, run.state, device, split)
                if run.losses[0] != without.losses[0]:  # no update has touched it yet
                    failures.append(f"{name}: first loss {run.losses[0]} != {without.losses[0]}")
                failures += mismatch(f"{name} against no offload", run.params, without.params, 1e-6)
                if mode == "fp32":
                    failures += mismatch(name, run.params, reference(case), 1e-5)
    if rank == 0:
        print(f"parity on {world_size} ranks ({device.type}): {len(failures)} failures")
        for line in failures:
            print(line)
    shutdown()
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
