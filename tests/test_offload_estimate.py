"""estimate_memory under offload: GPU, host and file bytes per rank, formula by formula, and
against DeepSpeed's own estimates (estimate_zero3_model_states_mem_needs and
estimate_zero2_model_states_mem_needs, whose formulas are written out here)."""

from __future__ import annotations

import pytest
from torch import nn

from fzero.memory import estimate_memory

PSI, N = 1_400_000_000, 8
P = PSI // N  # 175,000,000: the shards divide exactly


def deepspeed_zero3_cpu_bytes(total, nodes=1, offload_param=True, buffer_factor=1.5):
    """DeepSpeed's stage-3 CPU estimate with zero_init: 18 bytes per parameter with both
    offloads (fp16 parameter, fp32 master, moments and gradient), 16 with the optimizer only,
    per node, times its buffer factor."""
    return total * (18 if offload_param else 16) / nodes * buffer_factor


def test_stage3_both_offloads_to_cpu_hold_deepspeeds_18_bytes_per_parameter_on_the_host():
    """fp32 gradient accumulation (fzero's default config): 12 optimizer + 4 gradient + 2
    parameter bytes per element of the shard on the host, which is DeepSpeed's 18 without its
    1.5 buffer factor; nothing stays on the GPU between steps."""
    estimate = estimate_memory(PSI, 1, 3, grad_accum_dtype="fp32", offload_optimizer="cpu",
                               offload_param="cpu")  # fmt: skip
    assert estimate.layout == "fzero"
    assert (estimate.host.parameters, estimate.host.gradients, estimate.host.optimizer_state) == (
        2 * PSI,
        4 * PSI,
        12 * PSI,
    )
    assert estimate.host_nbytes == deepspeed_zero3_cpu_bytes(PSI) / 1.5 == 18 * PSI
    assert (estimate.parameters, estimate.optimizer_state, estimate.file_nbytes) == (0, 0, 0)
    # On the GPU only the gradient shard, around the optimizer step.
    assert estimate.gpu_nbytes == estimate.transient_gradients == 4 * PSI
    assert estimate.between_steps == 0


def test_stage3_optimizer_offload_keeps_a_parameter_shard_on_the_gpu():
    """DeepSpeed: 2 Psi / N on the GPU and 16 Psi per node on the CPU. fzero: the same 2 P
    parameter shard on the GPU (gathers read it instead of casting the master); on the host
    12 + 2 (bf16 gradient shard) per element: the updated master goes up in fp32 and the device
    casts it, so no upload staging buffer is kept on the host."""
    estimate = estimate_memory(PSI, N, 3, offload_optimizer="cpu")
    assert estimate.parameters == 2 * P  # DeepSpeed's int(2 * total_params / total_gpus)
    assert (estimate.host.parameters, estimate.host.gradients, estimate.host.optimizer_state) == (
        0,
        2 * P,
        12 * P,
    )
    assert estimate.optimizer_state == 0 and estimate.gpu_nbytes == 2 * P + 2 * P


@pytest.mark.parametrize("stage", [1, 2])
def test_stage1_and_2_optimizer_offload_keep_the_full_parameters_on_the_gpu(stage):
    """DeepSpeed's stage-2 estimate with cpu_offload: 2 Psi on the GPU, which fzero's parameters
    are; the optimizer state leaves the GPU for the host."""
    estimate = estimate_memory(PSI, N, stage, offload_optimizer="cpu")
    without = estimate_memory(PSI, N, stage, layout="fzero")
    assert estimate.parameters == 2 * PSI == without.parameters
    assert estimate.gradients == without.gradients
    assert estimate.optimizer_state == 0 and without.optimizer_state == 12 * P
    assert estimate.host_nbytes == (12 + 2) * P
    assert estimate.gpu_nbytes == without.gpu_nbytes - 12 * P


