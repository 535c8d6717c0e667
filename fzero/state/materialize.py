"""Initialise a model built on the meta device straight into fzero's flat buffers, unit by unit.

A model built under ``with torch.device("meta"):`` (or transformers' ``init_empty_weights``) has
shapes but no values, so no rank ever holds the full model. ``fzero.shard`` then gives each
unit's parameters a full fp32 buffer of the unit, runs the model's own initialisation on the
unit's modules into it, keeps this rank's slice and frees the buffer before the next unit: peak
host memory is about the largest unit plus this rank's shard.

The seeding rule, which makes every rank compute the same values with no broadcast (and which
a single device can follow to get the same model):

1. ``base_seed`` is drawn on rank 0 as ``int(torch.randint(0, 2**62, ()))`` from its global
   generator (so ``torch.manual_seed`` before ``shard`` fixes it) and sent to every rank.
2. Units are initialised in layout order (root unit first); unit ``u`` (``layout.units[u]``)
   runs under ``torch.manual_seed(base_seed + u)`` inside ``torch.random.fork_rng``, so the
   caller's generator is left as step 1 left it.
3. A unit's modules are the model's modules whose name is the unit's name or lies under it
   (the root unit: every module under no other unit), taken in post-order (children before
   their parent, as Hugging Face's ``initialize_weights`` visits them, so a parent's rule, such
   as GPT-2's scaled residual projections, has the last word). Each is initialised by
   ``model._init_weights(module)`` when the model (or the nearest enclosing sub-model) is a
   transformers ``PreTrainedModel``, else by ``module.reset_parameters()`` when the module owns
   parameters or buffers directly.

Buffers on the meta device are materialised on the target device before their module's
initialisation, which must set them (Hugging Face's does for rotary tables; ``BatchNorm``'s
``reset_parameters`` does).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn

from fzero.errors import ShardError
from fzero.state.layout import FlatLayout, Unit

SEED_RANGE = 2**62


def is_on_meta(params: list[nn.Parameter]) -> bool:
    return any(p.is_meta for p in params)


def target_device(device: torch.device | str | None) -> torch.device:
    """Where a meta-device model's shards live: ``device``, else the current CUDA device when
    there is one, else the CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def draw_base_seed(comm) -> int:
    """Step 1 of the seeding rule: rank 0's draw, the same on every rank."""
    seed = torch.randint(0, SEED_RANGE, (), dtype=torch.int64)
    comm.broadcast(seed, src=0)
    return int(seed)


class UnitInitializer:
    """Runs the model's initialisation for one unit at a time into a flat fp32 buffer."""

    def __init__(self, model: nn.Module, layout: FlatLayout, base_seed: int, device: torch.device):
        self.model = model
        self.base_seed = base_seed
        self.device = device
        self.modules_of = _modules_per_unit(model, layout)

    def fill(self, unit: Unit, params: list[nn.Parameter], flat: torch.Tensor) -> None:
        """Point ``unit``'s parameters into ``flat`` (fp32, the unit's padded length) and
        initialise them there (step 2 and 3 of the rule); its modules' buffers too."""
        for slot, param in zip(unit.params, params):
            view = flat[slot.offset : slot.offset + slot.numel].view(slot.shape)
            if param.is_meta:  # a meta tensor cannot take other data: swap in a real one
                real = nn.Parameter(view, requires_grad=param.requires_grad)
                torch.utils.swap_tensors(param, real)
            else:
                param.data = view
        own = {id(p) for p in params}
        with torch.random.fork_rng(devices=_rng_devices(self.device)), torch.no_grad():
            torch.manual_seed(self.base_seed + unit.index)
            for name, module in self.modules_of.get(unit.index, []):
                for param_name, param in module.named_parameters(recurse=False):
                    if id(param) not in own:
                        raise ShardError(
                            f"{_join(name, param_name)} is tied to a parameter of another unit, "
                            "so it cannot be initialised with its own module on the meta device; "
                            "build this model on a real device, or name units (units=) that "
                            "keep the tied modules together"
                        )
                fresh = _materialise_buffers(module, self.device)
                initialise = _initialiser(self.model, name, module)
                if initialise is not None:
                    initialise()
                for buffer_name in fresh:
                    if torch.isnan(module._buffers[buffer_name]).any():
                        raise ShardError(
                            f"buffer {_join(name, buffer_name)} is on the meta device and its "
                            f"module's initialisation ({type(module).__name__}) does not set it: "
                            "set it in reset_parameters()/_init_weights, or build the model on a "
                            "real device"
                        )


def _materialise_buffers(module: nn.Module, device: torch.device) -> list[str]:
    """Give ``module``'s own meta buffers memory on ``device`` (and move its real ones there);
    floating meta ones start as NaN, so a buffer the initialisation leaves unset is caught.
    Returns those ones' names."""
    floating = []
    for name, buffer in module.named_buffers(recurse=False):
        if buffer is None:
            continue
        if not buffer.is_meta:  # built for real (init_empty_weights keeps buffers): move it
            module._buffers[name] = buffer.to(device)
            continue
        if buffer.is_floating_point():
            module._buffers[name] = torch.full_like(buffer, float("nan"), device=device)
            floating.append(name)
        else:
            module._buffers[name] = torch.zeros_like(buffer, device=device)
    return floating


def _modules_per_unit(
    model: nn.Module, layout: FlatLayout
) -> dict[int, list[tuple[str, nn.Module]]]:
    """Step 3 of the rule: each unit's modules, in post-order."""
    index_of = {u.name: u.index for u in layout.units if u.name}
    result: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in _post_order(model):
        owner = 0
        for unit_name, index in index_of.items():
            if name == unit_name or name.startswith(unit_name + "."):
                owner = index
                break
        result.setdefault(owner, []).append((name, module))
    return result


def _post_order(model: nn.Module) -> list[tuple[str, nn.Module]]:
    order: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def visit(prefix: str, module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        for child_name, child in module.named_children():
            visit(_join(prefix, child_name), child)
        order.append((prefix, module))

    visit("", model)
    return order


def _initialiser(model: nn.Module, name: str, module: nn.Module) -> Callable[[], None] | None:
    """The call that initialises ``module`` (step 3), or None when it needs none."""
    owner = _pretrained_owner(model, name)
    if owner is not None:
        return lambda: owner._init_weights(module)
    owns_values = any(True for _ in module.parameters(recurse=False)) or any(
        b is not None for b in module.buffers(recurse=False)
    )
    if not owns_values:
        return None
    reset = getattr(module, "reset_parameters", None)
    if not callable(reset):
        what = [n for n, _ in module.named_parameters(recurse=False)]
        what += [n for n, _ in module.named_buffers(recurse=False)]
        raise ShardError(
            f"module {name or '<root>'} ({type(module).__name__}) holds {what} on the meta device "
            "but has no reset_parameters() to initialise them: give it one, or build the "
            "model on a real device"
        )
    return reset


def _pretrained_owner(model: nn.Module, name: str) -> nn.Module | None:
    """The nearest module enclosing ``name`` (itself included) that is a transformers
    ``PreTrainedModel``: composite models initialise each sub-model by its own rule."""
    transformers = sys.modules.get("transformers")  # an HF model has imported it already
    if transformers is None:
        return None
    PreTrainedModel = transformers.PreTrainedModel  # noqa: N806 - a class
    parts = name.split(".") if name else []
    owner = model if isinstance(model, PreTrainedModel) else None
    current = model
    for part in parts:
        current = getattr(current, part)
        if isinstance(current, PreTrainedModel):
            owner = current
    return owner


def _rng_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
