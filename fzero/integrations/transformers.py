"""Hugging Face ``Trainer`` and ``TrainingArguments`` that train with fzero.

    from fzero.integrations.transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir="out", fzero="ds_config.json", bf16=True, ...)
    Trainer(model=model, args=args, train_dataset=data).train()

Subclasses of transformers' own (tested with transformers 5.x, accelerate 1.x). ``fzero=`` takes
the DeepSpeed JSON (path or dict; ``--fzero PATH`` through ``HfArgumentParser``; ``deepspeed=``
is read as ``fzero=`` so the guide's scripts run unchanged). Its ``"auto"`` values are filled
from the arguments as transformers does for DeepSpeed (``fzero/integrations/hf_config.py``); a
config without an ``optimizer`` block trains with the arguments' AdamW (weight decay off where
the Trainer turns it off), one without a ``scheduler`` block with ``lr_scheduler_type``.

The Trainer's loop is transformers' own; only its pieces change: ``training_step`` runs one
micro-step of the fzero engine (``fzero/integrations/engine.py``), the optimizer step happens at
the accumulation boundary inside it (so the logged grad norm is the step's), checkpoints are
fzero sharded checkpoints beside the consolidated weights, and the model is never handed to
accelerate's ``prepare`` (no DDP wrapper around a sharded model).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import transformers

from fzero.config import Config
from fzero.config.parse import load_file
from fzero.errors import ConfigError, UnsupportedArgumentError
from fzero.integrations.engine import Engine
from fzero.integrations.facades import EngineOptimizer, EngineScheduler
from fzero.integrations.hf_config import fill_auto
from fzero.integrations.hf_schedule import schedule_from_arguments

ADAMW_NAMES = ("adamw_torch", "adamw_torch_fused", "adamw_hf")


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """transformers' ``TrainingArguments`` plus ``fzero``: the DeepSpeed-style JSON config."""

    fzero: dict | str | None = field(
        default=None,
        metadata={"help": "fzero / DeepSpeed JSON config: a file path or a dict"},
    )
    _VALID_DICT_FIELDS = [*transformers.TrainingArguments._VALID_DICT_FIELDS, "fzero"]

    @property
    def place_model_on_device(self) -> bool:
        """False: the Trainer leaves the model where it was built, and fzero shards it onto the
        device when training starts, unit by unit (as transformers leaves placement to
        DeepSpeed), so a model larger than the GPU is not moved there whole first."""
        return False

    def __post_init__(self) -> None:
        if self.deepspeed is not None:
            if self.fzero is not None and self.fzero != self.deepspeed:
                raise ConfigError(
                    "",
                    f"fzero={self.fzero!r} and deepspeed={self.deepspeed!r} name different "
                    "configs; give one of them (they mean the same)",
                )
            # The guide's scripts pass deepspeed=...; transformers would start DeepSpeed for it.
            self.fzero, self.deepspeed = self.deepspeed, None
        if self.fsdp:
            raise UnsupportedArgumentError("fsdp= and fzero= both shard the model: keep one")
        super().__post_init__()
        if isinstance(self.fzero, str) and not self.fzero.lstrip().startswith("{"):
            self.fzero = load_file(self.fzero)
        for name in ("fp16_full_eval", "bf16_full_eval", "load_best_model_at_end"):
            if getattr(self, name):
                raise UnsupportedArgumentError(
                    f"{name}=True is not supported with fzero (it would replace the sharded "
                    "parameters); evaluate in the training precision and load the best checkpoint "
                    "with from_pretrained after training"
                )


