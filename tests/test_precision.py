"""Mixed precision the way DeepSpeed users configure it: fp16 with DeepSpeed's loss scaling,
bf16 with a choice of reduction dtype, and what a non-finite gradient does."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fzero
from fzero.collectives import run_ranks
from fzero.errors import ConfigError, LossScaleError, NonFiniteGradientError
from fzero.loss_scale import LossScaler, update
from tests.harness import assert_close_to_reference
from tests.models import ToyLM, ToySpec, make_batches, reference_train

SPEC = ToySpec(depth=2, width=8)
OPTIMIZER = {"type": "AdamW", "params": {"lr": 1e-2, "eps": 1e-2, "weight_decay": 0.1}}


# -- the loss-scale rule ------------------------------------------------------------------------


def deepspeed_scales(
    overflows, *, scale, window, hysteresis, consecutive=False, min_scale=1.0
) -> list[float]:
    """DeepSpeed's DynamicLossScaler.update_scale, written out: the scale after each step.

    On an overflow: if hysteresis is 1 or one overflow of it is left, halve (not below
    min_scale), else use one up; remember the step. On a clean step: consecutive hysteresis
    refills it; ``stable`` = steps since the last overflow minus one (at the start the last
    overflow is step -1); when stable is a positive multiple of the window, double the scale
    (and refill hysteresis unless consecutive)."""
    left, last_overflow, out = hysteresis, -1, []
    for step, overflow in enumerate(overflows):
        if overflow:
            if hysteresis == 1 or left == 1:
                scale = max(scale / 2, min_scale)
            else:
                left -= 1
            last_overflow = step
        else:
            if consecutive:
                left = hysteresis
            stable = step - last_overflow - 1
            if stable > 0 and stable % window == 0:
                if not consecutive:
                    left = hysteresis
                scale *= 2
        out.append(scale)
    return out


def fp16_block(**keys) -> dict:
    return {"enabled": True, "initial_scale_power": 10, "loss_scale_window": 3} | keys


def fzero_scales(overflows, fp16: dict) -> list[float]:
    config = fzero.Config.from_dict({"fp16": fp16})
    scaler, out = LossScaler.from_fp16(config.fp16), []
    for overflow in overflows:
        scaler = update(scaler, overflow)
        out.append(scaler.scale)
    return out


def test_loss_scale_follows_deepspeed_on_a_written_out_sequence():
    """Window 3, hysteresis 2: the first overflow only uses up hysteresis, the second halves;
    halving does not refill it, so the third halves again; 3 clean steps after an overflow, the
    4th doubles and refills it; with no overflow the scale first doubles at step 3 (0-based)."""
    overflows = [0, 0, 0, 0, 1, 0, 1, 1, 0, 0, 0, 0, 1, 0]
    expected = [1024, 1024, 1024, 2048, 2048, 2048, 1024, 512, 512, 512, 512, 1024, 1024, 1024]
    got = fzero_scales(overflows, fp16_block(hysteresis=2))
    assert got == expected == deepspeed_scales(overflows, scale=1024, window=3, hysteresis=2)


@settings(max_examples=200, deadline=None)
@given(
    overflows=st.lists(st.booleans(), max_size=40),
    window=st.integers(1, 5),
    hysteresis=st.integers(1, 3),
    consecutive=st.booleans(),
)
def test_loss_scale_matches_deepspeed_rule(overflows, window, hysteresis, consecutive):
    """Any overflow pattern: the scale sequence equals DeepSpeed's update_scale, written out."""
    fp16 = fp16_block(
        initial_scale_power=24,
        loss_scale_window=window,
        hysteresis=hysteresis,
        consecutive_hysteresis=consecutive,
        min_loss_scale=2.0**-30,  # out of reach: no LossScaleError here
    )
    expected = deepspeed_scales(
        overflows,
        scale=2.0**24,
        window=window,
        hysteresis=hysteresis,
        consecutive=consecutive,
        min_scale=2.0**-30,
    )
    assert fzero_scales(overflows, fp16) == expected


def test_loss_scale_at_its_minimum_raises_like_deepspeed():
    fp16 = fp16_block(initial_scale_power=2, hysteresis=1, min_loss_scale=2)
    assert fzero_scales([1], fp16) == [2.0]
    with pytest.raises(LossScaleError, match="fp16.min_loss_scale"):
        fzero_scales([1, 1], fp16)


def test_static_loss_scale_never_changes():
    assert fzero_scales([0, 1, 1, 0, 0, 0, 0], {"enabled": True, "loss_scale": 128}) == [128] * 7


