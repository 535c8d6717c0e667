"""DeepSpeed keys that fzero reads but does not implement: warned, or rejected.

Every DeepSpeed key is one of three things in fzero (``docs/config.md`` lists them all):

- implemented: a field of a ``Config`` block, with DeepSpeed's meaning;
- warned: accepted, with a one-time ``ConfigWarning`` that says why it has no effect here;
- rejected: a ``ConfigError``, unless the value asks for nothing (``false``, ``null``, a block
  with ``"enabled": false``, or the one value fzero always behaves as), which is accepted silently.

The tables here are keyed by the JSON path of the key. ``ALIASES`` maps DeepSpeed's alternative
spellings (the pydantic field names behind ``stage3_*`` aliases) to the name fzero stores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fzero.config.notes import note, suggest, warn_no_effect
from fzero.errors import ConfigError, ConfigTypeError


def _off(value: Any) -> bool:
    """True for a value that switches a feature off: false, null, {}, or enabled: false."""
    if isinstance(value, dict):
        return not value or value.get("enabled") is False or value.get("enabled") == "auto"
    return value is None or value is False


def _nothing_enabled(value: Any) -> bool:
    """True for a block in which no technique says ``"enabled": true``, at any depth: DeepSpeed's
    compression and data-efficiency blocks switch each technique on with its own
    ``enabled`` flag (``deepspeed/compression/config.py``, ``runtime/data_pipeline/config.py``)."""
    if isinstance(value, dict):
        return value.get("enabled") is not True and all(map(_nothing_enabled, value.values()))
    return not isinstance(value, list) or all(map(_nothing_enabled, value))


def _never(value: Any) -> bool:
    return False


def _always(value: Any) -> bool:
    return True


def _equals(*expected: Any) -> Callable[[Any], bool]:
    """Accepts exactly the given values (``1 == True`` does not count)."""

    def accepts(value: Any) -> bool:
        return any(value == e and type(value) is type(e) for e in expected)

    return accepts


def _all_false(value: Any) -> bool:
    """A block whose every switch is off (``activation_checkpointing`` with nothing enabled)."""
    return isinstance(value, dict) and not any(v is True for v in value.values())


@dataclass(frozen=True)
class Rule:
    """What fzero does with a DeepSpeed key it does not implement.

    ``silent`` says which values ask for nothing fzero lacks: what fzero does anyway, or a
    feature switched off. Those are accepted without a warning (and listed in one INFO line).
    Any other value is an error when ``rejected``, else accepted with a one-time
    ``ConfigWarning`` giving ``reason``. ``keys`` lists a warned block's sub-keys so that typos
    inside it are still caught.
    """

    reason: str
    silent: Callable[[Any], bool] = _never
    rejected: bool = False
    keys: tuple[str, ...] = ()

    @property
    def warned(self) -> bool:
        return not self.rejected


def warned(reason: str, silent: Callable[[Any], bool] = _never, keys: tuple[str, ...] = ()) -> Rule:
    return Rule(reason, silent, False, keys)


def rejected(reason: str, silent: Callable[[Any], bool] = _off) -> Rule:
    return Rule(reason, silent, True)


_MONITOR = "fzero reports loss, grad_norm and lr in train_step's metrics; log them yourself"
_NO_OFFLOAD = "it only tunes CPU/NVMe offload, which fzero does not implement"
_NO_ZERO_PP = "ZeRO++ (hierarchical partitions, quantized collectives) is not implemented"

_FALSE, _TRUE = _equals(False), _equals(True)
_GATHERS = "fzero.full_state_dict always gathers the full parameters; fzero.save writes shards"

# Keys are DeepSpeed's (deepspeed/runtime/constants.py, runtime/config.py for the top level,
# runtime/zero/config.py for zero_optimization, runtime/precision_config.py for fp16 and bf16).
RULES: dict[str, Rule] = {
    # -- top level ------------------------------------------------------------------------------
    "wall_clock_breakdown": warned(
        "fzero does not time step phases; simulate(schedule) gives a timeline", _FALSE
    ),
    "memory_breakdown": warned("fzero does not print memory breakdowns", _FALSE),
    "dump_state": warned(
        "fzero has no engine state to print; print(state.schedule) instead", _FALSE
    ),
    "prescale_gradients": warned(
        "fzero averages gradients inside its reduce; where the division happens is its choice",
        _FALSE,
    ),
    "gradient_predivide_factor": warned(
        "fzero averages gradients inside its reduce; where the division happens is its choice",
        lambda value: value == 1 and not isinstance(value, bool),
    ),
    # Both only concern optimizers other than DeepSpeed's own; fzero always runs its AdamW.
    "zero_allow_untested_optimizer": warned("fzero only runs its own AdamW", _always),
    "zero_force_ds_cpu_optimizer": warned("fzero has no CPU optimizer", _always),
    "disable_allgather": warned("fzero's schedule decides how updated shards are gathered", _FALSE),
    "dataloader_drop_last": warned("fzero does not build data loaders", _FALSE),
    "vocabulary_size": warned(
        "DeepSpeed only uses it for a tensor-core alignment warning", _always
    ),
    "graph_harvesting": warned("fzero does not capture CUDA graphs", _FALSE),
    "use_data_before_expert_parallelism": warned("fzero has no expert parallelism", _FALSE),
    "seq_parallel_communication_data_type": warned("fzero has no sequence parallelism", _always),
    "managed_gradient_accumulation": warned(
        "fzero's train_step always accumulates the micro-batches it is given", _TRUE
    ),
    "log_level": warned(
        'fzero logs on the "fzero" logger; set its level with logging.getLogger("fzero")',
        lambda value: value is None,
    ),
    "pipeline": warned(
        "DeepSpeed reads it only for a PipelineModule; fzero has no pipelines", _always
    ),
    "checkpoint": warned(
        "fzero.save and fzero.load have their own sharded format",
        lambda value: _off(value) or _all_false(value),
    ),
    "aio": warned(f"asynchronous I/O settings: {_NO_OFFLOAD}", _always),
    "compile": warned(
        "fzero does not compile the model; apply torch.compile yourself",
        # DeepSpeed compiles only when asked (deepcompile, or engine.compile()); "disable": false
        # is axolotl's way of asking, so it warns.
        lambda value: (
            isinstance(value, dict)
            and not value.get("deepcompile", False)
            and not value.get("enabled", False)
            and value.get("disable", True) is not False
        ),
    ),
    "autotuning": warned("fzero has no autotuner; simulate(schedule) compares bucket sizes", _off),
    "flops_profiler": warned("fzero has no FLOPs profiler", _off),
    "comms_logger": warned(
        "fzero does not log collectives; print(state.schedule) lists them", _off
    ),
    "timers": warned("fzero has no timers", _nothing_enabled),
    "tensorboard": warned(_MONITOR, _off),
    "wandb": warned(_MONITOR, _off),
    "csv_monitor": warned(_MONITOR, _off),
    "comet": warned(_MONITOR, _off),
    "activation_checkpointing": warned(
        "DeepSpeed applies it only to models that call deepspeed.checkpointing; "
        "use torch.utils.checkpoint in the model",
        _all_false,
        keys=(
            "partition_activations",
            "contiguous_memory_optimization",
            "cpu_checkpointing",
            "number_checkpoints",
            "synchronize_checkpoint_boundary",
            "profile",
        ),
    ),
    "gradient_allreduce_op": rejected(
        'fzero averages gradients over ranks; only "mean" is supported', _equals("mean")
    ),
    "sparse_gradients": rejected("sparse (CSR) gradients are not supported"),
    "amp": rejected("NVIDIA apex AMP is not supported; use bf16"),
    "torch_autocast": rejected("torch.autocast is not applied by fzero; use bf16"),
    "sparse_attention": rejected("DeepSpeed's sparse attention kernels are not available"),
    "elasticity": rejected("elastic training is not implemented"),
    "progressive_layer_drop": rejected("progressive layer drop is not implemented"),
    "curriculum_learning": rejected("curriculum learning is not implemented"),
    "data_efficiency": rejected(
        "data efficiency (curriculum, random-LTD) is not implemented", _nothing_enabled
    ),
    "eigenvalue": rejected("eigenvalue computation is not implemented"),
    "compression_training": rejected("compression training is not implemented", _nothing_enabled),
    "quantize_training": rejected("quantized training (MoQ) is not implemented"),
    "weight_quantization": rejected("weight quantization is not implemented"),
    "hybrid_engine": rejected("the RLHF hybrid engine is not implemented"),
    "expert_parallel": rejected("expert parallelism is not implemented"),
    "tensor_parallel": rejected(
        "tensor parallelism is not implemented",
        lambda value: isinstance(value, dict) and value.get("autotp_size", 0) in (0, 1),
    ),
    # -- zero_optimization ----------------------------------------------------------------------
    "zero_optimization.contiguous_gradients": warned(
        "fzero's gradients always live in contiguous flat buffers", _TRUE
    ),
    "zero_optimization.reduce_scatter": warned(
        "fzero's schedule picks reduce-scatter or all-reduce for each stage", _TRUE
    ),
    "zero_optimization.allgather_partitions": warned(
        "fzero always all-gathers updated shards", _TRUE
    ),
    "zero_optimization.use_multi_rank_bucket_allreduce": warned(
        "fzero's schedule decides how buckets are reduced", _TRUE
    ),
    # Sub-groups only tile the optimizer step (DeepSpeed: for offload); no value changes results.
    "zero_optimization.sub_group_size": warned(
        "fzero updates each flat shard in one fused kernel; sub-groups only tile offload", _always
    ),
    "zero_optimization.load_from_fp32_weights": warned(
        "fzero checkpoints always hold the fp32 master weights", _TRUE
    ),
    "zero_optimization.elastic_checkpoint": warned(
        "fzero checkpoints have their own format (and DeepSpeed deprecated this key)", _FALSE
    ),
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": warned(_GATHERS, _always),
    "zero_optimization.stage3_gather_fp16_weights_on_model_save": warned(_GATHERS, _always),
    "zero_optimization.stage3_model_persistence_threshold": warned(
        "fzero bounds persistent parameters with stage3_param_persistence_threshold only"
    ),
    "zero_optimization.stage3_module_granularity_threshold": warned(
        "fzero gathers whole units (repeated modules, the root), never single small modules",
        _equals(0),
    ),
    "zero_optimization.stage3_use_all_reduce_for_fetch_params": warned(
        "fzero fetches parameters with all-gather", _FALSE
    ),
    "zero_optimization.stage3_allgather_sequential": warned(
        "fzero's schedule gathers whole units from flat buffers", _FALSE
    ),
    "zero_optimization.leaf_module": warned(
        "fzero's units already gather each repeated module as one piece",
        lambda value: isinstance(value, dict) and not any(value.values()),
    ),
    "zero_optimization.ignore_unused_parameters": warned(
        "fzero reduces whole flat buffers and never errors on unused parameters", _TRUE
    ),
    "zero_optimization.round_robin_gradients": warned(_NO_OFFLOAD, _always),
    "zero_optimization.cpu_offload_use_pin_memory": warned(_NO_OFFLOAD, _always),
    "zero_optimization.save_muon_momentum_buffer_in_memory": warned(_NO_OFFLOAD, _FALSE),
    # DeepSpeed's stage-3 linear that saves activation memory; false asks for plain nn.Linear,
    # which is what runs here, and true asks for a saving fzero's units give in their own way.
    "zero_optimization.memory_efficient_linear": warned("fzero does not patch nn.Linear", _always),
    "zero_optimization.override_module_apply": warned(
        "fzero does not patch nn.Module.apply", _TRUE
    ),
    "zero_optimization.log_trace_cache_warnings": warned("fzero has no trace cache", _FALSE),
    "zero_optimization.enable_sanity_checks": warned(
        "fzero checks every schedule with verify(schedule)", _FALSE
    ),
    "zero_optimization.pipeline_loading_checkpoint": warned("fzero has no pipeline engine", _FALSE),
    "zero_optimization.cpu_offload": rejected(
        "optimizer offload is not implemented (this is the deprecated spelling of "
        'offload_optimizer.device "cpu")'
    ),
    "zero_optimization.cpu_offload_param": rejected(
        "parameter offload is not implemented (this is the deprecated spelling of "
        'offload_param.device "cpu")'
    ),
    "zero_optimization.zero_hpz_partition_size": rejected(_NO_ZERO_PP, lambda v: v in (0, 1)),
    "zero_optimization.zero_quantized_weights": rejected(_NO_ZERO_PP),
    "zero_optimization.zero_quantized_nontrainable_weights": rejected(_NO_ZERO_PP),
    "zero_optimization.zero_quantized_gradients": rejected(_NO_ZERO_PP),
    "zero_optimization.zeropp_loco_param": rejected(_NO_ZERO_PP),
    "zero_optimization.mics_shard_size": rejected("MiCS is not implemented", _equals(-1)),
    "zero_optimization.mics_hierarchical_params_gather": rejected("MiCS is not implemented"),
    "zero_optimization.legacy_stage1": rejected("the legacy stage 1 is not implemented"),
    "zero_optimization.zenflow": rejected("ZenFlow is not implemented"),
    # -- optimizer ------------------------------------------------------------------------------
    "optimizer.legacy_fusion": warned("fzero runs its own fused AdamW", _FALSE),
    # deepspeed/runtime/engine.py (_configure_basic_optimizer) raises on it, whatever its value.
    "optimizer.params.max_grad_norm": rejected(
        "'max_grad_norm' is not supported as an optimizer parameter (DeepSpeed refuses it "
        "too): use the top-level gradient_clipping instead",
        _never,
    ),
    "optimizer.params.amsgrad": rejected("AMSGrad is not implemented", _FALSE),
    # -- precision ------------------------------------------------------------------------------
    "fp16.fused_mode": warned("fzero has one fused optimizer path", _always),
    "fp16.fp16_master_weights_and_grads": rejected("fzero keeps fp32 master weights"),
    "bf16.immediate_grad_update": warned(
        "fzero accumulates gradients in its flat buffers; the update runs at the step", _FALSE
    ),
    "bf16.check_grad_overflow": warned(
        "fzero.nonfinite_grads decides what a non-finite gradient does (default: skip the step)",
        _always,
    ),
    "bf16.bf16_master_weights_and_grads": rejected("fzero keeps fp32 master weights"),
    "bf16.bf16_optimizer_states": rejected("fzero keeps fp32 optimizer states"),
}

ALIASES: dict[str, str] = {
    "seq_parallel_comm_data_type": "seq_parallel_communication_data_type",  # the old name
    "zero_optimization.prefetch_bucket_size": "stage3_prefetch_bucket_size",
    "zero_optimization.param_persistence_threshold": "stage3_param_persistence_threshold",
    "zero_optimization.max_live_parameters": "stage3_max_live_parameters",
    "zero_optimization.max_reuse_distance": "stage3_max_reuse_distance",
    "zero_optimization.model_persistence_threshold": "stage3_model_persistence_threshold",
    "zero_optimization.gather_16bit_weights_on_model_save": (
        "stage3_gather_16bit_weights_on_model_save"
    ),
    "zero_optimization.module_granularity_threshold": "stage3_module_granularity_threshold",
    "zero_optimization.use_all_reduce_for_fetch_params": "stage3_use_all_reduce_for_fetch_params",
    "zero_optimization.allgather_sequential": "stage3_allgather_sequential",
}


def apply_rule(path: str, value: Any) -> bool:
    """Accept quietly, warn about or reject the unimplemented key at ``path``; False if no rule
    names it. ``"auto"`` in a warned key is quiet: DeepSpeed drops it and uses its default."""
    rule = RULES.get(path)
    if rule is None:
        return False
    if rule.keys:
        if not isinstance(value, dict):
            raise ConfigTypeError(path, f"expected an object, got {value!r}")
        for key in value:
            if key not in rule.keys:
                raise ConfigError(f"{path}.{key}", f"unknown key{suggest(key, rule.keys)}")
    if rule.silent(value) or (rule.warned and value == "auto"):
        note("accepted", path)
        return True
    if rule.rejected:
        raise ConfigError(path, f"unsupported: {rule.reason} (got {value!r})")
    warn_no_effect(path, rule.reason)
    return True


def known_keys(path: str) -> list[str]:
    """The warned, rejected and alias keys directly under ``path`` (for suggestions)."""
    prefix = f"{path}." if path else ""
    names = [key[len(prefix) :] for key in (*RULES, *ALIASES) if key.startswith(prefix)]
    return [name for name in names if "." not in name]