class Trainer(transformers.Trainer):
    """transformers' ``Trainer`` whose steps are fzero's (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any):
        optimizers = kwargs.get("optimizers", (None, None))
        if any(item is not None for item in optimizers):
            raise UnsupportedArgumentError(
                "Trainer(optimizers=...): fzero runs its own AdamW and schedules; describe them "
                'in the config ("optimizer" and "scheduler" blocks) or the arguments '
                "(learning_rate, adam_beta1/2, adam_epsilon, weight_decay, lr_scheduler_type)"
            )
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, TrainingArguments):
            raise UnsupportedArgumentError(
                "fzero's Trainer needs fzero.integrations.transformers.TrainingArguments "
                f"(got {type(self.args).__name__}): it carries the fzero= config"
            )
        if getattr(self.model, "_fzero_runtime", None) is not None:
            raise UnsupportedArgumentError(
                "the model is already sharded by fzero: give the Trainer the plain model (it "
                "shards it itself when training starts)"
            )
        if self.args.n_gpu > 1:
            raise UnsupportedArgumentError(
                f"one process sees {self.args.n_gpu} GPUs (transformers would use DataParallel): "
                "start one process per GPU with `fzero --num_gpus N` or torchrun"
            )
        self.engine: Engine | None = None

    # -- setup ----------------------------------------------------------------------------------

    def _build_accelerator_args(self, **kwargs: Any) -> dict[str, Any]:
        arguments = super()._build_accelerator_args(**kwargs)
        arguments["mixed_precision"] = "no"  # fzero's config sets the precision, not autocast
        return arguments

    def fzero_config(self, num_training_steps: int) -> Config:
        """The config this run trains with: "auto" filled from the arguments, the arguments'
        AdamW and schedule where the config has no optimizer or scheduler block."""
        raw = dict(self.args.fzero or {})
        filled = fill_auto(
            raw,
            self.args,
            model_config=getattr(self.model, "config", None),
            num_training_steps=num_training_steps,
            world_size=self.args.world_size,
        )
        for key, value in (
            ("train_micro_batch_size_per_gpu", self.args.per_device_train_batch_size),
            ("gradient_accumulation_steps", self.args.gradient_accumulation_steps),
            ("gradient_clipping", self.args.max_grad_norm),
        ):
            filled.setdefault(key, value)
        no_decay: tuple[str, ...] = ()
        if "optimizer" not in filled:
            optim = str(getattr(self.args.optim, "value", self.args.optim))
            if optim not in ADAMW_NAMES:
                raise UnsupportedArgumentError(
                    f"optim={optim!r}: fzero runs AdamW only; use optim='adamw_torch' or an "
                    '"optimizer" block in the config'
                )
            filled["optimizer"] = {
                "type": "AdamW",
                "params": {
                    "lr": self.args.learning_rate,
                    "betas": [self.args.adam_beta1, self.args.adam_beta2],
                    "eps": self.args.adam_epsilon,
                    "weight_decay": self.args.weight_decay,
                },
            }
            decay = set(self.get_decay_parameter_names(self.model))
            no_decay = tuple(n for n, p in self.model.named_parameters() if n not in decay)
        config = Config.from_any(filled)
        if no_decay:
            patterns = tuple(config.fzero.no_weight_decay) + no_decay
            config = config.replace(
                fzero=dataclasses.replace(config.fzero, no_weight_decay=patterns)
            )
        if "scheduler" not in filled:
            config = config.replace(
                scheduler=schedule_from_arguments(self.args, num_training_steps)
            )
        return config

    def _prepare_for_training(self, max_steps: int, train_dataloader: Any, resume: Any):
        from fzero.integrations.initialize import initialize

        if self.engine is None:
            self.engine, _, _, _ = initialize(model=self.model, config=self.fzero_config(max_steps))
        self.optimizer = _TrainerOptimizer(self.engine)
        self.lr_scheduler = _TrainerScheduler(self.engine)
        self.model_wrapped = self.model
        if resume is not None:
            self.engine.load_checkpoint(resume)
        for name in ("model", "optimizer", "lr_scheduler"):
            setattr(self.callback_handler, name, getattr(self, name))
        self.callback_handler.train_dataloader = train_dataloader
        return self.model, train_dataloader

    def create_optimizer(self, model: Any = None) -> Any:
        if self.engine is None:
            raise UnsupportedArgumentError(
                "fzero's Trainer builds its optimizer when training starts (trainer.train())"
            )
        return _TrainerOptimizer(self.engine)

    # -- the step -------------------------------------------------------------------------------

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None):
        engine = self.engine
        if engine is None:
            raise UnsupportedArgumentError("training_step runs inside trainer.train()")
        boundary = self.accelerator.gradient_state.sync_gradients
        engine.set_gradient_accumulation_boundary(boundary)
        model.train()
        inputs = self._prepare_inputs(inputs)
        engine.arm()
        try:
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            # Newer releases have Trainer.loss_is_scaled_for_ga; older 5.x ones (5.17) decide as
            # its None case below.
            scaled_for_accumulation = getattr(self, "loss_is_scaled_for_ga", None)
            if scaled_for_accumulation is None:
                scaled_for_accumulation = (
                    self.model_accepts_loss_kwargs and num_items_in_batch is not None
                ) or self.compute_loss_func is not None
            if not scaled_for_accumulation:
                loss = loss / self.current_gradient_accumulation_steps
        except BaseException:
            engine.abort()
            raise
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()  # the optimizer step when this micro-batch ends the window
        return loss.detach()

    def _clip_grad_norm(self, model: Any) -> Any:
        """The step ran in ``training_step``, clipped by the config's ``gradient_clipping``."""
        return self.engine.metrics.get("grad_norm")

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> float | None:
        norm = self.engine.metrics.get("grad_norm")
        return None if norm is None else float(norm)

    def _get_learning_rate(self) -> float:
        return float(self.lr_scheduler.get_last_lr()[0])

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.engine is not None and "loss" in logs and self.engine.config.fp16.enabled:
            logs["loss_scale"] = self.engine.get_loss_scale()
            logs["skipped_steps"] = self.engine.skipped_steps
        super().log(logs, start_time)

    # -- checkpoints and weights ------------------------------------------------------------------

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        self.engine.save_checkpoint(output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Loaded with the master weights in ``_prepare_for_training`` (one fzero checkpoint)."""

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        from fzero.checkpoint import open_checkpoint

        open_checkpoint(resume_from_checkpoint)  # raises naming the directory when there is none

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Consolidated weights that ``from_pretrained(output_dir)`` loads (call on every rank:
        the shards are gathered)."""
        if self.engine is None:
            return super().save_model(output_dir, _internal_call)
        from fzero.api import full_state_dict

        state_dict = full_state_dict(self.engine.state)
        self._save(output_dir or self.args.output_dir, state_dict=state_dict)


class _TrainerOptimizer(EngineOptimizer):
    """What the Trainer's loop steps: the engine already applied the step in
    ``training_step``; this checks that it did."""

    def step(self, closure: Any = None) -> None:
        if self.engine.pending_micro_batches:
            raise UnsupportedArgumentError(
                "optimizer.step() inside an accumulation window: the fzero Trainer steps at the "
                "window's last micro-batch (in training_step); do not call it yourself"
            )


class _TrainerScheduler(EngineScheduler):
    """The schedule as the Trainer reads it: ``get_last_lr`` is the lr of the step just run."""

    def get_last_lr(self) -> list[float]:
        lr = self.engine.metrics.get("lr")
        return [lr] if lr is not None else self.engine.get_lr()

    def step(self, *args: Any, **kwargs: Any) -> None:
        """The schedule is a function of the applied steps: nothing to advance."""


__all__ = ["Trainer", "TrainingArguments"]