# -- fp16 training -------------------------------------------------------------------------------


def train(
    stage: int,
    batches,
    precision: dict,
    *,
    world: int = 2,
    inject: tuple[int, ...] = (),
    extra: dict | None = None,
):
    """Train on thread ranks; at the steps in ``inject`` rank 1 alone gets an Inf gradient (a
    hook on one weight). Returns, per rank, (full_state_dict, metrics per step)."""
    config = {
        "optimizer": OPTIMIZER,
        "gradient_clipping": 0.5,
        "zero_optimization": {"stage": stage},
        **precision,
        **(extra or {}),
    }
    models = [ToyLM(SPEC) for _ in range(world)]

    def rank_main(comm):
        model, now = models[comm.rank], {"step": -1}
        if comm.rank == 1:
            infinite = lambda g: torch.full_like(g, float("inf")) if now["step"] in inject else g  # noqa: E731
            model.blocks[0].linear.weight.register_hook(infinite)
        state = fzero.shard(model, config=config, process_group=comm)
        metrics = []
        for step, batch in enumerate(batches):
            now["step"] = step
            state, m = fzero.train_step(state, batch[comm.rank])
            metrics.append(m)
        return fzero.full_state_dict(state), metrics

    return run_ranks(world, rank_main)


WARMUP = {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 12}}}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_fp16_overflow_on_one_rank_skips_the_step_on_every_rank(stage):
    """Rank 1's gradient is Inf at steps 2 and 5: every rank skips exactly those steps, the
    loss scale follows DeepSpeed's rule (hysteresis 2: the first overflow keeps the scale), and
    the final parameters are bit for bit those of a run that never saw those two batches (the lr
    schedule does not advance on a skipped step, and power-of-two scales unscale exactly)."""
    torch.set_num_threads(1)
    batches = make_batches(SPEC, steps=10, world_size=2, micro=2)
    precision = {"fp16": fp16_block(hysteresis=2)}
    runs = train(stage, batches, precision, inject=(2, 5), extra=WARMUP)
    overflows = [step in (2, 5) for step in range(10)]
    scales = deepspeed_scales(overflows, scale=1024, window=3, hysteresis=2)
    clean = train(
        stage, [b for i, b in enumerate(batches) if i not in (2, 5)], precision, extra=WARMUP
    )
    for (full, metrics), (clean_full, clean_metrics) in zip(runs, clean):
        assert [m["skipped"] for m in metrics] == overflows
        assert [m["loss_scale"] for m in metrics] == scales
        assert [m["skipped_steps"] for m in metrics] == [0, 0, 1, 1, 1, 2, 2, 2, 2, 2]
        assert [m["step"] for m in metrics] == list(range(1, 11))
        applied = [m["lr"] for m, skip in zip(metrics, overflows) if not skip]
        assert applied == [m["lr"] for m in clean_metrics]
        for name, value in clean_full.items():
            assert torch.equal(full[name], value), name


def test_fp16_trains_like_fp32():
    """Dynamic fp16 (scale 2**10, no overflow) ends within 5e-3 (relative to each tensor's
    largest value) of the fp32 reference on the concatenated batch after 6 steps (measured:
    1.3e-3 to 1.5e-3, fp16's 11-bit mantissa)."""
    torch.set_num_threads(1)
    batches = make_batches(SPEC, steps=6, world_size=2, micro=2)
    ref = reference_train(SPEC, batches, lr=1e-2, weight_decay=0.1, eps=1e-2, clip=0.5)
    for stage in (0, 3):
        for full, metrics in train(stage, batches, {"fp16": fp16_block()}):
            assert not any(m["skipped"] for m in metrics)
            assert_close_to_reference(full, ref.state_dict(), rtol=5e-3)


def test_fp16_at_min_loss_scale_raises_and_leaves_the_state_usable():
    torch.set_num_threads(1)
    config = {"fp16": fp16_block(initial_scale_power=1, min_loss_scale=2, hysteresis=1)}
    model = ToyLM(SPEC)
    state = fzero.shard(model, stage=2, config=config)
    batch = make_batches(SPEC, steps=1, world_size=1, micro=1)[0][0][0]
    before = fzero.full_state_dict(state)
    model.head.weight.register_hook(lambda g: g * float("nan"))
    with pytest.raises(LossScaleError, match="minimum loss scale 2"):
        fzero.train_step(state, batch)
    after = fzero.full_state_dict(state)  # the same state: nothing was donated or changed
    assert all(torch.equal(before[k], after[k]) for k in before)


# -- bf16 and fp32: non-finite gradients ----------------------------------------------------------


