"""``fill_auto`` fills "auto" exactly as transformers does for DeepSpeed, against real
``TrainingArguments``; transformers' own rules (``HfTrainerDeepSpeedConfig``) are the oracle."""

from __future__ import annotations

import copy

import pytest

transformers = pytest.importorskip("transformers")
accelerate_deepspeed = pytest.importorskip("accelerate.utils.deepspeed")

from transformers import GPT2Config, LlamaConfig, TrainingArguments  # noqa: E402
from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig  # noqa: E402

from fzero.errors import AutoConfigMismatchError, ConfigError  # noqa: E402
from fzero.integrations.hf_config import fill_auto  # noqa: E402

# The guide's HF config, with its optimizer and scheduler written as "auto" too.
GUIDE_CONFIG = {
    "bf16": {"enabled": "auto"},
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": True,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": 1e9,
    },
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
    },
    "scheduler": {
        "type": "WarmupDecayLR",
        "params": {
            "warmup_min_lr": "auto",
            "warmup_max_lr": "auto",
            "warmup_num_steps": "auto",
            "total_num_steps": "auto",
        },
    },
}


def _args(**overrides) -> TrainingArguments:
    values = dict(
        output_dir="/tmp/fzero-hf-config",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        report_to=[],
        use_cpu=True,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def _transformers_fill(config, args, model_config, num_training_steps):
    """transformers' own filling, run on accelerate's config holder (transformers only builds
    its class with DeepSpeed installed; its methods are used unchanged)."""
    names = ("is_auto", "fill_match", "fill_only", "trainer_config_process")
    names += ("trainer_config_finalize",)
    oracle_type = type(
        "TransformersRules",
        (accelerate_deepspeed.HfDeepSpeedConfig,),
        {name: HfTrainerDeepSpeedConfig.__dict__[name] for name in names},
    )
    oracle = oracle_type(copy.deepcopy(config))
    oracle._dtype, oracle.mismatches = None, []
    oracle.trainer_config_process(args)

    class Model:
        pass

    Model.config = model_config
    oracle.trainer_config_finalize(args, Model(), num_training_steps)
    return oracle.config


@pytest.mark.parametrize(
    "overrides, model_config, stage",
    [
        (dict(bf16=True, warmup_steps=0.1), GPT2Config(n_embd=32), 3),
        (
            dict(learning_rate=3e-4, adam_beta2=0.95, weight_decay=0.1),
            GPT2Config(n_embd=16),
            2,
        ),
        (
            dict(max_grad_norm=0.5, adam_epsilon=1e-6, warmup_steps=7),
            LlamaConfig(hidden_size=48, num_attention_heads=4, num_key_value_heads=4),
            1,
        ),
    ],
)
def test_fill_auto_equals_transformers(overrides, model_config, stage):
    """Every "auto" key gets the value transformers' DeepSpeed integration gives it."""
    config = copy.deepcopy(GUIDE_CONFIG)
    config["zero_optimization"]["stage"] = stage
    snapshot = copy.deepcopy(config)
    args = _args(**overrides)
    ours = fill_auto(config, args, model_config=model_config, num_training_steps=100)
    theirs = _transformers_fill(config, args, model_config, 100)
    # No warm-up: transformers 5.17 filled warmup_num_steps 0, which DeepSpeed 0.19.6+ refuses;
    # later 5.x releases fill at least 1, and so does fzero (the rule of the newest release).
    scheduler = theirs.get("scheduler", {}).get("params", {})
    if scheduler.get("warmup_num_steps") == 0:
        scheduler["warmup_num_steps"] = 1
    assert ours == theirs
    # Below stage 3 transformers leaves the stage-3 keys as they are; fzero's resolve fills them.
    left = {key for key, value in ours["zero_optimization"].items() if value == "auto"}
    assert left == (
        set()
        if stage == 3
        else {"stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"}
    )
    assert config == snapshot  # the input is not modified


def test_guide_config_values():
    """The guide's config and arguments give the documented values."""
    args = _args(bf16=True)
    filled = fill_auto(
        GUIDE_CONFIG, args, model_config=GPT2Config(n_embd=64), num_training_steps=50
    )
    assert filled["train_micro_batch_size_per_gpu"] == 2
    assert filled["gradient_accumulation_steps"] == 4
    assert filled["train_batch_size"] == 8
    assert filled["gradient_clipping"] == 1.0
    assert filled["bf16"]["enabled"] is True
    zero = filled["zero_optimization"]
    assert zero["reduce_bucket_size"] == 64 * 64
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
    assert zero["stage3_param_persistence_threshold"] == 640
    assert filled["scheduler"]["params"]["total_num_steps"] == 50
    assert filled["scheduler"]["params"]["warmup_num_steps"] == 1  # no warm-up: at least 1


def test_world_size_enters_train_batch_size():
    filled = fill_auto(GUIDE_CONFIG, _args(), model_config=GPT2Config(n_embd=8), world_size=4)
    assert filled["train_batch_size"] == 2 * 4 * 4
    assert filled["scheduler"]["params"]["total_num_steps"] == "auto"  # steps not known yet


def test_every_contradiction_is_reported_with_both_sides():
    config = copy.deepcopy(GUIDE_CONFIG)
    config["train_micro_batch_size_per_gpu"] = 4
    config["gradient_clipping"] = 0.5
    config["optimizer"]["params"]["lr"] = 1e-3
    with pytest.raises(AutoConfigMismatchError) as raised:
        fill_auto(config, _args(), model_config=GPT2Config(n_embd=8), num_training_steps=10)
    message = str(raised.value)
    assert (
        "train_micro_batch_size_per_gpu=4 vs TrainingArguments per_device_train_batch_size=2"
        in message
    )
    assert "gradient_clipping=0.5 vs TrainingArguments max_grad_norm=1.0" in message
    assert "optimizer.params.lr=0.001 vs TrainingArguments learning_rate=5e-05" in message
    assert '"auto"' in message
    assert len(raised.value.mismatches) == 3
    with pytest.raises(ValueError):  # transformers raises ValueError: so do we
        fill_auto(config, _args(), model_config=GPT2Config(n_embd=8))


def test_explicit_values_that_agree_pass():
    config = copy.deepcopy(GUIDE_CONFIG)
    config.update(
        train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=4, gradient_clipping=1.0
    )
    filled = fill_auto(config, _args(), model_config=GPT2Config(n_embd=8))
    assert filled["train_batch_size"] == 8


def test_hidden_size_keys_need_a_hidden_size():
    class NoHidden:
        vocab_size = 10

    with pytest.raises(ConfigError, match="zero_optimization.reduce_bucket_size.*hidden_size"):
        fill_auto(GUIDE_CONFIG, _args(), model_config=NoHidden())
