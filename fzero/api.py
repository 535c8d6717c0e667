"""The public entry points: ``shard``, ``train_step`` and ``full_state_dict``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fzero.collectives import Communicator, FakeWorld, make_communicator
from fzero.config import Config
from fzero.cross_rank import check_same_on_all_ranks, layout_summary, schedule_summary
from fzero.errors import (
    BatchError,
    LossError,
    NonFiniteGradientError,
    ScheduleError,
    ShardError,
)
from fzero.executor import Executor, Hyper, OptimizerBuffers
from fzero.hooks import HookDriver
from fzero.loss_scale import LossScaler, update
from fzero.schedule import Knobs, Schedule, Trigger, UnitInfo, compile_schedule, presumed_trace
from fzero.state.buffers import build_workspace
from fzero.state.layout import (
    FlatLayout,
    backward_reads_params,
    build_layout,
    dtype_from_name,
    find_unit_modules,
)
from fzero.state.zero_state import ZeroState
from fzero.timeline import MeasuredTimeline


@dataclass(eq=False, repr=False)
class Runtime:
    """Everything static about a sharded model: the pytree's metadata (hashed by identity)."""

    model: nn.Module
    config: Config
    layout: FlatLayout
    comm: Communicator
    executor: Executor
    hooks: HookDriver
    loss_fn: Callable[[nn.Module, Any], Any] | None
    units: tuple[UnitInfo, ...]
    step_count: int = 0  # train_step calls, skipped steps included
    skipped_steps: int = 0  # steps whose gradients were not finite (nothing was updated)
    loss_scaler: LossScaler = field(default_factory=LossScaler)
    live_state: ZeroState | None = field(default=None, repr=False)

    def compile(self, trace: tuple[Trigger, ...], traced: bool) -> Schedule:
        zero = self.config.zero_optimization
        reduction = ""  # the stage's default
        if self.config.fzero.deterministic:
            reduction = "ordered"
        elif self.config.stage >= 2 and not self.config.reduce_every_micro_batch:
            reduction = "last_micro_batch"
        gather_numel = sum(u.padded_numel for u in self.layout.units if u.has_trainable)
        knobs = Knobs(
            prefetch=zero.overlap_comm,
            max_live_nbytes=zero.stage3_max_live_parameters * self.compute_itemsize,
            max_reuse_numel=zero.stage3_max_reuse_distance,
            prefetch_bucket_numel=zero.stage3_prefetch_bucket_size,
            overlap_reductions=zero.overlap_comm,
            reduce_bucket_numel=zero.reduce_bucket_size,
            gather_bucket_numel=zero.allgather_bucket_size,
            gradient_reduction=reduction,
            grad_gather_nbytes=gather_numel * self.grad_itemsize,
        )
        schedule = compile_schedule(
            self.units,
            stage=self.config.stage,
            world_size=self.comm.world_size,
            trace=trace,
            traced=traced,
            optimizer_numel=self.layout.optimizer_numel,
            grad_shard_nbytes=self.layout.optimizer_numel * self.grad_itemsize,
            knobs=knobs,
        )
        if traced:
            check_same_on_all_ranks(self.comm, "traced schedule", schedule_summary(schedule))
        return schedule

    @property
    def compute_itemsize(self) -> int:
        return dtype_from_name(self.config.compute_dtype_name).itemsize

    @property
    def grad_itemsize(self) -> int:
        return dtype_from_name(self.config.grad_accum_dtype_name).itemsize

    @property
    def check_finite(self) -> bool:
        """Whether a step looks for non-finite gradients (and so reads one flag on the host)."""
        return self.config.fp16.enabled is True or self.config.fzero.nonfinite_grads != "apply"


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
) -> ZeroState:
    """Partition ``model``'s parameters into flat buffers, keep this rank's shard, build AdamW
    state for it and compile the step schedule.

    ``stage`` overrides the config's ``zero_optimization.stage`` when given. ``units`` names
    the modules to gather and reduce as one (default: every block the model repeats and every
    embedding outside them, plus the root for the rest; see ``find_unit_modules``).
    ``process_group``: a ``torch.distributed`` group, an fzero communicator
    (``fzero.collectives.ThreadGroup(n).communicator(rank)``), or None for the default group (or
    world size 1 when none is initialised). ``record_ops`` keeps a log of executed ops for tests.
    ``simulate_world_size=N`` runs as rank 0 of N ranks that do not exist: collectives only
    shape their outputs, so the memory (and compute time) of one rank of N can be measured on
    one device; the values trained are meaningless. ``record_timeline`` records device times of
    every trigger and gather into ``state.runtime.executor.timeline`` (see ``fzero.timeline``).
    The model's parameters become views into fzero's buffers; keep using the same model object.
    """
    if stage is not None and (isinstance(stage, bool) or not isinstance(stage, int)):
        raise ShardError(f"stage must be an int 0-3, got {stage!r}")
    if stage is not None and stage not in (0, 1, 2, 3):
        raise ShardError(f"stage must be 0, 1, 2 or 3, got {stage}")
    cfg = Config.from_any(config).with_stage_override(stage)
    cfg.check_stage_options()
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
    device = devices.pop()
    if getattr(model, "_fzero_runtime", None) is not None:
        raise ShardError("this model is already sharded by fzero; shard a fresh model")

    cfg = cfg.resolve(
        world_size=comm.world_size,
        hidden_size=_hidden_size(model),
        param_numel=sum(p.numel() for p in params),
    )
    unit_modules = _resolve_units(model, units)
    layout, params_per_unit = build_layout(
        model,
        unit_modules,
        world_size=comm.world_size,
        rank=comm.rank,
        stage=cfg.stage,
        alignment=cfg.fzero.alignment,
        weight_decay=cfg.optimizer.weight_decay,
        no_weight_decay=cfg.fzero.no_weight_decay,
    )
    check_same_on_all_ranks(comm, "model layout and config", layout_summary(layout, cfg))

    compute_dtype = dtype_from_name(cfg.compute_dtype_name)
    accum_dtype = dtype_from_name(cfg.grad_accum_dtype_name)
    reduce_dtype = dtype_from_name(cfg.reduce_dtype_name)
    if compute_dtype != torch.float32:
        # As DeepSpeed's bf16/fp16 modes do: floating-point buffers compute in the same dtype.
        for buffer in model.buffers():
            if buffer.is_floating_point():
                buffer.data = buffer.data.to(compute_dtype)
    # Stage 3 units below the persistence threshold (elements) stay gathered for good.
    threshold = cfg.zero_optimization.stage3_param_persistence_threshold
    persistent = {u.index for u in layout.units if cfg.stage == 3 and u.numel < threshold}
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
    )

    infos = tuple(
        UnitInfo(
            u.index,
            u.name,
            u.numel,
            u.padded_numel * compute_dtype.itemsize,
            u.padded_numel * compute_dtype.itemsize if u.has_trainable else 0,
            u.padded_numel * reduce_dtype.itemsize if u.has_trainable else 0,
            u.has_trainable,
            persistent=u.index in persistent,
            backward_reads_params=backward_reads_params(dict(unit_modules).get(u.name, model)),
        )
        for u in layout.units
    )
    zeros = lambda: torch.zeros(layout.optimizer_numel, dtype=torch.float32, device=device)  # noqa: E731
    optimizer = OptimizerBuffers(
        master, zeros(), zeros(), torch.zeros((), dtype=torch.float32, device=device)
    )
    # The schedule is compiled below, once the runtime that compiles it exists.
    executor = Executor(layout, None, workspace, comm, layout.decay_ranges(), record_ops)
    executor.configure(reduce_dtype)
    executor.optimizer = optimizer
    executor.unit_params = params_per_unit
    if record_timeline:
        executor.timeline = MeasuredTimeline(device)
    executor.norm_order = _norm_order(model, layout)
    modules = {
        u.index: (model if u.name == "" else model.get_submodule(u.name)) for u in layout.units
    }
    if cfg.fzero.compile_units:
        # Only the blocks' own computation: the module hooks that raise the triggers run
        # around the compiled forward, never inside it.
        for module in modules.values():
            if module is not model:
                module.forward = torch.compile(module.forward)
    hooks = HookDriver(model, modules, params_per_unit, executor, comm)
    runtime = Runtime(model, cfg, layout, comm, executor, hooks, loss_fn, infos)
    runtime.loss_scaler = LossScaler.from_fp16(cfg.fp16)
    executor.schedule = runtime.compile(presumed_trace(infos), traced=False)
    executor.on_trace = lambda trace: runtime.compile(trace, traced=True)
    model._fzero_runtime = runtime  # marks the model as sharded
    state = ZeroState(
        master,
        optimizer.exp_avg,
        optimizer.exp_avg_sq,
        optimizer.step,
        workspace.state_leaves(),
        runtime,
    )
    runtime.live_state = state
    return state


