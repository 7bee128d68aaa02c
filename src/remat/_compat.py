"""Every private or version-dependent torch API that remat uses, in one place.

Each function says why it needs what it uses, so that a torch upgrade touches this file only.
:data:`VERSION_PATHS` names each of them: the torch API, the release that introduced or last changed
it, and what remat does where it is missing. remat supports torch 2.11 and later (pyproject), and
is tested on 2.11 (CUDA, scripts/gpu_check.sh) and 2.13 (CPU); tests/unit/test_compat_versions.py
checks every path on the installed torch and each fallback by hiding what it falls back from.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# StorageWeakRef is the weak storage reference torch's own sharing of tensors between processes
# uses (a private module, stable since 1.x; imported by ``import torch``).
from torch.multiprocessing.reductions import StorageWeakRef

# TorchDispatchMode is public in name and documented, but lives in a private module.
from torch.utils._python_dispatch import TorchDispatchMode

# pytree is the flattening torch itself uses for op arguments and module outputs (private module,
# stable since 1.13); it handles tuples, lists, dicts, NamedTuples and registered dataclasses.
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

__all__ = [
    "MIN_TORCH",
    "VERSION_PATHS",
    "TorchDispatchMode",
    "VersionPath",
    "attention_op",
    "compile_with_activation_budget",
    "compiled_original",
    "detached",
    "flop_formula",
    "forward_hook_count",
    "function_modes",
    "global_forward_hook_count",
    "in_backward",
    "is_fake_tensor",
    "is_module_compiled",
    "local_tensor",
    "no_dispatch_modes",
    "on_storage_resize",
    "op_is_view",
    "op_writes_inputs",
    "op_writes_self",
    "sdpa_backend",
    "storage_id",
    "storage_ref",
    "tensor_base",
    "tensor_version",
    "tree_flatten",
    "tree_map",
    "tree_unflatten",
]


def in_backward() -> bool:
    """Whether the calling thread is running the autograd engine (inside ``backward()``).

    torch exposes no public query; ``torch.utils.checkpoint`` itself uses
    ``torch._C._current_graph_task_id``, which is -1 outside a graph task.
    """
    return torch._C._current_graph_task_id() != -1


def tensor_base(tensor: torch.Tensor) -> torch.Tensor | None:
    """The tensor ``tensor`` is a view of (``Tensor._base``), or ``None``: a parameter's ``.t()``
    that a Linear saves is a view of the parameter, so it costs no activation memory."""
    return tensor._base


_ATTENTION_OPS = {
    "math": "_scaled_dot_product_attention_math",
    "flash": "_scaled_dot_product_flash_attention",
    "efficient": "_scaled_dot_product_efficient_attention",
    "flash_cpu": "_scaled_dot_product_flash_attention_for_cpu",
}


def attention_op(kernel: str) -> Any:
    """The aten op of one scaled-dot-product-attention kernel (``math``, ``flash``,
    ``efficient``, ``flash_cpu``): torch's private ``aten._scaled_dot_product_*`` ops, which
    estimate mode calls on ``meta`` to model what a target device's kernel stores."""
    return getattr(torch.ops.aten, _ATTENTION_OPS[kernel])


def tensor_version(tensor: torch.Tensor) -> int:
    """The version counter that in-place ops bump (``Tensor._version``); used to detect in-place
    changes to a checkpointed unit's stored inputs and to buffers during recompute."""
    return int(tensor._version)


