"""NVMe offload trains bit for bit like CPU offload of the same configuration (the same CPU
AdamW on the same values; only where the values rest differs), at stages 1-3, with parameter
shards in a file at stage 3, over real gloo ranks (2 and 3) and one rank. Its state is an
ordinary state: checkpoints move between NVMe, CPU and no offload, and a tree_map copy trains
like the original. nvme_path is checked at shard time, the files' space is reserved then (a
disk that fills later does not fail a step), and the files go when the run ends.

The model's units (width 64) span several 4096-byte pages of the files, at offsets that are not
page-aligned, so the direct transfers of whole pages and the end pages written through the
mapping both run.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import optree
import pytest
import torch

import fzero
from fzero.errors import ConfigError, SwapPathError
from fzero.offload.aio import AioSettings, aligned_empty
from fzero.offload.mapped import MappedFile
from fzero.offload.swap import NvmeSwapper
from fzero.schedule import ops as O
from fzero.schedule import simulate, verify
from tests.gloo_pool import GlooPool
from tests.harness import Case, assert_close_to_reference
from tests.models import ToyLM, ToySpec

SPEC = ToySpec(depth=3, width=64, frozen=True)
# fp16 whose first loss scales overflow: a skipped step, then steps that apply.
FP16 = {"fp16": {"enabled": True, "initial_scale_power": 15, "hysteresis": 1}}
TIMEOUT_S = 120
KEY = "zero_optimization.offload_optimizer.nvme_path"


def _config(
    case: Case, device: str, params: bool, directory, optimizer_device: str | None = None
) -> dict:
    config = case.config()
    zero = dict(config["zero_optimization"])
    offload = {"device": device, "pin_memory": True, "buffer_count": 2}
    if device == "nvme":
        offload["nvme_path"] = str(directory)
    zero["offload_optimizer"] = {**offload, "device": optimizer_device or device}
    if params:
        zero["offload_param"] = {**offload, "buffer_count": 3, "max_in_cpu": 0}  # all in the file
    # Requests of two pages on 2 x 2 threads: a unit's range is cut into several.
    return {**config, "zero_optimization": zero, "aio": {"block_size": 8192, "thread_count": 2}}


def _train(case: Case, config: dict):
    torch.manual_seed(0)
    state = fzero.shard(ToyLM(case.spec), stage=case.stage, config=config)
    rank = state.rank
    losses = []
    for step in case.batches():
        micro = step[rank]
        state, metrics = fzero.train_step(state, micro if case.micro > 1 else micro[0])
        losses.append((float(metrics["loss"]), metrics["skipped"], metrics["loss_scale"]))
    return state, losses


def _both(rank: int, world_size: int, stage: int, micro: int, params: bool, extra, directory):
    """Train the case with CPU and with NVMe offload on this rank; return what must agree."""
    torch.set_num_threads(1)
    case = Case(SPEC, world_size, stage, micro, steps=3, clip=0.05, extra=extra)
    out = {}
    for device in ("cpu", "nvme"):
        state, losses = _train(case, _config(case, device, params, directory))
        leaves = [state.master, state.exp_avg, state.exp_avg_sq, *state.param_shards]
        out[device] = (fzero.full_state_dict(state), losses, [t.clone() for t in leaves])
        if device == "nvme":
            files = state.runtime.executor.host_optimizer.files
            swappers = list(files.swappers.values())
            ops = state.schedule.ops(micro)
            verify(state.schedule)
            out["check"] = {
                "file_backed": state.master.untyped_storage().filename is not None
                and "float32 in a file" in repr(state),  # the repr says where it lives
                "reads": any(isinstance(op, O.ReadStateFromFile) for op in ops),
                "shard_reads": any(isinstance(op, O.ReadShardFromFile) for op in ops),
                "waits": isinstance(state.schedule.step[-1].ops[-1], O.WaitFileWrites),
                "simulated": simulate(state.schedule, micro_batches=micro).step_seconds > 0,
                "files": sorted(p.name for p in swappers[0].directory.iterdir()),
                "direct_or_why_not": swappers[0].direct or bool(swappers[0].io_note),
            }
            files.close()  # the run's directory goes now, not when the state is collected
    return out


def _check(results, params: bool, skipped_first: bool = False) -> None:
    for out in results:
        full_cpu, losses_cpu, leaves_cpu = out["cpu"]
        full_nvme, losses_nvme, leaves_nvme = out["nvme"]
        assert losses_nvme == losses_cpu
        assert losses_nvme[0][1] == skipped_first
        assert not losses_nvme[-1][1]  # the last step applied its update
        for name, value in full_cpu.items():
            assert torch.equal(full_nvme[name], value), name
        for a, b in zip(leaves_cpu, leaves_nvme, strict=True):
            assert torch.equal(a, b)
        check = out["check"]
        assert check["file_backed"] and check["reads"] and check["waits"] and check["simulated"]
        assert check["shard_reads"] == params
        expected = ["exp_avg", "exp_avg_sq", "master"] + (["param_shard"] if params else [])
        assert check["files"] == expected
        assert check["direct_or_why_not"]  # buffered only where the filesystem refuses O_DIRECT


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"world{n}")
def pool(request):
    pool = GlooPool(request.param)
    yield pool
    pool.close()


# (stage, micro-batches, parameter shards in a file too, extra config) per world size
GLOO_CASES = {
    2: [(1, 2, False, {}), (3, 2, True, FP16)],
    3: [(2, 1, False, FP16), (3, 1, False, FP16)],
}


def test_gloo_nvme_offload_trains_bitwise_like_cpu_offload(pool, tmp_path):
    for stage, micro, params, extra in GLOO_CASES[pool.world_size]:
        directory = tmp_path / f"stage{stage}"
        directory.mkdir()
        results = pool.run(_both, stage, micro, params, extra, str(directory), timeout_s=TIMEOUT_S)
        _check(results, params, skipped_first=extra is FP16)
        assert list(directory.iterdir()) == []  # every run's files went with its state


PERSISTENT_ROOT = {"zero_optimization": {"stage3_param_persistence_threshold": 1000}}


@pytest.mark.parametrize(
    "stage, micro, params, extra",
    [
        (3, 2, True, {"bf16": {"enabled": True}}),
        (3, 2, True, PERSISTENT_ROOT),  # the root unit steps and gathers in the step phase
        (2, 2, False, {}),
        (1, 1, False, FP16),
    ],
)
def test_one_rank_nvme_offload_trains_bitwise_like_cpu_offload(
    tmp_path, stage, micro, params, extra
):
    results = [_both(0, 1, stage, micro, params, extra, tmp_path)]
    _check(results, params, skipped_first=extra is FP16)


def test_without_o_direct_the_files_go_through_the_page_cache_and_train_the_same(
    tmp_path, monkeypatch
):
    """Where the filesystem refuses O_DIRECT (the swapper's probe says so in io_note), the same
    reads and writes are buffered: still bit for bit CPU offload."""
    from fzero.offload import swap

    monkeypatch.setattr(swap, "_probe_direct", lambda directory: (False, "no O_DIRECT here"))
    results = [_both(0, 1, 3, 1, True, {}, tmp_path)]
    _check(results, True)
    case = Case(SPEC, 1, 3, 1)
    state = fzero.shard(ToyLM(SPEC), stage=3, config=_config(case, "nvme", True, tmp_path))
    files = state.runtime.executor.host_optimizer.files
    assert files.io_notes == ["no O_DIRECT here"]
    files.close()


def test_parameter_shards_in_a_file_with_the_optimizer_on_the_host(tmp_path):
    """offload_param nvme beside offload_optimizer cpu: the CPU step writes each unit's shard
    to the file (WriteStateToFile), the gathers read it back; bit for bit CPU offload."""
    torch.set_num_threads(1)
    case = Case(SPEC, 1, 3, 2, steps=3, clip=0.05)
    expected, expected_losses = _train(case, _config(case, "cpu", True, tmp_path))
    state, losses = _train(case, _config(case, "nvme", True, tmp_path, optimizer_device="cpu"))
    assert losses == expected_losses
    for a, b in zip(expected.param_shards, state.param_shards, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(state.master, expected.master)
    ops = state.schedule.ops(2)
    assert not any(isinstance(op, O.ReadStateFromFile) for op in ops)
    assert any(isinstance(op, O.WriteStateToFile) for op in ops)
    assert state.param_shards[0].untyped_storage().filename is not None
    assert state.master.untyped_storage().filename is None


def test_max_in_cpu_keeps_the_first_units_shards_in_memory_and_trains_the_same(tmp_path):
    """offload_param.max_in_cpu (DeepSpeed's parameter elements kept in CPU memory under
    NVMe): the first units whose shards fit stay in memory (the file's pages, locked): no file
    op for them in the schedule, their uploads read memory; the rest go through the file. Bit
    for bit CPU offload either way."""
    from dataclasses import replace

    from fzero.errors import ScheduleInvariantError

    torch.set_num_threads(1)
    case = Case(SPEC, 1, 3, 1, steps=3, clip=0.05)
    expected, expected_losses = _train(case, _config(case, "cpu", True, tmp_path))
    config = _config(case, "nvme", True, tmp_path)
    torch.manual_seed(0)
    layout = fzero.shard(ToyLM(SPEC), stage=3, config=_config(case, "cpu", True, tmp_path)).layout
    sizes = [u.shard_numel for u in layout.units]
    config["zero_optimization"]["offload_param"]["max_in_cpu"] = sizes[0] + sizes[1]
    state, losses = _train(case, config)
    assert losses == expected_losses
    for a, b in zip(expected.param_shards, state.param_shards, strict=True):
        assert torch.equal(a, b)
    verify(state.schedule)
    resident = state.runtime.executor.host_optimizer.shard_files.resident
    assert resident == {layout.units[0].index, layout.units[1].index}
    ops = state.schedule.ops(1) + [op for e in state.schedule.first_micro_extra for op in e.ops]
    uploads = {op.unit: op.from_file for op in ops if isinstance(op, O.UploadShard)}
    read = {op.unit for op in ops if isinstance(op, O.ReadShardFromFile)}
    written = {op.unit for op in ops if isinstance(op, O.WriteStateToFile) and op.shard_nbytes}
    assert uploads and all(uploads[u] == (u not in resident) for u in uploads)
    assert not read & resident and read == {u for u in uploads if u not in resident}
    assert not written & resident and written
    assert "from its file" in str(state.schedule)
    # A resident unit's upload marked "from its file" has no read before it: refused.
    first = min(resident)

    def from_file(entry):
        ops = tuple(
            replace(op, from_file=True)
            if isinstance(op, O.UploadShard) and op.unit == first
            else op
            for op in entry.ops
        )
        return replace(entry, ops=ops)

    schedule = state.schedule
    micro = tuple(from_file(e) for e in schedule.micro_step)
    with pytest.raises(ScheduleInvariantError, match="without ReadShardFromFile"):
        verify(replace(schedule, micro_step=micro, last_micro_step=None))
    state.runtime.executor.host_optimizer.files.close()


def test_the_file_io_is_in_the_printed_serialized_and_verified_schedule(tmp_path):
    """The reads and writes print, round-trip through JSON, and verify refuses a schedule that
    ends the step with writes in flight or steps a unit whose state it never read."""
    from dataclasses import replace

    from fzero.errors import ScheduleInvariantError
    from fzero.schedule import schedule_from_json, schedule_to_json

    case = Case(SPEC, 1, 3, 1, steps=1)
    state, _ = _train(case, _config(case, "nvme", True, tmp_path))
    schedule = state.schedule
    text = str(schedule)
    for name in ("ReadStateFromFile", "WriteStateToFile", "ReadShardFromFile", "WaitFileWrites"):
        assert name in text
    assert schedule_from_json(schedule_to_json(schedule)) == schedule
    from fzero.schedule.trace_export import chrome_trace

    events = chrome_trace(simulate(schedule))["traceEvents"]
    file_thread = next(e["tid"] for e in events if e.get("args", {}).get("name") == O.FILE)
    assert any(e.get("tid") == file_thread and e.get("ph") == "X" for e in events)
    (step,) = schedule.step
    unwaited = replace(step, ops=tuple(op for op in step.ops if type(op) is not O.WaitFileWrites))
    with pytest.raises(ScheduleInvariantError, match="file writes in flight"):
        verify(replace(schedule, step=(unwaited,)))
    extra = tuple(
        replace(e, ops=tuple(op for op in e.ops if type(op) is not O.ReadStateFromFile))
        for e in schedule.first_micro_extra
    )
    with pytest.raises(ScheduleInvariantError, match="without ReadStateFromFile"):
        verify(replace(schedule, first_micro_extra=extra))
    micro = tuple(
        replace(e, ops=tuple(op for op in e.ops if type(op) is not O.ReadShardFromFile))
        for e in schedule.micro_step
    )
    with pytest.raises(ScheduleInvariantError, match="without ReadShardFromFile"):
        verify(replace(schedule, micro_step=micro, last_micro_step=None))
    state.runtime.executor.host_optimizer.files.close()


def _cached_pages(path: Path) -> int:
    """Pages of the file ``path`` in the page cache (mincore over a private mapping of it)."""
    import ctypes
    import mmap

    size = os.path.getsize(path)
    with open(path, "rb") as file:
        mapping = mmap.mmap(file.fileno(), size, access=mmap.ACCESS_COPY)
    try:
        # The exporting c_char is dropped at once, so the mapping can be closed below.
        address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
        pages = -(-size // mmap.PAGESIZE)
        vector = (ctypes.c_ubyte * pages)()
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vector) != 0:
            pytest.skip(f"mincore failed: {os.strerror(ctypes.get_errno())}")
        return sum(v & 1 for v in vector)
    finally:
        mapping.close()


def test_the_step_moves_the_state_through_staging_not_through_the_mapping(tmp_path):
    """After a step, of the pages shard wrote through the mapping only the partial pages at
    the units' ends remain cached: the step read and wrote everything else directly."""
    case = Case(SPEC, 1, 2, 1, steps=1)
    config = _config(case, "nvme", False, tmp_path)
    torch.manual_seed(0)
    state = fzero.shard(ToyLM(SPEC), stage=2, config=config)
    files = state.runtime.executor.host_optimizer.files
    master = files.files["master"].path
    total = files.files["master"].reserved_nbytes // 4096
    assert _cached_pages(master) >= total - 1  # shard wrote every value through the mapping
    state, _ = fzero.train_step(state, case.batches()[0][0][0])
    assert _cached_pages(master) <= 2 * len(state.layout.units)
    fzero.full_state_dict(state)  # a reader between steps faults the mapping in again
    assert _cached_pages(master) >= total - 1
    files.close()


def test_mapped_file_ranges_round_trip_beside_neighbours_staged_at_once(tmp_path):
    """Ranges at odd offsets, read into their own staging buffers before any of them is
    written back (as prefetch does), each written back changed: the file holds every change
    and nothing of a neighbour is overwritten with stale bytes. With and without O_DIRECT."""
    for direct in (True, False):
        swap = NvmeSwapper(
            tmp_path, key=KEY, needed_nbytes=1 << 20, aio=AioSettings(block_size=8192),
            direct_io=direct,
        )  # fmt: skip
        file = MappedFile(swap, "master", 10_000, torch.float32)
        expected = torch.randn(10_000)
        file.tensor.copy_(expected)
        cuts = [0, 3, 1030, 1031, 5000, 6024, 9999, 10_000]
        ranges = list(zip(cuts, cuts[1:]))
        staged = []
        for lo, hi in ranges:
            buffer = aligned_empty(MappedFile.staging_nbytes(hi - lo, 4), torch.uint8)
            handle = file.read(lo, hi, buffer)
            staged.append((lo, hi, buffer, handle))
        handles = []
        for lo, hi, buffer, handle in staged:
            handle.wait()
            view = file.view(lo, hi, buffer)
            assert torch.equal(view, expected[lo:hi])
            view.add_(1.0)
            handles.append(file.write(lo, hi, buffer))
        for handle in handles:
            if handle is not None:
                handle.wait()
        assert torch.equal(file.tensor, expected + 1.0)
        assert os.stat(file.path).st_blocks * 512 >= file.reserved_nbytes  # reserved
        file.close()
        swap.close()
    assert list(tmp_path.iterdir()) == []


def test_optimizer_slots_fit_the_largest_units_and_a_large_unit_waits_for_its_slot(tmp_path):
    """Staging slots are sized for the buffer_count largest units, one each (not all for the
    largest): here 2 slots for units of 300 and 100 elements among 100s. A small unit takes the
    small slot when it is free, so the large one stays for the large unit; when only a small
    slot is written back, the large unit's read waits until its step needs it, and then reads
    its own values from the slot the unit before it left."""
    from fzero.offload.staging import OptimizerStaging, slot_numels

    assert slot_numels([100, 300, 100, 100], 2) == [300, 100]
    assert slot_numels([100, 300], 4) == [300, 100, 100, 100]
    swap = NvmeSwapper(tmp_path, key=KEY, needed_nbytes=1 << 20, aio=AioSettings())
    cuts = [0, 100, 400, 500, 600]  # units 0, 2, 3: 100 elements; unit 1: 300
    files = tuple(MappedFile(swap, name, cuts[-1], torch.float32) for name in ("m", "a", "b"))
    values = [torch.randn(cuts[-1]) for _ in files]
    for file, value in zip(files, values):
        file.tensor.copy_(value)
    ranges = {unit: (lo, hi) for unit, (lo, hi) in enumerate(zip(cuts, cuts[1:]))}
    staging = OptimizerStaging(files, ranges, 2, pin_memory=False)
    assert sorted(s.numel for s in staging.free) == [100, 300]

    def step(unit):  # the CPU step's view of the slot: check the values, change them
        lo, hi = ranges[unit]
        arrays = staging.arrays(unit)
        for array, value in zip(arrays, values):
            assert torch.equal(array, value[lo:hi])
            array.add_(1.0)
            value[lo:hi] += 1.0

    staging.read(0)
    assert staging.by_unit[0].numel == 100  # the small slot, though the large one is free
    staging.read(2)  # the small slot is busy: the large one
    assert staging.by_unit[2].numel == 300
    step(0)
    staging.write(0)
    staging.read(1)  # 300 elements: only the small slot is written back, so it waits
    assert 1 not in staging.by_unit
    step(2)
    staging.write(2)
    step(1)  # read now, into the large slot unit 2 was written back from
    assert staging.by_unit[1].numel == 300
    staging.write(1)
    staging.read(3)
    step(3)
    staging.wait_writes()
    for file, value in zip(files, values):
        assert torch.equal(file.tensor, value)  # every change, nothing of a neighbour lost
    staging.read(2)  # unit 2 in the large slot, unit 3 in the small one: unit 1 has none
    staging.read(3)
    with pytest.raises(RuntimeError, match="unit 1's 300 elements.*buffer_count"):
        staging.arrays(1)
    staging.abort()
    for file in files:
        file.close()
    swap.close()


def test_the_host_check_prices_the_slots_shard_allocates(tmp_path):
    """``OffloadPlan.staging_nbytes`` (what the shard-time host check counts) covers the
    optimizer slots a sharded state holds, one per each of the buffer_count largest units,
    within a page either side per buffer; the units differ in size here (the root holds the
    embedding and the head)."""
    from fzero.offload.plan import OffloadPlan
    from fzero.offload.staging import slot_numels

    case = Case(SPEC, 1, 2, 1)
    config = _config(case, "nvme", False, tmp_path)
    config["zero_optimization"]["offload_optimizer"]["buffer_count"] = 4  # one per unit here
    torch.manual_seed(0)
    state = fzero.shard(ToyLM(SPEC), stage=3, config=config)
    files = state.runtime.executor.host_optimizer.files
    slots = list(files.optimizer.free)
    numels = [u.optimizer_numel for u in state.layout.units if u.optimizer_numel]
    assert len(numels) == 4 and min(numels) < max(numels) // 4
    assert sorted(s.numel for s in slots) == sorted(numels) == sorted(slot_numels(numels, 4))
    held = sum(b.nbytes for s in slots for b in s.buffers)
    plan = OffloadPlan.from_config(state.runtime.config)
    priced = plan.staging_nbytes(state.layout, torch.float32)
    assert held <= priced <= held + 4 * 3 * 2 * 4096
    assert held < 4 * 3 * MappedFile.staging_nbytes(max(numels), 4)  # less than uniform slots
    files.close()


def _one_rank(directory, device: str, params: bool = True) -> dict:
    case = Case(SPEC, 1, 3, 1, steps=3, clip=0.05)
    if device == "none":
        return case.config()
    return _config(case, device, params, directory)


@pytest.mark.parametrize("saved", ["nvme", "cpu", "none"])
def test_checkpoints_move_between_nvme_cpu_and_no_offload(tmp_path, saved):
    """A state saved from one residence, loaded into the others, trains on like the state
    that was saved: bit for bit between NVMe and CPU offload (one CPU AdamW), within an fp32
    rounding of the device kernel without offload."""
    torch.set_num_threads(1)
    swap_dir = tmp_path / "swap"
    swap_dir.mkdir()
    batches = Case(SPEC, 1, 3, 1, steps=3).batches()
    torch.manual_seed(0)
    state = fzero.shard(ToyLM(SPEC), stage=3, config=_one_rank(swap_dir, saved))
    state, _ = fzero.train_step(state, batches[0][0][0])
    fzero.save(state, tmp_path / "checkpoint")
    state, expected = fzero.train_step(state, batches[1][0][0])
    expected_full = fzero.full_state_dict(state)
    for loaded_kind in ("nvme", "cpu", "none"):
        if loaded_kind == saved:
            continue
        config = _one_rank(swap_dir, loaded_kind)
        loaded = fzero.load(tmp_path / "checkpoint", ToyLM(SPEC), config=config)
        loaded, metrics = fzero.train_step(loaded, batches[1][0][0])
        assert float(metrics["loss"]) == float(expected["loss"])
        full = fzero.full_state_dict(loaded)
        if "none" in (saved, loaded_kind):
            assert_close_to_reference(full, expected_full, 1e-6)
        else:
            for name, value in expected_full.items():
                assert torch.equal(full[name], value), name


def test_a_tree_map_copy_of_an_nvme_state_trains_bitwise_like_the_original(tmp_path):
    """The copy holds the pending update of stage 3 and RAM copies of the mapped leaves;
    trained after the original, on the same batches, it ends in the same leaves."""
    torch.set_num_threads(1)
    batches = Case(SPEC, 1, 3, 2, steps=3).batches()
    torch.manual_seed(0)
    # Only the optimizer state in files: the pending update is uploaded (UploadUpdate).
    state = fzero.shard(ToyLM(SPEC), stage=3, config=_one_rank(tmp_path, "nvme", params=False))
    state, _ = fzero.train_step(state, batches[0][0])
    copy = optree.tree_map(torch.clone, state, namespace=fzero.NAMESPACE)
    assert copy.pending.is_armed and copy.master.untyped_storage().filename is None
    losses = []
    for batch in batches[1:]:
        state, metrics = fzero.train_step(state, batch[0])
        losses.append(float(metrics["loss"]))
    leaves = [t.clone() for t in optree.tree_leaves(state, namespace=fzero.NAMESPACE)]
    for batch, loss in zip(batches[1:], losses, strict=True):
        copy, metrics = fzero.train_step(copy, batch[0])
        assert float(metrics["loss"]) == loss
    for a, b in zip(leaves, optree.tree_leaves(copy, namespace=fzero.NAMESPACE), strict=True):
        assert torch.equal(a, b)


def test_a_micro_batch_that_fails_while_the_update_streams_through_the_files_loses_nothing(
    tmp_path,
):
    """At stage 3 the pending update is read, stepped and written unit by unit in the forward;
    a micro-batch that fails after the root unit's (its read of the next unit in flight) leaves
    the files with the whole update, and training goes on bit for bit as without the failure."""
    from fzero.errors import BatchError

    torch.set_num_threads(1)
    case = Case(SPEC, 1, 3, 1, steps=3, clip=0.05)
    expected, expected_losses = _train(case, _config(case, "cpu", True, tmp_path))
    torch.manual_seed(0)
    state = fzero.shard(ToyLM(SPEC), stage=3, config=_config(case, "nvme", True, tmp_path))
    losses = []
    for index, step in enumerate(case.batches()):
        ids, targets = step[0][0]
        if index == 1:  # ids out of range fail in the root's embedding
            with pytest.raises(BatchError):
                fzero.train_step(state, (ids + 1000, targets))
            assert not state.pending.is_armed
        state, metrics = fzero.train_step(state, (ids, targets))
        losses.append((float(metrics["loss"]), metrics["skipped"], metrics["loss_scale"]))
    assert losses == expected_losses
    for a, b in zip(
        [expected.master, expected.exp_avg, *expected.param_shards],
        [state.master, state.exp_avg, *state.param_shards],
        strict=True,
    ):
        assert torch.equal(a, b)


def test_bad_nvme_paths_and_buffer_counts_are_refused_at_shard_time(tmp_path, monkeypatch):
    case = Case(SPEC, 1, 2, 1)
    from fzero.offload import aio

    with monkeypatch.context() as patch:  # as root every directory is writable: pretend
        patch.setattr(aio.os, "access", lambda path, mode: False)
        with pytest.raises(SwapPathError, match=f"{KEY}: .*is not writable by this user"):
            fzero.shard(ToyLM(SPEC), stage=2, config=_config(case, "nvme", False, tmp_path))
    for path, message in [
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "file", "is not a directory"),
    ]:
        if path.name == "file":
            path.write_text("")
        with pytest.raises(SwapPathError, match=f"{KEY}: .*{message}") as raised:
            fzero.shard(ToyLM(SPEC), stage=2, config=_config(case, "nvme", False, path))
        assert str(path) in str(raised.value)
    config = _config(case, "nvme", False, tmp_path)
    config["zero_optimization"]["offload_optimizer"]["buffer_count"] = 1
    with pytest.raises(ConfigError, match="offload_optimizer.buffer_count: must be at least 2"):
        fzero.shard(ToyLM(SPEC), stage=2, config=config)
    params = _config(Case(SPEC, 1, 3, 1), "nvme", True, tmp_path)
    params["zero_optimization"]["offload_param"]["nvme_path"] = str(tmp_path / "missing")
    with pytest.raises(SwapPathError, match="offload_param.nvme_path: .*does not exist"):
        fzero.shard(ToyLM(SPEC), stage=3, config=params)
    assert list(tmp_path.iterdir()) == [tmp_path / "file"]


def test_the_host_memory_check_counts_what_nvme_offload_keeps_on_the_host(tmp_path, monkeypatch):
    """The gradient copy and the staging buffers, not the state in files; the remedy does not
    suggest the offload already configured. Refused before any file is made."""
    from fzero.errors import HostMemoryError
    from fzero.offload import host

    monkeypatch.setattr(
        host, "read_host_memory", lambda root="/": host.HostMemory(1000, 1000, None)
    )
    config = _config(Case(SPEC, 1, 2, 1), "nvme", False, tmp_path)
    with pytest.raises(HostMemoryError, match=r"gradients .* and the NVMe staging buffers\)") as e:
        fzero.shard(ToyLM(SPEC), stage=2, config=config)
    assert 'Offload the parameters to "nvme" too' in str(e.value)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 256 KiB tmpfs (needs the right to mount; skipped without it)."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


def test_a_disk_too_small_is_refused_and_one_that_fills_later_breaks_no_step(small_tmpfs):
    """Shard refuses a disk without room for the files, naming the key, the path and the
    bytes needed. Where the files fit, their space is reserved at shard time: the disk filled
    up to the last byte afterwards, training still matches CPU offload."""
    big = ToySpec(depth=3, width=160)  # ~1.0 MB of master and moments
    with pytest.raises(SwapPathError, match=rf"{KEY}: .*{small_tmpfs}.* need [\d,]+ "):
        fzero.shard(ToyLM(big), stage=2, config=_config(Case(big, 1, 2, 1), "nvme", False,
                                                         small_tmpfs))  # fmt: skip
    case = Case(SPEC, 1, 3, 1, steps=3, clip=0.05)
    expected_state, expected = _train(case, _config(case, "cpu", True, small_tmpfs))
    torch.manual_seed(0)
    state = fzero.shard(ToyLM(SPEC), stage=3, config=_config(case, "nvme", True, small_tmpfs))
    filler = os.open(small_tmpfs / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    with pytest.raises(OSError, match="No space left"):  # fill the disk
        while True:
            os.write(filler, b"\0" * 4096)
    os.close(filler)
    losses = []
    for step in case.batches():
        state, metrics = fzero.train_step(state, step[0][0])
        losses.append((float(metrics["loss"]), metrics["skipped"], metrics["loss_scale"]))
    assert losses == expected
    assert torch.equal(state.master, expected_state.master)
    state.runtime.executor.host_optimizer.files.close()
    del state  # the mappings keep the filesystem busy until the leaves are gone
    gc.collect()


def test_files_are_removed_on_close_on_exit_and_after_a_crash_by_the_next_start(tmp_path):
    """close() of the files waits, closes and removes the run's directory (the leaves stay
    readable); a process that exits without closing leaves nothing either; one killed leaves
    its files, which the next shard on the host removes."""
    case = Case(SPEC, 1, 2, 1)
    state, _ = _train(Case(SPEC, 1, 2, 1, steps=1), _config(case, "nvme", False, tmp_path))
    files = state.runtime.executor.host_optimizer.files
    master = state.master.clone()
    (directory,) = [s.directory for s in files.swappers.values()]
    assert sorted(p.name for p in directory.iterdir()) == ["exp_avg", "exp_avg_sq", "master"]
    files.close()
    assert not directory.exists() and torch.equal(state.master, master)
    script = (
        "import os, sys, fzero, torch\n"
        "from tests.models import ToyLM, ToySpec\n"
        "config = {'zero_optimization': {'offload_optimizer': {'device': 'nvme', "
        "'nvme_path': sys.argv[1]}}}\n"
        "state = fzero.shard(ToyLM(ToySpec(width=64)), stage=2, config=config)\n"
        "batch = (torch.randint(0, 11, (2, 5)), torch.randint(0, 11, (2, 5)))\n"
        "state, _ = fzero.train_step(state, batch)\n"
        "print(next(iter(state.runtime.executor.host_optimizer.files.swappers.values()))"
        ".directory, flush=True)\n"
        "if sys.argv[2] == 'kill': os._exit(0)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    runs = {}
    for how in ("exit", "kill"):
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path), how], env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        runs[how] = Path(done.stdout.strip())
    assert not runs["exit"].exists()
    assert (runs["kill"] / "master").exists()  # killed: nothing ran to remove it
    state = fzero.shard(ToyLM(SPEC), stage=2, config=_config(case, "nvme", False, tmp_path))
    files = state.runtime.executor.host_optimizer.files
    assert [s.removed_stale for s in files.swappers.values()] == [[runs["kill"].name]]
    files.close()
    assert list(tmp_path.iterdir()) == []
