"""The DeepSpeed key table, top level: keys outside any block, and ``activation_checkpointing``.

Keys are DeepSpeed's (``deepspeed/runtime/constants.py``, ``runtime/config.py``). What a rule
means: ``rules.py``; the implemented top-level keys are fields of ``Config`` (``config.py``).
"""

from __future__ import annotations

from fzero.config.rules import (
    FALSE,
    TRUE,
    Rule,
    all_false,
    always,
    equals,
    nothing_enabled,
    rejected,
    switched_off,
    warned,
)

_MONITOR = "fzero reports loss, grad_norm and lr in train_step's metrics; log them yourself"

TOP_LEVEL_RULES: dict[str, Rule] = {
    "wall_clock_breakdown": warned(
        "fzero does not time step phases; simulate(schedule) gives a timeline", FALSE
    ),
    "memory_breakdown": warned("fzero does not print memory breakdowns", FALSE),
    "dump_state": warned(
        "fzero has no engine state to print; print(state.schedule) instead", FALSE
    ),
    "prescale_gradients": warned(
        "fzero averages gradients inside its reduce; where the division happens is its choice",
        FALSE,
    ),
    "gradient_predivide_factor": warned(
        "fzero averages gradients inside its reduce; where the division happens is its choice",
        lambda value: value == 1 and not isinstance(value, bool),
    ),
    # Both only concern optimizers other than DeepSpeed's own; fzero always runs its AdamW.
    "zero_allow_untested_optimizer": warned("fzero only runs its own AdamW", always),
    "zero_force_ds_cpu_optimizer": warned("fzero has no CPU optimizer", always),
    "disable_allgather": warned("fzero's schedule decides how updated shards are gathered", FALSE),
    "dataloader_drop_last": warned(
        "fzero.initialize(training_data=...) builds its DataLoader with drop_last=False: "
        "the last, smaller micro-batch is kept",
        FALSE,
    ),
    "vocabulary_size": warned("DeepSpeed only uses it for a tensor-core alignment warning", always),
    "graph_harvesting": warned("fzero does not capture CUDA graphs", FALSE),
    "use_data_before_expert_parallelism": warned("fzero has no expert parallelism", FALSE),
    "seq_parallel_communication_data_type": warned("fzero has no sequence parallelism", always),
    "managed_gradient_accumulation": warned(
        "fzero's train_step always accumulates the micro-batches it is given", TRUE
    ),
    "log_level": warned(
        'fzero logs on the "fzero" logger; set its level with logging.getLogger("fzero")',
        lambda value: value is None,
    ),
    "pipeline": warned(
        "DeepSpeed reads it only for a PipelineModule; fzero has no pipelines", always
    ),
    "checkpoint": warned(
        "fzero.save and fzero.load have their own sharded format",
        lambda value: switched_off(value) or all_false(value),
    ),
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
    "autotuning": warned(
        "fzero has no autotuner; simulate(schedule) compares bucket sizes", switched_off
    ),
    "flops_profiler": warned("fzero has no FLOPs profiler", switched_off),
    "comms_logger": warned(
        "fzero does not log collectives; print(state.schedule) lists them", switched_off
    ),
    "timers": warned("fzero has no timers", nothing_enabled),
    "tensorboard": warned(_MONITOR, switched_off),
    "wandb": warned(_MONITOR, switched_off),
    "csv_monitor": warned(_MONITOR, switched_off),
    "comet": warned(_MONITOR, switched_off),
    "activation_checkpointing.partition_activations": warned(
        "it splits checkpointed activations across model-parallel ranks, and fzero has no "
        "model parallelism: every rank holds whole activations",
        FALSE,
    ),
    "activation_checkpointing.contiguous_memory_optimization": warned(
        "it copies DeepSpeed's partitioned activations into one preallocated buffer; torch's "
        "caching allocator holds fzero's checkpointed inputs",
        FALSE,
    ),
    "activation_checkpointing.synchronize_checkpoint_boundary": warned(
        "a device synchronize at each checkpoint is a profiling aid; fzero's timeline "
        "(shard(record_timeline=True)) measures units without one",
        FALSE,
    ),
    "activation_checkpointing.profile": warned(
        "fzero does not time checkpoint forwards; simulate(schedule) shows recompute costs",
        FALSE,
    ),
    "gradient_allreduce_op": rejected(
        'fzero averages gradients over ranks; only "mean" is supported', equals("mean")
    ),
    "sparse_gradients": rejected("sparse (CSR) gradients are not supported"),
    "amp": rejected("NVIDIA apex AMP is not supported; use bf16"),
    "torch_autocast": rejected("torch.autocast is not applied by fzero; use bf16"),
    "sparse_attention": rejected("DeepSpeed's sparse attention kernels are not available"),
    "elasticity": rejected("elastic training is not implemented"),
    "progressive_layer_drop": rejected("progressive layer drop is not implemented"),
    "curriculum_learning": rejected("curriculum learning is not implemented"),
    "data_efficiency": rejected(
        "data efficiency (curriculum, random-LTD) is not implemented", nothing_enabled
    ),
    "eigenvalue": rejected("eigenvalue computation is not implemented"),
    "compression_training": rejected("compression training is not implemented", nothing_enabled),
    "quantize_training": rejected("quantized training (MoQ) is not implemented"),
    "weight_quantization": rejected("weight quantization is not implemented"),
    "hybrid_engine": rejected("the RLHF hybrid engine is not implemented"),
    "expert_parallel": rejected("expert parallelism is not implemented"),
    "tensor_parallel": rejected(
        "tensor parallelism is not implemented",
        lambda value: isinstance(value, dict) and value.get("autotp_size", 0) in (0, 1),
    ),
}
