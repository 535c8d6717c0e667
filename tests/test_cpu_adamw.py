"""The CPU-offload AdamW step (torch's fused CPU kernel, chunked) against fzero's reference and
torch.optim.AdamW(fused=True).

Measured tolerance: the moments are bitwise the reference's. The master differs only through
the update's rounding: torch's kernel forms ``(-step_size * exp_avg) / denom``, the reference
``-step_size * (exp_avg / denom)``, two roundings each, so after one step the masters differ by
at most ``2**-22 * |update| + 1 ulp`` of the result. Where the update is small next to the
master, as in training, that is one ulp: at lr 1e-3 on 2**20 elements one step differed on 15
elements (1.4e-5 of them), each by exactly one ulp. Where a large update nearly cancels the
master (lr 0.1 here) the difference can be a few ulps of the small result.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fzero.kernels import WeightDecaySegments, adamw_reference
from fzero.kernels.cpu_adamw import cpu_adamw_step
from tests.test_adamw_kernel import (
    assert_identical,
    examples,
    hyperparameters,
    random_grad,
    random_shard,
    run_both,
    shard_ranges,
    step_options,
)

HYPER = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}


def ulp_distance(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """How many representable fp32 values lie between the two, element by element."""
    ordered = []
    for tensor in (actual, expected):
        bits = tensor.float().contiguous().view(torch.int32).long()
        ordered.append(torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits))
    return (ordered[0] - ordered[1]).abs()


def assert_within_update_rounding(
    actual: torch.Tensor, expected: torch.Tensor, decayed: torch.Tensor
) -> None:
    """``|actual - expected| <= 2**-22 |update| + ulp``, the update being ``expected - decayed``
    (the master after its decay, which both compute identically); Inf and NaN exactly where the
    reference has them."""
    finite = torch.isfinite(expected)
    assert_identical(actual[~finite], expected[~finite])
    a, e, d = (t[finite].double() for t in (actual, expected, decayed))
    larger = torch.maximum(a.abs(), e.abs()).float()
    ulp = (torch.nextafter(larger, torch.tensor(float("inf"))) - larger).double()
    assert bool(((a - e).abs() <= 2**-22 * (e - d).abs() + ulp).all())


@given(
    shard_ranges(),
    hyperparameters,
    st.integers(0, 99),
    st.integers(1, 3),
    st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    st.sampled_from([torch.float32, torch.bfloat16]),
    step_options,
    st.sampled_from([None, 1, 7, 64]),
)
@examples
def test_matches_the_reference_moments_bitwise_and_master_to_the_updates_rounding(
    shard, hyper, seed, steps, grad_dtype, state_dtype, options, chunk_numel
):
    """Every gradient dtype, moment dtype, grad_scale, found_inf, param_out dtype and chunk
    size, NaN/Inf gradients included: the moments equal the reference's to the bit over
    ``steps`` steps, the master after one step is within the update's rounding, param_out is
    the master in its dtype, and a skipped step changes nothing."""

    def implementation(*args, **kwargs):
        cpu_adamw_step(*args, chunk_numel=chunk_numel, **kwargs)

    actual, expected = run_both(
        implementation, shard, hyper, seed, steps, grad_dtype, state_dtype, options
    )
    assert_identical(actual[1], expected[1])
    assert_identical(actual[2], expected[2])
    skipped = options["found_inf"] is not None and options["found_inf"].item() != 0
    if skipped:  # nothing may change at all, param_out included
        for a, e in zip(actual, expected):
            assert_identical(a, e)
    elif options["param_out"] is not None:
        assert_identical(actual[3], actual[0].to(options["param_out"]))
    one, one_expected = run_both(
        implementation, shard, hyper, seed, 1, grad_dtype, state_dtype, options
    )
    numel, ranges = shard
    decayed = random_shard(numel, seed, state_dtype)[0]
    if not skipped:
        for start, end, weight_decay in ranges:
            decayed[start:end].mul_(1 - hyper["lr"] * weight_decay)
    assert_within_update_rounding(one[0], one_expected[0], decayed)


def test_one_step_on_a_large_shard_differs_within_update_rounding_on_few_elements():
    """2**20 elements over many chunks, three decay ranges, bf16 gradient, grad_scale and a bf16
    param_out: within the update's rounding (the module's bound, ``2**-22 |update|`` plus one
    ulp), on under 1e-3 of the elements. Counted in ulps the difference depends on the host's
    vector width and on where a master lands near zero: on an AVX-512 host at most 1 ulp on
    1.4e-5 of the elements; on an AVX2 host (AMD EPYC, torch 2.13) 303 elements (2.9e-4), 275
    of them by 1 ulp and the largest by 128 ulps, on a master that the update took from 5.3e-4
    to -6.4e-6, where 2**-22 of the update is about 280 ulps of the result."""
    numel = 1 << 20
    ranges = [(0, 1_000, 0.1), (1_000, 600_001, 0.0), (600_001, numel, 0.05)]
    decay = WeightDecaySegments.from_ranges(ranges, numel)
    grad = random_grad(numel, 1, torch.bfloat16)
    scale = torch.tensor(0.7)
    results = []
    for run in (cpu_adamw_step, adamw_reference):
        master, exp_avg, exp_avg_sq = random_shard(numel, 0)
        param_out = torch.empty(numel, dtype=torch.bfloat16)
        run(master, grad, exp_avg, exp_avg_sq, step=torch.tensor(5.0), decay=decay,
            grad_scale=scale, param_out=param_out, **HYPER)  # fmt: skip
        results.append((master, exp_avg, exp_avg_sq))
    (master, exp_avg, exp_avg_sq), (ref_master, ref_avg, ref_avg_sq) = results
    assert_identical(exp_avg, ref_avg)
    assert_identical(exp_avg_sq, ref_avg_sq)
    decayed = random_shard(numel, 0)[0]
    for start, end, weight_decay in ranges:
        decayed[start:end].mul_(1 - HYPER["lr"] * weight_decay)
    assert_within_update_rounding(master, ref_master, decayed)
    assert int((ulp_distance(master, ref_master) > 0).sum()) < numel // 1000


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_is_bitwise_torch_fused_adamw_on_the_cpu(weight_decay):
    """fp32 gradients, one decay, no scale: exactly torch.optim.AdamW(fused=True), three steps,
    the step count left as the caller gave it."""
    numel = 70_001
    master, _, _ = random_shard(numel, 3)
    param = torch.nn.Parameter(master.clone())
    optimizer = torch.optim.AdamW(
        [param], lr=1e-2, betas=(0.9, 0.95), eps=1e-6, weight_decay=weight_decay, fused=True
    )
    exp_avg, exp_avg_sq = torch.zeros(numel), torch.zeros(numel)
    decay = WeightDecaySegments.uniform(numel, weight_decay)
    for step in range(1, 4):
        grad = random_grad(numel, 10 + step)
        param.grad = grad.clone()
        optimizer.step()
        step_count = torch.tensor(float(step))
        cpu_adamw_step(master, grad, exp_avg, exp_avg_sq, lr=1e-2, beta1=0.9, beta2=0.95,
                       eps=1e-6, step=step_count, decay=decay)  # fmt: skip
        assert step_count.item() == step
    state = optimizer.state[param]
    assert_identical(master, param.detach())
    assert_identical(exp_avg, state["exp_avg"])
    assert_identical(exp_avg_sq, state["exp_avg_sq"])


def test_gradient_is_read_only():
    numel = 1000
    master, exp_avg, exp_avg_sq = random_shard(numel, 0)
    for dtype in (torch.float32, torch.bfloat16):
        grad = random_grad(numel, 1, dtype)
        before = grad.clone()
        cpu_adamw_step(master, grad, exp_avg, exp_avg_sq, step=torch.tensor(1.0),
                       decay=WeightDecaySegments.uniform(numel, 0.1),
                       grad_scale=torch.tensor(0.25), chunk_numel=300, **HYPER)  # fmt: skip
        assert_identical(grad, before)


def test_bad_arguments_are_rejected_before_any_work():
    decay = WeightDecaySegments.uniform(8, 0.1)
    master, exp_avg, exp_avg_sq = random_shard(8, 0)
    kwargs = {"step": torch.tensor(1.0), "decay": decay, **HYPER}
    with pytest.raises(ValueError, match="grad must be contiguous"):
        cpu_adamw_step(master, torch.zeros(7), exp_avg, exp_avg_sq, **kwargs)
    with pytest.raises(ValueError, match="chunk_numel"):
        cpu_adamw_step(master, torch.zeros(8), exp_avg, exp_avg_sq, chunk_numel=0,
                       grad_scale=torch.tensor(1.0), **kwargs)  # fmt: skip
    meta = [t.to("meta") for t in (master, exp_avg, exp_avg_sq)]
    with pytest.raises(ValueError, match="host tensors"):
        cpu_adamw_step(meta[0], torch.zeros(8, device="meta"), meta[1], meta[2],
                       step=torch.tensor(1.0, device="meta"), decay=decay, **HYPER)  # fmt: skip
