"""The public entry points: ``shard`` and ``full_state_dict`` here, ``train_step`` in
``fzero/train.py`` (re-exported)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fzero.collectives import FakeWorld, make_communicator
from fzero.config import Config
from fzero.errors import ShardError
from fzero.loss_scale import LossScaler
from fzero.offload.host import releasable_nbytes
from fzero.offload.plan import OffloadPlan
from fzero.runtime import Runtime
from fzero.runtime.activation_checkpointing import checkpoint_units, checkpointed_units
from fzero.runtime.cross_rank import check_same_on_all_ranks, layout_summary
from fzero.runtime.executor import Executor, ExecutorParts
from fzero.runtime.hooks import HookDriver
from fzero.runtime.plan import make_plan, streams_gradients
from fzero.runtime.timeline import MeasuredTimeline
from fzero.schedule import Schedule, UnitInfo, presumed_trace
from fzero.state.layout import (
    FlatLayout,
    backward_reads_params,
    build_layout,
    dtype_from_name,
    find_unit_modules,
)
from fzero.state.materialize import UnitInitializer, draw_base_seed, target_device
from fzero.state.progress import Progress
from fzero.state.sharding import build_workspace
from fzero.state.zero_state import ZeroState


def shard(
    model: nn.Module,
    stage: int | None = None,
    config: Config | dict | str | None = None,
    loss_fn: Callable[[nn.Module, Any], Any] | None = None,
    process_group: Any = None,
    *,
    units: list[nn.Module | str] | None = None,
    record_ops: bool = False,
    simulate_world_size: int | None = None,
    record_timeline: bool = False,
    total_num_steps: int | None = None,
    device: torch.device | str | None = None,
) -> ZeroState:
    """Partition ``model``'s parameters into flat buffers, keep this rank's shard, build AdamW
    state for it and compile the step schedule.

    ``stage`` overrides the config's ``zero_optimization.stage`` when given. ``units`` names
    the modules to gather and reduce as one (default: the blocks a Hugging Face model names in
    ``_no_split_modules``, else every block the model repeats, plus the root for the rest;
    ``fzero.embedding_units`` adds each embedding; see ``find_unit_modules``).
    ``process_group``: a ``torch.distributed`` group, an fzero communicator
    (``fzero.collectives.ThreadGroup(n).communicator(rank)``), or None for the default group (or
    world size 1 when none is initialised). ``record_ops`` keeps a log of executed ops for tests.
    ``simulate_world_size=N`` runs as rank 0 of N ranks that do not exist: collectives only
    shape their outputs, so the memory (and compute time) of one rank of N can be measured on
    one device; the values trained are meaningless. ``record_timeline`` records device times of
    every trigger and gather into ``state.runtime.executor.timeline`` (see
    ``fzero.runtime.timeline``). ``total_num_steps`` fills a scheduler's
    ``"total_num_steps": "auto"`` (the run's length, which only the caller knows).
    The model's parameters become views into fzero's buffers; keep using the same model object.
    A model built on the meta device is initialised unit by unit, straight into this rank's
    shard, on ``device`` (default: the current CUDA device, else the CPU); see
    ``fzero/state/materialize.py`` for the seeding rule every rank follows. A model in host
    memory may be given with ``device`` an accelerator: its values move there unit by unit as
    they are sharded, so the device only ever holds what the configuration keeps there (with
    offload, less than the model: a model larger than the device is sharded from the host).
    """
    cfg = _config_for(stage, config)
    if simulate_world_size is not None:
        if process_group is not None:
            raise ShardError("give process_group or simulate_world_size, not both")
        process_group = FakeWorld(simulate_world_size)
    comm = make_communicator(process_group)
    params = list(model.parameters())
    if not params:
        raise ShardError("the model has no parameters")
    devices = {p.device for p in params}
    if len(devices) != 1:
        raise ShardError(f"all parameters must be on one device, found {sorted(map(str, devices))}")
    model_device = devices.pop()
    on_meta = model_device.type == "meta"
    device = target_device(device) if on_meta else _placement(model_device, device)
    if getattr(model, "_fzero_runtime", None) is not None:
        raise ShardError("this model is already sharded by fzero; shard a fresh model")

    cfg, layout, params_per_unit = _resolved_layout(
        model, cfg, units, comm.world_size, comm.rank, total_num_steps
    )
    check_same_on_all_ranks(comm, "model layout and config", layout_summary(layout, cfg))

    compute_dtype = dtype_from_name(cfg.compute_dtype_name)
    accum_dtype = dtype_from_name(cfg.grad_accum_dtype_name)
    reduce_dtype = dtype_from_name(cfg.reduce_dtype_name)
    if not on_meta and device != model_device:
        _move_buffers(model, device)
    if compute_dtype != torch.float32:
        # As DeepSpeed's bf16/fp16 modes do: floating-point buffers compute in the same dtype.
        for buffer in model.buffers():
            if buffer.is_floating_point():
                buffer.data = buffer.data.to(compute_dtype)
    offload = OffloadPlan.from_config(cfg)
    # A host model sharded onto an accelerator frees its parameters' host memory unit by unit.
    from_host = model_device.type == "cpu" and device.type != "cpu"
    released = releasable_nbytes(params) if from_host else 0
    offload.check_host_memory(layout, compute_dtype, accum_dtype, released)
    files = offload.file_residence(cfg, layout, compute_dtype, comm.rank)
    persistent = _persistent_units(layout, cfg)
    workspace, master = build_workspace(
        layout,
        params_per_unit,
        cfg.stage,
        comm,
        device,
        compute_dtype,
        accum_dtype,
        ordered=cfg.fzero.deterministic,
        persistent=persistent,
        host_master=offload.optimizer_on_host,
        host_shards=offload.params_on_host,
        pin_memory=offload.pin_memory,
        device_master_numel=offload.device_numel(layout),
        files=files,
        grad_shard_numel=offload.device_numel(layout) if streams_gradients(cfg, offload) else None,
        initializer=UnitInitializer(model, layout, draw_base_seed(comm), device)
        if on_meta
        else None,
    )

    modules = _unit_modules(model, layout)
    recomputed = checkpointed_units(layout, cfg)
    infos = _unit_infos(layout, cfg, modules, persistent, recomputed)
    optimizer = offload.optimizer_buffers(master, layout.optimizer_numel, device, workspace, files)
    plan = make_plan(layout, infos, cfg, comm.world_size, offload)
    parts = ExecutorParts(
        layout,
        workspace,
        comm,
        optimizer,
        params_per_unit,
        reduce_dtype,
        layout.decay_ranges(),
        _norm_order(model, layout),
        host_optimizer=offload.host_optimizer_settings(compute_dtype, layout, files),
    )
    timeline = MeasuredTimeline(device) if record_timeline else None
    executor = Executor(plan.schedule, parts, record_ops=record_ops, timeline=timeline)
    if cfg.fzero.compile_units:
        # Only the blocks' own computation: the module hooks that raise the triggers run
        # around the compiled forward, never inside it.
        for module in modules.values():
            if module is not model:
                module.forward = torch.compile(module.forward)
    hooks = HookDriver(model, modules, params_per_unit, executor, comm)
    cpu_checkpointing = cfg.activation_checkpointing.cpu_checkpointing
    checkpoint_units(modules, recomputed, hooks, cpu_checkpointing)
    runtime = Runtime(model, cfg, comm, plan, executor, hooks, loss_fn)
    model._fzero_runtime = runtime  # marks the model as sharded
    return runtime.new_state(Progress.start(LossScaler.from_fp16(cfg.fp16)))


def full_state_dict(state: ZeroState) -> dict[str, torch.Tensor]:
    """The full parameters (fp32: trainable ones from the master weights) and buffers under the
    model's own ``state_dict`` names, gathered from all ranks. Every rank gets the result."""
    state.check_live()
    runtime: Runtime = state.runtime
    runtime.install(state)
    layout, comm, workspace = runtime.layout, runtime.comm, runtime.executor.workspace
    full: dict[str, torch.Tensor] = {}
    by_param: dict[int, torch.Tensor] = {}  # id(parameter) -> value, for renamed state dicts
    for unit, params in zip(layout.units, runtime.executor.unit_params, strict=True):
        # Offloaded masters are on the host: gather where the communicator works.
        owned = workspace.owned_fp32(unit.index).to(workspace.device)
        gathered = owned
        if layout.shard_world > 1:
            gathered = torch.empty(unit.padded_numel, dtype=torch.float32, device=owned.device)
            comm.all_gather(gathered, owned).wait()
        for slot, param in zip(unit.params, params, strict=True):
            value = gathered[slot.offset : slot.offset + slot.numel].view(slot.shape).clone()
            by_param[id(param)] = value
            for name in slot.names:
                full[name] = value
    result = {}
    # A module may rename its entries (torch's checkpoint_wrapper drops its own prefix): match
    # parameters by identity first.
    for name, tensor in runtime.model.state_dict(keep_vars=True).items():
        value = by_param.get(id(tensor), full.get(name))
        result[name] = value if value is not None else tensor.detach().clone()
    return result


def plan_schedule(
    model: nn.Module,
    stage: int | None = None,
    config: Config | dict | str | None = None,
    *,
    world_size: int = 1,
    units: list[nn.Module | str] | None = None,
    total_num_steps: int | None = None,
) -> Schedule:
    """The schedule ``shard`` would run for ``model`` on each of ``world_size`` ranks, compiled
    for the order a sequential model runs in (``presumed_trace``), without allocating anything:
    the model may be on the meta device and larger than this machine. Print it, ``verify`` it,
    ``simulate`` it (time and device memory a step), beside ``estimate_memory`` for the host and
    file bytes, before renting the hardware. Where the model's first step runs in the presumed
    order (a plain stack of blocks, with or without activation checkpointing) it is the
    schedule ``shard``'s runtime compiles after that step; a model that runs its units in
    another order gets the traced one at its first step instead."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ShardError(f"world_size must be a positive int, got {world_size!r}")
    cfg = _config_for(stage, config)
    if not any(True for _ in model.parameters()):
        raise ShardError("the model has no parameters")
    cfg, layout, _ = _resolved_layout(model, cfg, units, world_size, 0, total_num_steps)
    persistent = _persistent_units(layout, cfg)
    modules = _unit_modules(model, layout)
    infos = _unit_infos(layout, cfg, modules, persistent, checkpointed_units(layout, cfg))
    plan = make_plan(layout, infos, cfg, world_size, OffloadPlan.from_config(cfg))
    # The model's own checkpointing shows only in the trace, as fzero's does.
    by_model = _checkpointed_by_the_model(model, layout)
    order = tuple(
        dataclasses.replace(u, recomputed=True) if u.index in by_model else u for u in infos
    )
    return plan.retraced(presumed_trace(order)).schedule


# -- helpers ------------------------------------------------------------------------------------


def _config_for(stage: int | None, config: Config | dict | str | None) -> Config:
    """The config, with ``stage`` (when given) overriding its ``zero_optimization.stage``."""
    if stage is not None and (isinstance(stage, bool) or not isinstance(stage, int)):
        raise ShardError(f"stage must be an int 0-3, got {stage!r}")
    if stage is not None and stage not in (0, 1, 2, 3):
        raise ShardError(f"stage must be 0, 1, 2 or 3, got {stage}")
    cfg = Config.from_any(config).with_stage_override(stage)
    cfg.check_stage_options()
    return cfg


def _resolved_layout(model, cfg, units, world_size: int, rank: int, total_num_steps):
    """The config with its "auto" values resolved for this model and world, and the flat
    layout of ``rank``'s shard (with each unit's parameters)."""
    cfg = cfg.resolve(
        world_size=world_size,
        hidden_size=_hidden_size(model),
        param_numel=sum(p.numel() for p in model.parameters()),
        total_num_steps=total_num_steps,
    )
    unit_modules = _resolve_units(model, units, cfg.fzero.embedding_units)
    layout, params_per_unit = build_layout(
        model,
        unit_modules,
        world_size=world_size,
        rank=rank,
        stage=cfg.stage,
        alignment=cfg.fzero.alignment,
        weight_decay=cfg.optimizer.weight_decay,
        no_weight_decay=cfg.fzero.no_weight_decay,
    )
    return cfg, layout, params_per_unit


def _persistent_units(layout: FlatLayout, cfg: Config) -> set[int]:
    """Stage 3 units below the persistence threshold (elements) stay gathered for good."""
    threshold = cfg.zero_optimization.stage3_param_persistence_threshold
    return {u.index for u in layout.units if cfg.stage == 3 and u.numel < threshold}


def _checkpointed_by_the_model(model: nn.Module, layout: FlatLayout) -> frozenset[int]:
    """The units whose forward the model itself recomputes in backward, which a real step's
    trace shows as ``pre_recompute`` triggers: inside torch's ``checkpoint_wrapper``, or below
    a module with Hugging Face's ``gradient_checkpointing`` switched on."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    found = set()
    for unit in layout.units:
        if unit.name == "":
            continue
        parts = unit.name.split(".")
        chain = [model.get_submodule(".".join(parts[:i])) for i in range(len(parts) + 1)]
        if any(isinstance(m, CheckpointWrapper) for m in chain[1:]) or any(
            getattr(m, "gradient_checkpointing", False) is True for m in chain[:-1]
        ):
            found.add(unit.index)
    return frozenset(found)


