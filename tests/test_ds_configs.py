"""Real-world DeepSpeed configs load with DeepSpeed's meaning and train a step.

``tests/data/ds_configs/`` holds configs with the keys and values that public projects ship
(Hugging Face transformers' and accelerate's, LLaMA-Factory's, axolotl's, FastChat's, OpenRLHF's
and DeepSpeed-Chat's generated ones, DeepSpeedExamples'); ``SOURCES.md`` there names the public
file each one follows. Every file either loads and trains one optimizer step on a tiny model (on
as many thread ranks as its batch sizes imply), or needs a feature fzero does not have yet and is
rejected with an error naming the key. ``REJECTED`` lists those, with the cause, so a new
rejection (or a file that starts loading) fails here.
"""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import fzero
from fzero.collectives import run_ranks
from fzero.config import Config
from fzero.config.parse import load_file
from fzero.errors import ConfigError, ConfigWarning
from tests.models import ToyLM, ToySpec

CORPUS = Path(__file__).parent / "data" / "ds_configs"
FILES = sorted(path.name for path in CORPUS.glob("*.json"))
SPEC = ToySpec(vocab=13, width=8, depth=2)


# file -> (the key its error names, the cause). CPU offload of the optimizer and the parameters
# is implemented: the configs that ask for it train like the rest.
REJECTED: dict[str, tuple[str, str]] = {
    "dsexamples_bert_large_onebitlamb.json": ("optimizer.type", "1-bit optimizer"),
    "dsexamples_tensor_parallel_hf.json": ("tensor_parallel", "tensor parallelism"),
    "openrlhf_train_stage3_zpg8.json": ("zero_optimization.zero_hpz_partition_size", "ZeRO++"),
}


def test_every_corpus_file_names_its_public_source():
    sources = (CORPUS / "SOURCES.md").read_text()
    listed = set(re.findall(r"^\| `([^`]+\.json)` \|", sources, flags=re.MULTILINE))
    assert listed == set(FILES)
    assert set(REJECTED) <= set(FILES)
    assert len(FILES) >= 25


