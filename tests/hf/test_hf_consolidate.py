"""``python -m fzero.checkpoint consolidate CKPT OUT --hf-config DIR`` writes a folder that
``AutoModelForCausalLM.from_pretrained`` loads with no warning, weights as trained, tied ones
stored once, sharded with an index above ``--max-shard-size``; it streams one file at a time."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import fzero
from fzero.checkpoint.__main__ import main as cli
from tests.hf.common import assert_same_weights, batches, build, fzero_config, transformers
from tests.hf.test_hf_pretrained import _child


def _trained_checkpoint(family: str, root: Path, stage: int = 3) -> dict[str, torch.Tensor]:
    state = fzero.shard(build(family), config=fzero_config(stage))
    for step in batches(2, 1):
        state, _ = fzero.train_step(state, step[0])
    fzero.save(state, root)
    return fzero.full_state_dict(state)


def _load_quietly(folder: Path):
    """``from_pretrained(folder)``, with every warning transformers logs or issues."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = transformers.utils.logging.get_logger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as issued:
            warnings.simplefilter("always")
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                folder, output_loading_info=True
            )
    finally:
        logger.removeHandler(handler)
    messages = [r.getMessage() for r in records] + [str(w.message) for w in issued]
    return model, info, messages


def _stored_names(folder: Path) -> set[str]:
    names = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            names.update(handle.keys())
    return names


def test_tied_gpt2_round_trips_through_from_pretrained_with_no_warning(tmp_path):
    trained = _trained_checkpoint("gpt2", tmp_path / "ckpt")
    build("gpt2").config.save_pretrained(tmp_path / "source")
    out = tmp_path / "out"
    argv = [
        "consolidate",
        str(tmp_path / "ckpt"),
        str(out),
        "--hf-config",
        str(tmp_path / "source"),
    ]
    assert cli(argv) == 0
    assert (out / "config.json").is_file()
    assert "lm_head.weight" not in _stored_names(out)  # as save_pretrained stores a tie
    model, info, messages = _load_quietly(out)
    assert messages == []
    assert all(not keys for keys in info.values()), info
    assert model.lm_head.weight is model.transformer.wte.weight
    assert_same_weights(model.state_dict(), trained, rtol=0)


def test_llama_shards_above_max_shard_size_and_keeps_its_untied_head(tmp_path):
    trained = _trained_checkpoint("llama", tmp_path / "ckpt", stage=2)
    build("llama").config.save_pretrained(tmp_path / "source")
    out = tmp_path / "out"
    files = fzero.checkpoint.consolidate(
        tmp_path / "ckpt",
        out,
        max_shard_bytes=20_000,
        hf_config=tmp_path / "source" / "config.json",  # a config file works too
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len({*index["weight_map"].values()}) > 1
    assert set(index["weight_map"]) == set(trained) == _stored_names(out)
    assert len([f for f in files if f.suffix == ".safetensors"]) == len(
        {*index["weight_map"].values()}
    )
    model, info, messages = _load_quietly(out)
    assert messages == []
    assert all(not keys for keys in info.values()), info
    assert_same_weights(model.state_dict(), trained, rtol=0)


def test_bf16_output_says_so_in_its_config(tmp_path):
    trained = _trained_checkpoint("qwen2", tmp_path / "ckpt", stage=1)
    build("qwen2").config.save_pretrained(tmp_path / "source")
    fzero.checkpoint.consolidate(
        tmp_path / "ckpt", tmp_path / "out", dtype="bf16", hf_config=tmp_path / "source"
    )
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    model, _, messages = _load_quietly(tmp_path / "out")
    assert messages == []
    assert model.dtype == torch.bfloat16
    assert_same_weights(
        model.state_dict(), {k: v.to(torch.bfloat16) for k, v in trained.items()}, rtol=0
    )


def test_hf_config_errors_name_the_path(tmp_path):
    _trained_checkpoint("gpt2", tmp_path / "ckpt")
    (tmp_path / "empty").mkdir()
    assert (
        cli(
            [
                "consolidate",
                str(tmp_path / "ckpt"),
                str(tmp_path / "o1"),
                "--hf-config",
                str(tmp_path / "empty"),
            ]
        )
        == 1
    )
    with pytest.raises(fzero.errors.CheckpointError, match="holds no config.json"):
        fzero.checkpoint.consolidate(
            tmp_path / "ckpt", tmp_path / "o2", hf_config=tmp_path / "empty"
        )


def test_consolidation_peak_is_about_one_output_file(tmp_path):
    """A 32 MiB model written as 2 MB files: the process's peak growth stays below one file plus
    constants (the 1 MiB checksum buffer, Python objects: measured 1.8-1.9 MiB after the child's
    warm-up, in two environments), far below the model, since each tensor is read as it is
    written. The child runs with glibc's mmap
    threshold fixed, as it is in effect for tensors above 32 MiB: at this small scale its
    adaptive threshold would otherwise keep freed blocks in the heap and measure the allocator."""
    config = transformers.LlamaConfig(
        num_hidden_layers=12,
        hidden_size=256,
        intermediate_size=640,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=64,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    model_nbytes = sum(p.numel() * 4 for p in model.parameters())
    model.config.save_pretrained(tmp_path / "source")
    fzero.save(fzero.shard(model, stage=3), tmp_path / "ckpt")
    del model
    max_shard = 2_000_000
    result = _child(
        env={"MALLOC_MMAP_THRESHOLD_": "131072"},
        args=[
            "consolidate",
            str(tmp_path / "ckpt"),
            str(tmp_path / "out"),
            str(max_shard),
            str(tmp_path / "source"),
        ],
    )
    print(f"model {model_nbytes / 2**20:.1f} MiB, files of {max_shard / 1e6} MB, measured {result}")
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 10
    assert result["peak"] < model_nbytes / 4
    assert result["peak"] < max_shard + 6 * 2**20
