"""FlatLayout: where every parameter lives in the flat buffers, and which slice this rank owns.

Parameters are grouped into units (one per repeated block, plus a root unit for the rest; with
``fzero.embedding_units`` also one per embedding outside the blocks). A
unit's parameters lie back to back in one flat buffer: trainable parameters first, then frozen
ones, then zero padding up to a multiple of ``shard_world * alignment`` elements. Rank ``r`` owns
``[r * S, (r + 1) * S)`` of every unit, ``S = padded_numel / shard_world``. Stage 0 does not
shard (``shard_world == 1``): every rank owns whole units.

This rank's slices of all units, concatenated, form its *shard space*; the compute-dtype
parameter shard lives there. The optimizer space is the trainable part of it: frozen
parameters (and the padding after them) cost no master weights, moments or gradients.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from fzero.errors import ShardError


@dataclass(frozen=True)
class ParamSlot:
    """One parameter's place in its unit's flat buffer.

    ``names`` are every name the model's ``state_dict`` gives it (more than one when tied);
    ``names[0]`` is the canonical one.
    """

    names: tuple[str, ...]
    shape: tuple[int, ...]
    offset: int
    requires_grad: bool
    weight_decay: float

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Unit:
    """A group of parameters gathered, reduced and released together.

    ``trainable_numel`` counts the elements that the optimizer updates, including padding when
    the unit has no frozen parameters (so such units need no split in the optimizer space).
    """

    index: int
    name: str
    params: tuple[ParamSlot, ...]
    numel: int
    padded_numel: int
    shard_numel: int
    shard_offset: int
    trainable_numel: int
    optimizer_offset: int
    optimizer_numel: int  # of this rank's shard

    @property
    def has_trainable(self) -> bool:
        return any(p.requires_grad for p in self.params)


@dataclass(frozen=True)
class FlatLayout:
    units: tuple[Unit, ...]
    world_size: int
    rank: int
    shard_world: int
    alignment: int

    @property
    def shard_numel(self) -> int:
        return sum(u.shard_numel for u in self.units)

    @property
    def optimizer_numel(self) -> int:
        return sum(u.optimizer_numel for u in self.units)

    @property
    def numel(self) -> int:
        return sum(u.numel for u in self.units)

    @property
    def trainable_param_numel(self) -> int:
        return sum(p.numel for u in self.units for p in u.params if p.requires_grad)

    def owned_range(self, unit: Unit) -> tuple[int, int]:
        """This rank's slice of ``unit``'s flat buffer."""
        start = (self.rank if self.shard_world > 1 else 0) * unit.shard_numel
        return start, start + unit.shard_numel

    def decay_ranges(self) -> tuple[tuple[int, int, float], ...]:
        """Per-element weight decay over the optimizer space, as (start, end, decay) ranges."""
        ranges: list[tuple[int, int, float]] = []
        for unit in self.units:
            if unit.optimizer_numel == 0:
                continue
            start, _ = self.owned_range(unit)
            cursor = start
            end = start + unit.optimizer_numel
            for p in unit.params:
                lo, hi = max(p.offset, cursor), min(p.offset + p.numel, end)
                if lo >= hi:
                    continue
                if lo > cursor:  # padding between parameters never happens, but be exact
                    ranges.append(
                        (
                            unit.optimizer_offset + cursor - start,
                            unit.optimizer_offset + lo - start,
                            0.0,
                        )
                    )
                decay = p.weight_decay if p.requires_grad else 0.0
                ranges.append(
                    (unit.optimizer_offset + lo - start, unit.optimizer_offset + hi - start, decay)
                )
                cursor = hi
            if cursor < end:  # trailing padding
                ranges.append(
                    (
                        unit.optimizer_offset + cursor - start,
                        unit.optimizer_offset + end - start,
                        0.0,
                    )
                )
        return tuple(ranges)


def find_unit_modules(model: nn.Module, embeddings: bool = False) -> list[tuple[str, nn.Module]]:
    """The default units: the model's own hint when it gives one (Hugging Face's
    ``_no_split_modules``, class names of the blocks that FSDP and DeepSpeed wrap: every module
    of such a class is a unit), else the modules the model repeats, that is elements of a
    ModuleList/Sequential holding two or more modules of one class (transformer blocks); with
    ``embeddings`` (``fzero.embedding_units``) also every ``nn.Embedding`` outside them.
    Searched top-down; a unit's insides are not searched further. A hint that names no module
    of the model (or only modules without parameters) falls back to the repeated blocks.

    An embedding's table is large (vocabulary x width) and only its forward reads it: its
    backward needs the indices alone. In the root unit it stays gathered from the start of
    forward to the end of backward, through the activation peak; as a unit, stage 3 releases it
    right after its forward. An embedding whose weight is tied to a parameter of another unit
    (an output head) gives that parameter to the root unit, as any tie across units does, and
    is then no unit at all."""
    hinted = frozenset(getattr(model, "_no_split_modules", None) or ())
    found = _search_units(model, embeddings, hinted)
    if hinted and not any(type(m).__name__ in hinted for _, m in found):
        return _search_units(model, embeddings, frozenset())
    return found


def _search_units(
    model: nn.Module, embeddings: bool, hinted: frozenset[str]
) -> list[tuple[str, nn.Module]]:
    found: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            path = f"{prefix}{child_name}"
            if embeddings and isinstance(child, nn.Embedding):
                found.append((path, child))
                continue
            if type(child).__name__ in hinted and any(True for _ in child.parameters()):
                found.append((path, child))
                continue
            if hinted:  # the hint decides: no fallback to repetition inside a hinted model
                visit(f"{path}.", child)
                continue
            if isinstance(child, (nn.ModuleList, nn.Sequential)) and len(child) >= 2:
                kinds = {type(m) for m in child}
                if len(kinds) == 1 and any(True for _ in child[0].parameters()):
                    found.extend((f"{path}.{i}", m) for i, m in enumerate(child))
                    continue
            visit(f"{path}.", child)

    visit("", model)
    return found


def backward_reads_params(module: nn.Module) -> bool:
    """Whether a unit made of ``module`` needs its parameters' values in backward. An
    ``nn.Embedding`` (or a subclass keeping its forward) does not: the gradient of a lookup
    depends on the indices and the table's size alone."""
    return type(module).forward is not nn.Embedding.forward


