"""What ``train_step`` does to a batch before the model sees it: refuse the wrong kinds, and cast
floating-point inputs to the compute dtype.

Kinds. ``train_step`` takes one micro-batch (a mapping, a tuple or a tensor, or anything
``loss_fn`` reads) or a list of them. An iterator or a generator is neither: called with
``model(batch)`` it fails deep inside the model ("forward() missing 1 required positional
argument"), never naming the generator, so it is refused here by its type.

Casting. With bf16 or fp16 compute the parameters are low precision, so a float32 batch fails
in the first matmul ("mat1 and mat2 must have the same dtype"). FSDP2 casts the forward's
floating-point inputs (``MixedPrecisionPolicy(cast_forward_inputs=True)``) and DeepSpeed does so
for fp16 with ``fp16.auto_cast`` (``deepspeed/runtime/engine.py``, ``_cast_inputs_half``). fzero
does it by default (``fzero.cast_forward_inputs``); integer tensors (token ids, labels) are left
alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from fzero.errors import BatchError

if TYPE_CHECKING:
    from fzero.config import Config

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_batch_kind(batch: Any, has_loss_fn: bool) -> None:
    """Raise ``BatchError`` naming the type and what to pass instead when ``batch`` is not one
    micro-batch or a list of them.

    Refused anywhere: an iterator or a generator (``list(...)`` of it is a list of
    micro-batches). Without ``loss_fn`` a micro-batch must be what the model can be called
    with: a mapping (``model(**batch)``), a tuple (``model(*batch)``) or a tensor; a list inside
    the list of micro-batches is refused with that advice, since only the outer list means
    "micro-batches". ``loss_fn`` reads micro-batches of any other kind.
    """
    if isinstance(batch, Iterator):
        raise BatchError(_iterator_message("the batch", batch))
    micro_batches = batch if isinstance(batch, list) else [batch]
    for index, micro_batch in enumerate(micro_batches):
        where = f"micro-batch {index}" if isinstance(batch, list) else "the batch"
        if isinstance(micro_batch, Iterator):
            raise BatchError(_iterator_message(where, micro_batch))
        if has_loss_fn or isinstance(micro_batch, (Mapping, tuple, torch.Tensor)):
            continue
        if isinstance(micro_batch, list):
            raise BatchError(
                f"{where} is a list inside the list of micro-batches: only the outer list means "
                "micro-batches; give each micro-batch as a mapping (model(**batch)), a tuple "
                "(model(*batch)) or a tensor, or pass shard(..., loss_fn=...) to read lists"
            )
        raise BatchError(
            f"{where} is a {type(micro_batch).__name__}: without loss_fn a micro-batch must be a "
            "mapping (model(**batch)), a tuple (model(*batch)) or a tensor (model(batch)); "
            "convert it, or pass shard(..., loss_fn=lambda model, batch: ...)"
        )


def _iterator_message(where: str, value: Any) -> str:
    kind = type(value).__name__
    return (
        f"{where} is a {kind}, an iterator: train_step needs one micro-batch (a mapping, tuple or "
        f"tensor) or a list of them; take one item with next(...), or pass list(...) of it to "
        "accumulate its micro-batches into one step"
    )


def input_cast_dtype(config: Config) -> torch.dtype | None:
    """The dtype floating-point inputs are cast to, or None to pass them as given."""
    name = config.compute_dtype_name
    if name == "fp32":
        return None
    if config.fzero.cast_forward_inputs or (name == "fp16" and config.fp16.auto_cast):
        return _DTYPES[name]
    return None


def cast_floating_inputs(batch: Any, dtype: torch.dtype | None) -> Any:
    """``batch`` with every floating-point tensor cast to ``dtype``, through mappings, lists,
    tuples (named ones too) and dataclasses; other values unchanged. ``dtype`` None: ``batch``."""
    if dtype is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() and batch.dtype != dtype else batch
    if isinstance(batch, Mapping):
        cast = {key: cast_floating_inputs(value, dtype) for key, value in batch.items()}
        try:
            return type(batch)(cast)  # a BatchEncoding or OrderedDict stays one
        except TypeError:
            return cast
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(cast_floating_inputs(value, dtype) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(cast_floating_inputs(value, dtype) for value in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changes = {
            f.name: cast_floating_inputs(getattr(batch, f.name), dtype)
            for f in dataclasses.fields(batch)
            if f.init
        }
        return dataclasses.replace(batch, **changes)
    return batch