@pytest.mark.parametrize("precision", [{}, {"bf16": {"enabled": True}}], ids=["fp32", "bf16"])
def test_nonfinite_gradient_skips_the_step_by_default(precision):
    """Without fp16, a NaN gradient on one rank skips the step everywhere (the default), and the
    skipped steps are counted; the parameters equal a run without that batch."""
    torch.set_num_threads(1)
    batches = make_batches(SPEC, steps=4, world_size=2, micro=1)
    runs = train(1, batches, precision, inject=(1,))
    clean = train(1, [b for i, b in enumerate(batches) if i != 1], precision)
    for (full, metrics), (clean_full, _) in zip(runs, clean):
        assert [m["skipped"] for m in metrics] == [False, True, False, False]
        assert metrics[-1]["skipped_steps"] == 1 and metrics[-1]["loss_scale"] == 1.0
        assert all(torch.equal(full[k], clean_full[k]) for k in full)


def test_nonfinite_gradient_error_mode_raises_after_skipping():
    torch.set_num_threads(1)
    model = ToyLM(SPEC)
    state = fzero.shard(model, stage=3, config={"fzero": {"nonfinite_grads": "error"}})
    batch = make_batches(SPEC, steps=1, world_size=1, micro=1)[0][0][0]
    before = fzero.full_state_dict(state)
    handle = model.head.weight.register_hook(lambda g: g * float("inf"))
    with pytest.raises(NonFiniteGradientError, match="skipped on every rank"):
        fzero.train_step(state, batch)
    assert all(torch.equal(before[k], v) for k, v in fzero.full_state_dict(state).items())
    handle.remove()
    state, metrics = fzero.train_step(state, batch)  # the state given in is still usable
    assert not metrics["skipped"] and metrics["skipped_steps"] == 1 and metrics["step"] == 2


def test_nonfinite_gradient_apply_mode_applies_it():
    torch.set_num_threads(1)
    model = ToyLM(SPEC)
    state = fzero.shard(model, stage=0, config={"fzero": {"nonfinite_grads": "apply"}})
    model.head.weight.register_hook(lambda g: g * float("nan"))
    batch = make_batches(SPEC, steps=1, world_size=1, micro=1)[0][0][0]
    state, metrics = fzero.train_step(state, batch)
    assert not metrics["skipped"]
    assert torch.isnan(fzero.full_state_dict(state)["head.weight"]).all()


# -- bf16 parity -------------------------------------------------------------------------------


def bf16_reference(batches, *, world: int, micro: int) -> dict[str, torch.Tensor]:
    """Plain PyTorch bf16 with fp32 master weights (what DeepSpeed's bf16 mode does): a bf16
    copy of the model runs forward and backward on each micro-batch, the gradients are summed in
    fp32, averaged over ranks, clipped, and AdamW updates the fp32 masters."""
    master, compute = ToyLM(SPEC), ToyLM(SPEC).to(torch.bfloat16)
    params = [p for p in master.parameters() if p.requires_grad]
    names = {id(p): n for n, p in master.named_parameters()}
    opt = torch.optim.AdamW(params, lr=1e-2, eps=1e-2, weight_decay=0.1, foreach=False)
    compute_params = dict(compute.named_parameters())
    for step in batches:
        with torch.no_grad():
            for p in params:
                compute_params[names[id(p)]].copy_(p)
        total = [torch.zeros_like(p) for p in params]
        for rank in step:
            for micro_batch in rank:
                compute.zero_grad(set_to_none=True)
                (compute(*micro_batch) / micro).backward()
                for t, p in zip(total, params):
                    t += compute_params[names[id(p)]].grad.float()
        for t, p in zip(total, params):
            p.grad = t / world
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
    return master.state_dict()


