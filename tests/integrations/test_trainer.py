"""The fzero Trainer (real transformers and accelerate, CPU gloo): its loss curve equals a
plain PyTorch reference at stages 0-3 with the guide's "auto" config, resume is bitwise,
``save_model`` loads in ``from_pretrained``, evaluation works at stage 3, misuse is refused."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fzero.errors import (  # noqa: E402
    AutoConfigMismatchError,
    ConfigError,
    UnsupportedArgumentError,
)
from fzero.integrations.transformers import Trainer, TrainingArguments  # noqa: E402
from tests.integrations.engine_cases import tiny_gpt2  # noqa: E402
from tests.integrations.trainer_cases import (  # noqa: E402
    arguments,
    auto_config,
    dataset,
    reference,
    train,
    train_summary,
)


def _assert_matches_reference(logs, ranks_seen, full, windows=None):
    losses, rates, weights = reference(ranks_seen, windows)
    torch.testing.assert_close([entry["loss"] for entry in logs], losses, rtol=1e-5, atol=0)
    # AdamW divides by sqrt(v): where a gradient is near zero (some biases) the update magnifies
    # the rounding of a differently ordered gradient sum, up to a few 1e-6 after 4 steps at lr 1e-2.
    for name, value in weights.items():
        if name in full:
            torch.testing.assert_close(full[name], value, rtol=1e-5, atol=1e-5, msg=name)
    assert [entry["learning_rate"] for entry in logs] == pytest.approx(rates, rel=1e-12)
    assert all(entry["grad_norm"] > 0 for entry in logs)  # logged from fzero's step


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_trainer_matches_plain_pytorch(tmp_path, stage):
    logs, seen, full, _ = train(0, 1, str(tmp_path), stage)
    assert len(seen) == 4 * 2
    _assert_matches_reference(logs, [seen], full)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [3])
def test_trainer_matches_plain_pytorch_two_ranks(gloo2, tmp_path, stage):
    results = gloo2.run(train_summary, str(tmp_path / f"stage{stage}"), stage)
    (logs, seen0, full), (logs1, seen1, _) = results
    assert logs == logs1
    assert not torch.equal(seen0[0], seen1[0])  # each rank read its own part of the data
    _assert_matches_reference(logs, [seen0, seen1], full)


def test_shorter_last_window_of_an_epoch(tmp_path):
    """6 micro-batches an epoch with accumulation 4: steps of 4 and 2 micro-batches."""
    logs, seen, full, _ = train(
        0,
        1,
        str(tmp_path),
        2,
        samples=12,
        gradient_accumulation_steps=4,
        max_steps=-1,
        num_train_epochs=1,
    )
    assert len(seen) == 6 and len(logs) == 2
    _assert_matches_reference(logs, [seen], full, windows=[4, 2])


def test_resume_is_bitwise(tmp_path):
    straight_logs, _, straight, _ = train(0, 1, str(tmp_path / "a"), 3)
    train(0, 1, str(tmp_path / "b"), 3, save_strategy="steps", save_steps=2, max_steps=2)
    checkpoint = tmp_path / "b" / "checkpoint-2"
    assert (checkpoint / "latest").is_file() and (checkpoint / "model.safetensors").is_file()
    logs, _, resumed, _ = train(0, 1, str(tmp_path / "b"), 3, resume=str(checkpoint))
    assert [e["loss"] for e in logs[2:]] == [e["loss"] for e in straight_logs[2:]]
    assert all(torch.equal(resumed[name], straight[name]) for name in straight)


def test_checkpointing_saving_and_evaluation_at_stage3(tmp_path):
    logs, _, full, trainer = train(0, 1, str(tmp_path), 3)
    plain_logs, _, _, _ = train(0, 1, str(tmp_path / "g"), 3, gradient_checkpointing=True)
    torch.testing.assert_close([e["loss"] for e in plain_logs], [e["loss"] for e in logs])
    trainer.save_model(str(tmp_path / "final"))
    loaded = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "final"))
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, full[name]), name
    evaluation = trainer.evaluate(eval_dataset=dataset(8))
    # The oracle: transformers' own Trainer evaluating the consolidated weights, unsharded.
    plain_args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "plain"), per_device_eval_batch_size=2, use_cpu=True, report_to=[]
    )
    plain = transformers.Trainer(model=loaded, args=plain_args)
    expected = plain.evaluate(dataset(8))
    assert evaluation["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-6)
    predictions, plain_predictions = trainer.predict(dataset(4)), plain.predict(dataset(4))
    assert predictions.predictions.shape == (4, 8, 32)
    torch.testing.assert_close(
        torch.as_tensor(predictions.predictions), torch.as_tensor(plain_predictions.predictions)
    )


def test_fp16_logs_loss_scale_and_skipped_steps(tmp_path):
    config = auto_config(2, fp16={"enabled": "auto", "initial_scale_power": 30})
    logs, _, _, _ = train(0, 1, str(tmp_path), 2, fp16=True, fzero=config)
    assert all("loss_scale" in entry and "skipped_steps" in entry for entry in logs)
    assert logs[-1]["skipped_steps"] >= 1  # 2**30 overflows fp16 at first
    assert logs[-1]["loss_scale"] < 2.0**30


def test_hf_argument_parser_takes_fzero(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 2}, "train_batch_size": "auto"}')
    parser = transformers.HfArgumentParser(TrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--fzero", str(path), "--use_cpu", "--report_to", "none"]
    )
    assert args.fzero["zero_optimization"] == {"stage": 2}
    (guide,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--deepspeed", str(path), "--use_cpu"]
    )
    assert guide.fzero == args.fzero and guide.deepspeed is None


def test_the_trainer_leaves_the_model_where_it_was_built(tmp_path):
    """transformers would move the whole model to the GPU when the Trainer is made; fzero shards
    it there unit by unit when training starts (tests/gpu/test_cuda_offload.py trains a host
    model through the engine on CUDA), so a model larger than the GPU can train."""
    model = tiny_gpt2()
    trainer = Trainer(model=model, args=arguments(str(tmp_path), 2), train_dataset=dataset(4))
    assert trainer.args.place_model_on_device is False and not trainer.place_model_on_device


def test_misuse_is_refused(tmp_path):
    model = tiny_gpt2()
    args = arguments(str(tmp_path), 2)
    with pytest.raises(UnsupportedArgumentError, match="fzero runs its own AdamW"):
        Trainer(
            model=model, args=args, optimizers=(torch.optim.SGD(model.parameters(), lr=1), None)
        )
    plain = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(UnsupportedArgumentError, match="needs fzero.integrations.transformers"):
        Trainer(model=model, args=plain)
    with pytest.raises(UnsupportedArgumentError, match="load_best_model_at_end"):
        arguments(
            str(tmp_path),
            2,
            load_best_model_at_end=True,
            eval_strategy="steps",
            save_strategy="steps",
        )
    with pytest.raises(ConfigError, match="name different configs; give one of them"):
        arguments(str(tmp_path), 2, deepspeed={"zero_optimization": {"stage": 2}})
    contradicting = auto_config(2, gradient_clipping=2.0)
    with pytest.raises(
        AutoConfigMismatchError,
        match="gradient_clipping=2.0 vs TrainingArguments max_grad_norm=0.5",
    ):
        train(0, 1, str(tmp_path), 2, fzero=contradicting)
    with pytest.raises(UnsupportedArgumentError, match="optim='sgd'"):
        train(0, 1, str(tmp_path), 2, optim="sgd")
