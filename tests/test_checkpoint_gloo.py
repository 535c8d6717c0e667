"""Checkpoints across real gloo processes: resume, reshard, a damaged file refused on every
rank, and a rank killed (SIGKILL) in the middle of a save."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import fzero
from fzero.errors import CheckpointIncompleteError
from tests.gloo_pool import GlooPool, _free_port
from tests.harness import Case
from tests.models import ToyLM, ToySpec

pytestmark = pytest.mark.slow
SPEC = ToySpec(depth=3, width=7, tied=True, frozen=True)
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def pool():
    pool = GlooPool(2)
    yield pool
    pool.close()


def _train_and_save(rank: int, world_size: int, root: str, stage: int, done: int, more: int):
    """``done`` steps, save, ``more`` steps; returns full_state_dict when saved and at the end."""
    case = Case(SPEC, world_size, stage, 1, steps=done + more)
    state = fzero.shard(ToyLM(SPEC), stage=stage, config=case.config())
    batches = case.batches()
    for step in range(done + more):
        if step == done:
            fzero.save(state, root, data_state={"rank": rank, "next_step": step})
            saved = fzero.full_state_dict(state)
        state, _ = fzero.train_step(state, batches[step][rank][0])
    return saved, fzero.full_state_dict(state)


def _load_and_train(rank: int, world_size: int, root: str, stage: int, done: int, more: int):
    case = Case(SPEC, world_size, stage, 1, steps=done + more)
    state = fzero.load(root, ToyLM(SPEC), stage=stage)
    loaded = fzero.full_state_dict(state)
    batches = case.batches()
    for step in range(done, done + more):
        state, _ = fzero.train_step(state, batches[step][rank][0])
    data_state = fzero.checkpoint.load_data_state(root, rank)
    return loaded, fzero.full_state_dict(state), data_state


def test_gloo_resume_is_bitwise_and_other_stages_load_exactly(pool, tmp_path):
    """Two gloo ranks save in stage 3; loading in stage 3 resumes bitwise, and loading in
    stage 1 gives exactly the saved parameters; each rank gets its own data_state back."""
    root = str(tmp_path)
    results = pool.run(_train_and_save, root, 3, 2, 2, timeout_s=TIMEOUT_S)
    saved, uninterrupted = results[0]
    for stage in (3, 1):
        outcomes = pool.run(_load_and_train, root, stage, 2, 2, timeout_s=TIMEOUT_S)
        for rank, (loaded, continued, data_state) in enumerate(outcomes):
            assert data_state == {"rank": rank, "next_step": 2}
            for name, tensor in saved.items():
                assert torch.equal(loaded[name], tensor), name
                if stage == 3:
                    assert torch.equal(continued[name], uninterrupted[name]), name


def _load_only(rank: int, world_size: int, root: str):
    fzero.load(root, ToyLM(SPEC))


def test_gloo_damaged_file_is_refused_by_every_rank(pool, tmp_path):
    """A flipped byte in rank 1's file: rank 0 (which read only its own file) refuses too,
    naming rank 1's file, instead of training on or hanging."""
    root = str(tmp_path)
    pool.run(_train_and_save, root, 2, 0, 1, timeout_s=TIMEOUT_S)
    path = fzero.checkpoint.open_checkpoint(root).file(1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(RuntimeError) as caught:  # the pool reports rank 0's error
        pool.run(_load_only, root, timeout_s=TIMEOUT_S)
    text = str(caught.value)
    assert "rank 0 failed" in text and "CheckpointCorruptError" in text
    assert f"{path} fails its checksum" in text


# -- a rank killed mid-save ---------------------------------------------------------------------


def _save_then_stall(rank: int, world_size: int, port: int, root: str, marker: str) -> None:
    """Train a step and save (a finished checkpoint), train another and save again; rank 1
    stalls halfway through writing its second file, where the test kills it."""
    import torch.distributed as dist

    from fzero.checkpoint import files

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    case = Case(SPEC, world_size, 2, 1, steps=2)
    state = fzero.shard(ToyLM(SPEC), stage=2, config=case.config())
    state, _ = fzero.train_step(state, case.batches()[0][rank][0])
    fzero.save(state, root)
    full = fzero.full_state_dict(state)
    if rank == 0:
        torch.save(full, Path(root).parent / "saved.pt")
    state, _ = fzero.train_step(state, case.batches()[1][rank][0])
    if rank == 1:
        write = files._write_chunk

        def stall(file, data):
            write(file, data)
            file.flush()
            Path(marker).touch()
            time.sleep(10 * TIMEOUT_S)

        files._write_chunk = stall
    fzero.save(state, root)


def test_rank_killed_mid_save_leaves_the_previous_checkpoint(tmp_path):
    """SIGKILL one of two gloo ranks while it writes its shard: the previous checkpoint stays
    the one ``latest`` names and loads; the partial one is refused as incomplete."""
    root, marker = tmp_path / "ckpt", tmp_path / "stalled"
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=_save_then_stall, args=(r, 2, port, str(root), str(marker)), daemon=True)
        for r in range(2)
    ]
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not marker.exists():
            assert time.monotonic() < deadline, "rank 1 never reached the middle of its save"
            assert all(p.is_alive() for p in procs), "a rank exited before the planned kill"
            time.sleep(0.05)
        os.kill(procs[1].pid, signal.SIGKILL)
        procs[0].join(timeout=20)  # gloo notices the lost peer; if not, it is killed below
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)

    partial = root / ".step-000002.tmp"
    assert any(partial.glob(".rank00001.safetensors.partial"))
    assert not (partial / "manifest.json").exists() and not (root / "step-000002").exists()
    assert (root / "latest").read_text().strip() == "step-000001"
    state = fzero.load(root, ToyLM(SPEC))  # saved by 2 ranks, loaded by 1
    saved = torch.load(tmp_path / "saved.pt")
    full = fzero.full_state_dict(state)
    for name, tensor in saved.items():
        assert torch.equal(full[name], tensor), name
    with pytest.raises(CheckpointIncompleteError, match="incomplete checkpoint"):
        fzero.load(partial, ToyLM(SPEC))
