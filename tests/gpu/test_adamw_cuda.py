"""The Triton AdamW kernel on a CUDA device against the torch reference on the same device."""

from __future__ import annotations

import pytest
import torch

from fzero.kernels import WeightDecaySegments, adamw_reference, adamw_step

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

HYPER = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}


def decay_table(numel: int, segments: int, seed: int) -> WeightDecaySegments:
    """`segments` random ranges alternating between decay 0.1 and 0, as biases and norms do."""
    if numel == 0:
        return WeightDecaySegments.from_ranges([], 0)
    generator = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(numel - 1, generator=generator)[: segments - 1] + 1
    bounds = [0, *sorted(cuts.tolist()), numel]
    ranges = [
        (a, b, 0.1 if i % 2 == 0 else 0.0) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))
    ]
    return WeightDecaySegments.from_ranges(ranges, numel)


def make_shard(numel, seed, grad_dtype, state_dtype, offset=0):
    """Random master/moments on the GPU; `offset` starts them off 16-byte alignment."""
    generator = torch.Generator().manual_seed(seed)

    def randn(scale=1.0, dtype=torch.float32):
        whole = scale * torch.randn(numel + offset, generator=generator)
        return whole.to(dtype).cuda()[offset:]

    master = randn()
    exp_avg = randn(0.1, state_dtype)
    exp_avg_sq = randn(0.1, state_dtype).square()
    grads = [randn(1.0, grad_dtype) for _ in range(3)]
    return master, exp_avg, exp_avg_sq, grads


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-6) -> None:
    """fp32 to a few ulps (fused multiply-adds, float64 bias corrections); low precision to one
    rounding of its type. NaN must match NaN.

    With bf16 moments, a few-ulp fp32 difference now and then lands a moment on the other side
    of a bf16 rounding, and the next update differs by up to lr * 2**-7: pass atol=1e-5 then.
    """
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol, equal_nan=True)
    else:
        torch.testing.assert_close(actual, expected, equal_nan=True)


def copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy at the same distance from 16-byte alignment as `tensor` (clone would realign)."""
    offset = tensor.data_ptr() % 16 // tensor.element_size()
    whole = torch.empty(tensor.numel() + offset, dtype=tensor.dtype, device=tensor.device)
    return whole[offset:].copy_(tensor)


def run(implementation, shard, decay, steps, options, param_out_dtype):
    """`steps` steps of `implementation` on a copy of `shard`; returns the outputs."""
    master, exp_avg, exp_avg_sq = (copy(t) for t in shard[:3])
    grads = shard[3]
    param_out = None
    if param_out_dtype is not None:
        param_out = torch.full_like(master, float("nan"), dtype=param_out_dtype)
    for step in range(1, steps + 1):
        implementation(
            master,
            grads[step - 1],
            exp_avg,
            exp_avg_sq,
            step=torch.tensor(float(step), device="cuda"),
            decay=decay,
            param_out=param_out,
            **options,
            **HYPER,
        )
    return [t for t in (master, exp_avg, exp_avg_sq, param_out) if t is not None]


SIZES = [1, 3, 1000, 2048, 4095, 4096, 4097, 1_000_003]
DTYPES = [
    # grad, state, param_out
    (torch.float32, torch.float32, None),
    (torch.bfloat16, torch.float32, torch.bfloat16),
    (torch.float32, torch.bfloat16, torch.float32),
    (torch.float16, torch.bfloat16, torch.float16),
]


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: "-".join(str(x)[6:] for x in d))
@pytest.mark.parametrize("grad_scale", [None, 0.37])
def test_kernel_matches_reference(numel, dtypes, grad_scale):
    """Three steps, random data, many segments, odd sizes, every dtype combination."""
    grad_dtype, state_dtype, param_out_dtype = dtypes
    shard = make_shard(numel, numel, grad_dtype, state_dtype)
    decay = decay_table(numel, min(numel, 300), numel)
    options = {"grad_scale": None if grad_scale is None else torch.tensor(grad_scale).cuda()}
    actual = run(adamw_step, shard, decay, 3, options, param_out_dtype)
    expected = run(adamw_reference, shard, decay, 3, options, param_out_dtype)
    for a, e in zip(actual, expected):
        assert_matches(a, e, atol=1e-5 if state_dtype == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize(
    ("block_numel", "num_warps"),
    [(512, 4), (1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 8), (4096, 16)],
)
@pytest.mark.parametrize("offset", [0, 1])
def test_every_block_shape_and_misaligned_shards_match_reference(block_numel, num_warps, offset):
    """Block shapes the benchmark sweeps, and a shard that starts off 16-byte alignment."""
    from fzero.kernels.adamw_triton import adamw_step_triton

    def kernel(*args, **kwargs):
        adamw_step_triton(*args, block_numel=block_numel, num_warps=num_warps, **kwargs)

    numel = 3 * block_numel + 5
    shard = make_shard(numel, 7, torch.bfloat16, torch.float32, offset)
    decay = decay_table(numel, 40, 7)
    options = {"grad_scale": torch.tensor(0.5).cuda(), "found_inf": torch.zeros((), device="cuda")}
    actual = run(kernel, shard, decay, 2, options, torch.bfloat16)
    expected = run(adamw_reference, shard, decay, 2, options, torch.bfloat16)
    for a, e in zip(actual, expected):
        assert_matches(a, e)


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_non_finite_gradients_propagate_like_reference_and_found_inf_skips(poison, grad_dtype):
    numel = 10_007
    shard = make_shard(numel, 3, grad_dtype, torch.float32)
    for grad in shard[3]:
        grad[::97] = poison
    decay = decay_table(numel, 20, 3)
    actual = run(adamw_step, shard, decay, 1, {}, torch.bfloat16)
    expected = run(adamw_reference, shard, decay, 1, {}, torch.bfloat16)
    for a, e in zip(actual, expected):
        assert_matches(a, e)
    master, exp_avg, exp_avg_sq, grads = shard
    for flag in (1.0, float("inf"), float("nan")):
        before = [t.clone() for t in (master, exp_avg, exp_avg_sq)]
        param_out = torch.randn(numel, device="cuda").to(torch.bfloat16)
        param_out_before = param_out.clone()
        adamw_step(
            master,
            grads[0],
            exp_avg,
            exp_avg_sq,
            step=torch.ones((), device="cuda"),
            decay=decay,
            found_inf=torch.tensor(flag, device="cuda"),
            param_out=param_out,
            **HYPER,
        )
        for after, was in zip(
            (master, exp_avg, exp_avg_sq, param_out), [*before, param_out_before]
        ):
            assert torch.equal(after, was)


def test_empty_shard_is_a_no_op():
    empty = torch.empty(0, device="cuda")
    adamw_step(
        empty,
        empty,
        empty.clone(),
        empty.clone(),
        step=torch.ones((), device="cuda"),
        decay=WeightDecaySegments.from_ranges([], 0),
        param_out=torch.empty(0, device="cuda", dtype=torch.bfloat16),
        **HYPER,
    )


@pytest.mark.parametrize("step", [1, 2, 10, 1000, 100_000])
def test_bias_corrections_match_reference_at_small_and_large_steps(step):
    """The update itself to 2e-6: the bias corrections are formed in float64 on the device;
    float32 would be off by ~6e-6 at step 1 (1 - beta2 in float32 is 1.3e-5 off)."""
    numel = 4096
    master, exp_avg, exp_avg_sq, grads = make_shard(numel, 11, torch.float32, torch.float32)
    hyper = {**HYPER, "lr": 1.0}  # an update as large as master, so master's ulp hides nothing
    decay = WeightDecaySegments.uniform(numel, 0.0)
    updates = []
    for implementation in (adamw_step, adamw_reference):
        p, m, v = master.clone(), exp_avg.clone(), exp_avg_sq.clone()
        step_tensor = torch.tensor(float(step), device="cuda")
        implementation(p, grads[0], m, v, step=step_tensor, decay=decay, **hyper)
        updates.append(p - master)
    torch.testing.assert_close(updates[0], updates[1], rtol=2e-6, atol=5e-7)


def test_matches_torch_fused_adamw():
    """A second oracle: torch's own fused CUDA AdamW, uniform decay, three steps."""
    numel = 1_000_003
    master, _, _, grads = make_shard(numel, 5, torch.float32, torch.float32)
    param = torch.nn.Parameter(master.clone())
    optimizer = torch.optim.AdamW(
        [param], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, fused=True
    )
    exp_avg, exp_avg_sq = torch.zeros_like(master), torch.zeros_like(master)
    decay = WeightDecaySegments.uniform(numel, 0.1)
    for step, grad in enumerate(grads, start=1):
        param.grad = grad
        optimizer.step()
        adamw_step(
            master,
            grad,
            exp_avg,
            exp_avg_sq,
            step=torch.tensor(float(step), device="cuda"),
            decay=decay,
            **HYPER,
        )
    torch.testing.assert_close(master, param.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(exp_avg, optimizer.state[param]["exp_avg"], rtol=1e-5, atol=1e-7)


def test_step_never_syncs_with_the_host_and_replays_in_a_cuda_graph():
    """After the first call (which compiles and uploads the segment table), a step issues no
    host sync, so it can be captured once and replayed with the step count advancing on the
    device."""
    numel = 100_003
    master, exp_avg, exp_avg_sq, grads = make_shard(numel, 13, torch.bfloat16, torch.float32)
    decay = decay_table(numel, 50, 13)
    state = [master.clone(), exp_avg.clone(), exp_avg_sq.clone()]
    param_out = torch.empty_like(master, dtype=torch.bfloat16)
    step = torch.zeros((), device="cuda")
    grad_scale, found_inf = torch.tensor(0.5).cuda(), torch.zeros((), device="cuda")

    def one_step():
        step.add_(1)
        adamw_step(
            *state[:1],
            grads[0],
            *state[1:],
            step=step,
            decay=decay,
            grad_scale=grad_scale,
            found_inf=found_inf,
            param_out=param_out,
            **HYPER,
        )

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        one_step()  # compiles the kernel and uploads the table
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        one_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        one_step()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()

    expected = [master.clone(), exp_avg.clone(), exp_avg_sq.clone()]
    expected_out = torch.empty_like(param_out)
    for count in range(1, 6):  # warm-up, eager, and three replays
        adamw_reference(
            *expected[:1],
            grads[0],
            *expected[1:],
            step=torch.tensor(float(count)).cuda(),
            decay=decay,
            grad_scale=grad_scale,
            found_inf=found_inf,
            param_out=expected_out,
            **HYPER,
        )
    assert step.item() == 5
    for a, e in zip([*state, param_out], [*expected, expected_out]):
        assert_matches(a, e)
