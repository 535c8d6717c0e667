"""A real CUDA out-of-memory error inside ``fzero.train_step``: re-raised as
``StepOutOfMemoryError`` (still a ``torch.OutOfMemoryError``) that says what the schedule
predicted and what to change, with the state left usable.

The device's memory is capped (``torch.cuda.set_per_process_memory_fraction``) at 1 GiB, far
above what the model and a small batch need, and one micro-batch far too large is given: its
first block's activations (4 GiB) cannot be allocated. The case runs in a child process of its
own, bounded by a timeout, so that neither the cap nor a wrecked CUDA context can reach other
tests. The same child runs on CPU in CI with the allocation failure injected (a hook raising
``torch.OutOfMemoryError`` where the huge batch would allocate), so the GPU run exercises no
test logic that only a GPU has run; fzero's side of the injected case is covered on gloo ranks
by ``tests/faults/test_runtime_faults.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
WIDTH, HIDDEN = 16, 1024
SMALL_ROWS = 64
# 1,048,576 rows: 64 MiB of inputs, but the first block's hidden activations are 4 GiB (fp32).
HUGE_ROWS = 1 << 20
CAP_BYTES = 1 << 30  # well under the huge batch's activations, far above the small batch's
GOOD_STEPS = 5


def _child(device_type: str) -> None:
    """Runs in the child: one huge step under the memory cap (it must fail), then the good steps
    on that state and, as the oracle, the same good steps on a fresh model that never met the
    fault. Prints one ``RESULT`` line of JSON. On ``cpu`` the failure is injected."""
    sys.path.insert(0, str(ROOT))
    import fzero

    device = torch.device(device_type)
    if device.type == "cuda":  # the memory cap takes a device with its index
        device = torch.device("cuda", torch.cuda.current_device())
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(CAP_BYTES / total, device)
    else:
        torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    small = [_batch(SMALL_ROWS, g, device) for _ in range(GOOD_STEPS)]
    config = {
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "zero_optimization": {"stage3_param_persistence_threshold": 0},
    }
    model = _model(device)
    if device.type == "cpu":
        model.blocks[0].register_forward_pre_hook(_fail_where_cuda_would)
    state = fzero.shard(model, stage=3, config=config)
    state, _ = fzero.train_step(state, small[0])  # traced and compiled before the fault

    result: dict = {"raised": None}
    huge = _batch(HUGE_ROWS, g, device)
    try:
        fzero.train_step(state, huge)
    except Exception as error:  # noqa: BLE001 - what it is, is what the test checks
        cause = error.__cause__
        result.update(
            raised=type(error).__name__,
            bases=[c.__name__ for c in type(error).__mro__],
            message=str(error),
            cause=type(cause).__name__ if cause is not None else None,
            cause_message=str(cause) if cause is not None else "",
        )
    del huge
    if device.type == "cuda":
        torch.cuda.empty_cache()

    losses = []
    for batch in small[1:]:
        state, metrics = fzero.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    after = fzero.full_state_dict(state)

    oracle = fzero.shard(_model(device), stage=3, config=config)
    for batch in small:
        oracle, _ = fzero.train_step(oracle, batch)
    expected = fzero.full_state_dict(oracle)
    result.update(
        losses=losses,
        step=int(metrics["step"]),
        max_difference=max(float((after[k] - expected[k]).abs().max()) for k in expected),
        names_equal=sorted(after) == sorted(expected),
    )
    print("RESULT " + json.dumps(result), flush=True)


def _fail_where_cuda_would(module: torch.nn.Module, args: tuple) -> None:
    """CPU stand-in for the cap: the huge batch's first activation cannot be allocated."""
    rows = args[0].shape[0]
    if rows * HIDDEN * 4 > CAP_BYTES:
        raise torch.OutOfMemoryError(
            f"CPU dry run: out of memory. Tried to allocate {rows * HIDDEN * 4 / 2**30:.2f} GiB"
        )


