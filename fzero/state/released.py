"""Released stage-3 parameters: safe tensors with no values instead of views of freed memory.

Stage 3 frees a unit's gathered buffer between uses (``free_storage``). Its parameters are views
into that buffer, so they keep their shapes while their storage holds 0 bytes, and any kernel
that reads them (``print``, ``norm``, ``clone``, ``.numpy()``) reads past the end of the storage:
a segfault or garbage. So a release also switches each parameter's class to a subclass of its
own class whose ``__torch_function__`` lets metadata through (shape, dtype, device,
``requires_grad``, ``.grad``, hashing, hooks) and answers any read of values with a
``ReleasedParameterError`` that names the parameter and the fix; ``repr`` describes the
parameter without reading it. A gather switches the class back before the unit computes.

Why a class switch and not a permanent subclass or a 0-element ``.data``: a gathered parameter
is a plain ``nn.Parameter`` again, so the forward and backward hot path pays nothing (no Python
``__torch_function__`` call per op), and shapes stay the model's own (a 0-element ``.data``
would hand Hugging Face code reading ``weight.shape`` a wrong answer). The switch costs one
attribute store per parameter per gather and release: ``UnitClasses`` works out each
parameter's two classes once, at ``shard``, so a release or a gather is one loop of stores over
a prebuilt tuple (about 100 ns per parameter for both, measured on CPU; see
``benchmarks/release_cost.py``).
Autograd's C++ engine never dispatches through ``__torch_function__``, so saved tensors and
gradient accumulation behave as before.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from fzero.errors import ReleasedParameterError

NAME_ATTRIBUTE = "_fzero_name"
_ORIGINAL_CLASS = "_fzero_class"

_T = torch.Tensor
# What a released parameter still answers: its metadata, its gradient slot and its identity.
# Everything else reads (or writes) its values, which are not there.
METADATA = frozenset(
    {
        _T.shape.__get__,
        _T.dtype.__get__,
        _T.device.__get__,
        _T.layout.__get__,
        _T.ndim.__get__,
        _T.is_cuda.__get__,
        _T.is_meta.__get__,
        _T.is_leaf.__get__,
        _T.grad_fn.__get__,
        _T.requires_grad.__get__,
        _T.requires_grad.__set__,
        _T.grad.__get__,
        _T.grad.__set__,
        _T.grad.__delete__,
        _T.data.__set__,
        _T.__hash__,
        _T.__len__,
        _T.size,
        _T.dim,
        _T.numel,
        _T.nelement,
        _T.element_size,
        _T.stride,
        _T.is_floating_point,
        _T.is_complex,
        _T.is_contiguous,
        _T.requires_grad_,
        _T.register_hook,
        _T.register_post_accumulate_grad_hook,
        _T.data_ptr,
        _T.storage_offset,
        _T.untyped_storage,
        torch._has_compatible_shallow_copy_type,  # Module._apply asks it of every parameter
    }
)


# ``to`` / ``cpu``: asked to stay where and what it is (as
# ``model.to(device)`` asks of every parameter, Hugging Face's Trainer and accelerate before each
# evaluation), a released parameter is its own answer; an actual move reads values.
MOVES = frozenset({_T.to, _T.cpu})


def _unchanged_move(param: torch.Tensor, func: Any, args: tuple, kwargs: dict) -> Any:
    """``param`` itself when the call asks for its own device and dtype, else None."""
    with torch._C.DisableTorchFunctionSubclass():
        device, dtype = param.device, param.dtype
    if func is _T.cpu:
        return param if device.type == "cpu" else None
    try:
        wanted_device, wanted_dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
    except (TypeError, RuntimeError):
        return None
    if wanted_device is not None:
        wanted = torch.device(wanted_device)
        if wanted.type != device.type or wanted.index not in (None, device.index):
            return None
    if wanted_dtype is not None and wanted_dtype != dtype:
        return None
    return param


def _describe(param: torch.Tensor) -> str:
    name = param.__dict__.get(NAME_ATTRIBUTE, "<unnamed>")
    with torch._C.DisableTorchFunctionSubclass():
        shape, dtype = tuple(param.shape), param.dtype
    return f"parameter {name!r} (shape {shape}, {dtype})"


class ReleasedMixin:
    """Mixed into a parameter's class while its stage-3 unit is released (see module doc)."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        if func in MOVES and args and isinstance(args[0], ReleasedMixin):
            moved = _unchanged_move(args[0], func, args[1:], kwargs or {})
            if moved is not None:
                return moved
        released = next((a for a in _tensors(args, kwargs) if isinstance(a, ReleasedMixin)), None)
        what = _describe(released) if released is not None else "a parameter"
        name = getattr(func, "__name__", str(func))
        raise ReleasedParameterError(
            f"{what} was read ({name}) while released: stage 3 keeps only this rank's shard "
            "between uses. Read full parameters inside `with fzero.gathered(state):` (all ranks "
            "together), or take a copy with fzero.full_state_dict(state); run the model itself "
            "(its forward gathers each unit) rather than one of its submodules alone"
        )

    def __repr__(self) -> str:
        return (
            f"<released {_describe(self)}: its values are sharded; read them inside "
            "`with fzero.gathered(state):`>"
        )


def _tensors(args: Any, kwargs: Any) -> Iterable[Any]:
    for value in (*args, *(kwargs or {}).values()):
        if isinstance(value, (list, tuple)):
            yield from value
        else:
            yield value


_released_classes: dict[type, type] = {}


def _released_class(original: type) -> type:
    cls = _released_classes.get(original)
    if cls is None:
        cls = type(f"Released{original.__name__}", (ReleasedMixin, original), {})
        _released_classes[original] = cls
    return cls


def name_params(params: Iterable[nn.Parameter], names: Iterable[str]) -> None:
    """Remember each parameter's name for the errors a released read raises."""
    for param, name in zip(params, names, strict=True):
        param.__dict__[NAME_ATTRIBUTE] = name


def mark_released(params: Iterable[nn.Parameter]) -> None:
    """Make ``params`` (whose storage was just freed) refuse reads instead of reading freed
    memory."""
    for param in params:
        cls = type(param)
        if not issubclass(cls, ReleasedMixin):
            param.__dict__[_ORIGINAL_CLASS] = cls
            param.__class__ = _released_class(cls)


def original_class(param: torch.Tensor) -> type:
    """``param``'s own class, released or not."""
    if isinstance(param, ReleasedMixin):
        return param.__dict__[_ORIGINAL_CLASS]
    return type(param)


class UnitClasses:
    """One unit's parameters with both their classes, worked out once: ``release`` and
    ``gather`` are then a store per parameter (the hot path of every stage-3 gather and
    release), and either may run in any state (each sets the class outright)."""

    __slots__ = ("_released", "_gathered")

    def __init__(self, params: Iterable[nn.Parameter]):
        params = tuple(params)
        originals = tuple(original_class(param) for param in params)
        for param, cls in zip(params, originals):
            param.__dict__[_ORIGINAL_CLASS] = cls
        self._released = tuple((p, _released_class(cls)) for p, cls in zip(params, originals))
        self._gathered = tuple(zip(params, originals))

    def release(self) -> None:
        """Make the parameters (whose storage was just freed) refuse reads."""
        for param, cls in self._released:
            param.__class__ = cls

    def gather(self) -> None:
        """Give the parameters (whose storage now holds values) their own class back."""
        for param, cls in self._gathered:
            param.__class__ = cls


def is_released(param: torch.Tensor) -> bool:
    return isinstance(param, ReleasedMixin)
