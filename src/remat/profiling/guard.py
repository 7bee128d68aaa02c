"""Shape-only steps: the error for ops that have no shape-only form, and the guard that raises it.

Consumes a model running on ``meta`` (estimate mode, or a transformers model readied by
:func:`remat.integrations.hf.prepare_meta`); produces :class:`NotEstimableError`, naming the module
that ran an op whose output shape depends on tensor values, before the op runs. Both estimate mode
(:mod:`remat.profiling.estimate`) and the transformers integration use it, so it imports neither.
Estimate mode's guard, beneath every other mode, also answers ops it has seen on the same shapes
(:func:`answer_on_meta`), which makes a step on ``meta`` about twice as fast.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from remat._compat import TorchDispatchMode, tree_flatten
from remat.profiling.tracker import DATA_DEPENDENT_OPS

__all__ = ["DataDependentGuard", "NotEstimableError", "answer_on_meta", "module_running"]

_FAST: dict[Any, tuple[bool, bool]] = {}
"""Per op: (whether :func:`answer_on_meta` may answer it, whether it is pointwise)."""
_MISSING = object()
_VOID = object()
_LEAVES = (str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


class NotEstimableError(ValueError):
    """The model runs an op whose output shape depends on tensor values, so shapes alone cannot
    say how much memory it takes.

    Example:
        >>> issubclass(NotEstimableError, ValueError)
        True
    """


def module_running(names: dict[int, str]) -> str:
    """The innermost module whose ``forward`` is on the Python stack, named by ``names`` (``id``
    of a module -> its FQN); found without hooks (global ones would make every recomputed unit
    warn that they run twice).

    Example:
        >>> module_running({})
        '(outside the model)'
    """
    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            return names[id(owner)] or "(the model)"
        frame = frame.f_back
    return "(outside the model)"


class DataDependentGuard(TorchDispatchMode):
    """Raises :class:`NotEstimableError` before an op whose output shape depends on values.

    ``fast_meta=True`` also answers ops on ``meta`` it has seen on the same shapes with
    :func:`answer_on_meta` instead of running their meta kernels again; only for a guard entered
    beneath every other dispatch mode (an answered op would skip the modes beneath it).

    Example:
        >>> model = nn.Linear(2, 2, device="meta")
        >>> with DataDependentGuard(model):
        ...     torch.nonzero(torch.ones(3, device="meta"))
        Traceback (most recent call last):
        ...
        remat.profiling.guard.NotEstimableError: estimate: got a model whose module ...
    """

    def __init__(self, model: nn.Module, *, fast_meta: bool = False) -> None:
        super().__init__()
        self.names = {id(m): name for name, m in model.named_modules()}
        self.memo: dict[Any, Any] | None = {} if fast_meta else None

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(getattr(func, "overloadpacket", func), "__name__", str(func))
        suspect = name in DATA_DEPENDENT_OPS or (
            name == "index"
            and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool
                for i in tree_flatten(args[1:])[0]
            )
        )
        # An optimizer's step counter lives on the CPU and may be read with .item().
        if suspect and any(
            isinstance(t, torch.Tensor) and t.device.type == "meta"
            for t in tree_flatten((args, kwargs))[0]
        ):
            fqn = module_running(self.names)
            raise NotEstimableError(
                f"estimate: got a model whose module {fqn!r} runs {name}, whose output shape"
                " depends on tensor values (data-dependent routing such as mixture-of-experts"
                " dispatch); expected ops with shape-only forms. Fix: profile it on a real device"
                " (mode='measure'), or make the op's shapes static (e.g. capacity-padded expert"
                " dispatch)"
            )
        if self.memo is not None:
            return answer_on_meta(func, args, kwargs or {}, self.memo)
        return func(*args, **(kwargs or {}))


class _Unanswerable(Exception):
    """An argument :func:`answer_on_meta` cannot key on (a tensor off ``meta``, a generator)."""


def _answerable(func: Any) -> tuple[str, bool]:
    """(What ``func`` returns, if :func:`answer_on_meta` may answer it: ``fresh`` for a functional
    op returning one new tensor, ``void`` for an in-place op returning nothing (``_foreach_add_``,
    whose meta kernel only checks shapes), else ``""``; whether it is pointwise.)"""
    known = _FAST.get(func)
    if known is None:
        schema = getattr(func, "_schema", None)
        kind = ""
        if schema is not None and not schema.returns and schema.is_mutable:
            kind = "void"
        elif (
            schema is not None
            and not schema.is_mutable
            and len(schema.returns) == 1
            and str(schema.returns[0].type) == "Tensor"
            and schema.returns[0].alias_info is None
        ):
            kind = "fresh"
        known = (kind, torch.Tag.pointwise in getattr(func, "tags", ()))
        _FAST[func] = known
    return known


def _key(value: Any, pointwise: bool) -> Any:
    """What of ``value`` a meta kernel's output can depend on: a tensor's shape, strides and dtype;
    a scalar's type for a pointwise op (its value never changes a pointwise output's shape or
    dtype), else its value."""
    if isinstance(value, torch.Tensor):
        if type(value) not in (torch.Tensor, nn.Parameter) or value.device.type != "meta":
            raise _Unanswerable
        return (value.shape, value.stride(), value.dtype)
    if isinstance(value, bool | int | float | complex):
        return type(value) if pointwise else (type(value), value)
    if isinstance(value, _LEAVES):
        return value
    if isinstance(value, list | tuple):
        return tuple(_key(v, pointwise) for v in value)
    raise _Unanswerable


def _layout(
    out: Any, inputs: list[Any]
) -> tuple[tuple[int, ...], tuple[int, ...], torch.dtype] | None:
    """(shape, strides, dtype) of a plain meta tensor whose storage is its own (no input's: some
    ops, such as ``_unsafe_view``, return a view without saying so) and exactly what
    ``torch.empty_strided`` would give it; None for any other output."""
    if (
        type(out) is not torch.Tensor
        or out.device.type != "meta"
        or out.layout != torch.strided
        or out.is_conj()
        or out.is_neg()
        or out.storage_offset() != 0
    ):
        return None
    storage = out.untyped_storage()
    if any(isinstance(t, torch.Tensor) and t.untyped_storage() is storage for t in inputs):
        return None
    shape, stride = tuple(out.shape), out.stride()
    span = 0 if 0 in shape else 1 + sum((n - 1) * st for n, st in zip(shape, stride, strict=True))
    if storage.nbytes() != span * out.element_size():
        return None
    return shape, stride, out.dtype


def answer_on_meta(func: Any, args: tuple, kwargs: dict, memo: dict[Any, Any]) -> Any:
    """``func(*args, **kwargs)`` on ``meta``, answered from ``memo`` when the same op has run on
    tensors of the same shapes, strides and dtypes (and the same other arguments) before.

    A meta kernel's output is a function of that alone, so the answer is exact: a new tensor of
    the shape, strides and dtype the op's own kernel gave the first time. Only functional ops
    returning one new tensor with a storage of its own are answered (not views or several
    outputs), and in-place ops returning nothing (on ``meta`` their kernels only check shapes, as
    an optimizer's ``_foreach_*_`` ops), and only for inputs all on ``meta``. PyTorch's meta kernels for many ops
    (every pointwise one) are Python, about half a millisecond each; a model's repeated layers
    and a profile's repeated steps run the same ops on the same shapes again and again.

    Example:
        >>> x = torch.empty(2, 3, device="meta", dtype=torch.bfloat16)
        >>> memo = {}
        >>> for _ in range(2):  # the first call runs the meta kernel, the second is answered
        ...     out = answer_on_meta(torch.ops.aten.mul.Tensor, (x, x), {}, memo)
        >>> out.shape, out.dtype, out.device.type, out.is_contiguous(), len(memo)
        (torch.Size([2, 3]), torch.bfloat16, 'meta', True, 1)
        >>> answer_on_meta(torch.ops.aten.eq.Tensor, (x, x), {}, memo).dtype
        torch.bool
    """
    kind, pointwise = _answerable(func)
    if not kind:
        return func(*args, **kwargs)
    try:
        key = (
            func,
            _key(args, pointwise),
            _key(tuple(kwargs.items()), pointwise),
            torch.get_default_dtype(),  # what factory ops without a dtype make
        )
    except _Unanswerable:
        return func(*args, **kwargs)
    known = memo.get(key, _MISSING)
    if known is _MISSING:
        out = func(*args, **kwargs)
        if kind == "void":  # answered if it changed no input's shape, strides or dtype
            same = out is None and key[1:3] == (
                _key(args, pointwise),
                _key(tuple(kwargs.items()), pointwise),
            )
            memo[key] = _VOID if same else None
        else:
            memo[key] = _layout(out, tree_flatten((args, kwargs))[0])
        return out
    if known is None:
        return func(*args, **kwargs)
    if known is _VOID:
        return None
    shape, stride, dtype = known
    return torch.empty_strided(shape, stride, dtype=dtype, device="meta")