def relative_error(full: dict, ref: dict) -> float:
    return max(
        ((full[k].double() - ref[k].double()).abs().max() / ref[k].abs().max()).item() for k in ref
    )


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_matches_master_weight_reference_and_bf16_reduction_is_bounded(stage):
    """bf16 compute on 4 ranks, 2 micro-batches, 5 steps, against the bf16 reference, relative
    to each tensor's largest value. Reducing in fp32 (the default) ends within 5e-3 (measured
    2.2e-3: bf16's 8-bit mantissa, and stages 0 and 1 add micro-batches in their bf16 gradient
    buffers); reducing in bf16 (communication_data_type, half the traffic) also rounds each
    rank's gradient and the partial sums: within 5e-3 of the reference (measured 2.2e-3 to
    2.6e-3) and of the fp32-reduced run (measured 2.2e-3 to 2.6e-3). For scale, the bf16
    reference itself is 1.5e-2 from the fp32 reference."""
    torch.set_num_threads(1)
    world, micro = 4, 2
    batches = make_batches(SPEC, steps=5, world_size=world, micro=micro)
    ref = bf16_reference(batches, world=world, micro=micro)
    full = {}
    for reduce in ("fp32", "bf16"):
        precision = {"bf16": {"enabled": True}, "communication_data_type": reduce}
        full[reduce] = train(stage, batches, precision, world=world)[0][0]
    errors = {reduce: relative_error(values, ref) for reduce, values in full.items()}
    assert errors["fp32"] <= 5e-3 and errors["bf16"] <= 5e-3, errors
    assert relative_error(full["bf16"], full["fp32"]) <= 5e-3


# -- contradictory precision settings --------------------------------------------------------------

CONTRADICTIONS = [
    ("bf16.enabled", {"bf16": {"enabled": True}, "fp16": {"enabled": True}}),
    ("communication_data_type", {"fp16": {"enabled": True}, "communication_data_type": "bf16"}),
    (
        "data_types.grad_accum_dtype",
        {"fp16": {"enabled": True}, "data_types": {"grad_accum_dtype": "bf16"}},
    ),
    ("communication_data_type", {"bf16": {"enabled": True}, "communication_data_type": "fp16"}),
    ("fp16.loss_scale", {"fp16": {"enabled": True, "loss_scale": -1}}),
    ("fp16.min_loss_scale", {"fp16": {"enabled": True, "min_loss_scale": 2**17}}),
    (
        "fp16.min_loss_scale",
        {"fp16": {"enabled": True, "initial_scale_power": 3, "min_loss_scale": 16}},
    ),
    ("fzero.nonfinite_grads", {"fp16": {"enabled": True}, "fzero": {"nonfinite_grads": "apply"}}),
    ("fzero.nonfinite_grads", {"fzero": {"nonfinite_grads": "ignore"}}),
    (
        "fzero.reduce_every_micro_batch",
        {"fzero": {"deterministic": True, "reduce_every_micro_batch": False}},
    ),
]


@pytest.mark.parametrize(("key", "config"), CONTRADICTIONS, ids=[c[0] for c in CONTRADICTIONS])
def test_contradictory_precision_settings_name_the_key(key, config):
    with pytest.raises(ConfigError) as info:
        fzero.shard(ToyLM(SPEC), stage=2, config=config)
    assert info.value.path == key
    if key == "bf16.enabled":
        assert "fp16.enabled" in str(info.value)


def test_reduce_every_micro_batch_is_checked_against_the_final_stage():
    """true is an error below stage 2 (stages 0 and 1 reduce once per step), checked after
    shard(stage=...) overrides the config's stage, both ways."""
    config = {"fzero": {"reduce_every_micro_batch": True}}
    with pytest.raises(ConfigError, match="fzero.reduce_every_micro_batch"):
        fzero.shard(ToyLM(SPEC), stage=1, config=config)
    fzero.shard(ToyLM(SPEC), stage=3, config=config)  # the config's stage 0 is overridden


def test_checkpoint_resumes_the_loss_scale_and_skipped_steps(tmp_path):
    """Saved after an overflow, loaded into a fresh model: the dynamic scale, its hysteresis and
    window progress, and the skipped-step count continue as if never interrupted."""
    torch.set_num_threads(1)
    config = {"optimizer": OPTIMIZER, "fp16": fp16_block(hysteresis=1)}
    batches = [b[0] for b in make_batches(SPEC, steps=6, world_size=1, micro=1)]

    def run(state, model, steps, overflow_at):
        now = {"step": -1}
        model.head.weight.register_hook(
            lambda g: g * float("inf") if now["step"] in overflow_at else g
        )
        out = []
        for step in steps:
            now["step"] = step
            state, m = fzero.train_step(state, batches[step])
            out.append((m["loss_scale"], m["skipped_steps"]))
        return state, out

    model = ToyLM(SPEC)
    _, whole = run(fzero.shard(model, stage=2, config=config), model, range(6), {1})
    model = ToyLM(SPEC)
    state, first = run(fzero.shard(model, stage=2, config=config), model, range(3), {1})
    fzero.save(state, tmp_path)
    model = ToyLM(SPEC)
    _, second = run(fzero.load(tmp_path, model, config), model, range(3, 6), set())
    assert first + second == whole
    assert [scale for scale, _ in whole] == [1024, 512, 512, 512, 512, 1024]