def is_fake_tensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``FakeTensor`` (shapes only, no storage of its own)."""
    from torch._subclasses.fake_tensor import FakeTensor  # private module, stable since 2.0

    return isinstance(tensor, FakeTensor)


def forward_hook_count(module: torch.nn.Module) -> int:
    """Forward and forward-pre hooks registered on one module (``Module._forward_hooks`` and
    ``_forward_pre_hooks`` are private dicts; there is no public way to list hooks)."""
    return len(module._forward_hooks) + len(module._forward_pre_hooks)


def global_forward_hook_count() -> int:
    """Hooks registered with ``register_module_forward_hook`` / ``_pre_hook``, which run for
    every module (private dicts of ``torch.nn.modules.module``)."""
    from torch.nn.modules import module as module_module

    return len(module_module._global_forward_hooks) + len(module_module._global_forward_pre_hooks)


def flop_formula(func: Any) -> Callable[..., int] | None:
    """The FLOP formula that ``torch.utils.flop_counter`` registers for an aten op, or ``None``.

    ``flop_registry`` is a module-level table of ``torch.utils.flop_counter`` (not underscored but
    undocumented); each formula is called as ``formula(*args, **kwargs, out_val=out)``.
    """
    from torch.utils.flop_counter import flop_registry

    return flop_registry.get(getattr(func, "overloadpacket", func))


def op_is_view(func: Any) -> bool:
    """Whether an aten op returns a view of an input (``OpOverload.is_view``, from its schema)."""
    return bool(getattr(func, "is_view", False))


def op_writes_inputs(func: Any) -> bool:
    """Whether an aten op writes into an argument (in-place and ``out=`` variants): its schema's
    alias annotations (``Tensor(a!)``), read through the private ``OpOverload._schema``."""
    schema = getattr(func, "_schema", None)
    if schema is None:
        return True  # unknown: assume it may
    return any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def op_writes_self(func: Any) -> bool:
    """Whether an aten op is an in-place op on its first argument that returns it (``bernoulli_``,
    ``div_``): the first argument and the only return are annotated ``Tensor(a!)`` in the private
    ``OpOverload._schema``."""
    schema = getattr(func, "_schema", None)
    if schema is None or not schema.arguments or len(schema.returns) != 1:
        return False
    first, result = schema.arguments[0].alias_info, schema.returns[0].alias_info
    return (
        first is not None
        and first.is_write
        and result is not None
        and result.is_write
        and set(first.before_set) == set(result.before_set)
    )


def no_dispatch_modes() -> Any:
    """A context in which no ``TorchDispatchMode`` sees the ops run (for bookkeeping that must not
    count as the model's work, such as ``verify`` copying module outputs): the private
    ``torch.utils._python_dispatch._disable_current_modes``."""
    from torch.utils._python_dispatch import _disable_current_modes

    return _disable_current_modes()


def detached(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor.detach()`` that no ``TorchDispatchMode`` sees, for remat's own bookkeeping inside
    a unit's forward or replay (the selective op log and replay cache would otherwise take the
    detach for one of the unit's ops, and each round trip through a Python mode costs
    microseconds). The private ``torch._C._DisableTorchDispatch`` guard (what
    ``torch.utils._mode_utils.no_dispatch`` is) is used for plain tensors only: a tensor subclass
    (a ``FakeTensor``, a ``DTensor``) dispatches through the same Python key, so it is detached
    the ordinary way.

    Example:
        >>> x = torch.ones(2, requires_grad=True)
        >>> y = detached(x * 2)
        >>> y.requires_grad, y.tolist()
        (False, [2.0, 2.0])
    """
    if type(tensor) is torch.Tensor or type(tensor) is torch.nn.Parameter:
        with torch._C._DisableTorchDispatch():
            return tensor.detach()
    return tensor.detach()


_PLAIN_TENSORS = frozenset(
    {torch.Tensor, torch.nn.Parameter, getattr(torch.nn, "Buffer", torch.Tensor)}
)
"""Tensor types whose ``data_ptr()`` is their own memory's (no wrapper subclass)."""


def storage_id(tensor: torch.Tensor) -> int | None:
    """An identity of the memory ``tensor`` views, equal for every view of one storage and
    distinct between storages alive at the same time; ``None`` for a tensor without storage
    (sparse, nested). A freed storage's identity may be given to a later one (hold a
    :func:`storage_ref` to tell).

    For a plain tensor (a parameter or buffer too) with memory it is the address where its storage's data starts
    (``data_ptr()`` less the view's offset): it does not touch the storage's Python object,
    which torch creates and frees again on every ``untyped_storage()`` call once anything holds a
    weak reference to the storage (microseconds each time). Otherwise (a tensor subclass such as
    ``FakeTensor``, a meta tensor, an empty storage) it is the address of its ``StorageImpl``
    (the private ``UntypedStorage._cdata``).

    Example:
        >>> x = torch.zeros(4)
        >>> storage_id(x) == storage_id(x[1:]) != storage_id(x.clone())
        True
        >>> y = torch.zeros(4, device="meta")
        >>> storage_id(y) == storage_id(y[1:]) != storage_id(torch.zeros(4, device="meta"))
        True
    """
    if type(tensor) in _PLAIN_TENSORS:
        try:
            base = tensor.data_ptr() - tensor.storage_offset() * tensor.element_size()
        except RuntimeError:  # sparse
            return None
        if base:  # a meta tensor's or an empty storage's is 0
            return base
    try:
        return int(tensor.untyped_storage()._cdata)
    except (RuntimeError, NotImplementedError):
        return None


def storage_ref(tensor: torch.Tensor) -> Any:
    """A weak reference to ``tensor``'s storage (torch's ``StorageWeakRef``, from the private
    ``torch.multiprocessing.reductions``): ``expired()`` once the memory is freed, whatever views
    of it lived on. It holds no Python weakref on the storage's Python object.

    Example:
        >>> x = torch.zeros(4)
        >>> ref = storage_ref(x[2:])
        >>> ref.expired()
        False
        >>> del x
        >>> ref.expired()
        True
    """
    return StorageWeakRef(tensor.untyped_storage())


def function_modes() -> list[Any]:
    """The active ``TorchFunctionMode`` stack, outermost first.

    ``torch.overrides._get_current_function_mode_stack`` is private; the autograd engine does not
    carry function modes into backward, so a checkpoint replay re-enters the modes its forward ran
    under (estimate mode's kernel models are one), as it restores the autocast state.
    """
    from torch.overrides import _get_current_function_mode_stack

    return list(_get_current_function_mode_stack())


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's own part of a ``DTensor`` (FSDP2's sharded parameters and gradients), else the
    tensor itself: memory is accounted by the storage the rank holds.

    ``DTensor._local_tensor`` is a private attribute; the public ``to_local()`` returns a new view
    with autograd attached, which a dispatch-mode tracker must not create for every op.
    """
    local = getattr(tensor, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else tensor


def is_module_compiled(module: torch.nn.Module) -> bool:
    """Whether ``module.compile()`` was called on it: ``nn.Module.compile`` stores the compiled
    ``_call_impl`` in the private attribute ``_compiled_call_impl`` (``None`` otherwise)."""
    return getattr(module, "_compiled_call_impl", None) is not None


def compiled_original(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside ``torch.compile(model)``'s ``OptimizedModule`` (its private ``_orig_mod``),
    else ``module`` itself: remat plans the model's own modules, not the wrapper's."""
    import sys

    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing was compiled
    if eval_frame is not None and isinstance(module, eval_frame.OptimizedModule):
        return module._orig_mod
    return module


