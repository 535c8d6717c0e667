"""The step benchmark's CPU smoke mode keeps running (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step.py"


def test_step_benchmark_cpu_smoke_runs_every_stage():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for impl in ("torch", "fzero:0", "fzero:1", "fzero:2", "fzero:3"):
        assert f"| tiny | {impl} |" in done.stdout


def test_scaling_benchmark_cpu_smoke_runs_both_implementations_on_two_ranks(tmp_path):
    """torchrun, gloo, 1 and 2 CPU ranks: every row is there, and fzero's 2-rank row carries
    the simulator's prediction from the 1-rank calibration."""
    script = SCRIPT.parent / "scaling.py"
    out = tmp_path / "rows.json"
    command = [sys.executable, str(script), "--cpu-smoke", "--out", str(tmp_path)]
    done = subprocess.run(
        [*command, "--json", str(out)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {(r["impl"], r["world_size"]): r for r in json.loads(out.read_text())}
    assert set(rows) == {("fsdp2", 1), ("fzero:3", 1), ("fsdp2", 2), ("fzero:3", 2)}
    assert rows[("fzero:3", 2)]["predicted_ms"] > 0
    assert all(r["tokens_per_s"] > 0 for r in rows.values())


def test_memory_peak_replay_finds_the_live_blocks_at_the_peak():
    sys.path.insert(0, str(SCRIPT.parent))
    from memory_peak import live_at_peak

    def event(action, addr, size, where="fzero/executor.py"):
        return {
            "action": action,
            "addr": addr,
            "size": size,
            "frames": [{"filename": where, "line": 1, "name": "f"}],
        }

    trace = [
        event("alloc", 1, 100),
        event("alloc", 2, 300, "examples/gpt.py"),  # 400: before the timed events
        event("free_requested", 2, 300),
        event("free_completed", 2, 300),  # counted at free_requested, as memory_allocated does
        event("alloc", 3, 250, "examples/gpt.py"),  # 350: the timed peak
        event("free_requested", 1, 100),
        event("alloc", 4, 50),  # 300
    ]
    peak, index, groups = live_at_peak(trace, start=3)
    assert (peak, index) == (350, 4)
    assert {site.split(":")[0]: sum(sizes) for site, sizes in groups.items()} == {
        "executor.py": 100,
        "gpt.py": 250,
    }


def test_profile_busy_time_counts_overlapping_kernels_once():
    sys.path.insert(0, str(SCRIPT.parent))
    from profile_step import busy_seconds

    assert busy_seconds([(5.0, 6.0), (0.0, 2.0), (1.0, 3.0), (5.5, 5.7)]) == 4.0
    assert busy_seconds([]) == 0.0


def test_cpu_adamw_benchmark_cpu_smoke_runs_every_variant(tmp_path):
    """Every variant steps once; deepspeed is a row either way (timed, or skipped with why)."""
    script = SCRIPT.parent / "cpu_adamw.py"
    out = tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, str(script), "--cpu-smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {row["variant"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"fzero", "fzero:bf16", "fzero:torch-ops", "torch", "deepspeed"}
    assert all(rows[v]["gb_per_s"] > 0 for v in rows if v != "deepspeed")
    assert "| fzero:bf16 |" in done.stdout


def test_nvme_swap_benchmark_cpu_smoke_measures_both_directions_against_dd(tmp_path):
    out = tmp_path / "swap.json"
    script = SCRIPT.parent / "nvme_swap.py"
    done = subprocess.run(
        [sys.executable, str(script), "--cpu-smoke", "--dir", str(tmp_path), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["round_trip_exact"] and result["nbytes"] == 16 << 20
    assert result["write_gb_per_s"] > 0 and result["read_gb_per_s"] > 0
    assert "| write |" in done.stdout and "| read |" in done.stdout


def test_nvme_offload_benchmark_cpu_smoke_measures_the_swap_in_training_against_dd(tmp_path):
    out = tmp_path / "rows.json"
    command = [sys.executable, str(SCRIPT.parent / "nvme_offload.py"), "--cpu-smoke"]
    command += ["--impls", "fzero:2+nvme", "fzero:3+nvme+param", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {r["impl"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"fzero:2+nvme", "fzero:3+nvme+param"}
    for row in rows.values():
        assert row["read_gb_per_s"] > 0 and row["write_gb_per_s"] > 0
        assert row["dd"]["read_gb_per_s"] > 0 and row["dd"]["write_gb_per_s"] > 0
    assert "| fzero:3+nvme+param |" in done.stdout


def test_offload_benchmark_cpu_smoke_runs_every_fzero_offload_configuration(tmp_path):
    out = tmp_path / "rows.json"
    command = [sys.executable, str(SCRIPT.parent / "offload.py"), "--cpu-smoke", "--ckpt"]
    command += ["--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {r["impl"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"fzero:2", "fzero:2+opt", "fzero:3+opt", "fzero:3+opt+param"}
    assert all(r["tokens_per_s"] > 0 and r["simulated_ms"] > 0 for r in rows.values())


def test_offload_benchmark_cpu_smoke_swaps_to_nvme_and_reports_the_file_bytes(tmp_path):
    """+nvme rows put the offloaded buffers in swap files under a scratch directory of
    --nvme-dir, report what they hold on the disk and leave nothing behind."""
    out, swap = tmp_path / "rows.json", tmp_path / "swap"
    swap.mkdir()
    command = [sys.executable, str(SCRIPT.parent / "offload.py"), "--cpu-smoke", "--ckpt"]
    command += ["--impls", "fzero:3+opt+nvme", "fzero:3+opt+param+nvme", "fzero:3+opt"]
    command += ["--nvme-dir", str(swap), "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {r["impl"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"fzero:3+opt+nvme", "fzero:3+opt+param+nvme", "fzero:3+opt"}
    optimizer, both = (
        rows["fzero:3+opt+nvme"]["file_gib"],
        rows["fzero:3+opt+param+nvme"]["file_gib"],
    )
    assert 0 < optimizer < both  # the parameter shard's file besides the optimizer's
    assert "file_gib" not in rows["fzero:3+opt"]
    assert list(swap.iterdir()) == []
    refused = subprocess.run(command[:-4], capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "--nvme-dir" in refused.stderr


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="the holder reads /proc/meminfo")
def test_offload_benchmark_under_a_host_cap_reports_what_was_held_and_left(tmp_path):
    """--host-memory-gib runs each row beside a process holding all but that much host
    memory: the row reports what was held and left, the holder outlived the row, and the
    row's anonymous resident set is reported beside the whole one. The cap here leaves all
    but 0.25 GiB of what is available, so that the tiny model trains."""
    sys.path.insert(0, str(SCRIPT.parent))
    from host_cap import GIB, mem_available

    leave_gib = mem_available() / GIB - 0.25
    out = tmp_path / "rows.json"
    command = [sys.executable, str(SCRIPT.parent / "offload.py"), "--cpu-smoke"]
    command += ["--impls", "fzero:3+opt", "--host-memory-gib", f"{leave_gib:.3f}"]
    command += ["--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert row["tokens_per_s"] > 0 and "host_cap_error" not in row
    assert row["host_cap_gib"] == pytest.approx(leave_gib, abs=1e-3)
    # What the holder needs to hold depends on what the row's own start (torch's import) took
    # already; that it held until only the cap was left does not.
    assert row["host_held_gib"] >= 0 and row["host_available_gib"] <= leave_gib
    assert 0 < row["host_anon_gib"] <= row["host_rss_gib"]


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="the holder reads /proc/meminfo")
def test_the_host_memory_holder_holds_until_only_the_cap_is_left():
    """The holder process allocates resident memory until MemAvailable is down to the cap,
    keeps it while its parent runs the row, and lets it go when the parent is done."""
    sys.path.insert(0, str(SCRIPT.parent))
    from host_cap import GIB, HostCap, mem_available

    leave_gib = mem_available() / GIB - 1.5  # the holder's own torch import takes some of it
    with HostCap(leave_gib) as cap:
        assert cap.report["host_held_gib"] > 0.5
        assert cap.report["host_available_gib"] <= leave_gib
        assert mem_available() / GIB < leave_gib + 0.5 and cap.check() is None
    assert cap.process.returncode == 0


def test_offload_benchmark_reports_a_row_refused_for_host_memory(monkeypatch):
    """A row whose offload does not fit the host's available memory is refused at shard with
    fzero's estimate; the benchmark keeps it as a row that says so (needed against available)."""
    sys.path.insert(0, str(SCRIPT.parent))
    import offload
    import torch

    import fzero.offload.host as host

    monkeypatch.setattr(host, "read_host_memory", lambda: host.HostMemory(1 << 20, 1 << 20, None))
    row = offload.run_one("fzero:3+opt", "tiny", 1, 0, torch.device("cpu"))
    assert "tokens_per_s" not in row and "host memory" in row["refused"]
    assert row["needed_gib"] > row["available_gib"] == 1 / 1024
    table = offload._table([row])
    assert "fzero:3+opt" in table and "refused at shard: needs" in table
    assert "0.00 available" in table


def test_offload_plan_predicts_the_3_9b_rows_on_the_meta_device(tmp_path):
    """The 3.9B rows plan here (nothing is allocated); partial offload predicts a shorter step,
    more device memory and fewer host bytes per parameter than full offload."""
    out = tmp_path / "plan.json"
    command = [sys.executable, str(SCRIPT.parent / "offload_plan.py"), "--model", "3.9b", "--ckpt"]
    command += ["--impls", "fzero:3+opt", "fzero:3+opt+r0.85", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    full, partial = json.loads(out.read_text())
    assert full["host_bytes_per_param"] == pytest.approx(16.0, abs=0.05)  # 12 + fp32 gradient
    assert partial["simulated_calibrated_ms"] < full["simulated_calibrated_ms"]
    assert partial["simulated_peak_gib"] > full["simulated_peak_gib"]
    assert partial["host_bytes_per_param"] < full["host_bytes_per_param"]


def test_host_cost_benchmark_times_a_revision_beside_this_tree():
    """Both trees run (the revision exported with git archive) and give every column."""
    command = [sys.executable, str(SCRIPT.parent / "host_cost.py"), "--baseline", "HEAD"]
    command += ["--layers", "2", "--steps", "2", "--rounds", "1", "--repeats", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| HEAD |")]
    rows += [line for line in done.stdout.splitlines() if line.startswith("| this tree |")]
    assert len(rows) == 2 and all(len(row.split("|")) == 7 for row in rows), done.stdout
