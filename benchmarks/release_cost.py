"""What making released stage-3 parameters safe costs: the class switch a release and a gather
do on each parameter of a unit (``fzero/state/released.py``), timed on one GPT block's
parameters. Forward and backward pay nothing: a gathered parameter is a plain ``nn.Parameter``.

    python benchmarks/release_cost.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from gpt import GPT, GPTConfig  # noqa: E402

from fzero.state.released import mark_gathered, mark_released  # noqa: E402


def main() -> None:
    model = GPT(GPTConfig(n_layer=1, n_embd=256, n_head=4, vocab_size=512, block_size=64))
    unit = list(model.h[0].parameters())
    for _ in range(1000):
        mark_released(unit)
        mark_gathered(unit)
    cycles = 100_000
    start = time.perf_counter()
    for _ in range(cycles):
        mark_released(unit)
        mark_gathered(unit)
    seconds = (time.perf_counter() - start) / cycles
    print(
        f"release + gather class switch of one block ({len(unit)} parameters): "
        f"{seconds * 1e6:.2f} us ({seconds / len(unit) * 1e9:.0f} ns per parameter)"
    )


if __name__ == "__main__":
    main()
