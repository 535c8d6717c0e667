"""Run fzero and the single-device reference side by side on the same drawn case."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

import optree
import torch

import fzero
from fzero.collectives import run_ranks
from tests.models import ToyLM, ToySpec, make_batches, reference_train


@dataclass(frozen=True)
class Case:
    spec: ToySpec
    world_size: int
    stage: int
    micro: int  # micro-batches per step (a list when > 1)
    steps: int = 3
    lr: float = 1e-2
    weight_decay: float = 0.1
    clip: float = 0.5
    # Adam divides by |gradient| + eps, so with the usual eps=1e-8 every gradient element, even
    # one that is zero up to rounding, becomes an lr-sized step: fp32 summation order alone
    # (the reference regrouped into micro-batch means, no fzero involved) then moves parameters
    # by up to ~1e-5 relative within three steps. eps=1e-2 keeps small elements in the linear
    # regime, which brings that floor to ~1e-6, while any real error (averaging, clipping,
    # decay, bias correction) still shows far above the 1e-5 tolerance.
    eps: float = 1e-2
    no_decay: tuple[str, ...] = ()
    deterministic: bool = False  # fzero.deterministic; compare with ordered_reference
    embedding_units: bool = False  # fzero.embedding_units
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def config(self) -> dict[str, Any]:
        cfg = {
            "optimizer": {
                "type": "AdamW",
                "params": {"lr": self.lr, "weight_decay": self.weight_decay, "eps": self.eps},
            },
            "gradient_clipping": self.clip,
            "fzero": {
                "no_weight_decay": list(self.no_decay),
                "deterministic": self.deterministic,
                "embedding_units": self.embedding_units,
            },
        }
        # Stage 3 gathers and releases every unit unless a test asks for persistence (the toy
        # units are far below DeepSpeed's default threshold of 1e5 elements).
        cfg["zero_optimization"] = {"stage3_param_persistence_threshold": 0}
        for key, value in self.extra.items():
            if key == "zero_optimization":
                cfg[key] = {**cfg[key], **value}
            else:
                cfg[key] = value
        return cfg

    def batches(self):
        return make_batches(
            self.spec, steps=self.steps, world_size=self.world_size, micro=self.micro
        )


def train_rank(case: Case, comm: Any, model: torch.nn.Module | None = None, record: bool = False):
    """Train ``case`` on this rank; return (full_state_dict, final state, metrics list)."""
    model = model if model is not None else ToyLM(case.spec)
    state = fzero.shard(
        model, stage=case.stage, config=case.config(), process_group=comm, record_ops=record
    )
    batches = case.batches()
    metrics = []
    for step in range(case.steps):
        micro = batches[step][comm.rank if comm is not None else 0]
        state, m = fzero.train_step(state, micro if case.micro > 1 else micro[0])
        metrics.append(m)
    return fzero.full_state_dict(state), state, metrics


def train_threads(case: Case, record: bool = False):
    # Models are built before the threads start: torch's global RNG is not per thread.
    models = [ToyLM(case.spec) for _ in range(case.world_size)]
    return run_ranks(
        case.world_size, lambda comm: train_rank(case, comm, models[comm.rank], record)
    )


def reference(
    case: Case, grouped: bool = True, model: torch.nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """The single-device reference (see ``reference_train`` for ``grouped`` and ``model``)."""
    model = reference_train(
        case.spec,
        case.batches(),
        lr=case.lr,
        weight_decay=case.weight_decay,
        eps=case.eps,
        clip=case.clip,
        no_decay=case.no_decay,
        grouped=grouped,
        model=model,
    )
    return model.state_dict()


def assert_close_to_reference(
    full: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], rtol: float = 1e-5
) -> None:
    """Every tensor within ``rtol`` of the reference, relative to the tensor's largest value."""
    assert list(full) == list(ref), f"names differ: {list(full)} vs {list(ref)}"
    for name, expected in ref.items():
        got = full[name]
        assert got.shape == expected.shape, f"{name}: shape {got.shape} vs {expected.shape}"
        scale = expected.abs().max().clamp_min(1e-12)
        error = ((got.double() - expected.double()).abs().max() / scale).item()
        assert error <= rtol, f"{name}: relative error {error:.3e} > {rtol:.0e}"


def ordered_reference(case: Case) -> dict[str, torch.Tensor]:
    """Plain PyTorch, one backward per micro-batch, summed in the order fzero's deterministic
    mode fixes: micro-batch 0 of rank 0, of rank 1, ..., then micro-batch 1 of every rank, ...,
    into fp32 zeros. Then what fzero does to the sum, op for op: the squared norms of each
    parameter's gradient added in ``model.parameters()`` order, the norm over the world size,
    one factor (1/world times torch's clipping coefficient) and ``AdamW(foreach=False)``."""
    model = ToyLM(case.spec)
    params = [p for p in model.parameters() if p.requires_grad]
    names = {
        id(p): [n for n, q in model.named_parameters(remove_duplicate=False) if q is p]
        for p in params
    }
    excluded = [
        p
        for p in params
        if any(fnmatch.fnmatchcase(n, pattern) for n in names[id(p)] for pattern in case.no_decay)
    ]
    groups = [
        {"params": [p for p in params if all(p is not q for q in excluded)]},
        {"params": excluded, "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(
        groups, lr=case.lr, weight_decay=case.weight_decay, eps=case.eps, foreach=False
    )
    world, micro = case.world_size, case.micro
    for step in case.batches():
        total = [torch.zeros_like(p) for p in params]
        for m in range(micro):
            for rank in range(world):
                model.zero_grad(set_to_none=True)
                loss = model(*step[rank][m])
                (loss / micro if micro > 1 else loss).backward()
                for t, p in zip(total, params):
                    if p.grad is not None:
                        t += p.grad
        scale = torch.full((), 1.0 / world)
        if case.clip > 0:
            squares = torch.zeros(())
            for t in total:
                squares = squares + torch.linalg.vector_norm(t, dtype=torch.float32).square()
            norm = squares.sqrt() / world
            scale = scale * torch.clamp(case.clip / (norm + 1e-6), max=1.0)
        for t, p in zip(total, params):
            p.grad = t * scale
        opt.step()
    return model.state_dict()


def assert_copy_trains_like_original(state: Any, micro_batches: list) -> None:
    """A ``tree_map`` copy of ``state`` trains ``micro_batches`` (one per step) to the same
    losses and, once settled, the same leaves bit for bit as ``state`` itself."""
    copy = optree.tree_map(torch.clone, state, namespace=fzero.NAMESPACE)
    runs = []
    for current in (state, copy):
        losses = []
        for micro in micro_batches:
            current, metrics = fzero.train_step(current, micro)
            losses.append(float(metrics["loss"]))
        current.runtime.settle(current)
        leaves = [t.clone() for t in optree.tree_leaves(current, namespace=fzero.NAMESPACE)]
        runs.append((losses, leaves))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        assert torch.equal(a, b)
