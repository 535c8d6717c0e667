"""What making released stage-3 parameters safe costs: the class switch a release and a gather
do on each parameter of a unit (``fzero/state/released.py``), timed on one GPT block's
parameters, both ways in one run: per-parameter functions that look each class up
(``mark_released`` and ``mark_gathered`` below, the way the gathers did it before) and the
precomputed ``UnitClasses`` the gathers use. Forward and backward pay nothing: a gathered
parameter is a plain ``nn.Parameter``.

    python benchmarks/release_cost.py
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from gpt import GPT, GPTConfig  # noqa: E402

from fzero.state.released import (  # noqa: E402
    _ORIGINAL_CLASS,
    ReleasedMixin,
    UnitClasses,
    mark_released,
)


def mark_gathered(params: list[torch.nn.Parameter]) -> None:
    """The per-parameter gather the gathers used before ``UnitClasses``: each parameter's own
    class looked up at every gather."""
    for param in params:
        if isinstance(param, ReleasedMixin):
            param.__class__ = param.__dict__[_ORIGINAL_CLASS]


def seconds_per_cycle(cycle: Callable[[], None], cycles: int = 100_000, rounds: int = 5) -> float:
    """Best of ``rounds`` rounds of ``cycles`` calls of ``cycle``."""
    for _ in range(1000):
        cycle()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(cycles):
            cycle()
        best = min(best, (time.perf_counter() - start) / cycles)
    return best


def main() -> None:
    model = GPT(GPTConfig(n_layer=1, n_embd=256, n_head=4, vocab_size=512, block_size=64))
    unit = list(model.h[0].parameters())
    classes = UnitClasses(unit)

    def by_function() -> None:
        mark_released(unit)
        mark_gathered(unit)

    def precomputed() -> None:
        classes.release()
        classes.gather()

    for name, cycle in (
        ("mark_released + mark_gathered", by_function),
        ("UnitClasses", precomputed),
    ):
        seconds = seconds_per_cycle(cycle)
        print(
            f"{name}: release + gather of one block ({len(unit)} parameters): "
            f"{seconds * 1e6:.2f} us ({seconds / len(unit) * 1e9:.0f} ns per parameter)"
        )


if __name__ == "__main__":
    main()
