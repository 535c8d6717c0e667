"""``fzero.Config`` reads DeepSpeed configs unchanged and names the offending key in every error.

Specification by example: the common DeepSpeed configs load and resolve; every bad input raises a
``ConfigError`` (a ``ValueError``; wrong types also a ``TypeError``) whose ``path`` is the JSON
path of the key; schedules match DeepSpeed's formulas written out here; and a property test draws
configs from the schema, checks each valid one loads and each one-key mutation is reported at
that key.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import re
import typing
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fzero.config.validate as validate_module
from fzero.config import Config
from fzero.config.keys import ALIASES, RULES
from fzero.config.lr_schedules import (
    SCHEDULERS,
    LRRangeTest,
    OneCycle,
    WarmupCosineLR,
    WarmupDecayLR,
    WarmupLR,
)
from fzero.errors import ConfigError, ConfigTypeError, ConfigWarning

pytestmark = pytest.mark.filterwarnings("ignore::fzero.errors.ConfigWarning")

SEED = {
    "bf16": {"enabled": True},
    "zero_optimization": {
        "stage": 3,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True},
        "overlap_comm": True,
        "contiguous_gradients": True,
        "sub_group_size": 1e9,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "gradient_accumulation_steps": 8,
    "gradient_clipping": 1.0,
    "train_batch_size": 64,
    "train_micro_batch_size_per_gpu": 1,
    "wall_clock_breakdown": False,
}

STAGE1 = {
    "train_batch_size": 32,
    "train_micro_batch_size_per_gpu": 4,
    "steps_per_print": 100,
    "optimizer": {"type": "Adam", "params": {"lr": 0.00015, "weight_decay": 0.01}},
    "fp16": {"enabled": False},
    "zero_optimization": {"stage": 1, "reduce_bucket_size": 5e8},
}

STAGE2 = {
    "bf16": {"enabled": True},
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": 3e-5, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1},
    },
    "scheduler": {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": 0, "warmup_max_lr": 3e-5, "warmup_num_steps": 500},
    },
    "zero_optimization": {
        "stage": 2,
        "allgather_partitions": True,
        "allgather_bucket_size": 2e8,
        "overlap_comm": True,
        "reduce_scatter": True,
        "reduce_bucket_size": 2e8,
        "contiguous_gradients": True,
    },
    "gradient_accumulation_steps": 4,
    "gradient_clipping": 1.0,
    "train_micro_batch_size_per_gpu": 2,
}

STAGE3 = {
    "bf16": {"enabled": True},
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "sub_group_size": 1e9,
        "reduce_bucket_size": 1e7,
        "stage3_prefetch_bucket_size": 1e7,
        "stage3_param_persistence_threshold": 1e5,
        "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "train_batch_size": 16,
    "gradient_accumulation_steps": 2,
}

FP16_DYNAMIC = {
    "train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "Adam", "params": {"lr": 0.00015}},
    "fp16": {
        "enabled": True,
        "auto_cast": False,
        "loss_scale": 0,
        "initial_scale_power": 16,
        "loss_scale_window": 1000,
        "hysteresis": 2,
        "consecutive_hysteresis": False,
        "min_loss_scale": 1,
    },
    "zero_optimization": {"stage": 2},
}

OFFLOAD_NVME = {
    "zero_optimization": {
        "stage": 3,
        "offload_optimizer": {"device": "nvme", "nvme_path": "/local_nvme", "buffer_count": 4},
        "offload_param": {
            "device": "nvme",
            "nvme_path": "/local_nvme",
            "buffer_count": 5,
            "buffer_size": 1e8,
            "max_in_cpu": 1e9,
        },
    },
    "aio": {"block_size": 1048576, "queue_depth": 8, "single_submit": False},
    "train_micro_batch_size_per_gpu": 1,
}

HF_ALL_AUTO = {
    "fp16": {
        "enabled": "auto",
        "loss_scale": 0,
        "loss_scale_window": 1000,
        "initial_scale_power": 16,
        "hysteresis": 2,
        "min_loss_scale": 1,
    },
    "bf16": {"enabled": "auto"},
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
    "zero_optimization": {
        "stage": 3,
        "offload_optimizer": {"device": "none"},
        "offload_param": {"device": "none"},
        "overlap_comm": True,
        "contiguous_gradients": True,
        "sub_group_size": 1e9,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 2000,
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}


@pytest.fixture
def offload_supported(monkeypatch):
    """Pretend the runtime implements CPU and NVMe offload."""
    monkeypatch.setattr(validate_module, "SUPPORTED_OFFLOAD_DEVICES", ("none", "cpu", "nvme"))


def raises_at(path: str, data: dict) -> ConfigError:
    """Load ``data`` and return the ConfigError, checking it names ``path``."""
    with pytest.raises(ConfigError) as info:
        Config.from_dict(data)
    assert info.value.path == path, str(info.value)
    assert str(info.value).startswith(f"{path}: ")
    return info.value


def with_key(data: dict, path: str, value) -> dict:
    """A deep copy of ``data`` with the dotted ``path`` set to ``value``."""
    data = copy.deepcopy(data)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return data


# -- the common DeepSpeed configs load and resolve -------------------------------------------------


def test_seed_config_loads_and_resolves_when_offload_is_supported(offload_supported):
    config = Config.from_dict(SEED)
    assert config.stage == 3
    assert config.compute_dtype_name == "bf16"
    assert config.zero_optimization.offload_param.pin_memory is True
    assert set(config.unresolved_keys()) == {
        "zero_optimization.reduce_bucket_size",
        "zero_optimization.stage3_prefetch_bucket_size",
        "zero_optimization.stage3_param_persistence_threshold",
    }
    resolved = config.resolve(world_size=8, hidden_size=4096, param_numel=7_000_000_000)
    assert resolved.unresolved_keys() == []
    zero = resolved.zero_optimization
    assert zero.reduce_bucket_size == 4096 * 4096
    assert zero.stage3_prefetch_bucket_size == int(0.9 * 4096 * 4096)
    assert zero.stage3_param_persistence_threshold == 10 * 4096
    assert zero.stage3_max_live_parameters == 1_000_000_000
    assert (resolved.train_batch_size, resolved.gradient_accumulation_steps) == (64, 8)


def test_seed_config_loads_cpu_and_nvme_offload():
    config = Config.from_dict(SEED)
    assert config.zero_optimization.offload_optimizer.device == "cpu"
    assert config.zero_optimization.offload_param.device == "cpu"
    nvme = {"device": "nvme", "nvme_path": "/local_nvme"}
    data = with_key(SEED, "zero_optimization.offload_optimizer", nvme)
    assert Config.from_dict(data).zero_optimization.offload_optimizer.nvme_path == "/local_nvme"
    data = with_key(data, "zero_optimization.offload_optimizer.nvme_path", None)
    raises_at("zero_optimization.offload_optimizer.nvme_path", data)


@pytest.mark.parametrize("data", [STAGE1, STAGE2, STAGE3], ids=["stage1", "stage2", "stage3"])
def test_common_stage_configs_load_and_resolve(data):
    config = Config.from_dict(data)
    assert config.stage == data["zero_optimization"]["stage"]
    resolved = config.resolve(world_size=2, hidden_size=1024, param_numel=10**8)
    assert resolved.unresolved_keys() == []
    assert resolved.train_batch_size == (
        resolved.train_micro_batch_size_per_gpu * resolved.gradient_accumulation_steps * 2
    )


def test_fp16_dynamic_config_parses_every_loss_scale_key():
    config = Config.from_dict(FP16_DYNAMIC)
    assert config.fp16.enabled is True and config.compute_dtype_name == "fp16"
    assert (config.fp16.loss_scale, config.fp16.initial_scale_power) == (0.0, 16)
    assert (config.fp16.loss_scale_window, config.fp16.hysteresis) == (1000, 2)
    assert config.fp16.min_loss_scale == 1.0 and config.fp16.consecutive_hysteresis is False


def test_nvme_offload_config_loads_when_supported(offload_supported):
    config = Config.from_dict(OFFLOAD_NVME)
    assert config.zero_optimization.offload_param.nvme_path == "/local_nvme"
    assert config.zero_optimization.offload_param.max_in_cpu == 1_000_000_000


def test_hf_all_auto_config_loads_and_resolves(caplog):
    config = Config.from_dict(HF_ALL_AUTO)
    assert "optimizer.params.lr" in config.unresolved_keys()
    with caplog.at_level(logging.INFO, logger="fzero"):
        resolved = config.resolve(
            world_size=4, hidden_size=None, param_numel=10**9, total_num_steps=5000
        )
    assert resolved.unresolved_keys() == []
    assert resolved.zero_optimization.reduce_bucket_size == 500_000_000
    assert resolved.compute_dtype_name == "fp32"
    assert resolved.scheduler.warmup_max_lr == resolved.optimizer.lr
    assert resolved.scheduler.total_num_steps == 5000
    assert resolved.train_batch_size is None
    info, warning = (
        [r for r in caplog.records if r.name == "fzero" and r.levelno == level]
        for level in (logging.INFO, logging.WARNING)
    )
    [info], [warning] = info, warning
    assert "DeepSpeed's default" in info.getMessage()
    assert "total_num_steps=5000" in info.getMessage()
    # The values only a trainer fills: one WARNING naming each key and the value it got.
    for text in (
        "optimizer.params.lr=0.001",
        "optimizer.params.betas=(0.9, 0.999)",
        "optimizer.params.eps=1e-08",
        "optimizer.params.weight_decay=0.0",
        "gradient_clipping=0.0",
        "bf16.enabled=False",
        "fp16.enabled=False",
        "scheduler.params.warmup_num_steps=1000",
        "scheduler.params.warmup_max_lr=0.001",
    ):
        assert text in warning.getMessage()
    assert '"bf16": {"enabled": true}' in warning.getMessage()


def test_auto_total_num_steps_needs_the_number_of_training_steps():
    config = Config.from_dict(HF_ALL_AUTO)
    with pytest.raises(ConfigError) as info:
        config.resolve(world_size=1, hidden_size=64, param_numel=10**6)
    assert info.value.path == "scheduler.params.total_num_steps"
    assert "fzero.shard(..., total_num_steps=N)" in str(info.value)


def test_optimizer_defaults_are_deepspeeds_for_the_same_type():
    """FusedAdam (weight_decay 0) unless torch_adam picks torch's AdamW (0.01); bias_correction
    and adam_w_mode default true (deepspeed/ops/adam/fused_adam.py, runtime/engine.py)."""
    for kind in ("Adam", "AdamW"):
        optimizer = Config.from_dict(
            {"optimizer": {"type": kind, "params": {"lr": 1e-4}}}
        ).optimizer
        assert (optimizer.weight_decay, optimizer.betas, optimizer.eps) == (0.0, (0.9, 0.999), 1e-8)
        assert optimizer.bias_correction is True and optimizer.adam_w_mode is True
        params = {"lr": 1e-4, "torch_adam": True}
        optimizer = Config.from_dict({"optimizer": {"type": kind, "params": params}}).optimizer
        assert optimizer.weight_decay == 0.01
    assert Config().optimizer.weight_decay == 0.0
    auto = {"optimizer": {"type": "AdamW", "params": {"weight_decay": "auto", "torch_adam": True}}}
    resolved = Config.from_dict(auto).resolve(world_size=1, hidden_size=None, param_numel=10)
    assert resolved.optimizer.weight_decay == 0.01


def test_max_grad_norm_in_optimizer_params_is_refused_as_deepspeed_refuses_it():
    error = raises_at(
        "optimizer.params.max_grad_norm", {"optimizer": {"params": {"max_grad_norm": 1.0}}}
    )
    assert "not supported as an optimizer parameter" in str(error)
    assert "gradient_clipping" in str(error)


def test_auto_bucket_sizes_are_capped_at_the_model_size():
    config = Config.from_dict({"zero_optimization": {"reduce_bucket_size": "auto"}})
    resolved = config.resolve(world_size=1, hidden_size=4096, param_numel=1000)
    assert resolved.zero_optimization.reduce_bucket_size == 1000


def test_json_and_hjson_files_load(tmp_path: Path):
    json_path = tmp_path / "ds_config.json"
    json_path.write_text(json.dumps(STAGE3))
    assert Config.from_any(json_path) == Config.from_dict(STAGE3)
    assert Config.from_any(str(json_path)) == Config.from_dict(STAGE3)
    hjson_path = tmp_path / "ds_config.hjson"
    hjson_path.write_text("{\n  # stage 2, commented\n  zero_optimization: {stage: 2}\n}\n")
    assert Config.from_any(hjson_path).stage == 2


def test_duplicate_keys_in_a_file_are_an_error(tmp_path: Path):
    path = tmp_path / "ds_config.json"
    path.write_text('{"zero_optimization": {"stage": 2, "stage": 3}}')
    with pytest.raises(ConfigError) as info:
        Config.from_any(path)
    assert info.value.path == "stage"


def test_keyword_arguments_build_the_same_config():
    built = Config.from_kwargs(zero_optimization={"stage": 3}, bf16={"enabled": True})
    assert built == Config.from_dict({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}})


def test_bfloat16_is_deepspeeds_old_name_for_bf16():
    assert Config.from_dict({"bfloat16": {"enabled": True}}).compute_dtype_name == "bf16"
    raises_at("bfloat16", {"bfloat16": {"enabled": True}, "bf16": {"enabled": True}})


def test_deepspeed_field_names_behind_stage3_aliases_are_accepted():
    config = Config.from_dict({"zero_optimization": {"prefetch_bucket_size": 123}})
    assert config.zero_optimization.stage3_prefetch_bucket_size == 123
    data = {"zero_optimization": {"prefetch_bucket_size": 1, "stage3_prefetch_bucket_size": 2}}
    raises_at("zero_optimization.stage3_prefetch_bucket_size", data)


def test_dtype_names_accept_deepspeeds_spellings():
    config = Config.from_dict(
        {"communication_data_type": "BF16", "data_types": {"grad_accum_dtype": "float32"}}
    )
    assert (config.reduce_dtype_name, config.grad_accum_dtype_name) == ("bf16", "fp32")


# -- errors name the offending key -----------------------------------------------------------------

WARMUP = {"scheduler.type": "WarmupLR"}
BAD_INPUTS = [  # (the key named in the error, its bad value, other keys of the config)
    ("zero_optimization.stage", 5, {}),
    ("zero_optimization.stage", "3", {}),
    ("zero_optimization.stage", True, {}),
    ("zero_optimization.reduce_bucket_size", -1, {}),
    ("zero_optimization.allgather_bucket_size", -5, {}),
    ("zero_optimization.allgather_bucket_size", 1.5, {}),
    ("zero_optimization.overlap_comm", "yes", {}),
    ("zero_optimization.stag", 2, {}),
    ("zero_optimization", True, {}),
    ("zero_optimization.offload_optimizer.nvme_path", None, {
        "zero_optimization.offload_optimizer.device": "nvme"}),
    ("zero_optimization.offload_param.device", "gpu", {}),
    ("zero_optimization.offload_optimizer.ratio", 1.5, {}),
    ("zero_optimization.zero_quantized_weights", True, {}),
    ("zero_optimization.cpu_offload", True, {}),
    ("optimizer.type", "Lamb", {"optimizer.params.max_coeff": 10}),
    ("optimizer.params.lr", -0.1, {}),
    ("optimizer.params.betas", [0.9, 1.0], {}),
    ("optimizer.params.betas[1]", [0.9, "x"], {}),
    ("optimizer.params.eps", 0, {}),
    ("optimizer.params.weight_decay", -1, {}),
    ("optimizer.params.adam_w_mode", False, {"optimizer.type": "Adam"}),
    ("optimizer.params.amsgrad", True, {}),
    ("optimizer.params.learning_rate", 0.1, {}),
    ("scheduler.type", "StepLR", {}),
    ("scheduler.params.warmup_num_steps", 0, WARMUP),
    ("scheduler.params.warmup_type", "cosine", WARMUP),
    ("scheduler.params.warmup_max_lr", -1, WARMUP),
    ("scheduler.params.total_num_steps", None, {"scheduler.type": "WarmupDecayLR"}),
    ("scheduler.params.cycle_max_lr", None, {"scheduler.type": "OneCycle",
                                             "scheduler.params.cycle_min_lr": 0.1}),
    ("bf16.enabled", True, {"fp16.enabled": True}),
    ("communication_data_type", "bf16", {"fp16.enabled": True}),
    ("data_types.grad_accum_dtype", "bf16", {"fp16.enabled": True}),
    ("communication_data_type", "fp16", {"bf16.enabled": True}),
    ("fp16.min_loss_scale", 2**17, {"fp16.enabled": True}),
    ("fzero.nonfinite_grads", "apply", {"fp16.enabled": True}),
    ("fzero.nonfinite_grads", "ignore", {}),
    ("fzero.reduce_every_micro_batch", False, {"fzero.deterministic": True}),
    ("fp16.loss_scale", -1, {}),
    ("fp16.initial_scale_power", 200, {}),
    ("fp16.hysteresis", 0, {}),
    ("fp16.min_loss_scale", 0, {}),
    ("gradient_clipping", -1.0, {}),
    ("gradient_clipping", "max", {}),
    ("fp16.enable", True, {}),
    ("optimizer.params.max_grad_norm", 1.0, {}),
    ("gradient_accumulation_steps", 0, {}),
    ("train_batch_size", 10, {"train_micro_batch_size_per_gpu": 4,
                              "gradient_accumulation_steps": 1}),
    ("train_micro_batch_size_per_gpu", -2, {}),
    ("steps_per_print", 0, {}),
    ("communication_data_type", "int8", {}),
    ("data_types.grad_accum_dtype", 16, {}),
    ("activation_checkpointing.partition_activation", True, {}),
    ("amp", {"enabled": True, "opt_level": "O1"}, {}),
    ("gradient_allreduce_op", "sum", {}),
    ("tensor_parallel", {"autotp_size": 4}, {}),
]  # fmt: skip


def bad_config(path: str, value, others: dict) -> dict:
    data: dict = {}
    for key, other in others.items():
        data = with_key(data, key, other)
    return with_key(data, path.split("[")[0], value) if value is not None else data


@pytest.mark.parametrize(("path", "value", "others"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_an_error_naming_the_key(path, value, others):
    error = raises_at(path, bad_config(path, value, others))
    assert isinstance(error, ValueError)


def test_there_are_at_least_twenty_distinct_bad_inputs():
    configs = {json.dumps(bad_config(*case), sort_keys=True) for case in BAD_INPUTS}
    assert len(configs) == len(BAD_INPUTS) >= 20


def test_wrong_types_are_also_type_errors():
    with pytest.raises(TypeError):
        Config.from_dict({"zero_optimization": {"stage": "3"}})
    with pytest.raises(ConfigTypeError):
        Config.from_dict({"optimizer": {"params": {"lr": [1]}}})


def test_unknown_keys_get_a_did_you_mean_suggestion():
    error = raises_at("zero_optimization.stage3_prefetch_bucket_sizes", {
        "zero_optimization": {"stage3_prefetch_bucket_sizes": 1}
    })  # fmt: skip
    assert "did you mean 'stage3_prefetch_bucket_size'" in str(error)


def test_unknown_top_level_keys_are_ignored_with_one_warning_naming_them():
    """DeepSpeed reads the top-level keys it knows and ignores the rest; fzero warns once, with
    "did you mean" only for a close match of a known key."""
    data = {
        "_comment": "from a real config",
        "log": {"level": "info"},
        "comms_config": {"verbose": False},
        "cuda_visible_devices": "0,1",
        "wall_clock_breakdwn": True,
        "zero_optimization": {"stage": 2},
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = Config.from_dict(data)
    assert config.stage == 2
    [message] = [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)]
    for key in ("_comment", "log", "comms_config", "cuda_visible_devices"):
        assert f"{key}," in message or f"{key} " in message
    assert "wall_clock_breakdwn (did you mean 'wall_clock_breakdown'?)" in message
    assert message.count("did you mean") == 1


def test_fp16_and_bf16_both_enabled_names_both_keys():
    error = raises_at("bf16.enabled", {"bf16": {"enabled": True}, "fp16": {"enabled": True}})
    assert "fp16.enabled" in str(error)


def test_batch_size_mismatch_reports_the_numbers():
    config = Config.from_dict(SEED | {"zero_optimization": {"stage": 3}})
    with pytest.raises(ConfigError) as info:
        config.resolve(world_size=4, hidden_size=None, param_numel=1)
    assert info.value.path == "train_batch_size"
    assert "64" in str(info.value) and "* world_size (4) = 32" in str(info.value)


@pytest.mark.parametrize(
    ("given", "world_size", "expected"),
    [
        ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 2}, 4, (64, 2, 8)),
        ({"train_batch_size": 64, "gradient_accumulation_steps": 4}, 4, (64, 4, 4)),
        ({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}, 4, (24, 2, 3)),
        ({"train_batch_size": 16}, 4, (16, 4, 1)),
        ({"train_micro_batch_size_per_gpu": 3}, 2, (6, 3, 1)),
        ({"gradient_accumulation_steps": 3}, 2, (None, None, 3)),
    ],
)
def test_any_two_batch_sizes_derive_the_third(given, world_size, expected):
    resolved = Config.from_dict(given).resolve(world_size=world_size, hidden_size=8, param_numel=8)
    batch_sizes = (
        resolved.train_batch_size,
        resolved.train_micro_batch_size_per_gpu,
        resolved.gradient_accumulation_steps,
    )
    assert batch_sizes == expected


def test_indivisible_batch_size_cannot_derive_the_micro_batch():
    config = Config.from_dict({"train_batch_size": 30, "gradient_accumulation_steps": 4})
    with pytest.raises(ConfigError) as info:
        config.resolve(world_size=2, hidden_size=8, param_numel=8)
    assert info.value.path == "train_batch_size" and "30" in str(info.value)


# -- warned and rejected keys ----------------------------------------------------------------------


def test_warned_keys_warn_once_with_the_reason():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        Config.from_dict({"zero_optimization": {"contiguous_gradients": False}})
        Config.from_dict({"zero_optimization": {"contiguous_gradients": False}})
    messages = [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)]
    assert len(messages) == 1
    assert messages[0].startswith("zero_optimization.contiguous_gradients: ")
    assert "no effect" in messages[0] and "flat buffers" in messages[0]


QUIET = {
    "wall_clock_breakdown": False,
    "prescale_gradients": False,
    "memory_breakdown": False,
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 2000,
    "zero_optimization": {
        "stage": 3,
        "contiguous_gradients": True,
        "allgather_partitions": True,
        "reduce_scatter": True,
        "sub_group_size": 1e9,
        "stage3_gather_16bit_weights_on_model_save": True,
        "round_robin_gradients": False,
    },
    "activation_checkpointing": {"partition_activations": False, "cpu_checkpointing": False},
    "tensorboard": {"enabled": False, "output_path": "logs/"},
    "flops_profiler": {"enabled": False, "profile_step": 1},
}


def test_values_that_ask_for_what_fzero_does_anyway_are_silent_and_listed_once_at_info(caplog):
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="fzero"):
        warnings.simplefilter("error", ConfigWarning)
        Config.from_dict(QUIET)
    [record] = [r for r in caplog.records if "accepted without effect" in r.getMessage()]
    assert record.levelno == logging.INFO
    for key in ("wall_clock_breakdown", "zero_optimization.reduce_scatter", "tensorboard"):
        assert key in record.getMessage()
    for path, value in [
        ("wall_clock_breakdown", True),
        ("prescale_gradients", True),
        ("zero_optimization.reduce_scatter", False),
        ("activation_checkpointing.partition_activations", True),
    ]:  # asking for what fzero does not do is a warning
        with pytest.warns(ConfigWarning, match=path.split(".")[0]):
            Config.from_dict(with_key(QUIET, path, value))


def test_a_block_present_with_every_technique_off_is_accepted():
    """As "enabled": false is: DeepSpeed's compression block with no technique enabled."""
    off = {"shared_parameters": {"enabled": False, "quantizer_kernel": False}}
    data = {
        "compression_training": {
            "weight_quantization": off | {"different_groups": {"wq1": {"params": {}}}},
            "activation_quantization": off,
            "sparse_pruning": off,
            "row_pruning": off,
            "head_pruning": off,
            "channel_pruning": off,
            "layer_reduction": {"enabled": False, "keep_number_layer": 5},
        }
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        Config.from_dict(data)
    on = with_key(data, "compression_training.row_pruning.shared_parameters.enabled", True)
    raises_at("compression_training", on)


def test_current_deepspeed_key_names_and_their_old_spellings_are_accepted():
    for key in ("seq_parallel_communication_data_type", "seq_parallel_comm_data_type"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConfigWarning)
            Config.from_dict({key: "fp32"})
    assert ALIASES["seq_parallel_comm_data_type"] == "seq_parallel_communication_data_type"


def test_auto_where_deepspeed_drops_it_takes_deepspeeds_default_and_is_logged(caplog):
    """DeepSpeed's pydantic blocks drop "auto" values, so the field keeps its default
    (deepspeed/runtime/config_utils.py); RLHF frameworks write it for these keys."""
    data = {
        "zero_optimization": {
            "stage": 3,
            "stage3_max_live_parameters": "auto",
            "stage3_max_reuse_distance": "auto",
            "allgather_bucket_size": "auto",
        }
    }
    with caplog.at_level(logging.INFO, logger="fzero"):
        zero = Config.from_dict(data).zero_optimization
    assert (zero.stage3_max_live_parameters, zero.stage3_max_reuse_distance) == (10**9, 10**9)
    assert zero.allgather_bucket_size == 500_000_000
    [record] = [r for r in caplog.records if "DeepSpeed's default" in r.getMessage()]
    assert "zero_optimization.stage3_max_reuse_distance=1000000000" in record.getMessage()


def test_onecycle_momentum_warns_unless_switched_off():
    params = {"cycle_min_lr": 0.01, "cycle_max_lr": 0.1}
    with pytest.warns(ConfigWarning, match="scheduler.params.cycle_momentum"):
        Config.from_dict({"scheduler": {"type": "OneCycle", "params": params}})
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        params = params | {"cycle_momentum": False}
        Config.from_dict({"scheduler": {"type": "OneCycle", "params": params}})


def test_rejected_keys_set_to_off_load_silently():
    data = {
        "amp": {"enabled": False},
        "sparse_gradients": False,
        "elasticity": {"enabled": False, "max_train_batch_size": 100},
        "gradient_allreduce_op": "mean",
        "tensor_parallel": {"autotp_size": 1},
        "zero_optimization": {"cpu_offload": False, "mics_shard_size": -1},
        "optimizer": {"params": {"amsgrad": False, "bias_correction": True}},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        Config.from_dict(data)


# -- stage override, fingerprint, diff -------------------------------------------------------------


def test_explicit_stage_overrides_the_file_and_says_so_once(caplog):
    config = Config.from_dict(STAGE2)
    with caplog.at_level(logging.INFO, logger="fzero"):
        assert config.with_stage_override(2) is config
        overridden = config.with_stage_override(3)
    assert overridden.stage == 3
    [record] = [r for r in caplog.records if r.name == "fzero"]
    assert "stage=3" in record.getMessage() and "zero_optimization.stage=2" in record.getMessage()


def test_to_dict_round_trips_and_configs_are_hashable():
    for data in (STAGE1, STAGE2, STAGE3, HF_ALL_AUTO):
        config = Config.from_dict(data)
        assert Config.from_dict(config.to_dict()) == config
        assert hash(config) == hash(Config.from_dict(data))


def test_fingerprint_is_stable_and_diff_names_the_keys():
    a, b = Config.from_dict(STAGE2), Config.from_dict(copy.deepcopy(STAGE2))
    assert a.fingerprint() == b.fingerprint() and a.diff(b) == []
    c = Config.from_dict(with_key(STAGE2, "zero_optimization.reduce_bucket_size", 1e6))
    c = c.replace(gradient_clipping=0.5)
    assert a.fingerprint() != c.fingerprint()
    assert a.diff(c) == ["zero_optimization.reduce_bucket_size", "gradient_clipping"]


def test_diff_names_keys_present_on_one_side_only():
    with_scheduler = Config.from_dict(STAGE2)
    without = with_scheduler.replace(scheduler=None)
    assert "scheduler.params.warmup_num_steps" in with_scheduler.diff(without)


# -- learning-rate schedules, against DeepSpeed's formulas written out -----------------------------


def test_lr_without_a_scheduler_is_the_optimizer_lr():
    config = Config.from_dict({"optimizer": {"params": {"lr": 0.25}}})
    assert [config.lr_at(step) for step in (0, 1, 1000)] == [0.25, 0.25, 0.25]


def test_lr_at_refuses_unresolved_auto():
    with pytest.raises(ConfigError) as info:
        Config.from_dict(HF_ALL_AUTO).lr_at(3)
    assert "auto" in str(info.value)


def test_warmup_lr_log_and_linear():
    log = WarmupLR(warmup_min_lr=0.1, warmup_max_lr=1.0, warmup_num_steps=10)
    # step s runs with DeepSpeed's last_batch_iteration = s - 1; before the first step: the min.
    assert log.lr_at(0, 9.0) == 0.1
    assert log.lr_at(1, 9.0) == 0.1  # log(0 + 1) = 0
    assert log.lr_at(5, 9.0) == pytest.approx(0.1 + 0.9 * math.log(5) / math.log(10))
    assert log.lr_at(11, 9.0) == 1.0 and log.lr_at(500, 9.0) == 1.0
    linear = dataclasses.replace(log, warmup_type="linear")
    assert linear.lr_at(5, 9.0) == pytest.approx(0.1 + 0.9 * 4 / 10)
    assert WarmupLR(warmup_num_steps=10, warmup_type="linear").lr_at(6, 2.0) == pytest.approx(1.0)
    # DeepSpeed warms up over at least 2 steps.
    assert WarmupLR(0.0, 1.0, 1, "linear").lr_at(2, 0) == pytest.approx(0.5)


def test_warmup_decay_lr():
    schedule = WarmupDecayLR(
        warmup_min_lr=0.0, warmup_max_lr=1.0, warmup_num_steps=10, warmup_type="linear",
        total_num_steps=110,
    )  # fmt: skip
    assert schedule.lr_at(5, 0) == pytest.approx(0.4)
    assert schedule.lr_at(20, 0) == pytest.approx((110 - 19) / (110 - 10))
    assert schedule.lr_at(111, 0) == 0.0 and schedule.lr_at(300, 0) == 0.0


def test_warmup_cosine_lr():
    schedule = WarmupCosineLR(
        total_num_steps=110, warmup_min_ratio=0.1, warmup_num_steps=10, cos_min_ratio=0.01,
        warmup_type="linear",
    )  # fmt: skip
    base = 2.0
    assert schedule.lr_at(0, base) == 0.0  # DeepSpeed's WarmupCosineLR starts at 0
    assert schedule.lr_at(5, base) == pytest.approx(base * (0.1 + 0.4 * 0.9))
    progress = (59 - 10 + 1) / (110 - 10)
    ratio = 0.01 + 0.99 * (1 + math.cos(math.pi * progress)) / 2
    assert schedule.lr_at(60, base) == pytest.approx(base * ratio)
    assert schedule.lr_at(10_000, base) == pytest.approx(base * 0.01)


def test_one_cycle():
    schedule = OneCycle(
        cycle_min_lr=0.1, cycle_max_lr=1.0, cycle_first_step_size=10, decay_lr_rate=0.5,
        decay_step_size=5,
    )  # fmt: skip
    assert schedule.lr_at(0, 0) == 0.1
    assert schedule.lr_at(5, 0) == pytest.approx(0.1 + 0.9 * 0.5)
    assert schedule.lr_at(10, 0) == pytest.approx(1.0)
    assert schedule.lr_at(15, 0) == pytest.approx(0.1 + 0.9 * 0.5)
    assert schedule.lr_at(20, 0) == pytest.approx(0.1)
    assert schedule.lr_at(21, 0) == pytest.approx(0.1 / (1 + 0.5 * 1 / 5))
    assert schedule.lr_at(30, 0) == pytest.approx(0.1 / (1 + 0.5 * 10 / 5))
    stairs = dataclasses.replace(schedule, cycle_first_stair_count=2)
    assert [stairs.lr_at(s, 0) for s in (4, 5, 9, 10)] == pytest.approx([0.1, 0.55, 0.55, 1.0])
    no_decay = dataclasses.replace(schedule, decay_step_size=0)
    assert no_decay.lr_at(30, 0) == 0.1


def test_lr_range_test():
    schedule = LRRangeTest(lr_range_test_min_lr=0.01, lr_range_test_step_size=10,
                           lr_range_test_step_rate=2.0)  # fmt: skip
    assert schedule.lr_at(0, 0) == 0.01
    assert schedule.lr_at(5, 0) == pytest.approx(0.01 * (1 + 2.0 * 0.5))
    staircase = dataclasses.replace(schedule, lr_range_test_staircase=True)
    assert [staircase.lr_at(s, 0) for s in (5, 10)] == pytest.approx([0.01, 0.03])


def test_config_lr_at_uses_the_scheduler_and_the_optimizer_lr():
    params = {"warmup_num_steps": 4, "warmup_type": "linear"}
    config = Config.from_dict(
        {"optimizer": {"params": {"lr": 0.5}}, "scheduler": {"type": "WarmupLR", "params": params}}
    )
    assert [config.lr_at(s) for s in range(6)] == pytest.approx([0, 0, 0.125, 0.25, 0.375, 0.5])


# -- property: configs drawn from the schema -------------------------------------------------------

sizes = st.integers(0, 10**10)
fractions = st.floats(0, 0.999)
VALID = {
    "zero_optimization.stage": st.integers(0, 3),
    "zero_optimization.reduce_bucket_size": sizes | st.just("auto"),
    "zero_optimization.allgather_bucket_size": sizes,
    "zero_optimization.overlap_comm": st.booleans(),
    "zero_optimization.stage3_prefetch_bucket_size": sizes | st.just("auto"),
    "zero_optimization.stage3_max_live_parameters": sizes.map(float),
    "zero_optimization.stage3_max_reuse_distance": sizes,
    "zero_optimization.stage3_param_persistence_threshold": sizes | st.just("auto"),
    "zero_optimization.offload_optimizer.device": st.just("none"),
    "zero_optimization.offload_optimizer.pin_memory": st.booleans(),
    "zero_optimization.offload_param.buffer_count": st.integers(0, 16),
    "zero_optimization.contiguous_gradients": st.booleans(),
    "optimizer.type": st.sampled_from(["Adam", "AdamW", "adamw", "ADAM"]),
    "optimizer.params.lr": st.floats(0, 1) | st.just("auto"),
    "optimizer.params.betas": st.tuples(fractions, fractions).map(list),
    "optimizer.params.eps": st.floats(1e-12, 1e-3),
    "optimizer.params.weight_decay": st.floats(0, 1),
    "bf16.enabled": st.booleans() | st.just("auto"),
    "fp16.loss_scale": st.floats(0, 2**16),
    "fp16.initial_scale_power": st.integers(0, 32),
    "fp16.loss_scale_window": st.integers(1, 10_000),
    "fp16.hysteresis": st.integers(1, 8),
    "fp16.min_loss_scale": st.floats(1e-4, 8),
    "gradient_clipping": st.floats(0, 10) | st.just("auto"),
    "steps_per_print": st.integers(1, 10**6),
    "communication_data_type": st.sampled_from(["fp32", "bf16", "fp16", None]),
    "data_types.grad_accum_dtype": st.sampled_from(["fp32", "bf16", "float32"]),
    "fzero.alignment": st.integers(1, 256),
    "fzero.nonfinite_grads": st.sampled_from(["skip", "error", "apply"]),
    "fzero.deterministic": st.booleans(),
}
INVALID = {
    "zero_optimization.stage": [4, -1, "3", True, 2.5],
    "zero_optimization.reduce_bucket_size": [-1, "big", 1.5, None],
    "zero_optimization.allgather_bucket_size": [-3, "big", False],
    "zero_optimization.overlap_comm": ["true", 1, None],
    "zero_optimization.stage3_max_live_parameters": [-1.0, "all"],
    "zero_optimization.offload_optimizer.device": ["gpu", "disk", 0],
    "zero_optimization.offload_param.buffer_count": [-1, "4"],
    "zero_optimization.zero_quantized_gradients": [True],
    "optimizer.type": ["SGD", "Lion", 3],
    "optimizer.params.lr": [-1e-3, "fast", [0.1]],
    "optimizer.params.betas": [[0.9, 1.0], [0.9], [-0.1, 0.9], "0.9"],
    "optimizer.params.eps": [0, -1e-8],
    "optimizer.params.weight_decay": [-0.1, True],
    "bf16.enabled": ["yes", 1],
    "fp16.loss_scale": [-1, "dynamic"],
    "fp16.initial_scale_power": [-1, 500, 1.5],
    "fp16.loss_scale_window": [0],
    "fp16.hysteresis": [0, -2],
    "fp16.min_loss_scale": [0, -1],
    "gradient_clipping": [-0.5, "none"],
    "steps_per_print": [0, "10"],
    "communication_data_type": ["int8", 32],
    "data_types.grad_accum_dtype": ["fp64"],
    "fzero.alignment": [0, -16],
    "fzero.nonfinite_grads": ["ignore", 1],
    "fzero.deterministic": ["yes", 0],
    "amp": [{"enabled": True}],
}


@st.composite
def valid_configs(draw) -> dict:
    data: dict = {}
    for path in draw(st.lists(st.sampled_from(sorted(VALID)), unique=True, max_size=12)):
        data = with_key(data, path, draw(VALID[path]))
    bf16 = data.get("bf16", {}).get("enabled") is True
    if bf16 and data.get("communication_data_type") == "fp16":
        del data["communication_data_type"]  # a contradiction: bf16 gradients overflow fp16
    if draw(st.booleans()):
        micro, accumulation, world = (draw(st.integers(1, 8)) for _ in range(3))
        batch = {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": accumulation,
            "train_batch_size": micro * accumulation * world,
        }
        for key in draw(st.lists(st.sampled_from(sorted(batch)), unique=True)):
            data[key] = batch[key]
    name = draw(st.sampled_from([None, *SCHEDULERS]))
    if name is not None:
        params = {"total_num_steps": draw(st.integers(1, 10**5))}
        if name == "OneCycle":
            params = {"cycle_min_lr": 0.01, "cycle_max_lr": 0.1, "cycle_momentum": False}
        if name in ("WarmupLR", "LRRangeTest"):
            params = {}
        data["scheduler"] = {"type": name, "params": params}
    return data


@settings(max_examples=100, deadline=None)
@given(data=valid_configs())
def test_every_valid_drawn_config_loads_and_round_trips(data):
    config = Config.from_dict(data)
    assert Config.from_dict(config.to_dict()) == config
    sizes = [data.get(key) for key in ("train_batch_size", "train_micro_batch_size_per_gpu")]
    accumulation = data.get("gradient_accumulation_steps", 1)
    world_size = sizes[0] // (sizes[1] * accumulation) if None not in sizes else 1
    resolved = config.resolve(
        world_size=world_size, hidden_size=64, param_numel=10**6, total_num_steps=10
    )
    assert resolved.unresolved_keys() == []


@settings(max_examples=100, deadline=None)
@given(data=valid_configs(), path=st.sampled_from(sorted(INVALID)), pick=st.integers(0, 10))
def test_every_one_key_mutation_is_reported_at_that_key(data, path, pick):
    values = INVALID[path]
    mutated = with_key(data, path, values[pick % len(values)])
    with pytest.raises(ConfigError) as info:
        Config.from_dict(mutated)
    assert info.value.path.split("[")[0] == path, str(info.value)


@settings(max_examples=100, deadline=None)
@given(data=valid_configs(), path=st.sampled_from(sorted(VALID)), cut=st.integers(1, 3))
def test_a_misspelt_key_is_reported_at_the_misspelling(data, path, cut):
    """Inside a block a typo is an error at its path; at the top level, where DeepSpeed ignores
    keys it does not know, it is a warning naming it."""
    *parents, last = path.split(".")
    typo = ".".join([*parents, last[:-cut] + "x"])
    if not parents:
        with pytest.warns(ConfigWarning, match=f"ignored top-level keys.*{typo}"):
            Config.from_dict(with_key(data, typo, 1))
        return
    with pytest.raises(ConfigError) as info:
        Config.from_dict(with_key(data, typo, 1))
    assert info.value.path == typo


# -- the docs table lists every key ----------------------------------------------------------------


def implemented_paths(cls: type = Config, prefix: str = "") -> set[str]:
    """Every dataclass field of the config as a DeepSpeed JSON path."""
    paths = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        blocks = [a for a in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(a)]
        name = (
            f"params.{f.name}" if cls.__name__ == "OptimizerConfig" and f.name != "type" else f.name
        )
        if f.name == "scheduler":
            paths |= {"scheduler.type"}
            for scheduler in SCHEDULERS.values():
                paths |= implemented_paths(scheduler, "scheduler.params.")
        elif blocks:
            paths |= implemented_paths(blocks[0], f"{prefix}{f.name}.")
        else:
            paths.add(prefix + name)
    return paths


def test_docs_table_lists_every_key_and_only_known_keys():
    text = (Path(__file__).parent.parent / "docs" / "config.md").read_text()
    rows = set(re.findall(r"^\| `([^`]+)` \|", text, flags=re.MULTILINE))
    expected = implemented_paths() | set(RULES) | {"bfloat16"}
    assert expected - rows == set(), "keys missing from docs/config.md"
    offload_blocks = {"zero_optimization.offload_optimizer", "zero_optimization.offload_param"}
    assert rows - expected - offload_blocks == set(), "unknown keys in the docs"
    for alias in ALIASES:
        assert alias.rpartition(".")[2] in text
