"""AdamW over a flat shard: the reference against torch.optim.AdamW, the CPU path (and the Triton
kernel under TRITON_INTERPRET=1, where triton is installed) against the reference."""

from __future__ import annotations

import importlib.util
import math
import os
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fzero.kernels import WeightDecaySegments, adamw_reference, adamw_step
from fzero.kernels.adamw import adamw_step_cpu

examples = settings(max_examples=50, deadline=None)
decays = st.sampled_from([0.0, 0.01, 0.1, 0.5])
# beta1 = 0.3 makes torch.lerp's weight 0.7, which takes its other formula.
hyperparameters = st.fixed_dictionaries(
    {
        "lr": st.sampled_from([1e-3, 1e-2, 0.1]),
        "beta1": st.sampled_from([0.9, 0.0, 0.3]),
        "beta2": st.sampled_from([0.999, 0.95]),
        "eps": st.sampled_from([1e-8, 1e-6]),
    }
)


@st.composite
def shard_ranges(draw, max_numel: int = 300) -> tuple[int, list[tuple[int, int, float]]]:
    """A shard size (0, 1, and sizes that are no multiple of any vector width) and a decay table
    with random cut points, empty ranges included."""
    numel = draw(st.integers(0, max_numel))
    cuts = sorted(draw(st.lists(st.integers(0, numel), max_size=8)) + [0, numel])
    ranges = [(a, b, draw(decays)) for a, b in zip(cuts, cuts[1:])]
    return numel, ranges if numel else []


def random_shard(numel: int, seed: int, state_dtype: torch.dtype = torch.float32):
    """master, exp_avg, exp_avg_sq; never zeros, so unwritten or misindexed elements show."""
    generator = torch.Generator().manual_seed(seed)
    master = torch.randn(numel, generator=generator)
    exp_avg = (0.1 * torch.randn(numel, generator=generator)).to(state_dtype)
    exp_avg_sq = (0.01 * torch.rand(numel, generator=generator)).to(state_dtype)
    return master, exp_avg, exp_avg_sq