def _unit_modules(model: nn.Module, layout: FlatLayout) -> dict[int, nn.Module]:
    return {u.index: (model if u.name == "" else model.get_submodule(u.name)) for u in layout.units}


def _unit_infos(
    layout: FlatLayout,
    cfg: Config,
    modules: dict[int, nn.Module],
    persistent: set[int],
    recomputed: set[int] | frozenset[int],
) -> tuple[UnitInfo, ...]:
    """What the compiler knows of each unit: its sizes in the compute and reduce dtypes, and
    whether it stays gathered, reads its parameters in backward, or recomputes its forward."""
    compute = dtype_from_name(cfg.compute_dtype_name).itemsize
    reduce = dtype_from_name(cfg.reduce_dtype_name).itemsize
    return tuple(
        UnitInfo(
            u.index,
            u.name,
            u.numel,
            u.padded_numel * compute,
            u.padded_numel * compute if u.has_trainable else 0,
            u.padded_numel * reduce if u.has_trainable else 0,
            u.has_trainable,
            persistent=u.index in persistent,
            backward_reads_params=backward_reads_params(modules[u.index]),
            optimizer_numel=u.optimizer_numel,
            shard_nbytes=u.shard_numel * compute,
            param_itemsize=compute,
            recomputed=u.index in recomputed,
        )
        for u in layout.units
    )