def train_step(state: ZeroState, batch: Any) -> tuple[ZeroState, dict[str, Any]]:
    """One optimizer step: forward and backward over each micro-batch, the gradient
    collectives, and AdamW on this rank's shard.

    ``batch`` is one micro-batch or a list of micro-batches accumulated into one step. The
    state's buffers are donated: they may be updated in place, and ``state`` must not be used
    again; use the returned one. Metric values ``loss`` and ``grad_norm`` are 0-dim tensors
    (reading them syncs with the device), averaged over micro-batches and ranks; ``grad_norm``
    is the unscaled gradient's.

    Non-finite gradients on any rank skip the whole step on every rank (no parameter, moment or
    step-count change; the learning-rate schedule does not advance), unless
    ``fzero.nonfinite_grads`` is ``"apply"``; ``"error"`` raises ``NonFiniteGradientError`` after
    skipping, leaving ``state`` usable. In fp16 the loss is multiplied by ``loss_scale`` before
    backward and the scale follows DeepSpeed's dynamic rule (``fzero/loss_scale.py``). Deciding
    whether the step was skipped reads one flag on the host, once per step, after the optimizer
    kernel is queued: the host waits for the step to finish there, the device does not idle
    (``"apply"`` skips the check and the read). ``metrics``: ``skipped`` (this step),
    ``skipped_steps`` (so far), ``loss_scale`` (for the next step), ``step`` (steps run, skipped
    ones included).
    """
    state.check_live()
    runtime: Runtime = state.runtime
    cfg, executor, hooks = runtime.config, runtime.executor, runtime.hooks
    micro_batches = batch if isinstance(batch, list) else [batch]
    if not micro_batches:
        raise BatchError("batch is an empty list; give at least one micro-batch")
    expected = cfg.gradient_accumulation_steps
    if expected is not None and len(micro_batches) != expected:
        raise BatchError(
            f"got {len(micro_batches)} micro-batches but gradient_accumulation_steps is "
            f"{expected}; pass a list of {expected} micro-batches (or fix the config)"
        )
    opt, scale = cfg.optimizer, runtime.loss_scaler.scale
    applied = runtime.step_count - runtime.skipped_steps  # skipped steps keep the lr schedule
    executor.hyper = Hyper(
        cfg.lr_at(applied),
        opt.betas[0],
        opt.betas[1],
        opt.eps,
        cfg.gradient_clipping,
        loss_scale=scale,
        check_finite=runtime.check_finite,
    )
    count = len(micro_batches)
    try:
        for index, micro_batch in enumerate(micro_batches):
            hooks.begin_micro_step(last=index == count - 1)
            loss = _forward(runtime, micro_batch, index)
            executor.add_loss(loss)
            hooks.begin_backward()
            scaled = loss / count if count > 1 else loss
            (scaled * scale if scale != 1.0 else scaled).backward()
            hooks.end_backward()
    except BaseException:
        hooks.deactivate()
        executor.abort()
        raise
    result = executor.run_step(count)
    runtime.step_count += 1
    # The step's one host read: whether any rank's gradients were not finite.
    skipped = result.found_inf is not None and bool(result.found_inf.item())
    runtime.skipped_steps += skipped
    # Both errors come before the state is donated: nothing changed, ``state`` stays usable.
    runtime.loss_scaler = update(runtime.loss_scaler, skipped)
    if skipped and cfg.fzero.nonfinite_grads == "error":
        raise NonFiniteGradientError(
            f"step {runtime.step_count}: the gradients hold Inf or NaN on some rank; the step was "
            'skipped on every rank (fzero.nonfinite_grads is "error")'
        )
    new_state = dataclasses.replace(state)
    runtime.live_state = new_state
    metrics = {
        "loss": result.loss,
        "grad_norm": result.grad_norm,
        "lr": executor.hyper.lr,
        "loss_scale": runtime.loss_scaler.scale,
        "skipped": skipped,
        "skipped_steps": runtime.skipped_steps,
        "step": runtime.step_count,
    }
    return new_state, metrics