def random_grad(numel: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_identical(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bitwise equal, counting NaN as equal to NaN."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


@given(shard_ranges(), hyperparameters, st.integers(1, 3), st.integers(0, 2**31 - 1))
@examples
def test_reference_is_bitwise_torch_adamw_foreach_false(shard, hyper, steps, seed):
    """fp32, no grad_scale, no found_inf: the reference is torch.optim.AdamW(foreach=False), with
    one param group per decay range, to the bit, over several steps from zero moments."""
    numel, ranges = shard
    decay = WeightDecaySegments.from_ranges(ranges, numel)
    master, _, _ = random_shard(numel, seed)
    exp_avg, exp_avg_sq = torch.zeros(numel), torch.zeros(numel)
    params = [torch.nn.Parameter(master[a:b].clone()) for a, b, _ in ranges if a < b]
    groups = [
        {"params": [param], "weight_decay": d}
        for param, (_, _, d) in zip(params, [r for r in ranges if r[0] < r[1]])
    ]
    optimizer = torch.optim.AdamW(
        groups or [torch.nn.Parameter(torch.zeros(1))],
        lr=hyper["lr"],
        betas=(hyper["beta1"], hyper["beta2"]),
        eps=hyper["eps"],
        foreach=False,
    )
    for step in range(1, steps + 1):
        grad = random_grad(numel, seed + step)
        for param, (a, b, _) in zip(params, [r for r in ranges if r[0] < r[1]]):
            param.grad = grad[a:b].clone()
        optimizer.step()
        adamw_reference(
            master, grad, exp_avg, exp_avg_sq, step=torch.tensor(float(step)), decay=decay, **hyper
        )
    if params:
        state = [optimizer.state[param] for param in params]
        assert torch.equal(master, torch.cat([param.detach() for param in params]))
        assert torch.equal(exp_avg, torch.cat([s["exp_avg"] for s in state]))
        assert torch.equal(exp_avg_sq, torch.cat([s["exp_avg_sq"] for s in state]))


@given(shard_ranges(), hyperparameters, st.sampled_from([0.25, 3.0, 1 / 1024]), st.integers(0, 99))
@examples
def test_reference_scales_low_precision_grads_before_the_torch_update(shard, hyper, scale, seed):
    """A bf16 grad with grad_scale is exactly torch's AdamW given grad.float() * grad_scale, and
    param_out is the new master rounded to bf16."""
    numel, ranges = shard
    decay = WeightDecaySegments.from_ranges(ranges, numel)
    grad = random_grad(numel, seed + 1, torch.bfloat16)
    grad_scale = torch.tensor(scale)
    master, exp_avg, exp_avg_sq = random_shard(numel, seed)
    expected = [t.clone() for t in (master, exp_avg, exp_avg_sq)]
    scaled_grad = grad.float() * grad_scale
    adamw_reference(
        expected[0],
        scaled_grad,
        expected[1],
        expected[2],
        step=torch.tensor(2.0),
        decay=decay,
        **hyper,
    )
    param_out = torch.full((numel,), float("nan"), dtype=torch.bfloat16)
    adamw_reference(
        master,
        grad,
        exp_avg,
        exp_avg_sq,
        step=torch.tensor(2.0),
        decay=decay,
        grad_scale=grad_scale,
        param_out=param_out,
        **hyper,
    )
    for actual, wanted in zip((master, exp_avg, exp_avg_sq), expected):
        assert torch.equal(actual, wanted)
    assert torch.equal(param_out, master.to(torch.bfloat16))


@given(shard_ranges(), hyperparameters, st.integers(1, 5000), st.integers(0, 99))
@examples
def test_bf16_moments_follow_the_float64_formula(shard, hyper, step, seed):
    """With bf16 moments the math is fp32 and only the stored moments are rounded: the result is
    the float64 formula to fp32 accuracy for master and to one bf16 rounding for the moments."""
    numel, ranges = shard
    decay = WeightDecaySegments.from_ranges(ranges, numel)
    master, exp_avg, exp_avg_sq = random_shard(numel, seed, torch.bfloat16)
    grad = random_grad(numel, seed + 1)
    p, g, m, v = (t.double() for t in (master, grad, exp_avg, exp_avg_sq))
    lr, beta1, beta2, eps = hyper["lr"], hyper["beta1"], hyper["beta2"], hyper["eps"]
    for a, b, d in ranges:
        p[a:b] *= 1 - lr * d
    m = m + (1 - beta1) * (g - m)
    v = v * beta2 + (1 - beta2) * g * g
    denom = v.sqrt() / math.sqrt(1 - beta2**step) + eps
    p = p - lr / (1 - beta1**step) * m / denom
    adamw_reference(
        master, grad, exp_avg, exp_avg_sq, step=torch.tensor(float(step)), decay=decay, **hyper
    )
    torch.testing.assert_close(master.double(), p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(exp_avg.double(), m, rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(exp_avg_sq.double(), v, rtol=2**-8, atol=1e-8)


def run_both(implementation, shard, hyper, seed, steps, grad_dtype, state_dtype, options):
    """Run `implementation` and the reference side by side for `steps` steps; return both."""
    numel, ranges = shard
    decay = WeightDecaySegments.from_ranges(ranges, numel)
    outputs = []
    for run in (implementation, adamw_reference):
        master, exp_avg, exp_avg_sq = random_shard(numel, seed, state_dtype)
        param_out = None
        if options["param_out"] is not None:
            param_out = torch.full((numel,), float("nan"), dtype=options["param_out"])
        for step in range(1, steps + 1):
            grad = random_grad(numel, seed + step, grad_dtype)
            if options["poison"] and numel:
                grad[seed % numel] = options["poison"]
            run(
                master,
                grad,
                exp_avg,
                exp_avg_sq,
                step=torch.tensor(float(step)),
                decay=decay,
                grad_scale=options["grad_scale"],
                found_inf=options["found_inf"],
                param_out=param_out,
                **hyper,
            )
        outputs.append(
            [master, exp_avg, exp_avg_sq] + ([param_out] if param_out is not None else [])
        )
    return outputs


step_options = st.fixed_dictionaries(
    {
        "grad_scale": st.sampled_from([None, torch.tensor(0.5), torch.tensor(1 / 3)]),
        "found_inf": st.sampled_from([None, torch.tensor(0.0), torch.tensor(1.0)]),
        "param_out": st.sampled_from([None, torch.bfloat16, torch.float16, torch.float32]),
        "poison": st.sampled_from([None, float("nan"), float("inf")]),
    }
)


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
def test_cpu_path_is_bitwise_the_reference(
    shard, hyper, seed, steps, grad_dtype, state_dtype, options, chunk_numel
):
    """adamw_step on CPU tensors (chunked, whatever the chunk size) equals the reference to the
    bit, for every dtype and option, NaN/Inf gradients included; found_inf=1 changes nothing."""
    if chunk_numel is None:
        implementation = adamw_step
    else:

        def implementation(*args, **kwargs):
            adamw_step_cpu(*args, chunk_numel=chunk_numel, **kwargs)

    actual, expected = run_both(
        implementation, shard, hyper, seed, steps, grad_dtype, state_dtype, options
    )
    for a, e in zip(actual, expected):
        assert_identical(a, e)


def test_cpu_path_is_bitwise_the_reference_on_a_shard_larger_than_its_chunks():
    """Past torch's parallel grain size and across many chunk boundaries, with every option on."""
    numel = 200_003
    shard = (numel, [(0, 1_000, 0.1), (1_000, 150_001, 0.0), (150_001, numel, 0.05)])
    options = {
        "grad_scale": torch.tensor(0.7),
        "found_inf": torch.tensor(0.0),
        "param_out": torch.bfloat16,
        "poison": float("inf"),
    }
    hyper = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
    for state_dtype in (torch.float32, torch.bfloat16):
        actual, expected = run_both(
            adamw_step, shard, hyper, 3, 2, torch.bfloat16, state_dtype, options
        )
        for a, e in zip(actual, expected):
            assert_identical(a, e)


@pytest.mark.parametrize("implementation", [adamw_reference, adamw_step])
def test_found_inf_leaves_master_moments_and_param_out_untouched(implementation):
    """A nonzero (or NaN) found_inf skips the update; nothing is written, NaN grads or not."""
    numel = 37
    decay = WeightDecaySegments.from_ranges([(0, 10, 0.1), (10, numel, 0.0)], numel)
    for flag in (1.0, float("inf"), float("nan")):
        master, exp_avg, exp_avg_sq = random_shard(numel, 0)
        param_out = torch.randn(numel).to(torch.bfloat16)
        before = [t.clone() for t in (master, exp_avg, exp_avg_sq, param_out)]
        grad = torch.full((numel,), float("nan"))
        implementation(
            master,
            grad,
            exp_avg,
            exp_avg_sq,
            lr=0.1,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            step=torch.tensor(1.0),
            decay=decay,
            found_inf=torch.tensor(flag),
            param_out=param_out,
        )
        for after, was in zip((master, exp_avg, exp_avg_sq, param_out), before):
            assert torch.equal(after, was)


@pytest.mark.parametrize(
    ("ranges", "numel", "named"),
    [
        ([(0, 5, 0.1), (6, 10, 0.0)], 10, "(6, 10, 0.0)"),  # gap
        ([(0, 5, 0.1), (4, 10, 0.0)], 10, "(4, 10, 0.0)"),  # overlap
        ([(0, 10, -0.1)], 10, "(0, 10, -0.1)"),  # negative decay
        ([(0, 10, float("nan"))], 10, "(0, 10, nan)"),  # non-finite decay
        ([(0, 6, 0.0), (6, 3, 0.1)], 10, "(6, 3, 0.1)"),  # reversed
        ([(0, 5, 0.1)], 10, "(0, 5, 0.1)"),  # stops short of numel
        ([(0, 12, 0.1)], 10, "(0, 12, 0.1)"),  # runs past numel
        ([(1, 10, 0.1)], 10, "(1, 10, 0.1)"),  # does not start at 0
        ([(5, 10, 0.1), (0, 5, 0.0)], 10, "(5, 10, 0.1)"),  # unsorted
    ],
)
def test_bad_decay_tables_raise_value_error_naming_the_range(ranges, numel, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        WeightDecaySegments.from_ranges(ranges, numel)


def test_decay_tables_drop_empty_ranges_and_merge_equal_neighbours():
    segments = WeightDecaySegments.from_ranges(
        [(0, 3, 0.1), (3, 5, 0.1), (5, 5, 0.0), (5, 9, 0), (9, 9, 0.3), (9, 12, 0.1)], 12
    )
    assert segments.ranges == ((0, 5, 0.1), (5, 9, 0.0), (9, 12, 0.1))
    assert WeightDecaySegments.from_ranges([], 0).ranges == ()
    with pytest.raises(ValueError, match="gap"):
        WeightDecaySegments(((0, 3, 0.1), (4, 9, 0.0)), 9)  # the constructor checks too


@given(shard_ranges(max_numel=200), st.integers(0, 199))
@examples
def test_device_table_bisection_finds_each_elements_segment(shard, index):
    """The kernel's search, written out: ``search_steps`` bisection steps over the starts (with
    the shard's end as sentinel) land on the segment holding ``index``."""
    numel, ranges = shard
    segments = WeightDecaySegments.from_ranges(ranges, numel)
    table = segments.device_table(torch.device("cpu"))
    starts = table.segment_starts.tolist()
    assert starts == [a for a, _, _ in segments.ranges] + [numel]
    assert table.segment_decays.tolist() == [d for _, _, d in segments.ranges]
    assert segments.device_table(torch.device("cpu")) is table  # cached
    if numel == 0:
        return
    index %= numel
    low, high = 0, len(segments.ranges)
    for _ in range(table.search_steps):
        middle = (low + high) // 2
        low, high = (middle, high) if starts[middle] <= index else (low, middle)
    start, end, _ = segments.ranges[low]
    assert start <= index < end


def test_mismatched_shards_are_rejected_before_any_work():
    decay = WeightDecaySegments.uniform(8, 0.1)
    master, exp_avg, exp_avg_sq = random_shard(8, 0)
    hyper = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "step": torch.tensor(1.0)}
    with pytest.raises(ValueError, match="grad"):
        adamw_step(master, torch.zeros(7), exp_avg, exp_avg_sq, decay=decay, **hyper)
    with pytest.raises(TypeError, match="exp_avg"):
        adamw_step(master, torch.zeros(8), exp_avg, exp_avg_sq.half(), decay=decay, **hyper)
    with pytest.raises(ValueError, match="decay covers 9"):
        adamw_step(
            master,
            torch.zeros(8),
            exp_avg,
            exp_avg_sq,
            decay=WeightDecaySegments.uniform(9, 0.1),
            **hyper,
        )


@pytest.fixture(scope="module")
def interpreted_kernel():
    """adamw_triton.py loaded afresh with TRITON_INTERPRET=1, so its kernel runs on CPU tensors.

    The variable stays set while the module's tests run, since triton imports parts of itself
    lazily. Skipped where CUDA is present: tests/gpu runs the compiled kernel there.
    """
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: tests/gpu runs the compiled kernel")
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        pytest.importorskip("triton")
        path = Path(__file__).parents[1] / "fzero" / "kernels" / "adamw_triton.py"
        spec = importlib.util.spec_from_file_location("_adamw_triton_interpreted", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module.adamw_step_triton
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


@given(
    shard_ranges(max_numel=3000),
    hyperparameters,
    st.integers(0, 99),
    st.sampled_from([torch.float32, torch.bfloat16]),
    st.sampled_from([torch.float32, torch.bfloat16]),
    step_options,
    st.sampled_from([(64, 1), (256, 2), (1024, 4)]),
)
@settings(max_examples=25, deadline=None)
def test_triton_kernel_under_the_interpreter_matches_the_reference(
    interpreted_kernel, shard, hyper, seed, grad_dtype, state_dtype, options, block
):
    """The Triton kernel's logic (blocks, tails, segments straddling blocks, flags) on the CPU.

    Not bitwise: the kernel fuses multiply-adds and forms bias corrections in float64, and the
    interpreter (unlike the GPU) rounds fp32 to bf16 by truncation. So fp32 results agree to a
    few ulps and low-precision ones to one ulp of their type. bf16 moments run one step only:
    a second would start from moments that already differ by that ulp.
    """
    block_numel, num_warps = block
    steps = 1 if state_dtype == torch.bfloat16 else 2

    def kernel(*args, **kwargs):
        interpreted_kernel(*args, block_numel=block_numel, num_warps=num_warps, **kwargs)

    actual, expected = run_both(kernel, shard, hyper, seed, steps, grad_dtype, state_dtype, options)
    for a, e in zip(actual, expected):
        if a.dtype == torch.float32:
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, equal_nan=True)
        else:
            ulp = 2**-7 if a.dtype == torch.bfloat16 else 2**-10
            torch.testing.assert_close(a, e, rtol=ulp, atol=1e-6, equal_nan=True)
