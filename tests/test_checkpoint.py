"""Checkpoints never lose work: resume is bitwise, any world size and stage can load, a failed
or interrupted save leaves the previous checkpoint loadable, and damage is named."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

import fzero
from fzero.checkpoint import consolidate, describe, files, load_data_state, open_checkpoint
from fzero.checkpoint.__main__ import main as cli
from fzero.collectives import run_ranks
from fzero.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointIncompleteError,
    CheckpointMismatchError,
    CheckpointWriteError,
)
from tests.harness import Case, assert_close_to_reference
from tests.models import ToyLM, ToySpec, reference_train
from tests.strategies import toy_specs

BF16 = {"bf16": {"enabled": True}}
# Tied embedding, a weight shared by two blocks (it lives in the root unit) and a frozen bias.
SPEC = ToySpec(depth=3, width=7, tied=True, shared_block_weight=True, frozen=True)


def _run(case: Case, root, steps: range, *, save_at=None, load=False, batch_of=None):
    """Train ``case`` on thread ranks over ``steps``; with ``save_at`` save to ``root`` just
    before that step (or after the last); with ``load`` start from ``root``, not a fresh shard.
    ``batch_of(step, rank)`` gives the batches (default: the case's). Returns rank 0's
    full_state_dict at the start, when saved, and at the end."""
    if batch_of is None:
        batches = case.batches()

        def batch_of(step, rank):
            micro = batches[step][rank]
            return micro if case.micro > 1 else micro[0]

    models = [ToyLM(case.spec) for _ in range(case.world_size)]  # before the threads: global RNG

    def body(comm):
        model = models[comm.rank]
        if load:
            state = fzero.load(root, model, case.config(), stage=case.stage, process_group=comm)
        else:
            state = fzero.shard(model, stage=case.stage, config=case.config(), process_group=comm)
        first = saved = fzero.full_state_dict(state)
        for step in [*steps, None]:
            if save_at is not None and save_at == (steps.stop if step is None else step):
                fzero.save(state, root)
                saved = fzero.full_state_dict(state)
            if step is not None:
                state, _ = fzero.train_step(state, batch_of(step, comm.rank))
        return first, saved, fzero.full_state_dict(state)

    return run_ranks(case.world_size, body)[0]


def _assert_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), f"{name} differs"


def _save_one(root, spec: ToySpec = SPEC, steps: int = 1, stage: int = 2, **save_args):
    """One rank, ``steps`` steps, then save; returns the checkpoint directory and the state."""
    case = Case(spec, 1, stage, 1, steps=steps)
    state = fzero.shard(ToyLM(spec), stage=stage, config=case.config())
    for step in range(steps):
        state, _ = fzero.train_step(state, case.batches()[step][0][0])
    return fzero.save(state, root, **save_args), state


# -- resume -------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=toy_specs(max_depth=3),
    world_size=st.integers(1, 3),
    stage=st.sampled_from([0, 1, 2, 3]),
    micro=st.integers(1, 2),
    done=st.integers(1, 2),
    more=st.integers(1, 2),
    bf16=st.booleans(),
)
def test_resume_is_bitwise_identical_to_never_stopping(
    tmp_path_factory, spec, world_size, stage, micro, done, more, bf16
):
    """Train k steps, save, load into a fresh model on as many ranks, train m more: every
    parameter and buffer is bitwise what k + m uninterrupted steps give (fp32 and bf16)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ckpt")
    case = Case(spec, world_size, stage, micro, steps=done + more, extra=BF16 if bf16 else {})
    _, _, uninterrupted = _run(case, root, range(done + more), save_at=done)
    _, _, resumed = _run(case, root, range(done, done + more), load=True)
    _assert_equal(resumed, uninterrupted)


# -- reshard ------------------------------------------------------------------------------------

DONE, MORE = 2, 2


def _global_batches(spec: ToySpec, rows: int = 6):
    """One global batch per step, split evenly over 1, 2 or 3 ranks: every world size trains on
    the same data, as one device on the whole batch."""
    g = torch.Generator().manual_seed(7)
    return [
        (
            torch.randint(spec.vocab, (rows, 3), generator=g),
            torch.randint(spec.vocab, (rows, 3), generator=g),
        )
        for _ in range(DONE + MORE)
    ]


def _split(spec: ToySpec, world_size: int):
    batches = _global_batches(spec)

    def batch_of(step: int, rank: int):
        ids, targets = batches[step]
        rows = ids.shape[0] // world_size
        return ids[rank * rows : (rank + 1) * rows], targets[rank * rows : (rank + 1) * rows]

    return batch_of


def _run_split(world_size, stage, steps, root, *, save_at=None, load=False, extra=None):
    case = Case(SPEC, world_size, stage, 1, extra=extra or {})
    return _run(case, root, steps, save_at=save_at, load=load, batch_of=_split(SPEC, world_size))


@pytest.fixture(scope="module")
def world3_stage3(tmp_path_factory):
    """A checkpoint saved by 3 ranks in stage 3 after DONE steps, the parameters it holds, and
    the same run continued MORE steps without stopping."""
    root = tmp_path_factory.mktemp("world3")
    _, saved, uninterrupted = _run_split(3, 3, range(DONE + MORE), root, save_at=DONE)
    return root, saved, uninterrupted


@pytest.mark.parametrize("world_size,stage", [(2, 1), (1, 0), (2, 3), (3, 2)])
def test_reshard_loads_bitwise_and_trains_like_the_unresharded_run(
    world3_stage3, world_size, stage
):
    """A world-3 stage-3 checkpoint loads on other world sizes and stages with exactly the saved
    parameters; training on continues like the run that never stopped (and like plain torch
    AdamW on the whole batch) within fp32 tolerance."""
    torch.set_num_threads(1)
    root, saved, uninterrupted = world3_stage3
    steps = range(DONE, DONE + MORE)
    loaded, _, continued = _run_split(world_size, stage, steps, root, load=True)
    _assert_equal(loaded, saved)
    assert_close_to_reference(continued, uninterrupted, rtol=1e-5)
    case = Case(SPEC, 1, 0, 1)
    reference = reference_train(
        SPEC,
        [[[batch]] for batch in _global_batches(SPEC)],
        lr=case.lr,
        weight_decay=case.weight_decay,
        eps=case.eps,
        clip=case.clip,
    )
    assert_close_to_reference(continued, reference.state_dict(), rtol=1e-5)


def test_bf16_reshard_keeps_master_and_frozen_values_exactly(tmp_path):
    """bf16: the checkpoint holds the fp32 master and the frozen values in bf16; loading on
    another world size and stage gives back exactly the saved parameters."""
    torch.set_num_threads(1)
    _, saved, _ = _run_split(3, 3, range(DONE), tmp_path, save_at=DONE, extra=BF16)
    checkpoint = open_checkpoint(tmp_path)
    assert checkpoint.manifest["compute_dtype"] == "bf16"
    with safe_open(str(checkpoint.file(2)), framework="pt") as handle:
        assert handle.get_slice("master").get_dtype() == "F32"
        assert handle.get_slice("param_shard.1").get_dtype() == "BF16"  # block 0's frozen bias
    for world_size, stage in [(2, 1), (1, 0)]:
        loaded, _, _ = _run_split(world_size, stage, range(0), tmp_path, load=True, extra=BF16)
        _assert_equal(loaded, saved)


# -- consolidate and info -----------------------------------------------------------------------


def test_consolidate_equals_full_state_dict_and_loads_into_a_fresh_model(world3_stage3, tmp_path):
    """The consolidated files hold full_state_dict under the model's names (tied ones under
    each), split into several files with an index, load into a fresh model, and that model's
    forward pass matches the original's."""
    root, saved, _ = world3_stage3
    out = tmp_path / "full"
    assert cli(["consolidate", str(root), str(out), "--max-shard-size", "400B"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    names = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(names) > 1 and names[0] == f"model-00001-of-{len(names):05d}.safetensors"
    assert set(index["weight_map"]) == set(saved)
    tensors = {}
    for name in names:
        tensors.update(load_file(out / name))
    _assert_equal({name: tensors[name] for name in saved}, saved)

    model = ToyLM(SPEC)
    result = model.load_state_dict(tensors, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    original = ToyLM(SPEC)
    original.load_state_dict(saved)
    ids, targets = _global_batches(SPEC)[0]
    assert torch.equal(model(ids, targets), original(ids, targets))


def test_consolidate_to_bf16_in_one_file(world3_stage3, tmp_path):
    root, saved, _ = world3_stage3
    [path] = consolidate(root, tmp_path / "bf16", dtype="bf16")
    assert path.name == "model.safetensors"
    tensors = load_file(path)
    assert tensors["embed.weight"].dtype == torch.bfloat16
    assert torch.equal(tensors["embed.weight"], saved["embed.weight"].bfloat16())
    assert torch.equal(tensors["blocks.0.gain"], saved["blocks.0.gain"])  # buffers as saved
    with pytest.raises(CheckpointError, match="not an empty directory"):
        consolidate(root, tmp_path / "bf16")


def test_info_says_what_a_checkpoint_holds(world3_stage3, capsys):
    root, _, _ = world3_stage3
    assert cli(["info", str(root)]) == 0
    text = capsys.readouterr().out
    assert "step 2, world size 3, stage 3" in text
    assert "rank00002.safetensors" in text and "units:" in text
    assert describe(root) == text.rstrip("\n")


# -- layout on disk -----------------------------------------------------------------------------


def test_keep_last_rotates_and_latest_points_at_the_newest(tmp_path):
    case = Case(SPEC, 1, 3, 1, steps=4)
    state = fzero.shard(ToyLM(SPEC), stage=3, config=case.config())
    for step in range(4):
        state, _ = fzero.train_step(state, case.batches()[step][0][0])
        fzero.save(state, tmp_path, keep_last=2, data_state={"position": step})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000003", "step-000004"]
    assert (tmp_path / "latest").read_text().strip() == "step-000004"
    assert open_checkpoint(tmp_path).step == 4
    assert load_data_state(tmp_path) == {"position": 3}
    assert load_data_state(tmp_path / "step-000003") == {"position": 2}
    with pytest.raises(ValueError, match="keep_last"):
        fzero.save(state, tmp_path, keep_last=0)
    # A stale pointer (its target removed by hand) falls back to the newest finished one.
    (tmp_path / "latest").write_text("step-000009\n")
    assert open_checkpoint(tmp_path).step == 4


def test_loaded_model_computes_with_the_saved_values(world3_stage3):
    """After a resharding load into stage 1 on 2 ranks, the model's own parameters (views into
    the gathered buffers) hold the saved values on every rank: refresh_parameters gathered."""
    root, saved, _ = world3_stage3
    models = [ToyLM(SPEC) for _ in range(2)]

    def body(comm):
        fzero.load(root, models[comm.rank], stage=1, process_group=comm)
        return {name: p.detach().clone() for name, p in models[comm.rank].named_parameters()}

    for params in run_ranks(2, body):
        for name, value in params.items():
            assert torch.equal(value, saved[name]), name


def test_saving_the_same_step_again_replaces_it(tmp_path):
    directory, state = _save_one(tmp_path)
    assert fzero.save(state, tmp_path) == directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", directory.name]
    fzero.load(tmp_path, ToyLM(SPEC))


def test_load_restores_step_count_rng_and_learning_rate_schedule(tmp_path):
    torch.manual_seed(123)
    directory, state = _save_one(tmp_path, steps=2)
    expected = torch.rand(3)
    torch.manual_seed(0)
    loaded = fzero.load(directory, ToyLM(SPEC))
    assert torch.equal(torch.rand(3), expected)
    assert loaded.progress.step_count == 2 and float(loaded.step) == 2.0
    assert loaded.runtime.config.fingerprint() == state.runtime.config.fingerprint()


# -- failures -----------------------------------------------------------------------------------


def test_disk_full_on_one_rank_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """Rank 1 runs out of space halfway through its file: every rank raises, the partial
    checkpoint is removed, and ``latest`` still names the previous one, which loads."""
    torch.set_num_threads(1)
    case = Case(SPEC, 2, 2, 1, steps=2)
    batches = case.batches()
    models = [ToyLM(SPEC) for _ in range(2)]
    real_write = files._write_chunk

    def full_disk(file, data):
        if "rank00001" in file.name and file.tell() > 0:  # after the header's length
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(file, data)

    def body(comm):
        state = fzero.shard(models[comm.rank], stage=2, config=case.config(), process_group=comm)
        state, _ = fzero.train_step(state, batches[0][comm.rank][0])
        fzero.save(state, tmp_path)
        saved = fzero.full_state_dict(state)
        state, _ = fzero.train_step(state, batches[1][comm.rank][0])
        with pytest.raises(CheckpointWriteError, match="failed on rank 1: OSError.*No space"):
            if comm.rank == 0:
                monkeypatch.setattr(files, "_write_chunk", full_disk)
            comm.all_gather_object(None)  # the writer is patched before either rank saves
            fzero.save(state, tmp_path)
        return saved

    saved = run_ranks(2, body)[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000001"]
    monkeypatch.setattr(files, "_write_chunk", real_write)
    _assert_equal(fzero.full_state_dict(fzero.load(tmp_path, ToyLM(SPEC))), saved)


def test_failure_while_publishing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """The disk fills while rank 0 writes the manifest: nothing is published. When it fills
    later, once the commit record is written, the new checkpoint is complete and is loaded."""
    from fzero.checkpoint import publish

    directory, state = _save_one(tmp_path)
    state, _ = fzero.train_step(state, Case(SPEC, 1, 2, 1).batches()[0][0][0])
    real_write = publish.write_text_atomic
    full_at = "manifest.json"

    def full_disk(path, text):
        if path.name == full_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(path, text)

    monkeypatch.setattr(publish, "write_text_atomic", full_disk)
    with pytest.raises(CheckpointWriteError, match="while publishing.*previous checkpoint is"):
        fzero.save(state, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", directory.name]
    full_at = "latest"
    with pytest.raises(CheckpointWriteError, match="was committed: it is complete and fzero.load"):
        fzero.save(state, tmp_path)
    assert open_checkpoint(tmp_path).directory == tmp_path / ".step-000002.tmp"
    monkeypatch.undo()
    assert fzero.save(state, tmp_path, keep_last=1) == tmp_path / "step-000002"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000002"]


def test_unwritable_directory_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    _, state = _save_one(tmp_path / "fine")
    with pytest.raises(CheckpointWriteError, match=re.escape(f"saving {blocker}/step-000001")):
        fzero.save(state, blocker)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(CheckpointWriteError, match="PermissionError"):
            fzero.save(state, locked)


def test_ranks_at_different_steps_are_refused_before_anything_is_written(tmp_path):
    """Rank 0 resumed from step 1, rank 1 from step 2: the save's first collective names each
    rank's step on both ranks, and the root is left as it was."""
    torch.set_num_threads(1)
    case = Case(SPEC, 2, 1, 1, steps=2)
    _run(case, tmp_path, range(2), save_at=1)
    _run(case, tmp_path, range(1, 2), save_at=2, load=True)
    before = sorted(p.name for p in tmp_path.iterdir())
    models = [ToyLM(SPEC) for _ in range(2)]
    errors = []

    def body(comm):
        directory = tmp_path / f"step-00000{comm.rank + 1}"
        state = fzero.load(directory, models[comm.rank], process_group=comm)
        with pytest.raises(CheckpointWriteError) as caught:
            fzero.save(state, tmp_path)
        errors.append(str(caught.value))

    run_ranks(2, body)
    assert len(errors) == 2
    for text in errors:
        assert "ranks are at different steps (rank 0: step 1, rank 1: step 2)" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == before


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing after the raise runs (no cleanup, no manifest)."""


def test_interrupted_save_is_ignored_and_refused_as_incomplete(tmp_path, monkeypatch):
    directory, state = _save_one(tmp_path)
    state, _ = fzero.train_step(state, Case(SPEC, 1, 2, 1).batches()[0][0][0])

    def killed(file, data):
        raise _Killed

    monkeypatch.setattr(files, "_write_chunk", killed)
    with pytest.raises(_Killed):
        fzero.save(state, tmp_path)
    monkeypatch.undo()
    partial = tmp_path / ".step-000002.tmp"
    assert partial.is_dir() and not (partial / "manifest.json").exists()
    assert open_checkpoint(tmp_path).directory == directory
    with pytest.raises(CheckpointIncompleteError, match="incomplete"):
        fzero.load(partial, ToyLM(SPEC))
    # A checkpoint directory whose commit record never came is refused the same way; one that
    # lost its manifest after the commit is damaged, and refused naming the file.
    copy, damaged = tmp_path / "copy", tmp_path / "damaged"
    shutil.copytree(directory, copy)
    (copy / "commit.json").unlink()
    with pytest.raises(CheckpointIncompleteError, match=re.escape(f"{copy} is an incomplete")):
        fzero.load(copy, ToyLM(SPEC))
    shutil.copytree(directory, damaged)
    (damaged / "manifest.json").unlink()
    with pytest.raises(CheckpointCorruptError, match=re.escape(f"{damaged}/manifest.json is mis")):
        fzero.load(damaged, ToyLM(SPEC))
    # The next finished save clears what the interrupted one left.
    fzero.save(state, tmp_path)
    assert not partial.exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove"])
def test_damaged_shard_is_refused_naming_the_file(tmp_path, damage):
    """On 2 ranks rank 1's file is damaged: both ranks refuse, naming that file."""
    torch.set_num_threads(1)
    case = Case(SPEC, 2, 3, 1, steps=1)
    _run(case, tmp_path, range(1), save_at=0)
    path = open_checkpoint(tmp_path).file(1)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-5] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[:-7]))
    else:
        path.unlink()
    expected = {"flip": "fails its checksum", "truncate": "is truncated", "remove": "is missing"}
    models = [ToyLM(SPEC) for _ in range(2)]
    errors = []

    def body(comm):
        try:
            fzero.load(tmp_path, models[comm.rank], process_group=comm)
        except CheckpointCorruptError as error:
            errors.append(str(error))

    run_ranks(2, body)
    assert len(errors) == 2
    for text in errors:
        assert str(path) in text and expected[damage] in text


def test_checkpoint_of_a_different_model_lists_the_differences(tmp_path):
    directory, _ = _save_one(tmp_path)
    other = ToySpec(depth=2, width=5, tied=False, frozen=True)
    with pytest.raises(CheckpointMismatchError) as caught:
        fzero.load(directory, ToyLM(other))
    text = str(caught.value)
    assert "different model" in text
    assert "blocks.2.linear.weight: in the checkpoint, not in the model" in text
    assert "shape (11, 7) in the checkpoint, (11, 5) now" in text
    unfrozen = ToyLM(SPEC)
    unfrozen.blocks[0].linear.bias.requires_grad_(True)
    with pytest.raises(CheckpointMismatchError, match="frozen in the checkpoint, trainable now"):
        fzero.load(directory, unfrozen)
    untied = ToyLM(ToySpec(depth=3, width=7, tied=False, shared_block_weight=True, frozen=True))
    with pytest.raises(CheckpointMismatchError, match="tied in the checkpoint, not in the model"):
        fzero.load(directory, untied)


def test_missing_checkpoint_and_bad_data_state(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        fzero.load(tmp_path / "nothing", ToyLM(SPEC))
    with pytest.raises(CheckpointIncompleteError, match="no finished checkpoint"):
        fzero.load(tmp_path, ToyLM(SPEC))
    _, state = _save_one(tmp_path / "a")
    with pytest.raises(CheckpointWriteError, match="JSON-serialisable"):
        fzero.save(state, tmp_path / "b", data_state={"sampler": object()})
    assert not any((tmp_path / "b").iterdir())
