"""An edited or torn manifest (or commit record) is refused naming the file, never loaded: the
commit record holds the manifest's sha256, written after it, so no edit can match it."""

from __future__ import annotations

import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fzero
from fzero.checkpoint import open_checkpoint
from fzero.collectives import run_ranks
from fzero.errors import CheckpointCorruptError
from tests.harness import Case
from tests.models import ToyLM, ToySpec

SPEC = ToySpec(depth=2, width=7, tied=True, frozen=True)
DIGITS = b"0123456789"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Steps 1 and 2 of two thread ranks in stage 3 (so a refused step 2 cannot quietly become
    step 1); returns the root and step 2's manifest and commit record bytes."""
    root = tmp_path_factory.mktemp("ckpt")
    case = Case(SPEC, 2, 3, 1, steps=2)
    models = [ToyLM(SPEC) for _ in range(2)]

    def body(comm):
        state = fzero.shard(models[comm.rank], stage=3, config=case.config(), process_group=comm)
        for step in range(2):
            state, _ = fzero.train_step(state, case.batches()[step][comm.rank][0])
            fzero.save(state, root)

    run_ranks(2, body)
    directory = root / "step-000002"
    return (
        root,
        (directory / "manifest.json").read_bytes(),
        (directory / "commit.json").read_bytes(),
    )


def _refused(root, name: str, data: bytes, original: bytes, both: bool = True) -> str:
    """Write ``data`` as step 2's ``name``; the root (and with ``both`` the directory) must
    refuse it with an error naming the file. Returns the error."""
    path = root / "step-000002" / name
    path.write_bytes(data)
    try:
        messages = []
        for where in (root, root / "step-000002") if both else (root,):
            with pytest.raises(CheckpointCorruptError) as caught:
                open_checkpoint(where)
            messages.append(str(caught.value))
            assert str(path) in messages[-1] or (name == "commit.json" and name in messages[-1])
    finally:
        path.write_bytes(original)
    return messages[0]


def _digit_edits(data: bytes):
    """At every digit of ``data``, one other digit (position p adds 1 + p % 9, mod 10, so all
    nine changes occur, spread over the file)."""
    for position, byte in enumerate(data):
        if byte in DIGITS:
            other = DIGITS[(DIGITS.index(byte) + 1 + position % 9) % 10]
            yield data[:position] + bytes([other]) + data[position + 1 :]


def test_every_one_digit_edit_of_the_manifest_is_refused_naming_it(saved):
    """Every digit of manifest.json (steps, learning rate, eps, the per-rank range table, sizes,
    checksums) changed: refused, naming manifest.json."""
    root, manifest, _ = saved
    edits = 0
    for data in _digit_edits(manifest):
        message = _refused(root, "manifest.json", data, manifest, both=False)
        assert "manifest.json does not match its commit record" in message
        edits += 1
    assert edits > 200  # the manifest has hundreds of digits
    open_checkpoint(root)  # the original still loads


def test_every_one_digit_edit_of_the_commit_record_is_refused(saved):
    root, _, commit = saved
    edits = list(_digit_edits(commit))
    assert len(edits) > 20
    for data in edits:
        _refused(root, "commit.json", data, commit)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_edit_or_torn_write_of_the_manifest_is_refused(saved, data):
    """A byte replaced, removed or inserted anywhere, or the file cut short (a torn write)."""
    root, manifest, _ = saved
    kind = data.draw(st.sampled_from(["replace", "remove", "insert", "truncate"]))
    position = data.draw(st.integers(0, len(manifest) - 1))
    if kind == "replace":
        byte = data.draw(st.integers(0, 255).filter(lambda b: b != manifest[position]))
        edited = manifest[:position] + bytes([byte]) + manifest[position + 1 :]
    elif kind == "remove":
        edited = manifest[:position] + manifest[position + 1 :]
    elif kind == "insert":
        edited = manifest[:position] + bytes([data.draw(st.integers(0, 255))]) + manifest[position:]
    else:
        edited = manifest[:position]
    _refused(root, "manifest.json", edited, manifest)


def test_load_refuses_an_edited_manifest_and_loads_it_restored(saved, tmp_path):
    """Through ``fzero.load``: a changed learning rate and a changed range-table entry are
    refused before any model is sharded; the untouched copy loads."""
    root, manifest, _ = saved
    copy = tmp_path / "ckpt"
    shutil.copytree(root, copy)
    text = manifest.decode()
    for old, new in (('"lr":0.01', '"lr":0.02'), ('"units":[[0,', '"units":[[1,')):
        assert old in text
        path = copy / "step-000002" / "manifest.json"
        path.write_text(text.replace(old, new, 1))
        with pytest.raises(CheckpointCorruptError, match=f"{path} does not match"):
            fzero.load(copy, ToyLM(SPEC))
    path.write_bytes(manifest)
    assert fzero.load(copy, ToyLM(SPEC)).progress.step_count == 2


def test_newest_checkpoint_without_its_commit_record_is_refused_not_skipped(saved, tmp_path):
    """No crash removes the commit record of a directory ``latest`` names: ``load`` says so,
    instead of quietly resuming from step 1."""
    root, _, _ = saved
    copy = tmp_path / "ckpt"
    shutil.copytree(root, copy)
    (copy / "step-000002" / "commit.json").unlink()
    with pytest.raises(CheckpointCorruptError, match="latest names .*step-000002, which is not a"):
        open_checkpoint(copy)
    (copy / "latest").unlink()  # with no pointer, only complete checkpoints are candidates
    assert open_checkpoint(copy).step == 1
