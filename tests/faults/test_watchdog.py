"""The step watchdog on real gloo processes: a stalled rank and a killed rank become errors
that say what happened and where each rank was, in seconds, not at the group's 30 minutes.

Each case runs in fresh processes (``tests/faults/ranks.py``): the faults wreck the group.
"""

from __future__ import annotations

import pytest

from tests.faults.ranks import run_ranks

STEP_TIMEOUT_S = 2.0
STALL_S = 12.0


def _config(stage: int) -> dict:
    return {
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "fzero": {"step_timeout_s": STEP_TIMEOUT_S},
    }


def _train_with_fault(rank: int, world_size: int, stage: int, faulty_rank: int, fault: str):
    """One good step, then a second in which ``faulty_rank`` stalls (sleeps) or dies inside
    block 1's forward."""
    import os
    import time

    import fzero
    from tests.models import ToyLM, ToySpec, make_batches

    spec = ToySpec(depth=3)
    model = ToyLM(spec)
    state = fzero.shard(model, config=_config(stage))
    batches = make_batches(spec, steps=2, world_size=world_size, micro=1)
    state, _ = fzero.train_step(state, batches[0][rank][0])
    if rank == faulty_rank:

        def hook(module, args):
            if fault == "die":
                os._exit(17)
            time.sleep(STALL_S)

        model.blocks[1].register_forward_pre_hook(hook)
    start = time.monotonic()
    try:
        fzero.train_step(state, batches[1][rank][0])
    finally:
        print(f"rank {rank}: step 1 ended after {time.monotonic() - start:.1f} s", flush=True)
    return "finished"


@pytest.mark.parametrize("stage,world", [(0, 2), (3, 3)], ids=["stage0-world2", "stage3-world3"])
def test_a_stalled_rank_gives_every_waiting_rank_a_step_timeout_naming_each_ranks_op(stage, world):
    """Rank 1 stalls in its forward. The ranks waiting for it raise ``StepTimeoutError`` after
    ``fzero.step_timeout_s`` (not the group's 30 minutes), naming the op of the schedule they
    wait at, rank 1's position (in the model's compute, after which trigger) and that rank 1 did
    not arrive; stage 0 waits in the step phase's reduction, stage 3 at the first op that needs
    rank 1's part of micro-batch 0."""
    waiting = [rank for rank in range(world) if rank != 1]
    outcomes = run_ranks(
        world, _train_with_fault, stage, 1, "stall", timeout_s=60, wait_for=tuple(waiting)
    )
    for rank in waiting:
        outcome = outcomes[rank]
        assert outcome is not None, f"rank {rank} never answered"
        assert outcome.error_type == "StepTimeoutError", outcome.message
        text = outcome.message
        assert f"rank {rank} timed out at step 1," in text
        where = "the step phase" if stage == 0 else "micro-batch 0"
        assert f"step 1, {where}, @" in text and " op " in text, text
        assert "rank 1: at step 1, micro-batch 0, outside fzero's ops" in text, text
        assert "after @pre_forward(" in text
        assert f"ranks that did not arrive at rank {rank}'s op: [1]" in text, text
        # Well before the stalled rank wakes up: the step timeout, not the group's.
        assert outcome.elapsed_s < STALL_S - 2, outcome.elapsed_s


def test_a_killed_rank_is_reported_as_lost_with_the_op_never_as_the_batchs_fault():
    """Rank 1 dies during a stage-3 forward. Rank 0's gather fails with the connection closed:
    it raises ``RankLostError`` naming its op and rank 1 as the rank that sent no report, not
    ``BatchError`` ("the model raised ...")."""
    outcomes = run_ranks(2, _train_with_fault, 3, 1, "die", timeout_s=60)
    assert outcomes[1] is None  # it died
    outcome = outcomes[0]
    assert outcome is not None, "rank 0 never answered"
    assert outcome.error_type == "RankLostError", outcome.message
    assert "BatchError" not in outcome.error_bases
    text = outcome.message
    assert "rank 0 lost a peer at step 1, micro-batch 0, @" in text, text
    assert "rank 1: no report" in text
    assert "restart the job" in text
    assert outcome.elapsed_s < STEP_TIMEOUT_S + 8, outcome.elapsed_s


def test_step_timeout_is_a_config_key_and_sets_the_group_timeout_fzero_creates():
    """``fzero.step_timeout_s`` defaults to 300 s, refuses what is not a positive number, and
    ``init_from_env`` gives the group it creates a timeout a minute longer (so that fzero's
    report comes before the backend's)."""
    import subprocess
    import sys

    import fzero
    from fzero.errors import ConfigError
    from tests.gloo_pool import _free_port

    assert fzero.Config.from_any({}).fzero.step_timeout_s == 300.0
    for bad in (0, -1, "soon", True):
        with pytest.raises(ConfigError, match="fzero.step_timeout_s"):
            fzero.Config.from_any({"fzero": {"step_timeout_s": bad}})
    code = (
        "import torch, torch.distributed as dist\n"
        "from fzero.collectives import init_from_env\n"
        "init_from_env(7.0)\n"
        "group = dist.distributed_c10d._get_default_group()\n"
        "print(group._get_backend(torch.device('cpu')).options._timeout.total_seconds())\n"
    )
    env = {
        **__import__("os").environ,
        "RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "CUDA_VISIBLE_DEVICES": "",
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) == 67.0


def test_waiting_for_the_device_past_the_step_timeout_raises_saying_where_the_rank_is():
    """Over NCCL the host meets a stalled peer only at the step's host read; the watchdog's
    timed wait for it (polled here with a predicate that never turns true, as a CUDA event of
    a step stuck behind a collective) raises ``StepTimeoutError`` after ``step_timeout_s``
    naming this rank's position and the ranks that sent no report; a predicate that turns true
    returns at once."""
    import time

    from fzero.errors import StepTimeoutError
    from fzero.runtime.position import STEP_PHASE, OpPosition
    from fzero.runtime.watchdog import Watchdog
    from fzero.schedule.ops import STEP, Trigger

    position = OpPosition()
    position.active, position.step, position.micro_batch = True, 3, STEP_PHASE
    position.trigger, position.entry = Trigger(STEP), 0
    watchdog = Watchdog(position, None, rank=0, timeout_s=0.5)
    try:
        start = time.monotonic()
        with pytest.raises(StepTimeoutError) as raised:
            watchdog.wait_until(lambda: False, world_size=2)
        assert 0.5 <= time.monotonic() - start < 5.0
        text = str(raised.value)
        assert "within fzero.step_timeout_s (0.5 s)" in text
        assert "rank 0 timed out at step 3, the step phase, outside fzero's ops" in text, text
        assert "after @step (entry 0)" in text and "rank 1: no report" in text
        assert "restart the job" in text
        answers = iter([False, False, True])
        start = time.monotonic()
        watchdog.wait_until(lambda: next(answers), world_size=2)
        assert time.monotonic() - start < 0.5
    finally:
        watchdog.stop()
