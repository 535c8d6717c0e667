"""Read a JSON object into a frozen config dataclass, checking every key and type on the way.

The type hints of the dataclass are the schema: ``int``, ``float``, ``bool``, ``str``,
``tuple[...]``, ``Literal[...]`` (a closed set of strings), ``X | None`` (null allowed),
``X | Literal["auto"]`` (the HF-style placeholder, resolved later by ``Config.resolve``) and
nested dataclasses. A key that is not a field goes to the key table ``keys.py`` (alias, warned or
rejected) and is otherwise an unknown key, reported with a "did you mean" suggestion.

Also here: ``build_scheduler`` (the ``scheduler`` block, whose ``type`` picks the dataclass),
``load_file`` (JSON, else HJSON, as DeepSpeed reads configs; duplicate keys are an error) and
``flatten`` (nested dict -> ``{"json.path": value}``, for ``diff`` and "auto" checks).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from typing import Any, Literal

import hjson

from fzero.config.keys import ALIASES, apply_rule, known_keys
from fzero.config.lr_schedules import SCHEDULERS, OneCycle, Scheduler
from fzero.config.notes import note, suggest, warn_no_effect
from fzero.errors import ConfigError, ConfigTypeError

Auto = Literal["auto"]
DtypeName = Literal["fp32", "bf16", "fp16"]

# DeepSpeed's DtypeEnum spellings, folded to fzero's three names.
_DTYPE_ALIASES = {
    "fp32": "fp32",
    "float32": "fp32",
    "float": "fp32",
    "torch.float32": "fp32",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "torch.bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "torch.float16": "fp16",
}

# DeepSpeed nests optimizer settings under "params"; fzero's dataclass is flat. Filled in by the
# module that defines the dataclass: {OptimizerConfig: "params"}.
NESTED_PARAMS: dict[type, str] = {}

# The blocks that DeepSpeed reads with a pydantic ``DeepSpeedConfigModel``, whose constructor
# drops every "auto" value so that the field keeps its default (deepspeed/runtime/config_utils.py,
# ``DeepSpeedConfigModel.__init__``). In these blocks a field that is not typed ``... | Auto``
# takes its default for "auto" too (noted at INFO). Filled in by the modules that
# define the blocks (``zero_block.py``, ``precision_blocks.py``).
DROPS_AUTO: set[type] = set()


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def build(cls: type, data: Any, path: str) -> Any:
    """An instance of dataclass ``cls`` from the JSON object ``data`` found at ``path``."""
    if not isinstance(data, dict):
        raise ConfigTypeError(path, f"expected an object, got {data!r}")
    items = [(key, value, join(path, key)) for key, value in data.items()]
    nested_key = NESTED_PARAMS.get(cls)
    if nested_key is not None and nested_key in data:
        nested = data[nested_key]
        nested_path = join(path, nested_key)
        if not isinstance(nested, dict):
            raise ConfigTypeError(nested_path, f"expected an object, got {nested!r}")
        items = [item for item in items if item[0] != nested_key]
        items += [(key, value, f"{nested_path}.{key}") for key, value in nested.items()]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, value, key_path in items:
        parent = key_path.rpartition(".")[0]
        name = ALIASES.get(key_path, key)
        canonical_path = join(parent, name)
        if name not in fields:
            if apply_rule(canonical_path, value):
                continue
            candidates = {*fields, *known_keys(parent), nested_key} - {None}
            if path == "":
                # DeepSpeed reads the top-level keys it knows and ignores the rest
                # (deepspeed/runtime/config.py, DeepSpeedConfig._initialize_params); inside a
                # block its pydantic models forbid unknown keys, so there they stay errors.
                hint = suggest(key, candidates, cutoff=0.8)  # "; did you mean 'x'?" or ""
                note("ignored", f"{key} ({hint[2:]})" if hint else key)
                continue
            raise ConfigError(key_path, f"unknown key{suggest(key, candidates)}")
        if name in values:
            raise ConfigError(key_path, f"given twice (also as {name!r})")
        if value == "auto" and cls in DROPS_AUTO and not accepts_auto(hints[name]):
            default = fields[name].default
            note("defaults", f"{canonical_path}={default}")
            continue
        values[name] = coerce(hints[name], value, key_path)
    return cls(**values)


def build_scheduler(data: Any) -> Scheduler | None:
    """The learning-rate schedule of the ``scheduler`` block ``data`` (None when absent)."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ConfigTypeError("scheduler", f"expected an object, got {data!r}")
    for key in data:
        if key not in ("type", "params"):
            raise ConfigError(f"scheduler.{key}", f"unknown key{suggest(key, ('type', 'params'))}")
    name = data.get("type")
    if not isinstance(name, str):
        raise ConfigTypeError("scheduler.type", f"expected a scheduler name, got {name!r}")
    if name not in SCHEDULERS:
        raise ConfigError(
            "scheduler.type",
            f"unsupported scheduler {name!r}; fzero implements {', '.join(SCHEDULERS)}"
            + suggest(name, SCHEDULERS),
        )
    scheduler = build(SCHEDULERS[name], data.get("params", {}), "scheduler.params")
    if isinstance(scheduler, OneCycle) and scheduler.cycle_momentum:
        warn_no_effect(
            "scheduler.params.cycle_momentum",
            "fzero keeps Adam's betas fixed (cycle_min_mom, cycle_max_mom and decay_mom_rate are "
            "ignored); set cycle_momentum to false to say so",
        )
    return scheduler