_RESIZE_CALLBACKS: list[Callable[[torch.UntypedStorage], None]] = []
_ORIGINAL_RESIZE: list[Any] = []


class _ResizeHandle:
    def __init__(self, callback: Callable[[torch.UntypedStorage], None]) -> None:
        self.callback = callback

    def remove(self) -> None:
        if self.callback in _RESIZE_CALLBACKS:
            _RESIZE_CALLBACKS.remove(self.callback)
        if not _RESIZE_CALLBACKS and _ORIGINAL_RESIZE:
            torch.UntypedStorage.resize_ = _ORIGINAL_RESIZE.pop()  # type: ignore[method-assign]


def on_storage_resize(callback: Callable[[torch.UntypedStorage], None]) -> _ResizeHandle:
    """Call ``callback(storage)`` after every ``UntypedStorage.resize_`` until the handle's
    ``remove()``.

    FSDP2 frees a unit's gathered parameters and allocates them again by resizing their storage
    (``free_storage`` / ``alloc_storage`` in ``torch.distributed.fsdp._fully_shard._fsdp_param``),
    a call that no dispatch mode sees. torch offers no hook for it, so the Python method
    ``UntypedStorage.resize_`` is wrapped while a callback is registered and restored after.
    """
    if not _ORIGINAL_RESIZE:
        original = torch.UntypedStorage.resize_
        _ORIGINAL_RESIZE.append(original)

        def resize_(self: torch.UntypedStorage, size: int) -> Any:
            result = original(self, size)
            for registered in list(_RESIZE_CALLBACKS):
                registered(self)
            return result

        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]
    _RESIZE_CALLBACKS.append(callback)
    return _ResizeHandle(callback)


