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

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fzero.errors import ConfigError, ConfigTypeError, ConfigWarning


def _off(value: Any) -> bool:
    """True for a value that switches a feature off: false, null, {}, or enabled: false."""
    if isinstance(value, dict):
        return not value or value.get("enabled") is False or value.get("enabled") == "auto"
    return value is None or value is False


def _equals(expected: Any) -> Callable[[Any], bool]:
    def accepts(value: Any) -> bool:
        return value == expected and type(value) is type(expected)

    return accepts


@dataclass(frozen=True)
class Rule:
    """What fzero does with a key it does not implement.

    ``accepts`` is None for a warned key. For a rejected key it says which values ask for
    nothing fzero lacks; those are accepted without a word. ``keys`` lists a warned block's
    sub-keys so that typos inside it are still caught.
    """

    reason: str
    accepts: Callable[[Any], bool] | None = None
    keys: tuple[str, ...] = ()

    @property
    def warned(self) -> bool:
        return self.accepts is None


def warned(reason: str, keys: tuple[str, ...] = ()) -> Rule:
    return Rule(reason, None, keys)


def rejected(reason: str, accepts: Callable[[Any], bool] = _off) -> Rule:
    return Rule(reason, accepts)


_MONITOR = "fzero reports loss, grad_norm and lr in train_step's metrics; log them yourself"
_NO_OFFLOAD = "it only tunes CPU/NVMe offload, which fzero does not implement"
_NO_ZERO_PP = "ZeRO++ (hierarchical partitions, quantized collectives) is not implemented"

RULES: dict[str, Rule] = {
    # -- top level ------------------------------------------------------------------------------
    "wall_clock_breakdown": warned(
        "fzero does not time step phases; simulate(schedule) gives a timeline"
    ),
    "memory_breakdown": warned("fzero does not print memory breakdowns"),
    "dump_state": warned("fzero has no engine state to print; print(state.schedule) instead"),
    "prescale_gradients": warned(
        "fzero averages gradients inside its reduce; where the division happens is its choice"
    ),
    "gradient_predivide_factor": warned(
        "fzero averages gradients inside its reduce; where the division happens is its choice"
    ),
    "zero_allow_untested_optimizer": warned("fzero only runs its own AdamW"),
    "zero_force_ds_cpu_optimizer": warned("fzero has no CPU optimizer"),
    "disable_allgather": warned("fzero's schedule decides how updated shards are gathered"),
    "dataloader_drop_last": warned("fzero does not build data loaders"),
    "vocabulary_size": warned("DeepSpeed only uses it for a tensor-core alignment warning"),
    "graph_harvesting": warned("fzero does not capture CUDA graphs"),
    "use_data_before_expert_parallelism": warned("fzero has no expert parallelism"),
    "seq_parallel_comm_data_type": warned("fzero has no sequence parallelism"),
    "pipeline": warned("DeepSpeed reads it only for a PipelineModule; fzero has no pipelines"),
    "checkpoint": warned("fzero.save and fzero.load have their own sharded format"),
    "aio": warned(f"asynchronous I/O settings: {_NO_OFFLOAD}"),
    "compile": warned("fzero does not compile the model; apply torch.compile yourself"),
    "autotuning": warned("fzero has no autotuner; simulate(schedule) compares bucket sizes"),
    "flops_profiler": warned("fzero has no FLOPs profiler"),
    "comms_logger": warned("fzero does not log collectives; print(state.schedule) lists them"),
    "timers": warned("fzero has no timers"),
    "tensorboard": warned(_MONITOR),
    "wandb": warned(_MONITOR),
    "csv_monitor": warned(_MONITOR),
    "comet": warned(_MONITOR),
    "activation_checkpointing.partition_activations": warned(
        "it splits checkpointed activations across model-parallel ranks, and fzero has no "
        "model parallelism: every rank holds whole activations"
    ),
    "activation_checkpointing.contiguous_memory_optimization": warned(
        "it copies DeepSpeed's partitioned activations into one preallocated buffer; torch's "
        "caching allocator holds fzero's checkpointed inputs"
    ),
    "activation_checkpointing.synchronize_checkpoint_boundary": warned(
        "a device synchronize at each checkpoint is a profiling aid; fzero's timeline "
        "(shard(record_timeline=True)) measures units without one"
    ),
    "activation_checkpointing.profile": warned(
        "fzero does not time checkpoint forwards; simulate(schedule) shows recompute costs"
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
    "data_efficiency": rejected("data efficiency (curriculum, random-LTD) is not implemented"),
    "eigenvalue": rejected("eigenvalue computation is not implemented"),
    "compression_training": rejected("compression training is not implemented"),
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
        "fzero's gradients always live in contiguous flat buffers"
    ),
    "zero_optimization.reduce_scatter": warned(
        "fzero's schedule picks reduce-scatter or all-reduce for each stage"
    ),
    "zero_optimization.allgather_partitions": warned("fzero always all-gathers updated shards"),
    "zero_optimization.use_multi_rank_bucket_allreduce": warned(
        "fzero's schedule decides how buckets are reduced"
    ),
    "zero_optimization.sub_group_size": warned(
        "fzero updates each flat shard in one fused kernel; sub-groups only tile offload"
    ),
    "zero_optimization.load_from_fp32_weights": warned(
        "fzero checkpoints always hold the fp32 master weights"
    ),
    "zero_optimization.elastic_checkpoint": warned(
        "fzero checkpoints have their own format (and DeepSpeed deprecated this key)"
    ),
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": warned(
        "fzero.full_state_dict always gathers the full parameters"
    ),
    "zero_optimization.stage3_gather_fp16_weights_on_model_save": warned(
        "fzero.full_state_dict always gathers the full parameters"
    ),
    "zero_optimization.stage3_model_persistence_threshold": warned(
        "fzero bounds persistent parameters with stage3_param_persistence_threshold only"
    ),
    "zero_optimization.stage3_module_granularity_threshold": warned(
        "fzero gathers whole units (repeated modules, the root), never single small modules"
    ),
    "zero_optimization.stage3_use_all_reduce_for_fetch_params": warned(
        "fzero fetches parameters with all-gather"
    ),
    "zero_optimization.stage3_allgather_sequential": warned(
        "fzero's schedule gathers whole units from flat buffers"
    ),
    "zero_optimization.leaf_module": warned(
        "fzero's units already gather each repeated module as one piece"
    ),
    "zero_optimization.ignore_unused_parameters": warned(
        "fzero reduces whole flat buffers and never errors on unused parameters"
    ),
    "zero_optimization.round_robin_gradients": warned(_NO_OFFLOAD),
    "zero_optimization.cpu_offload_use_pin_memory": warned(_NO_OFFLOAD),
    "zero_optimization.save_muon_momentum_buffer_in_memory": warned(_NO_OFFLOAD),
    "zero_optimization.memory_efficient_linear": warned("fzero does not patch nn.Linear"),
    "zero_optimization.override_module_apply": warned("fzero does not patch nn.Module.apply"),
    "zero_optimization.log_trace_cache_warnings": warned("fzero has no trace cache"),
    "zero_optimization.enable_sanity_checks": warned(
        "fzero checks every schedule with verify(schedule)"
    ),
    "zero_optimization.pipeline_loading_checkpoint": warned("fzero has no pipeline engine"),
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
    "optimizer.legacy_fusion": warned("fzero runs its own fused AdamW"),
    "optimizer.params.torch_adam": warned(
        "fzero runs its own fused AdamW, which computes the same update as torch's"
    ),
    "optimizer.params.max_grad_norm": warned("DeepSpeed ignores it too; use gradient_clipping"),
    "optimizer.params.bias_correction": rejected(
        "fzero's AdamW always applies bias correction", _equals(True)
    ),
    "optimizer.params.amsgrad": rejected("AMSGrad is not implemented", _equals(False)),
    # -- precision ------------------------------------------------------------------------------
    "fp16.fused_mode": warned("fzero has one fused optimizer path"),
    "fp16.fp16_master_weights_and_grads": rejected("fzero keeps fp32 master weights"),
    "bf16.immediate_grad_update": warned(
        "fzero accumulates gradients in its flat buffers; the update runs at the step"
    ),
    "bf16.check_grad_overflow": warned(
        "fzero.nonfinite_grads decides what a non-finite gradient does (default: skip the step)"
    ),
    "bf16.bf16_master_weights_and_grads": rejected("fzero keeps fp32 master weights"),
    "bf16.bf16_optimizer_states": rejected("fzero keeps fp32 optimizer states"),
}