def _model(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return Residual(depth=3).to(device)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(WIDTH, HIDDEN)
        self.down = torch.nn.Linear(HIDDEN, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class Residual(torch.nn.Module):
    """Blocks (fzero's units) of a residual MLP regressing a fixed linear map: no embedding or
    atomics, so that two runs of the same steps agree exactly on one device."""

    def __init__(self, depth: int):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block() for _ in range(depth))
        self.head = torch.nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return torch.nn.functional.mse_loss(self.head(x), y)


def _batch(rows: int, g: torch.Generator, device: torch.device):
    x = torch.randn(rows, WIDTH, generator=g)
    target = torch.Generator().manual_seed(2)
    y = x @ torch.randn(WIDTH, WIDTH, generator=target) / WIDTH**0.5
    return x.to(device), y.to(device)


def _run_child(device_type: str) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", device_type],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.fixture(scope="module")
def outcome() -> dict:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return _run_child("cuda")


def test_a_real_cuda_oom_is_raised_as_step_oom_with_the_schedules_prediction(outcome):
    """The error is fzero's StepOutOfMemoryError, still a torch.OutOfMemoryError, raised from
    the allocator's own error; it names where it happened, the schedule's predicted peak of
    gathered parameters, the largest unit and the rank's optimizer state."""
    assert outcome["raised"] == "StepOutOfMemoryError", outcome
    assert "OutOfMemoryError" in outcome["bases"]  # torch.OutOfMemoryError, caught as such
    assert outcome["cause"] == "OutOfMemoryError", outcome
    assert "CUDA out of memory" in outcome["cause_message"]
    message = outcome["message"]
    assert "out of device memory in micro-batch 0 of the step (CUDA out of memory" in message
    _check_the_prediction_is_named(outcome)


def _check_the_prediction_is_named(outcome: dict) -> None:
    assert outcome["raised"] == "StepOutOfMemoryError", outcome
    assert "OutOfMemoryError" in outcome["bases"]
    message = outcome["message"]
    assert "out of device memory in micro-batch 0 of the step" in message
    assert "ZeRO stage 3, world size 1" in message
    assert "of gathered parameters alive (schedule.peak_live_nbytes)" in message
    assert "largest unit: unit " in message and "of gradients" in message
    assert "of optimizer state" in message and "fzero.memory.estimate_memory" in message


def test_the_oom_message_gives_the_guides_remedies_in_order(outcome):
    """Smaller micro-batch with more accumulation, then activation checkpointing, then
    offload; and it says the state is still usable."""
    _check_the_remedies(outcome)


def _check_the_remedies(outcome: dict) -> None:
    message = outcome["message"]
    first = message.index("1. a smaller micro-batch with more gradient_accumulation_steps")
    second = message.index("2. activation checkpointing")
    third = message.index("3. offload")
    assert first < second < third
    assert "the state given to the step is still usable" in message


def test_after_a_real_cuda_oom_the_state_trains_on_as_if_it_never_happened(outcome):
    """After freeing the huge batch, small steps on the same state succeed, with finite and
    falling losses, and end where a fresh model given only those steps ends: the failed step
    changed nothing and counted no step."""
    _check_usable(outcome)


def _check_usable(outcome: dict) -> None:
    losses = outcome["losses"]
    assert all(loss == loss and abs(loss) != float("inf") for loss in losses), losses
    assert losses[-1] < losses[0], losses
    assert outcome["step"] == GOOD_STEPS  # the failed step is not counted
    assert outcome["names_equal"]
    assert outcome["max_difference"] <= 1e-6, outcome["max_difference"]


def test_the_same_child_with_the_failure_injected_passes_on_cpu():
    """The child above on CPU, the allocation failure raised by a hook where the huge batch's
    first activation would be allocated: every check of the CUDA tests but the allocator's own
    wording holds."""
    outcome = _run_child("cpu")
    assert outcome["cause"] == "OutOfMemoryError" and "CPU dry run" in outcome["cause_message"]
    _check_the_prediction_is_named(outcome)
    _check_the_remedies(outcome)
    _check_usable(outcome)


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    _child(sys.argv[2])