def build_layout(
    model: nn.Module,
    unit_modules: list[tuple[str, nn.Module]],
    *,
    world_size: int,
    rank: int,
    stage: int,
    alignment: int,
    weight_decay: float,
    no_weight_decay: tuple[str, ...] = (),
) -> tuple[FlatLayout, list[list[nn.Parameter]]]:
    """Assign every parameter of ``model`` to a unit. Returns the layout and, per unit, the
    Parameter objects in slot order.

    A parameter used by two different units (tied across blocks), or by a unit and the root's
    own modules (an embedding tied to the output head), goes to the root unit, which stays
    gathered for the whole step, so every user finds it.
    """
    names_of: dict[int, list[str]] = {}
    param_of: dict[int, nn.Parameter] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
        param_of[id(param)] = param
    if not any(p.requires_grad for p in param_of.values()):
        raise ShardError("the model has no trainable parameters (all have requires_grad=False)")

    owners: dict[int, set[int]] = {}
    for index, (_, module) in enumerate(unit_modules, start=1):
        for param in module.parameters():
            owners.setdefault(id(param), set()).add(index)
    # A parameter the root's own modules use too (an output head tied to an embedding unit)
    # belongs to the root: a unit's parameters are released when that unit is done.
    prefixes = tuple(f"{name}." for name, _ in unit_modules)
    for pid, names in names_of.items():
        if any(not name.startswith(prefixes) for name in names):
            owners.setdefault(pid, set()).add(0)
    members: list[list[int]] = [[] for _ in range(len(unit_modules) + 1)]
    for pid in names_of:  # named_parameters order: registration order, stable across ranks
        units = owners.get(pid, set())
        members[next(iter(units)) if len(units) == 1 else 0].append(pid)

    shard_world = world_size if stage > 0 else 1
    quantum = shard_world * alignment
    unit_names = [""] + [name for name, _ in unit_modules]
    units: list[Unit] = []
    params_per_unit: list[list[nn.Parameter]] = []
    shard_offset = optimizer_offset = 0
    for name, pids in zip(unit_names, members):
        if not pids:
            continue
        # Trainable first, so this rank's trainable elements are a prefix of its shard.
        pids = sorted(pids, key=lambda pid: not param_of[pid].requires_grad)
        slots, offset = [], 0
        for pid in pids:
            param = param_of[pid]
            names = tuple(names_of[pid])
            excluded = any(fnmatch.fnmatchcase(n, pat) for n in names for pat in no_weight_decay)
            slots.append(
                ParamSlot(
                    names,
                    tuple(param.shape),
                    offset,
                    param.requires_grad,
                    0.0 if excluded else weight_decay,
                )
            )
            offset += param.numel()
        padded = -(-offset // quantum) * quantum if offset else quantum
        shard = padded // shard_world
        has_frozen = any(not s.requires_grad for s in slots)
        trainable = sum(s.numel for s in slots if s.requires_grad) if has_frozen else padded
        owned_start = (rank if shard_world > 1 else 0) * shard
        optimizer_numel = min(max(trainable - owned_start, 0), shard)
        units.append(
            Unit(
                len(units),
                name,
                tuple(slots),
                offset,
                padded,
                shard,
                shard_offset,
                trainable,
                optimizer_offset,
                optimizer_numel,
            )
        )
        params_per_unit.append([param_of[pid] for pid in pids])
        shard_offset += shard
        optimizer_offset += optimizer_numel
    layout = FlatLayout(tuple(units), world_size, rank, shard_world, alignment)
    return layout, params_per_unit


def dtype_from_name(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