def _hidden_size(model: nn.Module) -> int | None:
    """The model's hidden size, for DeepSpeed's "auto" bucket sizes: from a Hugging Face style
    ``model.config`` when there is one, else the width of the first embedding."""
    model_config = getattr(model, "config", None) or getattr(model, "cfg", None)
    for name in ("hidden_size", "d_model", "n_embd"):
        value = getattr(model_config, name, None)
        if isinstance(value, int):
            return value
    embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    return embedding.embedding_dim if embedding is not None else None


def _placement(model_device: torch.device, device: torch.device | str | None) -> torch.device:
    """Where the shards of a model built on ``model_device`` live: ``device`` when given. A
    model in host memory may be sharded onto an accelerator (its values are copied there unit
    by unit, so the whole model never has to fit on it: DeepSpeed's engine takes a host model
    the same way); any other move is refused."""
    if device is None:
        return model_device
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device == model_device or (model_device.type == "cpu" and device.type != "meta"):
        return device
    raise ShardError(
        f"device={device}: this model is on {model_device}, and fzero shards a model from where "
        f"it is, from host memory onto a device, or from the meta device: move it to {device} "
        "or to the CPU first, or leave device out"
    )


def _move_buffers(model: nn.Module, device: torch.device) -> None:
    """The model's buffers (not parameters: sharding moves those) onto ``device``."""
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[name] = buffer.to(device)