def test_nvme_moves_the_optimizer_state_and_the_parameters_to_files():
    """File bytes are the states that left the host; the host keeps the gradient copy and the
    staging buffers of the largest unit's shard: optimizer_buffer_count of its three fp32
    states, and param_buffer_count + 2 of its compute-dtype shard."""
    unit = 60_000_000
    estimate = estimate_memory(PSI, N, 3, offload_optimizer="nvme", offload_param="nvme",
                               largest_unit_numel=unit, optimizer_buffer_count=4,
                               param_buffer_count=5, param_buffer_size=10_000_000)  # fmt: skip
    assert (estimate.file.parameters, estimate.file.optimizer_state) == (2 * P, 12 * P)
    assert estimate.file_nbytes == 14 * P
    assert estimate.host.total == 2 * P  # the bf16 gradient shard copied down
    assert estimate.host_staging_nbytes == 4 * 12 * (unit // N) + (5 + 2) * (unit // N) * 2
    assert estimate.host_nbytes == 2 * P + estimate.host_staging_nbytes
    optimizer_only = estimate_memory(PSI, N, 3, offload_optimizer="nvme", offload_param="cpu")
    assert optimizer_only.file_nbytes == 12 * P and optimizer_only.host.parameters == 2 * P
    # No unit size: the whole model is one unit, an upper bound on the staging.
    assert optimizer_only.host_staging_nbytes == 4 * 12 * P


def test_parameter_offload_without_optimizer_offload_moves_only_frozen_shards():
    """Trainable parameters are gathered from the master, which stays on the GPU with the
    optimizer; only the frozen parameters' compute-dtype shard can move."""
    model = nn.Linear(10, 10)  # 100 trainable weights, 10 frozen biases
    model.bias.requires_grad_(False)
    on_gpu = estimate_memory(model, 2, 3, layout="fzero")
    offloaded = estimate_memory(model, 2, 3, offload_param="cpu")
    assert on_gpu.parameters == 10 and offloaded.parameters == 0
    assert offloaded.host.parameters == 10 and offloaded.host_nbytes == 10
    assert offloaded.optimizer_state == on_gpu.optimizer_state == 50 * 12


def test_str_names_the_offload_and_its_host_and_file_bytes():
    text = str(estimate_memory(PSI, N, 3, offload_optimizer="cpu", offload_param="nvme"))
    assert "offload_optimizer cpu, offload_param nvme" in text
    assert f"host {(14 * P + 7 * (PSI // N) * 2) / 1e9:.2f} GB" in text  # 12 + 2, staging
    assert f"file {2 * P / 1e9:.2f} GB" in text
    assert "offload" not in str(estimate_memory(PSI, N, 3))


def test_bad_offload_arguments():
    with pytest.raises(ValueError, match="offload_param needs stage 3"):
        estimate_memory(PSI, N, 2, offload_param="cpu")
    with pytest.raises(ValueError, match="offload_optimizer needs stage 1, 2 or 3"):
        estimate_memory(PSI, N, 0, offload_optimizer="cpu")
    with pytest.raises(ValueError, match="offload_optimizer must be one of"):
        estimate_memory(PSI, N, 3, offload_optimizer="gpu")
    with pytest.raises(ValueError, match='layout="fzero"'):
        estimate_memory(PSI, N, 3, offload_optimizer="cpu", layout="paper")


def test_nvme_parameter_offload_keeps_max_in_cpu_elements_in_host_memory_too():
    """offload_param.max_in_cpu: that many elements of the compute-dtype shard stay in host
    memory (the file still backs the whole shard); more than the shard keeps all of it."""
    nvme = {"offload_optimizer": "nvme", "offload_param": "nvme", "largest_unit_numel": 6 * 10**7}
    kept = estimate_memory(PSI, N, 3, param_max_in_cpu=10**8, **nvme)
    assert kept.host.parameters == 2 * 10**8 and kept.file.parameters == 2 * P
    everything = estimate_memory(PSI, N, 3, param_max_in_cpu=10 * PSI, **nvme)
    assert everything.host.parameters == 2 * P
