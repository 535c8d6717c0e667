"""Small models for tests: a tiny language model whose shape hypothesis can vary."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ToySpec:
    vocab: int = 11
    width: int = 7
    depth: int = 2
    tied: bool = True  # the output head reuses the embedding (a tied parameter)
    shared_block_weight: bool = False  # block 1 reuses block 0's weight (tied across units)
    frozen: bool = False  # block 0's bias is frozen
    seed: int = 0


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, width)
        self.register_buffer("gain", torch.linspace(0.5, 1.5, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.linear(self.norm(x))) * self.gain


class ToyLM(nn.Module):
    def __init__(self, spec: ToySpec):
        super().__init__()
        torch.manual_seed(spec.seed)
        self.embed = nn.Embedding(spec.vocab, spec.width)
        self.blocks = nn.ModuleList(Block(spec.width) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(spec.width)
        self.head = nn.Linear(spec.width, spec.vocab, bias=False)
        if spec.tied:
            self.head.weight = self.embed.weight
        if spec.shared_block_weight and spec.depth >= 2:
            self.blocks[1].linear.weight = self.blocks[0].linear.weight
        if spec.frozen:
            self.blocks[0].linear.bias.requires_grad_(False)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def make_batches(
    spec: ToySpec,
    *,
    steps: int,
    world_size: int,
    micro: int,
    batch: int = 2,
    seq: int = 3,
    seed: int = 1,
):
    """batches[step][rank] is a list of ``micro`` (ids, targets) micro-batches."""
    g = torch.Generator().manual_seed(seed)
    return [
        [
            [
                (
                    torch.randint(spec.vocab, (batch, seq), generator=g),
                    torch.randint(spec.vocab, (batch, seq), generator=g),
                )
                for _ in range(micro)
            ]
            for _ in range(world_size)
        ]
        for _ in range(steps)
    ]


def reference_train(
    spec: ToySpec,
    batches,
    *,
    lr: float,
    weight_decay: float,
    clip: float,
    betas=(0.9, 0.999),
    eps: float = 1e-8,
    no_decay: tuple[str, ...] = (),
    grouped: bool = True,
    model: nn.Module | None = None,
):
    """Plain single-process PyTorch: AdamW on the concatenation of every rank's micro-batches.

    ``grouped``: the loss is the mean of the micro-batches' mean losses, each backpropagated
    in turn (PyTorch's own gradient accumulation); mathematically the concatenated batch's mean
    loss, and the same grouping of sums fzero's ranks and micro-batches make. Otherwise one
    backward over the concatenated batch, whose fp32 rounding differs (by up to 6e-5 relative
    after three Adam steps, measured on these models). ``model``: train this one (built from
    ``spec`` the same way) instead of a plain ``ToyLM(spec)``."""
    import fnmatch

    model = model if model is not None else ToyLM(spec)
    decay, plain = [], []
    seen = set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        names = [n for n, q in model.named_parameters(remove_duplicate=False) if q is p]
        excluded = any(fnmatch.fnmatchcase(n, pat) for n in names for pat in no_decay)
        (plain if excluded else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)
    for step in batches:
        micro = [mb for rank in step for mb in rank]
        opt.zero_grad()
        if grouped:
            for ids, targets in micro:
                (model(ids, targets) / len(micro)).backward()
        else:
            model(torch.cat([m[0] for m in micro]), torch.cat([m[1] for m in micro])).backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return model