def _resolve_units(model: nn.Module, units: list[nn.Module | str] | None, embeddings: bool):
    if units is None:
        return find_unit_modules(model, embeddings)
    if embeddings:
        raise ShardError(
            "units= and fzero.embedding_units both choose the units: pass the embeddings in "
            "units= or drop one of the two"
        )
    by_id = {id(m): n for n, m in model.named_modules()}
    resolved = []
    for item in units:
        if isinstance(item, str):
            try:
                resolved.append((item, model.get_submodule(item)))
            except AttributeError:
                raise ShardError(f"units: the model has no submodule {item!r}") from None
        elif isinstance(item, nn.Module) and id(item) in by_id and item is not model:
            resolved.append((by_id[id(item)], item))
        else:
            raise ShardError(f"units: {type(item).__name__} is not a submodule of the model")
    names = [n for n, _ in resolved]
    for a in names:
        for b in names:
            if a != b and b.startswith(a + "."):
                raise ShardError(f"units: {b!r} is inside {a!r}; units must not nest")
    return resolved


def _norm_order(model: nn.Module, layout: FlatLayout) -> tuple[tuple[int, int, tuple], ...]:
    """Trainable parameters as (unit, offset, shape), in ``model.parameters()`` order: the
    order deterministic mode adds squared norms in, which a plain reference can follow."""
    position = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    slots = [
        (position[slot.names[0]], unit.index, slot.offset, slot.shape)
        for unit in layout.units
        for slot in unit.params
        if slot.requires_grad
    ]
    return tuple((unit, offset, shape) for _, unit, offset, shape in sorted(slots))
