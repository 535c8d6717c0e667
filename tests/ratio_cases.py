"""What the partial-offload tests share (``offload_optimizer.ratio`` < 1, with and without
parameter offload): the configs, one rank's training run, and the check that each part of the
split state equals its oracle bit for bit."""

from __future__ import annotations

import threading

import torch

import fzero
from fzero.schedule.offload_split import split_units
from fzero.state.split import SplitFlat, as_flat
from tests.harness import Case
from tests.models import ToyLM, ToySpec

SPEC = ToySpec(depth=3, width=6, frozen=True)
KINDS = ("master", "exp_avg", "exp_avg_sq")
_BUILDING = threading.Lock()


def offloaded(config: dict, ratio: float | None, params: bool = False) -> dict:
    """``config`` without offload (None), or with CPU optimizer offload at ``ratio`` and, with
    ``params``, CPU parameter offload."""
    if ratio is None:
        return config
    zero = dict(config.get("zero_optimization", {}))
    zero["offload_optimizer"] = {"device": "cpu", "ratio": ratio}
    if params:
        zero["offload_param"] = {"device": "cpu"}
    return {**config, "zero_optimization": zero}


def train_rank(case: Case, ratio: float | None, rank: int, comm, steps: int, params=False):
    """Train ``steps`` steps on this rank; the optimizer state (whole flat buffers, with any
    pending update applied), the full parameters, the metrics and the state."""
    with _BUILDING:  # torch's global RNG is shared by rank threads: one model at a time
        torch.manual_seed(0)
        model = ToyLM(case.spec)
    config = offloaded(case.config(), ratio, params)
    state = fzero.shard(model, stage=case.stage, config=config, process_group=comm)
    batches = case.batches()
    metrics = []
    for step in range(steps):
        micro = batches[step][rank]
        state, m = fzero.train_step(state, micro if case.micro > 1 else micro[0])
        metrics.append((float(m["loss"]), m["skipped"], m["loss_scale"]))
    full = fzero.full_state_dict(state)  # applies a pending update first
    flats = {kind: as_flat(getattr(state, kind)).clone() for kind in KINDS}
    return flats, full, metrics, state


def host_shard_holds_the_cast_master(state) -> None:
    """Every unit's trainable part of the host shard is its master in the compute dtype."""
    workspace = state.runtime.executor.workspace
    assert workspace.host_shards and workspace.param_shard.device.type == "cpu"
    for unit in state.layout.units:
        span = slice(unit.shard_offset, unit.shard_offset + unit.optimizer_numel)
        master = state.master[unit.optimizer_offset : unit.optimizer_offset + unit.optimizer_numel]
        shard = workspace.param_shard[span]
        assert torch.equal(shard, master.to(shard.dtype)), f"unit {unit.index}"


def compare_parts(case: Case, ratio: float, rank: int, comm, steps: int, params=False):
    """Train without offload, with full offload and with ``ratio`` (each with parameter
    offload when ``params``) for ``steps`` steps; check the parts bit for bit against their
    oracles (and, with ``params``, the host shard against the master); return the three runs."""
    plain = train_rank(case, None, rank, comm, steps)
    full = train_rank(case, 1.0, rank, comm, steps, params)
    split = train_rank(case, ratio, rank, comm, steps, params)
    state = split[3]
    expected = split_units(((u.index, u.optimizer_numel) for u in state.layout.units), ratio)
    if params:  # every parameter-offload case splits
        assert expected.is_partial
    assert isinstance(state.master, SplitFlat) == expected.is_partial
    cut = expected.device_numel if expected.is_partial else 0
    for kind in KINDS:
        ours = split[0][kind]
        assert torch.equal(ours[:cut], plain[0][kind][:cut]), f"{kind}: device part"
        assert torch.equal(ours[cut:], full[0][kind][cut:]), f"{kind}: host part"
    if params:
        host_shard_holds_the_cast_master(state)
    assert split[2][0][0] == plain[2][0][0]  # the first loss: no update touched it yet
    assert [m[1:] for m in split[2]] == [m[1:] for m in plain[2]]  # skips and loss scales
    return plain, full, split