def _world_size(data: dict) -> int:
    """The world size the file's batch sizes were written for, when all three are numbers."""
    batch, micro, accumulation = (
        data.get(key)
        for key in (
            "train_batch_size",
            "train_micro_batch_size_per_gpu",
            "gradient_accumulation_steps",
        )
    )
    if all(isinstance(v, (int, float)) for v in (batch, micro, accumulation)):
        return int(batch // (micro * accumulation))
    return 2


def _train_one_step(path: Path, world_size: int) -> list[float]:
    def rank_main(comm):
        model = ToyLM(SPEC)
        state = fzero.shard(model, config=str(path), process_group=comm, total_num_steps=10)
        count = state.runtime.config.gradient_accumulation_steps or 1
        generator = torch.Generator().manual_seed(comm.rank)
        micro = [
            (
                torch.randint(SPEC.vocab, (2, 3), generator=generator),
                torch.randint(SPEC.vocab, (2, 3), generator=generator),
            )
            for _ in range(count)
        ]
        state, metrics = fzero.train_step(state, micro if count > 1 else micro[0])
        return float(metrics["loss"])

    return run_ranks(world_size, rank_main)


@pytest.mark.filterwarnings("ignore::fzero.errors.ConfigWarning")
@pytest.mark.parametrize("name", FILES)
def test_corpus_file_trains_a_step_or_is_rejected_naming_the_key(name):
    path = CORPUS / name
    data = load_file(path)
    if name in REJECTED:
        key, cause = REJECTED[name]
        with pytest.raises(ConfigError) as info:
            Config.from_any(path)
        assert info.value.path == key, f"{name}: rejected for {cause}, got {info.value}"
        return
    losses = _train_one_step(path, _world_size(data))
    assert all(math.isfinite(loss) for loss in losses)
    assert losses == [losses[0]] * len(losses)  # averaged over ranks


# Configs as Hugging Face integrations ship them: no ConfigWarning (the only warnings are
# ones the user can act on: trainer-only "auto" values, logged once).
HF_STYLE = [
    "accelerate_zero_stage1.json",
    "accelerate_zero_stage2.json",
    "accelerate_zero_stage3.json",
    "axolotl_zero1.json",
    "axolotl_zero3_bf16.json",
    "dschat_train_stage2_fp16.json",
    "dschat_train_stage3_bf16.json",
    "openrlhf_train_stage2.json",
    "openrlhf_train_stage3_overlap.json",
]


@pytest.mark.parametrize("name", HF_STYLE)
def test_typical_configs_give_no_config_warning(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        Config.from_any(CORPUS / name)


def test_unknown_top_level_keys_of_a_real_config_are_named_in_one_warning():
    with pytest.warns(ConfigWarning, match="comms_config, monitor_config") as caught:
        Config.from_any(CORPUS / "llamafactory_ds_z2.json")
    assert len([w for w in caught if issubclass(w.category, ConfigWarning)]) == 1


def test_trainer_only_auto_values_are_named_in_one_warning_with_their_values(caplog):
    with caplog.at_level(logging.INFO, logger="fzero"):
        _train_one_step(CORPUS / "accelerate_zero_stage3.json", 1)
    warnings_logged = [r for r in caplog.records if r.levelno == logging.WARNING]
    [record] = warnings_logged
    message = record.getMessage()
    # torch_adam is absent here: FusedAdam's weight decay 0; accelerate's stage 1 file sets it.
    for text in (
        "optimizer.params.lr=0.001",
        "optimizer.params.weight_decay=0.0",
        "gradient_clipping=0.0",
    ):
        assert text in message
    config = Config.from_any(CORPUS / "accelerate_zero_stage1.json")
    resolved = config.resolve(world_size=1, hidden_size=8, param_numel=100, total_num_steps=10)
    assert resolved.optimizer.weight_decay == 0.01  # torch_adam: torch AdamW's default


def test_openrlhf_autos_take_deepspeeds_defaults():
    zero = Config.from_any(CORPUS / "openrlhf_train_stage2.json").zero_optimization
    assert zero.stage3_max_live_parameters == 1_000_000_000
    assert zero.stage3_max_reuse_distance == 1_000_000_000


def test_corpus_files_read_with_deepspeeds_meaning():
    """A few values that a different reading would get wrong."""
    axolotl = Config.from_any(CORPUS / "axolotl_zero3_bf16.json")
    zero = axolotl.zero_optimization  # pydantic field names behind the stage3_ aliases
    assert (zero.stage3_max_live_parameters, zero.stage3_max_reuse_distance) == (0, 0)
    assert axolotl.compute_dtype_name == "bf16"
    dschat = Config.from_any(CORPUS / "dschat_train_stage3_bf16.json")
    assert dschat.compute_dtype_name == "bf16"  # "bfloat16", bf16's old name
    assert dschat.zero_optimization.stage3_prefetch_bucket_size == 30_000_000
    gpt2 = Config.from_any(CORPUS / "dsexamples_gpt2_baseline.json")
    assert gpt2.optimizer.type == "Adam" and gpt2.optimizer.adam_w_mode is True  # Adam is AdamW
    assert gpt2.optimizer.weight_decay == 0.01 and gpt2.fp16.loss_scale == 0.0  # dynamic
    leaf = Config.from_any(CORPUS / "dsexamples_zero3_leaf_module.json")
    assert leaf.optimizer.weight_decay == 0.0  # FusedAdam's default, not torch AdamW's
    assert leaf.lr_at(0) == 0.0 and leaf.scheduler.warmup_type == "linear"


# -- the example takes the flag DeepSpeed users type ----------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def _example(*args: str) -> subprocess.CompletedProcess:
    environment = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_gpt.py"), *args],
        capture_output=True,
        text=True,
        timeout=180,  # a hang fails the test instead of the suite
        env=environment,
        check=False,
    )


def test_example_help_documents_every_option_with_its_default():
    result = _example("--help")
    assert result.returncode == 0, result.stderr
    option = ""
    options = re.findall(r"\[(--[a-z-]+)", result.stdout)
    assert "--deepspeed" in options and len(options) >= 12
    documented: dict[str, str] = {}
    for line in result.stdout.splitlines():
        start = re.match(r"^  (--[a-z-]+)", line)
        if start:
            option = start.group(1)
        if line.startswith("  ") and option:
            documented[option] = documented.get(option, "") + " " + line.strip()
    for option in options:
        assert "(default:" in documented[option], f"{option} names no default"


def test_example_trains_with_a_deepspeed_config_file():
    result = _example(
        "--deepspeed", str(CORPUS / "accelerate_zero_stage3.json"),
        "--steps", "2", "--log-every", "1", "--n-layer", "1", "--n-embd", "32", "--seq-len", "8",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "ZeRO stage 3, 1 rank(s) on cpu, fp16" in result.stdout
    assert "step     2 | loss" in result.stdout
    assert "optimizer.params.lr=0.001" in result.stderr  # the trainer-only "auto" warning