def compile_with_activation_budget(model: torch.nn.Module, fraction: float) -> torch.nn.Module:
    """``torch.compile(model)`` whose partitioner keeps at most ``fraction`` of the saved
    activation bytes (``torch._functorch.config.activation_memory_budget``, private, 0..1).

    The config is read when the joint graph is partitioned, inside the backend, so the backend
    sets it around inductor's ``compile_fx`` (private). Dynamo caches compiled graphs on the code
    object of the frame it starts from, with no guard on this config, so each call wraps the model
    in a module whose ``forward`` has a code object of its own: models compiled at different
    fractions then compile separately instead of sharing the first one's graph.
    """
    import types

    def backend(graph: Any, example_inputs: Any) -> Any:
        # imported here: inductor takes seconds to import, and only compiling needs it
        import torch._functorch.config as functorch_config
        from torch._inductor.compile_fx import compile_fx

        with functorch_config.patch(activation_memory_budget=fraction):
            return compile_fx(graph, example_inputs)

    code = _BudgetWrapper.forward.__code__.replace(co_name=f"forward_budget_{id(backend)}")
    wrapper = _BudgetWrapper(model)
    wrapper.forward = types.MethodType(  # type: ignore[method-assign]
        types.FunctionType(code, _BudgetWrapper.forward.__globals__), wrapper
    )
    return torch.compile(wrapper, backend=backend)