def accepts_auto(hint: Any) -> bool:
    """Whether a field typed ``hint`` holds "auto" until ``Config.resolve``."""
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and Auto in typing.get_args(
        hint
    )


def describe(hint: Any) -> str:
    """What a value of type ``hint`` looks like, for error messages."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(describe(option) for option in typing.get_args(hint))
    if typing.get_origin(hint) is Literal:
        return " or ".join(f'"{option}"' for option in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return "a list"
    if dataclasses.is_dataclass(hint):
        return "an object"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, "null" if hint is type(None) else str(hint))


def coerce(hint: Any, value: Any, path: str) -> Any:
    """``value`` checked against ``hint`` (and converted: 5e8 -> 500000000, list -> tuple)."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else build(hint, value, path)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigTypeError(path, f"expected {describe(hint)}, got null")
        if value == "auto" and Auto in options:
            return "auto"
        (option,) = [o for o in options if o is not type(None) and o != Auto]
        try:
            return coerce(option, value, path)
        except ConfigTypeError as error:
            if error.path != path:  # a nested value is wrong: report that one
                raise
            raise ConfigTypeError(path, f"expected {describe(hint)}, got {value!r}") from None
    if origin is Literal:
        options = typing.get_args(hint)
        if not isinstance(value, str):
            raise ConfigTypeError(path, f"expected {describe(hint)}, got {value!r}")
        if hint == DtypeName:
            value = _DTYPE_ALIASES.get(value.lower(), value)
        if value not in options:
            raise ConfigError(path, f"must be {describe(hint)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigTypeError(path, f"expected a list, got {value!r}")
        item = typing.get_args(hint)[0]
        return tuple(coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigTypeError(path, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        # DeepSpeed configs often write sizes as 5e8; accept integral floats.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigTypeError(path, f"expected an integer, got {value!r}")
        if isinstance(value, float) and not value.is_integer():
            raise ConfigTypeError(path, f"expected an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigTypeError(path, f"expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(path, f"must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigTypeError(path, f"expected a string, got {value!r}")
        return value
    raise ConfigTypeError(path, f"cannot read a value for type {hint}")


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists, tuples and empty objects are leaves."""
    leaves: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            leaves.update(flatten(value, f"{path}."))
        else:
            leaves[path] = list(value) if isinstance(value, tuple) else value
    return leaves


def load_file(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file, or HJSON (DeepSpeed reads its configs with hjson); duplicate keys are errors."""
    with open(path) as f:
        text = f.read()
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError:
        try:
            return hjson.loads(text, object_pairs_hook=_no_duplicate_keys)
        except hjson.HjsonDecodeError as error:
            message = f"{os.fspath(path)} is neither valid JSON nor HJSON: {error}"
            raise ConfigError("", message) from None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise ConfigError(key, "appears twice in the same object of the file")
        data[key] = value
    return data
