"""Fill a DeepSpeed config's ``"auto"`` values from Hugging Face ``TrainingArguments``.

The rules are transformers' own for DeepSpeed (``HfTrainerDeepSpeedConfig`` in
``transformers/integrations/deepspeed.py``, checked against transformers 4.46-5.x), so a
``ds_config.json`` written for ``Trainer(args=TrainingArguments(deepspeed=...))`` means the same
here. Each rule pairs a config key with an argument: ``"auto"`` takes the argument's value; an
explicit value must equal it, and every contradiction is collected and raised together
(``AutoConfigMismatchError`` naming both sides). A key whose block is absent is left alone, as
transformers does. Pure: the config dict given is not modified.
"""

from __future__ import annotations

import copy
from typing import Any

from fzero.errors import AutoConfigMismatchError, ConfigError

AUTO = "auto"
HIDDEN_SIZE_KEYS = (
    "zero_optimization.reduce_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold",
)


def fill_auto(
    config: dict[str, Any],
    args: Any,
    *,
    model_config: Any = None,
    num_training_steps: int | None = None,
    world_size: int | None = None,
    auto_find_batch_size: bool = False,
) -> dict[str, Any]:
    """A copy of ``config`` with ``"auto"`` replaced from ``args`` (a ``TrainingArguments``),
    ``model_config`` (for the hidden-size bucket sizes) and ``num_training_steps`` (for the
    scheduler's ``total_num_steps`` and ``warmup_num_steps``; None leaves those two as they are).
    ``world_size`` defaults to ``args.world_size``. ``auto_find_batch_size`` lets explicit batch
    sizes differ from the arguments (transformers' batch-size finder changes them)."""
    filled = copy.deepcopy(config)
    mismatches: list[tuple[str, Any, str, Any]] = []

    def fill(key: str, value: Any, argument: str, must_match: bool = True) -> None:
        node, leaf = _node(filled, key)
        if node is None:
            return
        if node.get(leaf) == AUTO:
            node[leaf] = value
        elif must_match and node.get(leaf) is not None and node[leaf] != value:
            mismatches.append((key, node[leaf], argument, value))

    world_size = args.world_size if world_size is None else world_size
    micro = args.per_device_train_batch_size
    accumulation = args.gradient_accumulation_steps
    exact_batch = not auto_find_batch_size
    fill("train_micro_batch_size_per_gpu", micro, "per_device_train_batch_size", exact_batch)
    fill("gradient_accumulation_steps", accumulation, "gradient_accumulation_steps")
    fill(
        "train_batch_size",
        world_size * micro * accumulation,
        "train_batch_size (world_size * per_device_train_batch_size * gradient_accumulation_steps)",
        exact_batch,
    )
    fill("gradient_clipping", args.max_grad_norm, "max_grad_norm")
    fill("optimizer.params.lr", args.learning_rate, "learning_rate")
    fill("optimizer.params.betas", [args.adam_beta1, args.adam_beta2], "[adam_beta1, adam_beta2]")
    fill("optimizer.params.eps", args.adam_epsilon, "adam_epsilon")
    fill("optimizer.params.weight_decay", args.weight_decay, "weight_decay")
    fill("scheduler.params.warmup_min_lr", 0, "(not an argument: 0)", must_match=False)
    fill("scheduler.params.warmup_max_lr", args.learning_rate, "learning_rate")
    fill("fp16.enabled", bool(args.fp16 or args.fp16_full_eval), "fp16 or fp16_full_eval")
    fill("bf16.enabled", bool(args.bf16 or args.bf16_full_eval), "bf16 or bf16_full_eval")

    auto_keys = [key for key in HIDDEN_SIZE_KEYS if _get(filled, key) == AUTO]
    if auto_keys:
        hidden_size = hidden_size_of(model_config)
        if hidden_size is None:
            raise ConfigError(
                auto_keys[0],
                f'"auto" needs the model\'s hidden size, but its config has neither hidden_size '
                f'nor hidden_sizes (nor a text_config with them): replace "auto" in '
                f"{', '.join(auto_keys)} with a number",
            )
        square = hidden_size * hidden_size
        fill(HIDDEN_SIZE_KEYS[0], square, "hidden_size^2", must_match=False)
        if _get(filled, "zero_optimization.stage") == 3:
            fill(HIDDEN_SIZE_KEYS[1], int(0.9 * square), "0.9 * hidden_size^2", must_match=False)
            fill(HIDDEN_SIZE_KEYS[2], 10 * hidden_size, "10 * hidden_size", must_match=False)
    if num_training_steps is not None:
        fill("scheduler.params.total_num_steps", num_training_steps, "num_training_steps")
        warmup = max(1, args.get_warmup_steps(num_training_steps))
        fill("scheduler.params.warmup_num_steps", warmup, "warmup_steps (or warmup_ratio)")
    if mismatches:
        raise AutoConfigMismatchError(mismatches)
    return filled


def hidden_size_of(model_config: Any) -> int | None:
    """The hidden size transformers reads for the bucket sizes: ``hidden_size``, else the
    largest of ``hidden_sizes``, else the same from ``text_config``."""
    for candidate in (model_config, getattr(model_config, "text_config", None)):
        if candidate is None:
            continue
        if getattr(candidate, "hidden_size", None) is not None:
            return int(candidate.hidden_size)
        if getattr(candidate, "hidden_sizes", None):
            return int(max(candidate.hidden_sizes))
    return None


def _node(config: dict[str, Any], key: str) -> tuple[dict[str, Any] | None, str]:
    """The dict holding ``key``'s last part, or None when a block on the way is absent."""
    *blocks, leaf = key.split(".")
    node: Any = config
    for block in blocks:
        node = node.get(block) if isinstance(node, dict) else None
        if node is None:
            return None, leaf
    return (node if isinstance(node, dict) else None), leaf


def _get(config: dict[str, Any], key: str) -> Any:
    node, leaf = _node(config, key)
    return None if node is None else node.get(leaf)
