"""A save stopped at every named point of its protocol, on rank 0 and on rank 1 of two gloo
processes, fresh steps and same-step re-saves: ``fzero.load`` then takes the newest complete
checkpoint (the previous one before the commit record, the new one after it) and training
resumes bit for bit; the next save leaves no leftovers.

Most cases stop a rank by raising at the point (``crash_points``) in a pool worker that is
reused: the other rank stops at the collective it would have failed in (a collective's peer
that died), so neither leaves a collective half entered and the pool goes on. A few cases kill
a rank for real (``os._exit``) in a fresh pair of processes, each bounded by a timeout here.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.distributed
import torch.multiprocessing as mp

import fzero
from fzero.checkpoint import crash_points, open_checkpoint
from fzero.checkpoint.crash_points import COLLECTIVES, SAVE_POINTS
from tests.gloo_pool import GlooPool, _free_port
from tests.harness import Case
from tests.models import ToyLM, ToySpec

pytestmark = pytest.mark.slow
SPEC = ToySpec(depth=2, width=7, tied=True, frozen=True)
CASE = Case(SPEC, 2, 3, 1, steps=5)
ALTERNATIVE = 4  # the batch that makes step 2 again, differently, for same-step re-saves
TIMEOUT_S = 60
KILLED_EXIT = 17
PEER_FAILED_EXIT = 3
RANK1_POINTS = (
    "collective.begin",
    "staging_ready",
    "rank_file_partial",
    "rank_file_renamed",
    "collective.files",
    "collective.published",
)


class SimulatedCrash(BaseException):
    """The rank stops here: nothing after the raise runs (no cleanup, no later step)."""


class PeerLost(BaseException):
    """The collective this rank is about to enter would fail: its peer stopped."""


def _train(state, batch_index: int, rank: int):
    state, _ = fzero.train_step(state, CASE.batches()[batch_index][rank][0])
    return state


# -- the starting point: step 1 and step 2 saved, and the states that follow them --------------


def _make_template(rank: int, world_size: int, root: str) -> dict[str, dict[str, torch.Tensor]]:
    """Steps 1 and 2 saved under ``root``; returns the full state after each state this suite
    can resume from, and after one more step from it."""
    torch.set_num_threads(1)
    state = fzero.shard(ToyLM(SPEC), stage=CASE.stage, config=CASE.config())
    out = {}
    for step in range(4):
        state = _train(state, step, rank)
        out[f"main{step + 1}"] = fzero.full_state_dict(state)
        if step < 2:
            fzero.save(state, root)
    state = _train(fzero.load(Path(root) / "step-000001", ToyLM(SPEC)), ALTERNATIVE, rank)
    out["other2"] = fzero.full_state_dict(state)
    out["other3"] = fzero.full_state_dict(_train(state, 2, rank))
    return out


@pytest.fixture(scope="module")
def pool():
    pool = GlooPool(2)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def template(pool, tmp_path_factory):
    root = tmp_path_factory.mktemp("template")
    return root, pool.run(_make_template, str(root), timeout_s=TIMEOUT_S)[0]


# -- one case: save until a rank stops, then load, resume and save again ------------------------


def _peer_point(point: str) -> str:
    """Where the other rank stops: the first collective at or after ``point``."""
    return next(c for c in COLLECTIVES if SAVE_POINTS.index(c) >= SAVE_POINTS.index(point))


def _crash(rank: int, root: str, resave: bool, plans, kill: bool) -> list[str]:
    """Make the state to save (step 3, or step 2 again from other data when ``resave``), then
    save it once per plan ``(rank that stops, point, point where the other stops)``."""
    if resave:
        state = _train(fzero.load(Path(root) / "step-000001", ToyLM(SPEC)), ALTERNATIVE, rank)
    else:
        state = _train(fzero.load(root, ToyLM(SPEC)), 2, rank)
    stops = []
    for crash_rank, point, peer_point in plans:

        def hook(name, crash_rank=crash_rank, point=point, peer_point=peer_point):
            if rank == crash_rank and name == point:
                if kill:
                    os._exit(KILLED_EXIT)
                raise SimulatedCrash(point)
            if rank != crash_rank and name == peer_point and not kill:
                raise PeerLost(name)

        previous = crash_points.set_hook(hook)
        try:
            fzero.save(state, root)
            stops.append("finished")
        except (SimulatedCrash, PeerLost) as stop:
            stops.append(f"{type(stop).__name__} at {stop}")
        finally:
            crash_points.set_hook(previous)
        # A real peer would block in its collective until this rank died; here it waits for
        # the stopped rank to be done before anyone reads the root.
        torch.distributed.barrier()
    return stops


def _resume(rank: int, world_size: int, root: str):
    """What ``load`` takes, what it loads, one more step from it, and the root after saving."""
    chosen = open_checkpoint(root)
    state = fzero.load(root, ToyLM(SPEC))
    loaded = fzero.full_state_dict(state)
    state = _train(state, state.progress.step_count, rank)
    continued = fzero.full_state_dict(state)
    fzero.save(state, root)
    step2 = open_checkpoint(Path(root) / "step-000002").manifest["sequence"]
    listing = sorted(p.name for p in Path(root).iterdir())
    return chosen.directory.name, chosen.manifest["sequence"], loaded, continued, listing, step2


def _crash_and_resume(rank: int, world_size: int, root: str, resave: bool, plans):
    torch.set_num_threads(1)
    return _crash(rank, root, resave, plans, kill=False), _resume(rank, world_size, root)


def _check(template, resume, resave: bool, new: bool, where: str) -> None:
    """``load`` took the copy at ``where`` holding the new checkpoint (``new``) or the previous
    one, loaded it exactly, resumed bit for bit, and the next save left only step-* and latest."""
    chosen, sequence, loaded, continued, listing, step2_sequence = resume
    _, expected = template
    saved = ("other2" if resave else "main3") if new else "main2"
    after = {"main2": "main3", "main3": "main4", "other2": "other3"}[saved]
    assert chosen == where
    for name, tensor in expected[saved].items():
        assert torch.equal(loaded[name], tensor), f"{name}: not what {saved} saved"
        assert torch.equal(continued[name], expected[after][name]), f"{name}: resumed differently"
    steps = 4 if new and not resave else 3
    assert listing == ["latest", *(f"step-{s:06d}" for s in range(1, steps + 1))]
    if chosen.endswith("000002") or chosen.startswith(".step-000002"):
        assert step2_sequence == sequence  # what was loaded is what step-000002 now holds


def _expected(crash_rank: int, point: str, resave: bool) -> tuple[bool, str]:
    """Whether the new checkpoint survives, and in which directory ``load`` finds it."""
    committed = SAVE_POINTS.index(point) >= SAVE_POINTS.index("committed")
    new = committed if crash_rank == 0 else point == "collective.published"
    step = 2 if resave else 3
    if not new:
        return False, "step-000002"
    moved = SAVE_POINTS.index(point) >= SAVE_POINTS.index("renamed")
    return True, f"step-{step:06d}" if moved else f".step-{step:06d}.tmp"


CASES = [
    (crash_rank, point, resave)
    for crash_rank, points in ((0, SAVE_POINTS), (1, RANK1_POINTS))
    for point in points
    for resave in (False, True)
    if resave or point != "old_aside"  # a fresh step has no earlier copy to move aside
]


@pytest.mark.parametrize(
    ("crash_rank", "point", "resave"),
    CASES,
    ids=[f"rank{r}-{p}-{'resave' if s else 'fresh'}" for r, p, s in CASES],
)
def test_save_stopped_at_each_point_loads_the_newest_complete_checkpoint(
    pool, template, tmp_path, crash_rank, point, resave
):
    root = tmp_path / "ckpt"
    shutil.copytree(template[0], root)
    plans = [(crash_rank, point, _peer_point(point))]
    stops, resume = pool.run(_crash_and_resume, str(root), resave, plans, timeout_s=TIMEOUT_S)[0]
    seen = f"SimulatedCrash at {point}" if crash_rank == 0 else f"PeerLost at {plans[0][2]}"
    assert stops == [seen]  # rank 0's view
    _check(template, resume, resave, *_expected(crash_rank, point, resave))


# Saves stopped while settling what an earlier stopped save left: (first save's point, second
# save's point, whether the re-save case). The second stops before its own files are written.
RECOVERY_CASES = [("committed", "latest_written", False), ("committed", "renamed", False)]
RECOVERY_CASES += [("latest_written", "old_aside", True), ("old_aside", "renamed", True)]


@pytest.mark.parametrize(("first", "second", "resave"), RECOVERY_CASES)
def test_save_stopped_while_settling_an_earlier_one_loads_the_newest(
    pool, template, tmp_path, first, second, resave
):
    root = tmp_path / "ckpt"
    shutil.copytree(template[0], root)
    plans = [(0, first, _peer_point(first)), (0, second, "collective.begin")]
    stops, resume = pool.run(_crash_and_resume, str(root), resave, plans, timeout_s=TIMEOUT_S)[0]
    assert stops == [f"SimulatedCrash at {first}", f"SimulatedCrash at {second}"]
    step = 2 if resave else 3
    moved = second == "renamed"
    _check(template, resume, resave, True, f"step-{step:06d}" if moved else f".step-{step:06d}.tmp")


# -- real kills -----------------------------------------------------------------------------------


def _killed_worker(rank: int, port: int, root: str, resave: bool, plans) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        _crash(rank, root, resave, plans, kill=True)
    except RuntimeError as error:  # the collective with the killed rank fails: expected here
        if "by peer" not in str(error):  # gloo: "Connection closed by peer", "... reset by peer"
            raise
        os._exit(PEER_FAILED_EXIT)


KILL_CASES = [(0, "old_aside", True), (0, "committed", False), (1, "rank_file_partial", False)]


@pytest.mark.parametrize(("crash_rank", "point", "resave"), KILL_CASES)
def test_rank_killed_at_a_point_loads_the_newest_complete_checkpoint(
    pool, template, tmp_path, crash_rank, point, resave
):
    """``os._exit`` at the point; the other rank notices its lost peer and ends (both bounded
    by a timeout here); the pool then loads, resumes and saves as above."""
    root = tmp_path / "ckpt"
    shutil.copytree(template[0], root)
    ctx = mp.get_context("spawn")
    port = _free_port()
    plans = [(crash_rank, point, None)]
    procs = [
        ctx.Process(target=_killed_worker, args=(r, port, str(root), resave, plans), daemon=True)
        for r in range(2)
    ]
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + TIMEOUT_S
        for p in procs:
            p.join(timeout=max(deadline - time.monotonic(), 0.1))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        assert not hung, f"ranks {hung} still running {TIMEOUT_S} s after the kill"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
    assert procs[crash_rank].exitcode == KILLED_EXIT, "the rank did not reach the point"
    assert procs[1 - crash_rank].exitcode == PEER_FAILED_EXIT, "the other rank did not fail alike"
    resume = pool.run(_resume, str(root), timeout_s=TIMEOUT_S)[0]
    _check(template, resume, resave, *_expected(crash_rank, point, resave))
