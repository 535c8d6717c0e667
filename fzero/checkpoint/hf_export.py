"""What ``consolidate --hf-config`` adds so that ``from_pretrained(out)`` loads the folder as
``save_pretrained`` would have written it: the model's ``config.json`` (and
``generation_config.json`` when the source has one), and tied parameters stored once.

``save_pretrained`` stores a tied group (an output head tied to the input embedding) under one
name, the source of the tie: the names the model class lists as tie targets
(``_tied_weights_keys``, a ``{target: source}`` mapping in transformers 5) are left out, when
the config ties them (``tie_word_embeddings``). A group none of whose names is a listed target
keeps its first name (the one registered first). Reading the config and the model class needs
the ``transformers`` package, which is what loads the folder anyway.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fzero.errors import CheckpointError

GENERATION_CONFIG = "generation_config.json"


@dataclass(frozen=True)
class HfExport:
    config: Any  # a transformers PretrainedConfig
    generation_config: Path | None  # copied beside config.json when the source has one
    tie_targets: tuple[str, ...]  # names (or patterns) the model class stores only as a tie

    def dropped_names(self, tied_groups: list[tuple[str, ...]]) -> set[str]:
        """The names to leave out of the files: all but one of every tied group, when the
        config ties weights."""
        if not _ties(self.config):
            return set()
        dropped: set[str] = set()
        for names in tied_groups:
            if len(names) < 2:
                continue
            targets = [n for n in names if self._is_target(n)]
            sources = [n for n in names if n not in targets]
            keep = sources[0] if sources else names[0]
            dropped.update(n for n in names if n != keep)
        return dropped

    def _is_target(self, name: str) -> bool:
        return any(name == t or re.fullmatch(t, name) for t in self.tie_targets)

    def write(self, folder: Path, dtype_name: str) -> None:
        """``config.json`` (its ``dtype`` set to the dtype the weights were written in, as
        ``save_pretrained`` records it) and the generation config, into ``folder``."""
        self.config.dtype = dtype_name
        self.config.save_pretrained(folder)
        if self.generation_config is not None:
            shutil.copyfile(self.generation_config, folder / GENERATION_CONFIG)


def read_hf_config(source: str | os.PathLike) -> HfExport:
    """The config of ``source``: a model folder (or a folder holding ``config.json``), or the
    path of a config JSON file."""
    try:
        import transformers
    except ImportError:
        raise CheckpointError(
            "--hf-config needs the transformers package (pip install transformers)"
        ) from None
    source = Path(source)
    if not source.exists():
        raise CheckpointError(f"--hf-config {source}: no such file or folder")
    folder = source if source.is_dir() else source.parent
    if source.is_dir() and not (source / "config.json").is_file():
        raise CheckpointError(
            f"--hf-config {source} holds no config.json: give a model folder or a config file"
        )
    try:
        config = transformers.AutoConfig.from_pretrained(str(source), local_files_only=True)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"--hf-config {source} cannot be read: {error}") from None
    generation = folder / GENERATION_CONFIG if source.is_dir() else None
    targets: tuple[str, ...] = ()
    for architecture in getattr(config, "architectures", None) or ():
        model_class = getattr(transformers, architecture, None)
        keys = getattr(model_class, "_tied_weights_keys", None) or ()
        targets += tuple(keys)  # a dict's keys are the targets; older releases list them
    return HfExport(config, generation if generation and generation.is_file() else None, targets)


def _ties(config: Any) -> bool:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text_config, "tie_word_embeddings", False))