ALIASES: dict[str, str] = {
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
    """Warn about or reject the unimplemented key at ``path``; False if no rule names it."""
    rule = RULES.get(path)
    if rule is None:
        return False
    if not rule.warned:
        if rule.accepts(value):
            return True
        raise ConfigError(path, f"unsupported: {rule.reason} (got {value!r})")
    if rule.keys:
        if not isinstance(value, dict):
            raise ConfigTypeError(path, f"expected an object, got {value!r}")
        for key in value:
            if key not in rule.keys:
                raise ConfigError(f"{path}.{key}", f"unknown key{suggest(key, rule.keys)}")
    warn_no_effect(path, rule.reason)
    return True


def warn_no_effect(path: str, reason: str) -> None:
    """One ``ConfigWarning`` per distinct message (Python's default warning filter)."""
    warnings.warn(
        f"{path}: accepted but has no effect in fzero: {reason}", ConfigWarning, stacklevel=2
    )


def known_keys(path: str) -> list[str]:
    """The warned, rejected and alias keys directly under ``path`` (for suggestions)."""
    prefix = f"{path}." if path else ""
    names = [key[len(prefix) :] for key in (*RULES, *ALIASES) if key.startswith(prefix)]
    return [name for name in names if "." not in name]


def suggest(key: str, candidates: Any) -> str:
    """``"; did you mean 'x'?"`` for the closest candidate, or ``""``."""
    import difflib

    guess = difflib.get_close_matches(key, sorted(candidates), n=1)
    return f"; did you mean {guess[0]!r}?" if guess else ""
