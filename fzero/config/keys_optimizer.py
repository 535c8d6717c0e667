"""The DeepSpeed key table, the optimizer step's blocks: ``optimizer``, ``fp16`` and ``bf16``.

Keys are DeepSpeed's (``deepspeed/runtime/engine.py`` for the optimizer,
``runtime/precision_config.py`` for fp16 and bf16); the implemented ones are fields of
``OptimizerConfig`` (``optimizer_block.py``), ``Fp16Config`` and ``PrecisionConfig``
(``precision_blocks.py``). What a rule means: ``rules.py``.
"""

from __future__ import annotations

from fzero.config.rules import FALSE, Rule, always, never, rejected, warned

OPTIMIZER_RULES: dict[str, Rule] = {
    "optimizer.legacy_fusion": warned("fzero runs its own fused AdamW", FALSE),
    # deepspeed/runtime/engine.py (_configure_basic_optimizer) raises on it, whatever its value.
    "optimizer.params.max_grad_norm": rejected(
        "'max_grad_norm' is not supported as an optimizer parameter (DeepSpeed refuses it "
        "too): use the top-level gradient_clipping instead",
        never,
    ),
    "optimizer.params.amsgrad": rejected("AMSGrad is not implemented", FALSE),
    # -- precision ------------------------------------------------------------------------------
    "fp16.fused_mode": warned("fzero has one fused optimizer path", always),
    "fp16.fp16_master_weights_and_grads": rejected("fzero keeps fp32 master weights"),
    "bf16.immediate_grad_update": warned(
        "fzero accumulates gradients in its flat buffers; the update runs at the step", FALSE
    ),
    "bf16.check_grad_overflow": warned(
        "fzero.nonfinite_grads decides what a non-finite gradient does (default: skip the step)",
        always,
    ),
    "bf16.bf16_master_weights_and_grads": rejected("fzero keeps fp32 master weights"),
    "bf16.bf16_optimizer_states": rejected("fzero keeps fp32 optimizer states"),
}