class _BudgetWrapper(torch.nn.Module):
    """Holds the model as ``inner`` (so parameters are shared) and forwards every call to it."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)


def sdpa_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Any,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    *,
    enable_gqa: bool = False,
) -> str:
    """The kernel ``F.scaled_dot_product_attention`` picks for these arguments on their device
    (``"flash_attention"``, ``"efficient_attention"``, ``"math"``, ...): the private
    ``torch._fused_sdp_choice``, which returns an ``SDPBackend`` value."""
    extra = {"enable_gqa": True} if enable_gqa else {}  # the argument is new in torch 2.5
    choice = torch._fused_sdp_choice(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, **extra)
    try:
        name = torch.nn.attention.SDPBackend(choice).name
    except ValueError:
        name = "???"
    if name == "???":  # a backend this torch's enum does not name (pybind's name for it is ???)
        return f"backend_{int(choice)}"
    return name.lower()


MIN_TORCH = (2, 11)
"""The oldest torch remat supports (pyproject's ``torch>=2.11``)."""


@dataclass(frozen=True)
class VersionPath:
    """One private or version-dependent torch API that remat uses, and what it does without it.

    ``api`` is a dotted path from ``torch`` (``module:attribute.attribute`` where the module is not
    imported by ``import torch``); ``since`` the torch release that introduced it or last changed
    what remat relies on; ``fallback`` what remat does where it is missing (``None``: nothing, it is
    required, and torch >= :data:`MIN_TORCH` has it).

    Example:
        >>> path = next(p for p in VERSION_PATHS if p.function == "sdpa_backend")
        >>> path.api, path.since <= MIN_TORCH, path.resolve() is torch._fused_sdp_choice
        ('torch._fused_sdp_choice', True, True)
    """

    function: str
    api: str
    since: tuple[int, int]
    fallback: str | None = None

    def resolve(self) -> Any:
        """The object ``api`` names on the installed torch; ``AttributeError`` /
        ``ImportError`` where it has none."""
        module_name, _, attributes = self.api.partition(":")
        if not attributes:
            module_name, attributes = "torch", self.api.removeprefix("torch.")
        obj: Any = importlib.import_module(module_name)
        for name in attributes.split("."):
            obj = getattr(obj, name)
        return obj


VERSION_PATHS: tuple[VersionPath, ...] = (
    VersionPath("TorchDispatchMode", "torch.utils._python_dispatch:TorchDispatchMode", (2, 0)),
    VersionPath("tree_flatten", "torch.utils._pytree:tree_flatten", (2, 0)),
    VersionPath("tree_unflatten", "torch.utils._pytree:tree_unflatten", (2, 0)),
    VersionPath("tree_map", "torch.utils._pytree:tree_map", (2, 0)),
    VersionPath("in_backward", "torch._C._current_graph_task_id", (2, 1)),
    VersionPath("tensor_version", "torch.Tensor._version", (1, 0)),
    VersionPath("tensor_base", "torch.Tensor._base", (1, 0)),
    VersionPath("attention_op", "torch.ops.aten._scaled_dot_product_attention_math", (2, 0)),
    VersionPath("attention_op", "torch.ops.aten._scaled_dot_product_flash_attention", (2, 0)),
    VersionPath("attention_op", "torch.ops.aten._scaled_dot_product_efficient_attention", (2, 0)),
    VersionPath(
        "attention_op", "torch.ops.aten._scaled_dot_product_flash_attention_for_cpu", (2, 2)
    ),
    VersionPath("is_fake_tensor", "torch._subclasses.fake_tensor:FakeTensor", (2, 0)),
    VersionPath("forward_hook_count", "torch.nn.Module.__init__", (1, 0)),  # _forward_hooks dicts
    VersionPath(
        "global_forward_hook_count", "torch.nn.modules.module:_global_forward_hooks", (1, 13)
    ),
    VersionPath("flop_formula", "torch.utils.flop_counter:flop_registry", (2, 1)),
    VersionPath(
        "op_is_view",
        "torch.ops.aten.view.default.is_view",
        (2, 0),
        "no is_view: not a view (False)",
    ),
    VersionPath(
        "op_writes_inputs",
        "torch.ops.aten.add_.Tensor._schema",
        (2, 0),
        "no _schema: assume the op may write its inputs (True)",
    ),
    VersionPath(
        "op_writes_self",
        "torch.ops.aten.add_.Tensor._schema",
        (2, 0),
        "no _schema: not an in-place op on its first argument (False)",
    ),
    VersionPath("no_dispatch_modes", "torch.utils._python_dispatch:_disable_current_modes", (2, 0)),
    VersionPath("detached", "torch._C._DisableTorchDispatch", (2, 0)),
    VersionPath("storage_id", "torch.UntypedStorage._cdata", (2, 0)),
    VersionPath("storage_ref", "torch.multiprocessing.reductions:StorageWeakRef", (2, 0)),
    VersionPath("function_modes", "torch.overrides:_get_current_function_mode_stack", (2, 0)),
    VersionPath(
        "local_tensor",
        "torch.distributed.tensor:DTensor",
        (2, 4),
        "no _local_tensor attribute: the tensor itself (not a DTensor)",
    ),
    VersionPath(
        "is_module_compiled",
        "torch.nn.Module.compile",
        (2, 2),
        "no _compiled_call_impl attribute: not compiled (False)",
    ),
    VersionPath(
        "compiled_original",
        "torch._dynamo.eval_frame:OptimizedModule",
        (2, 0),
        "torch._dynamo not imported: nothing was compiled, the module itself",
    ),
    VersionPath(
        "on_storage_resize",
        "torch.UntypedStorage.resize_",
        (2, 6),  # FSDP2's fully_shard public in torch.distributed.fsdp, its _fsdp_param resizing
    ),
    VersionPath(
        "compile_with_activation_budget",
        "torch._functorch.config:activation_memory_budget",
        (2, 4),
    ),
    VersionPath("compile_with_activation_budget", "torch._inductor.compile_fx:compile_fx", (2, 0)),
    VersionPath(
        "sdpa_backend",
        "torch._fused_sdp_choice",
        (2, 5),  # enable_gqa=; on sm90 with cuDNN > 9.15 it may answer cudnn_attention first
        "enable_gqa passed only when True (older torch takes no such argument); a choice the"
        " SDPBackend enum does not name is backend_<number>",
    ),
    VersionPath("sdpa_backend", "torch.nn.attention:SDPBackend", (2, 3)),
    VersionPath("integrations.distributed", "torch.distributed.fsdp:fully_shard", (2, 6)),
)
"""Each private or version-dependent torch API remat uses (see :class:`VersionPath`)."""
