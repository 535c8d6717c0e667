"""Streamed gradients on one CUDA device (``fzero/schedule/streamed_grads.py``): the gradient
buffer is reused unit after unit while the copies down run on their own stream, so a race (a
unit landing in the buffer before the previous unit's copy read it) would show as a difference
from the whole-shard run.

- Memory: with stage 3 and both offloads, a step's peak allocated bytes (above what it started
  with) are below the whole-shard run's by about the shard less one unit's buffer; the batch
  is small, so the gradient shard, not the activations, sets the whole-shard run's peak. The
  prefetch bucket is one block: with DeepSpeed's default (5e7 elements) the forward gathers
  this whole model ahead, and that, not the backward, would set the streamed run's peak.
- Arithmetic: ``tests/test_streamed_gradients.py`` checks on CPU that streaming changes only the
  norm's summation order. Without clipping the CUDA runs must then agree bit for bit (losses,
  master weights, moments), in the step phase and with the CPU steps in the next forward, and
  with clipping the two placements of the CPU steps still agree bit for bit (both read the same
  per-unit sum). Clipping's last-bit change of the factor is compared in fp32 compute, within
  1e-6 relative to each tensor's largest value, the CPU tests' tolerance (bf16 compute turns a
  last-bit change of the master into a bf16 rounding flip of the parameters, which the next
  steps' gradients carry: no fp32 tolerance applies there).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import fzero

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from gpt import GPT, GPTConfig, MarkovCorpus  # noqa: E402

from tests.harness import assert_close_to_reference  # noqa: E402

STEPS = 4
CLIPPED_STEPS = 2  # see the module docstring


def _train(
    streamed: bool,
    clip: float,
    in_forward: bool = True,
    params: bool = True,
    bf16: bool = True,
    steps: int = STEPS,
    micro: int = 1,
):
    """Train STEPS steps at stage 3 with optimizer (and parameter) offload; returns the losses,
    the full parameters, the moments, the state and the largest step's peak allocated bytes
    above what that step started with (the tracing first step excluded)."""
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=8, n_embd=512, n_head=8, vocab_size=256, block_size=32)
    model = GPT(cfg)
    zero = {
        "stage3_param_persistence_threshold": 0,
        "stage3_prefetch_bucket_size": 12 * cfg.n_embd**2,  # one block
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
    }
    if params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config = {
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1}},
        "gradient_clipping": clip,
        "gradient_accumulation_steps": micro,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "fzero": {"offload_update_in_forward": in_forward, "stream_gradients": streamed},
    }
    state = fzero.shard(model, stage=3, config=config, device="cuda")
    assert (state.schedule.grad_streaming is not None) == streamed
    corpus, generator = MarkovCorpus(cfg.vocab_size), torch.Generator().manual_seed(3)
    losses, peaks = [], []
    for step in range(steps):
        batches = [
            tuple(t.cuda() for t in corpus.batch(2, cfg.block_size, generator))
            for _ in range(micro)
        ]
        batch = batches[0] if micro == 1 else batches
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        state, metrics = fzero.train_step(state, batch)
        losses.append(float(metrics["loss"]))
        torch.cuda.synchronize()
        if step > 0:
            peaks.append(torch.cuda.max_memory_allocated() - start)
    full = fzero.full_state_dict(state)  # applies a pending update first
    moments = (state.exp_avg.cpu().clone(), state.exp_avg_sq.cpu().clone())
    return losses, full, moments, state, max(peaks, default=0)


def _shard_and_buffer_nbytes(state) -> tuple[int, int]:
    layout = state.runtime.plan.layout
    largest = max(u.optimizer_numel for u in layout.units)
    return layout.optimizer_numel * 4, largest * 4  # fp32 gradient accumulation


def test_streamed_stage3_offload_peaks_below_the_whole_shard_by_about_the_shard():
    whole = _train(streamed=False, clip=1.0)
    streamed = _train(streamed=True, clip=1.0)
    shard_nbytes, buffer_nbytes = _shard_and_buffer_nbytes(streamed[3])
    assert shard_nbytes > 64 << 20  # the shard is what the comparison is about
    saved = whole[4] - streamed[4]
    expected = shard_nbytes - buffer_nbytes
    assert 0.9 * expected <= saved <= shard_nbytes + (1 << 20), (saved, expected)


def test_streamed_training_with_clipping_on_cuda_stays_within_fp32_rounding():
    whole = _train(streamed=False, clip=1.0, bf16=False, steps=CLIPPED_STEPS)
    streamed = _train(streamed=True, clip=1.0, bf16=False, steps=CLIPPED_STEPS)
    assert streamed[0][0] == whole[0][0]  # the first loss: no update has touched it
    assert_close_to_reference(streamed[1], whole[1], rtol=1e-6)


@pytest.mark.parametrize("in_forward", [True, False])
def test_streamed_training_on_cuda_equals_the_whole_shard_without_clipping(in_forward):
    whole = _train(streamed=False, clip=0.0, in_forward=in_forward)
    streamed = _train(streamed=True, clip=0.0, in_forward=in_forward)
    assert streamed[0] == whole[0]
    for name in whole[1]:
        assert torch.equal(streamed[1][name], whole[1][name]), name
    for a, b in zip(streamed[2], whole[2], strict=True):
        assert torch.equal(a, b)


def test_streamed_cpu_steps_in_the_forward_equal_the_step_phase_on_cuda():
    """The pending update (stage 3's CPU steps in the next forward) reads the same copied-down
    gradients as the step phase: bit for bit, with clipping (the same per-unit norm)."""
    in_forward = _train(streamed=True, clip=1.0, in_forward=True, params=False)
    in_step = _train(streamed=True, clip=1.0, in_forward=False, params=False)
    assert in_forward[0] == in_step[0]
    for name in in_step[1]:
        assert torch.equal(in_forward[1][name], in_step[1][name]), name


def test_accumulated_streaming_on_cuda_equals_the_whole_shard_without_clipping():
    """Three micro-batches a step: each later landing adds onto the sum brought back up from
    pinned host memory (``GradFromHost`` on the up stream, the landing waiting for it), so a
    race (the upload reading the host buffer before the copy down landed, or the landing
    before the upload) would show as a difference from the whole shard's sums."""
    whole = _train(streamed=False, clip=0.0, micro=3)
    streamed = _train(streamed=True, clip=0.0, micro=3)
    assert streamed[3].schedule.grad_streaming.accumulates
    assert streamed[0] == whole[0]
    for name in whole[1]:
        assert torch.equal(streamed[1][name], whole[1][name]), name
    for a, b in zip(streamed[2], whole[2], strict=True):
        assert torch.equal(a, b)
    assert streamed[4] < whole[4]  # the device never held the whole gradient shard