def full_state_dict(state: ZeroState) -> dict[str, torch.Tensor]:
    """The full parameters (fp32: trainable ones from the master weights) and buffers under the
    model's own ``state_dict`` names, gathered from all ranks. Every rank gets the result."""
    state.check_live()
    runtime: Runtime = state.runtime
    layout, comm, workspace = runtime.layout, runtime.comm, runtime.executor.workspace
    full: dict[str, torch.Tensor] = {}
    for unit in layout.units:
        owned = workspace.owned_fp32(unit.index)
        gathered = owned
        if layout.shard_world > 1:
            gathered = torch.empty(unit.padded_numel, dtype=torch.float32, device=owned.device)
            comm.all_gather(gathered, owned).wait()
        for slot in unit.params:
            value = gathered[slot.offset : slot.offset + slot.numel].view(slot.shape).clone()
            for name in slot.names:
                full[name] = value
    result = {}
    for name, tensor in runtime.model.state_dict(keep_vars=True).items():
        result[name] = full[name] if name in full else tensor.detach().clone()
    return result


# -- helpers ------------------------------------------------------------------------------------


def _forward(runtime: Runtime, micro_batch: Any, index: int) -> torch.Tensor:
    model = runtime.model
    try:
        if runtime.loss_fn is not None:
            output = runtime.loss_fn(model, micro_batch)
        elif isinstance(micro_batch, Mapping):
            output = model(**micro_batch)
        elif isinstance(micro_batch, tuple):
            output = model(*micro_batch)
        else:
            output = model(micro_batch)
    except ScheduleError:
        raise
    except Exception as error:
        raise BatchError(
            f"micro-batch {index}: the model raised {type(error).__name__}: {error}"
        ) from error
    return _loss_of(output)


def _loss_of(output: Any) -> torch.Tensor:
    loss = output
    if not isinstance(loss, torch.Tensor):
        if isinstance(output, Mapping) and "loss" in output:
            loss = output["loss"]
        elif hasattr(output, "loss"):
            loss = output.loss
    if not isinstance(loss, torch.Tensor):
        raise LossError(
            f"cannot find a loss in the model's output of type {type(output).__name__}: return a "
            "scalar tensor, an object with .loss, or a mapping with 'loss' (or pass loss_fn)"
        )
    if loss.numel() != 1 or not loss.is_floating_point():
        raise LossError(
            f"the loss must be a floating-point scalar, got shape {tuple(loss.shape)} "
            f"dtype {loss.dtype}; reduce it (e.g. .mean()) or pass loss_fn"
        )
    if not loss.requires_grad:
        raise LossError("the loss does not require grad: no trainable parameter contributed to it")
    return loss.reshape(())


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


def _resolve_units(model: nn.Module, units: list[nn.Module | str] | None):
    if units is None:
        return find_unit_modules(model)
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
