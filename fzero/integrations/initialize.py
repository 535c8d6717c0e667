"""``fzero.initialize``: DeepSpeed's ``deepspeed.initialize`` on fzero.

It shards the model with ``fzero.shard`` (joining the launcher's process group first, as
DeepSpeed does) and returns ``(engine, optimizer, training_dataloader, lr_scheduler)``. fzero
runs its own fused AdamW on the sharded fp32 master weights and its own learning-rate schedules,
so the optimizer and schedule come from the config's ``optimizer`` and ``scheduler`` blocks;
a torch optimizer or scheduler object handed in is refused with the config block to write
instead (its hyperparameters filled in), never silently ignored.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from fzero.config import Config
from fzero.errors import ConfigError, UnsupportedArgumentError
from fzero.integrations.arguments import config_path_from_args
from fzero.integrations.engine import Engine
from fzero.integrations.facades import EngineOptimizer, EngineScheduler


def initialize(
    args: Any = None,
    model: nn.Module | None = None,
    optimizer: Any = None,
    model_parameters: Iterable[Any] | None = None,
    training_data: torch.utils.data.Dataset | None = None,
    lr_scheduler: Any = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    config: Config | dict | str | os.PathLike | None = None,
    config_params: Config | dict | str | None = None,
) -> tuple[Engine, EngineOptimizer, torch.utils.data.DataLoader | None, EngineScheduler | None]:
    """Shard ``model`` and return ``(engine, optimizer, training_dataloader, lr_scheduler)``.

    The config is ``config`` (a dict, a DeepSpeed JSON path or an ``fzero.Config``; DeepSpeed's
    older name ``config_params`` too) or the file that ``args`` names (``--deepspeed_config``,
    ``--fzero``, ``--deepspeed PATH``; see ``fzero.add_config_arguments``). ``model_parameters``
    may list the model's trainable parameters (all of them: freeze the others with
    ``requires_grad_(False)`` before calling). ``training_data`` becomes a ``DataLoader`` of
    ``train_micro_batch_size_per_gpu`` samples, each rank reading its own part
    (``DistributedSampler``) when there are several. ``optimizer`` and ``lr_scheduler`` must be
    None: the config's blocks say what to run. The returned ``optimizer`` reports the
    hyperparameters (``param_groups``); ``lr_scheduler`` is None without a ``scheduler`` block.
    """
    from fzero.api import shard
    from fzero.collectives import init_from_env

    if model is None:
        raise UnsupportedArgumentError("fzero.initialize needs model=")
    config = _config(args, config, config_params)
    _refuse_optimizer(optimizer, config)
    _refuse_scheduler(lr_scheduler)
    _check_model_parameters(model, model_parameters)
    _, _, device = init_from_env()
    state = shard(model, config=config, device=_shard_device(model, device))
    engine = Engine(state, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    dataloader = None
    if training_data is not None:
        dataloader = _dataloader(training_data, engine, collate_fn)
    scheduler = EngineScheduler(engine) if engine.config.scheduler is not None else None
    return engine, EngineOptimizer(engine), dataloader, scheduler


# -- helpers ------------------------------------------------------------------------------------


def _config(args: Any, config: Any, config_params: Any) -> Config:
    if config is not None and config_params is not None:
        raise ConfigError("", "give config= or its older name config_params=, not both")
    given = config if config is not None else config_params
    from_args = config_path_from_args(args) if args is not None else None
    if given is not None and from_args is not None:
        raise ConfigError(
            "",
            f"a config was given twice: in the call (config=) and on the command line "
            f"({from_args}); keep one",
        )
    chosen = given if given is not None else from_args
    if chosen is None:
        raise ConfigError(
            "",
            "fzero.initialize needs a config: config=ds_config (a dict or a JSON path), or "
            "args= parsed with fzero.add_config_arguments and --deepspeed_config PATH",
        )
    return Config.from_any(chosen)


def _refuse_optimizer(optimizer: Any, config: Config) -> None:
    if optimizer is None:
        return
    block = (
        '{"type": "AdamW", "params": {"lr": ..., "betas": [...], "eps": ..., "weight_decay": ...}}'
    )
    if isinstance(optimizer, torch.optim.Optimizer):
        groups = optimizer.param_groups
        settings = {
            key: groups[0][key]
            for key in ("lr", "betas", "eps", "weight_decay")
            if key in groups[0]
        }
        if "betas" in settings:
            settings["betas"] = list(settings["betas"])
        kind = "AdamW" if isinstance(optimizer, (torch.optim.AdamW, torch.optim.Adam)) else None
        if kind is not None and len(groups) == 1:
            block = f'{{"type": "AdamW", "params": {settings}}}'.replace("'", '"')
        else:
            block += (
                f" ({type(optimizer).__name__} with {len(groups)} group(s) has no fzero "
                "equivalent: fzero runs AdamW; fzero.no_weight_decay turns weight decay off for "
                "the parameters whose names match its patterns)"
            )
    raise UnsupportedArgumentError(
        f"fzero.initialize(optimizer=...): fzero runs its own fused AdamW on the sharded master "
        f"weights, so it does not step the {type(optimizer).__name__} given. Drop optimizer= and "
        f'put this in the config: "optimizer": {block}'
    )


def _refuse_scheduler(lr_scheduler: Any) -> None:
    if lr_scheduler is None:
        return
    raise UnsupportedArgumentError(
        f"fzero.initialize(lr_scheduler=...): the {type(lr_scheduler).__name__} given would step a "
        "torch optimizer that fzero does not use. Drop lr_scheduler= and put the schedule in the "
        'config: "scheduler": {"type": "WarmupLR" | "WarmupDecayLR" | "WarmupCosineLR" | '
        '"OneCycle" | "LRRangeTest", "params": {...}} (DeepSpeed\'s schedules and keys)'
    )


def _check_model_parameters(model: nn.Module, model_parameters: Iterable[Any] | None) -> None:
    if model_parameters is None:
        return
    given = list(model_parameters)
    if any(isinstance(item, dict) for item in given):
        raise UnsupportedArgumentError(
            "fzero.initialize(model_parameters=[{...}, ...]): parameter groups with their own "
            "settings are not supported; fzero applies the config's optimizer to every "
            "trainable parameter (fzero.no_weight_decay turns weight decay off by name pattern)"
        )
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    listed = {id(p) for p in given}
    if listed - {id(p) for p in model.parameters()}:
        raise UnsupportedArgumentError(
            "model_parameters holds tensors that are not parameters of model"
        )
    if listed != trainable:
        missing = [
            n for n, p in model.named_parameters() if p.requires_grad and id(p) not in listed
        ]
        raise UnsupportedArgumentError(
            f"model_parameters leaves out trainable parameters (first: {missing[:3]}); fzero "
            "trains every parameter with requires_grad: freeze the others with "
            "param.requires_grad_(False) before fzero.initialize, or drop model_parameters"
        )


def _shard_device(model: nn.Module, device: torch.device) -> torch.device | None:
    """Where to shard ``model``: a model in host memory goes to this rank's GPU, as DeepSpeed
    moves it there; ``fzero.shard`` moves its values unit by unit, so a model larger than the
    GPU (with offload) never has to fit on it whole. Anywhere else the model stays where it is."""
    params = list(model.parameters())
    if params and params[0].device.type == "cpu" and device.type == "cuda":
        return device
    return None


def _dataloader(
    dataset: torch.utils.data.Dataset, engine: Engine, collate_fn: Callable | None
) -> torch.utils.data.DataLoader:
    micro_batch = engine.train_micro_batch_size_per_gpu
    if micro_batch is None:
        raise ConfigError(
            "train_micro_batch_size_per_gpu",
            "training_data= needs the micro-batch size: set train_micro_batch_size_per_gpu "
            "(or train_batch_size) in the config",
        )
    if engine.world_size > 1:
        sampler: torch.utils.data.Sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=engine.world_size, rank=engine.global_rank
        )
    else:
        sampler = torch.utils.data.RandomSampler(dataset)
    return torch.utils.data.DataLoader(
        dataset, batch_size=micro_batch, sampler=sampler, collate_fn=collate_fn
    )
