"""The DeepSpeed key table, ``zero_optimization`` block: the keys fzero warns about or rejects.

Keys are DeepSpeed's (``deepspeed/runtime/zero/config.py``); the implemented ones are fields of
``ZeroConfig`` (``zero_block.py``), and their ``stage3_*`` alternative spellings are ``ALIASES`` in
``keys.py``. What a rule means: ``rules.py``.
"""

from __future__ import annotations

from fzero.config.rules import (
    FALSE,
    NO_OFFLOAD,
    TRUE,
    Rule,
    always,
    equals,
    rejected,
    warned,
)

_NO_ZERO_PP = "ZeRO++ (hierarchical partitions, quantized collectives) is not implemented"
_GATHERS = "fzero.full_state_dict always gathers the full parameters; fzero.save writes shards"

ZERO_RULES: dict[str, Rule] = {
    "zero_optimization.contiguous_gradients": warned(
        "fzero's gradients always live in contiguous flat buffers", TRUE
    ),
    "zero_optimization.reduce_scatter": warned(
        "fzero's schedule picks reduce-scatter or all-reduce for each stage", TRUE
    ),
    "zero_optimization.allgather_partitions": warned(
        "fzero always all-gathers updated shards", TRUE
    ),
    "zero_optimization.use_multi_rank_bucket_allreduce": warned(
        "fzero's schedule decides how buckets are reduced", TRUE
    ),
    # Sub-groups only tile the optimizer step (DeepSpeed: for offload); no value changes results.
    "zero_optimization.sub_group_size": warned(
        "fzero updates each flat shard in one fused kernel; sub-groups only tile offload", always
    ),
    "zero_optimization.load_from_fp32_weights": warned(
        "fzero checkpoints always hold the fp32 master weights", TRUE
    ),
    "zero_optimization.elastic_checkpoint": warned(
        "fzero checkpoints have their own format (and DeepSpeed deprecated this key)", FALSE
    ),
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": warned(_GATHERS, always),
    "zero_optimization.stage3_gather_fp16_weights_on_model_save": warned(_GATHERS, always),
    "zero_optimization.stage3_model_persistence_threshold": warned(
        "fzero bounds persistent parameters with stage3_param_persistence_threshold only"
    ),
    "zero_optimization.stage3_module_granularity_threshold": warned(
        "fzero gathers whole units (repeated modules, the root), never single small modules",
        equals(0),
    ),
    "zero_optimization.stage3_use_all_reduce_for_fetch_params": warned(
        "fzero fetches parameters with all-gather", FALSE
    ),
    "zero_optimization.stage3_allgather_sequential": warned(
        "fzero's schedule gathers whole units from flat buffers", FALSE
    ),
    "zero_optimization.leaf_module": warned(
        "fzero's units already gather each repeated module as one piece",
        lambda value: isinstance(value, dict) and not any(value.values()),
    ),
    "zero_optimization.ignore_unused_parameters": warned(
        "fzero reduces whole flat buffers and never errors on unused parameters", TRUE
    ),
    "zero_optimization.round_robin_gradients": warned(NO_OFFLOAD, always),
    "zero_optimization.cpu_offload_use_pin_memory": warned(NO_OFFLOAD, always),
    "zero_optimization.save_muon_momentum_buffer_in_memory": warned(NO_OFFLOAD, FALSE),
    # DeepSpeed's stage-3 linear that saves activation memory; false asks for plain nn.Linear,
    # which is what runs here, and true asks for a saving fzero's units give in their own way.
    "zero_optimization.memory_efficient_linear": warned("fzero does not patch nn.Linear", always),
    "zero_optimization.override_module_apply": warned("fzero does not patch nn.Module.apply", TRUE),
    "zero_optimization.log_trace_cache_warnings": warned("fzero has no trace cache", FALSE),
    "zero_optimization.enable_sanity_checks": warned(
        "fzero checks every schedule with verify(schedule)", FALSE
    ),
    "zero_optimization.pipeline_loading_checkpoint": warned("fzero has no pipeline engine", FALSE),
    "zero_optimization.cpu_offload": rejected(
        "this is DeepSpeed's deprecated spelling of optimizer offload: write "
        '"offload_optimizer": {"device": "cpu"} in zero_optimization instead'
    ),
    "zero_optimization.cpu_offload_param": rejected(
        "this is DeepSpeed's deprecated spelling of parameter offload: write "
        '"offload_param": {"device": "cpu"} in zero_optimization instead'
    ),
    "zero_optimization.zero_hpz_partition_size": rejected(_NO_ZERO_PP, lambda v: v in (0, 1)),
    "zero_optimization.zero_quantized_weights": rejected(_NO_ZERO_PP),
    "zero_optimization.zero_quantized_nontrainable_weights": rejected(_NO_ZERO_PP),
    "zero_optimization.zero_quantized_gradients": rejected(_NO_ZERO_PP),
    "zero_optimization.zeropp_loco_param": rejected(_NO_ZERO_PP),
    "zero_optimization.mics_shard_size": rejected("MiCS is not implemented", equals(-1)),
    "zero_optimization.mics_hierarchical_params_gather": rejected("MiCS is not implemented"),
    "zero_optimization.legacy_stage1": rejected("the legacy stage 1 is not implemented"),
    "zero_optimization.zenflow": rejected("ZenFlow is not implemented"),
}
