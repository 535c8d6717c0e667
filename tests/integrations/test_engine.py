"""``fzero.initialize``'s engine: the guide's loop trains exactly as ``train_step`` does (bitwise,
on one rank and on two gloo ranks), resumes bitwise, and every misuse gets its error."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import fzero  # noqa: E402
from fzero.errors import (  # noqa: E402
    ConfigError,
    ConfigWarning,
    EngineError,
    UnsupportedArgumentError,
)
from tests.integrations.engine_cases import (  # noqa: E402
    engine_config,
    engine_equals_train_step,
    resume_is_bitwise,
    tiny_gpt2,
)


@pytest.mark.parametrize("stage", [0, 2])  # 1 and 3: on two ranks below
def test_engine_loop_equals_train_step_one_rank(stage):
    engine_losses, step_losses, same, counters, last_lr, group_lr = engine_equals_train_step(
        0, 1, stage
    )
    assert engine_losses == step_losses
    assert same
    assert counters == (3, 6, 12)  # optimizer steps, micro-batches, samples
    assert last_lr == [group_lr]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_engine_loop_equals_train_step_two_ranks(gloo2, stage):
    results = gloo2.run(engine_equals_train_step, stage)
    for engine_losses, step_losses, same, counters, _, _ in results:
        assert engine_losses == step_losses
        assert same
        assert counters == (3, 6, 24)
    assert results[0][0] == results[1][0]  # the loss is averaged over ranks


def test_resume_is_bitwise_one_rank(tmp_path):
    straight, resumed, same, client_state, counters, path = resume_is_bitwise(
        0, 1, 3, str(tmp_path)
    )
    assert resumed == straight
    assert same
    assert client_state == {"epoch": 7}
    assert counters == (4, 8, 16)
    assert path.startswith(str(tmp_path))


@pytest.mark.slow
def test_resume_is_bitwise_two_ranks(gloo2, tmp_path):
    for straight, resumed, same, client_state, _, _ in gloo2.run(
        resume_is_bitwise, 2, str(tmp_path)
    ):
        assert resumed == straight and same and client_state == {"epoch": 7}


# -- misuse ---------------------------------------------------------------------------------------


@pytest.fixture
def engine():
    engine, _, _, _ = fzero.initialize(model=tiny_gpt2(), config=engine_config(3, 1))
    return engine


def _ids():
    return torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))


def test_loop_out_of_order(engine):
    with pytest.raises(EngineError, match="needs the loss of a forward through the engine"):
        engine.backward(torch.ones((), requires_grad=True))
    with pytest.raises(EngineError, match="without engine.backward"):
        engine.step()
    outputs = engine(_ids(), labels=_ids())
    with pytest.raises(EngineError, match="called again before engine.backward"):
        engine(_ids(), labels=_ids())
    engine.backward(outputs.loss)
    with pytest.raises(EngineError, match="called twice"):
        engine.backward(outputs.loss)
    with pytest.raises(EngineError, match="without engine.step"):
        engine(_ids(), labels=_ids())
    engine.step()
    with pytest.raises(EngineError, match="inside a gradient-accumulation window"):
        engine.save_checkpoint("/tmp/never-written")
    assert engine.is_gradient_accumulation_boundary() is not False  # second micro-batch is last


def test_evaluation_forward_under_no_grad_mid_window(engine):
    """A no-grad forward (evaluation) is a plain forward, even at stage 3 between micro-steps."""
    ids = _ids()
    engine.backward(engine(ids, labels=ids).loss)
    engine.step()
    engine.eval()
    with torch.no_grad():
        logits = engine(ids).logits
    assert logits.shape == (2, 8, 32) and torch.isfinite(logits).all()
    engine.train()
    engine.backward(engine(ids, labels=ids).loss)
    engine.step()
    assert engine.global_steps == 1


def test_stepping_the_returned_optimizer_or_scheduler_is_refused():
    _, optimizer, _, scheduler = fzero.initialize(model=tiny_gpt2(), config=engine_config(2, 1))
    with pytest.raises(EngineError, match="call engine.step"):
        optimizer.step()
    with pytest.raises(EngineError, match="advances inside engine.step"):
        scheduler.step()


def test_torch_optimizer_is_refused_with_the_config_block():
    model = tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    with pytest.raises(UnsupportedArgumentError) as raised:
        fzero.initialize(model=model, optimizer=optimizer, config=engine_config(2, 1))
    message = str(raised.value)
    assert '"optimizer": {"type": "AdamW", "params": {"lr": 0.0003' in message
    assert '"weight_decay": 0.1' in message


def test_other_refusals(tmp_path):
    model = tiny_gpt2()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    config = engine_config(2, 1)
    with pytest.raises(UnsupportedArgumentError, match="StepLR given would step a torch optimizer"):
        fzero.initialize(model=model, lr_scheduler=scheduler, config=config)
    with pytest.raises(UnsupportedArgumentError, match="leaves out trainable parameters"):
        fzero.initialize(model=model, model_parameters=[model.lm_head.weight], config=config)
    with pytest.raises(UnsupportedArgumentError, match="parameter groups"):
        fzero.initialize(model=model, model_parameters=[{"params": []}], config=config)
    with pytest.raises(ConfigError, match="needs a config"):
        fzero.initialize(model=model)
    args = fzero.add_config_arguments(__import__("argparse").ArgumentParser()).parse_args(
        ["--deepspeed_config", str(tmp_path / "ds.json")]
    )
    with pytest.raises(ConfigError, match="given twice"):
        fzero.initialize(args=args, model=model, config=config)


def test_client_state_must_be_json(engine, tmp_path):
    ids = _ids()
    for _ in range(2):
        engine.backward(engine(ids, labels=ids).loss)
        engine.step()
    with pytest.raises(EngineError, match="JSON-serialisable"):
        engine.save_checkpoint(tmp_path, client_state={"tensor": torch.ones(2)})


def test_training_data_becomes_a_micro_batch_loader():
    data = [{"input_ids": torch.arange(8) % 32} for _ in range(10)]
    engine, _, loader, _ = fzero.initialize(
        model=tiny_gpt2(), config=engine_config(0, 1), training_data=data
    )
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (2, 8)
    assert len(loader) == 5


def test_dataloader_drop_last_true_warns_and_the_last_micro_batch_is_kept():
    """What the key table says of dataloader_drop_last: initialize's DataLoader keeps a last,
    smaller micro-batch, so ``true`` is accepted with a warning that it has no effect."""
    data = [{"input_ids": torch.arange(8) % 32} for _ in range(9)]
    config = engine_config(0, 1, dataloader_drop_last=True)
    with pytest.warns(ConfigWarning, match="dataloader_drop_last.*drop_last=False"):
        _, _, loader, _ = fzero.initialize(model=tiny_gpt2(), config=config, training_data=data)
    sizes = [len(batch["input_ids"]) for batch in loader]
    assert sizes == [2, 2, 2, 2, 1]
