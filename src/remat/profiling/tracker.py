"""An exact tracker of tensor memory, the same on CPU, CUDA, ``meta`` and under ``FakeTensorMode``.

:func:`track_memory` is a context manager built on a ``TorchDispatchMode``. Every aten op that runs
inside it is seen after it returns: each output whose storage the tracker has not seen yet is a new
allocation of ``storage.nbytes()`` bytes, and a weakref finalizer on the storage releases it when the
storage dies. Accounting is keyed by storage, not tensor, so views are never counted twice. Because
nothing but shapes and dtypes is read, the numbers are identical whether the tensors are real, on
``meta`` or fake: a model's peak can be measured exactly without the memory or the hardware.

Tensors that existed before entry (parameters, buffers, gradients and optimizer state of the roots
passed in, and any other tensor an op reads) are the static base, counted once, so that
``peak_bytes`` is the whole step's peak.

Consumes: the ops run inside the ``with`` block. Produces: :class:`MemoryReport`, with the peak, the
peak by category and by module FQN and phase, and per-module activation bytes, output bytes, FLOPs and
(optionally) op time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from remat import _compat
from remat._compat import TorchDispatchMode, tree_flatten
from remat.profiling.meta_kernels import mirror_cpu_on_meta
from remat.profiling.target import current_target

__all__ = [
    "CATEGORIES",
    "PHASES",
    "MemoryReport",
    "MemoryTracker",
    "ModuleStats",
    "current_capacity",
    "host_allocations",
    "simulated_capacity",
    "track_memory",
]

logger = logging.getLogger(__name__)

CATEGORIES = (
    "parameter",
    "buffer",
    "gradient",
    "optimizer_state",
    "input",
    "activation",
    "transient",
)
"""Where a byte belongs. ``input``: a tensor that existed before entry and is none of the others
(the batch). ``activation``: created in forward and still alive when that forward ended (what autograd
keeps for backward, and the outputs). ``transient``: everything else created inside (temporaries,
recomputed activations, gradients of non-leaf tensors)."""

PHASES = ("forward", "backward", "optimizer")

DATA_DEPENDENT_OPS = frozenset(
    {
        "nonzero",
        "masked_select",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "_local_scalar_dense",
        "bincount",
        "repeat_interleave",
    }
)
"""aten ops whose output shape (or a Python value) depends on tensor values, not shapes alone;
indexing with a boolean mask is one too."""

_ROOT = ""
_STATIC = -1
_HOST = threading.local()


@contextlib.contextmanager
def host_allocations() -> Iterator[None]:
    """Storages created inside are host memory (offloaded activations): trackers count them in
    ``host_bytes`` / ``host_peak_bytes``, apart from the device's live total.

    Example:
        >>> import torch
        >>> x = torch.ones(256)
        >>> with track_memory(x) as tracker:
        ...     with host_allocations():
        ...         copy = x.clone()
        ...     y = x * 2
        >>> tracker.peak_bytes - tracker.static_bytes, tracker.host_peak_bytes
        (1024, 1024)
    """
    _HOST.depth = getattr(_HOST, "depth", 0) + 1
    try:
        yield
    finally:
        _HOST.depth -= 1


@dataclass(kw_only=True)
class ModuleStats:
    """What one module did during the first training step inside the tracker.

    Example:
        >>> ModuleStats(activation_bytes=96, output_bytes=32).saved_bytes
        64
    """

    calls: int = 0
    """Forward calls (recompute during backward not included)."""
    activation_bytes: int = 0
    """Bytes created in this module's forward (submodules included) and alive when the forward ended."""
    output_bytes: int = 0
    """Bytes of this module's outputs that it created (views of its inputs excluded)."""
    forward_flops: int = 0
    backward_flops: int = 0
    """FLOPs of the ops run in backward while this module was current, recompute included."""
    forward_ms: float | None = None
    """Summed op time in forward; ``None`` unless ops were timed (real devices only)."""
    backward_ms: float | None = None

    @property
    def saved_bytes(self) -> int:
        """Activation bytes other than the module's own outputs: what recomputing it frees."""
        return max(self.activation_bytes - self.output_bytes, 0)


@dataclass(frozen=True, kw_only=True)
class MemoryReport:
    """The tracker's measurements; every byte count is of live tensor storage.

    Example:
        >>> import torch
        >>> x = torch.ones(4, 4, requires_grad=True)
        >>> with track_memory(x) as tracker:
        ...     (x * 2).exp().sum().backward()
        >>> report = tracker.report()
        >>> report.static_bytes, sum(report.peak_by_category.values()) == report.peak_bytes
        (64, True)
    """

    peak_bytes: int
    """Largest number of live bytes at any point inside the tracker, static base included."""
    current_bytes: int
    """Live bytes when the report was made."""
    static_bytes: int
    """Bytes of the tensors that existed before entry (parameters, buffers, ...), counted once."""
    peak_phase: str
    """Phase in which the peak was reached: forward, backward, optimizer or "static"."""
    peak_module: str
    """FQN of the module running when the peak was reached ("" for none)."""
    peak_by_category: dict[str, int]
    """Live bytes at the peak, by category (see ``CATEGORIES``); sums to ``peak_bytes``."""
    module_peaks: dict[str, dict[str, int]]
    """Per module FQN, per phase, the largest live total while that module was running."""
    modules: dict[str, ModuleStats]
    """Per module FQN ("" is the whole step): activation, output bytes, FLOPs, time."""
    data_dependent_ops: dict[str, list[str]] = field(default_factory=dict)
    """Per module FQN (innermost), the data-dependent ops it ran in forward (see
    ``DATA_DEPENDENT_OPS``)."""
    num_allocations: int
    host_peak_bytes: int = 0
    """Largest total of host bytes (see :func:`host_allocations`), not part of ``peak_bytes``."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        data = dataclasses.asdict(self)
        for fqn, stats in self.modules.items():
            data["modules"][fqn]["saved_bytes"] = stats.saved_bytes
        return data


@dataclass
class Mark:
    """An interval of the tracked run, from one ``mark()`` to the next."""

    label: Any
    start_bytes: int
    """Live bytes when the interval began."""
    peak_bytes: int
    """Largest live total inside the interval (at least ``start_bytes``)."""
    event: int = 0
    """The tracker's event counter when the interval began (see ``lifetimes``)."""


@dataclass(eq=False)
class _Storage:
    nbytes: int
    device: str
    created_at: int
    phase: str
    segment: int
    fqn: str
    category: str | None = None
    died_at: int | None = None


@dataclass
class _ModuleAcc:
    calls: int = 0
    outputs: list[_Storage] = field(default_factory=list)
    flops: dict[str, int] = field(default_factory=lambda: {"forward": 0, "backward": 0})
    ms: dict[str, float] = field(default_factory=lambda: {"forward": 0.0, "backward": 0.0})


class MemoryTracker(TorchDispatchMode):
    """The dispatch mode behind :func:`track_memory`; use that function to create one."""

    def __init__(
        self,
        roots: Iterable[Any] = (),
        *,
        device: str | torch.device | None = None,
        time_ops: bool = False,
        round_bytes: int | None = None,
    ) -> None:
        super().__init__()
        self._roots = list(roots)
        self._device_type = torch.device(device).type if device is not None else None
        self._time_ops = time_ops
        if round_bytes is not None and round_bytes < 1:
            raise ValueError(f"round_bytes: got {round_bytes}; expected an integer >= 1")
        if round_bytes is None:  # a modelled target (estimate mode) may round like its allocator
            target = current_target()
            round_bytes = target.round_bytes if target is not None else None
        self._round_bytes = round_bytes
        self._live: dict[int, _Storage] = {}
        self._finalizers: list[weakref.finalize] = []
        self._all: list[_Storage] = []
        self._event = 0
        self.current_bytes = 0
        self.peak_bytes = 0
        self.static_bytes = 0
        self.host_bytes = 0
        self.host_peak_bytes = 0
        self._peak_event = _STATIC
        self._peak_phase = "static"
        self._peak_fqn = _ROOT
        self._module_peaks: dict[str, dict[str, int]] = defaultdict(dict)
        self._modules: dict[str, _ModuleAcc] = defaultdict(_ModuleAcc)
        self._names: dict[int, str] = {}
        self._ancestors: dict[str, tuple[str, ...]] = {}
        self._fw_stack: list[str] = []
        self._bw_module = _ROOT
        self._bw_set_at = -1
        self._num_ops = 0
        self._phase = "forward"
        self._in_optimizer = 0
        self._segment = 0
        self._segment_end: dict[int, int] = {}
        self._handles: list[Any] = []
        self._active = False
        self._meta_mirror: Any = None
        self._report: MemoryReport | None = None
        self._param_ids: set[int] = set()
        self.marks: list[Mark] = []
        self._data_dependent: dict[str, set[str]] = defaultdict(set)
        self.observer: Callable[[Any, str, str, int], None] | None = None
        """Called after each op is accounted, with the op, its phase, the module FQN running it
        and the event counter (see ``lifetimes``); ``None`` (the default): nothing is called.
        ``remat.timeline`` sets it to record the live total op by op."""

    # ----------------------------------------------------------------------------- entry / exit
    def __enter__(self) -> MemoryTracker:
        self._active = True
        for root in self._roots:
            self._register_root(root)
        nn_module = torch.nn.modules.module
        self._handles += [
            nn_module.register_module_forward_pre_hook(self._on_forward_pre),
            nn_module.register_module_forward_hook(self._on_forward_post),
            register_optimizer_step_pre_hook(self._on_optimizer_pre),
            register_optimizer_step_post_hook(self._on_optimizer_post),
            _compat.on_storage_resize(self._on_resize),
        ]
        # Shape-only runs with no modelled target mirror the CPU's attention kernel choice, so
        # their bytes are the CPU's (meta alone would take the math path and keep score matrices).
        # The CPU's kernels on meta, beneath this mode, so what they correct is what is counted.
        self._meta_mirror = mirror_cpu_on_meta(*self._roots)
        self._meta_mirror.__enter__()
        super().__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        super().__exit__(*exc_info)
        if self._meta_mirror is not None:
            self._meta_mirror.__exit__(*exc_info)
            self._meta_mirror = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._report = self._make_report()
        self._active = False
        # The finalizers are held by Python's registry until their storages die, and they hold
        # this tracker and its roots (the model, the optimizer and its state): detached here, or
        # every tracked step would keep its optimizer's state alive for good.
        for finalizer in self._finalizers:
            finalizer.detach()
        self._finalizers.clear()
        self._roots = []

    def report(self) -> MemoryReport:
        """The measurements so far (inside the block) or final (after it)."""
        return self._report if self._report is not None else self._make_report()

    # ---------------------------------------------------------------------------- registration
    def _register_root(self, root: Any) -> None:
        if isinstance(root, torch.nn.Module):
            for name, module in root.named_modules(remove_duplicate=False):
                self._names.setdefault(id(module), name)
            for param in root.parameters():
                self._param_ids.add(id(param))
                self._add_static(param, "parameter")
                if param.grad is not None:
                    self._add_static(param.grad, "gradient")
                if param.requires_grad:
                    self._handles.append(param.register_post_accumulate_grad_hook(self._on_grad))
            for buffer in root.buffers():
                self._add_static(buffer, "buffer")
        elif isinstance(root, torch.optim.Optimizer):
            for group in root.param_groups:
                for param in group["params"]:
                    self._add_static(param, "parameter")
            for state in root.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor):
                        self._add_static(value, "optimizer_state")
        else:
            for leaf in tree_flatten(root)[0]:
                if isinstance(leaf, torch.Tensor):
                    self._add_static(leaf, "input")

    def _storage(self, tensor: torch.Tensor) -> torch.UntypedStorage | None:
        if self._device_type is not None and tensor.device.type != self._device_type:
            return None
        tensor = _compat.local_tensor(tensor)
        try:
            return tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse, nested: no single storage
            return None

    def _size(self, storage: torch.UntypedStorage) -> int:
        nbytes = storage.nbytes()
        rounding = self._round_bytes or (512 if storage.device.type == "cuda" else 1)
        return -(-nbytes // rounding) * rounding

    def _add_static(self, tensor: torch.Tensor, category: str) -> None:
        storage = self._storage(tensor)
        if storage is None:
            return
        info = self._live.get(id(storage))
        if info is not None:
            if info.created_at == _STATIC and info.category in ("input", None):
                info.category = category
            return
        info = _Storage(
            self._size(storage), storage.device.type, _STATIC, "static", 0, _ROOT, category
        )
        self._track(storage, info)
        # It was alive from entry until now: every total measured so far included it.
        self.static_bytes += info.nbytes
        self.current_bytes += info.nbytes
        self.peak_bytes += info.nbytes
        for phases in self._module_peaks.values():
            for phase in phases:
                phases[phase] += info.nbytes
        for mark in self.marks:
            mark.start_bytes += info.nbytes
            mark.peak_bytes += info.nbytes

    def _track(self, storage: torch.UntypedStorage, info: _Storage) -> None:
        key = id(storage)
        self._live[key] = info
        self._all.append(info)
        self._finalizers.append(weakref.finalize(storage, self._release, key, info))

    def _release(self, key: int, info: _Storage) -> None:
        if not self._active or info.died_at is not None:
            return
        if info.category == "host":
            info.died_at = self._event
            self.host_bytes -= info.nbytes
            if self._live.get(key) is info:
                del self._live[key]
            return
        self._event += 1
        info.died_at = self._event
        self.current_bytes -= info.nbytes
        if self._live.get(key) is info:
            del self._live[key]

    def _on_resize(self, storage: torch.UntypedStorage) -> None:
        """A storage resized outside any op (FSDP2 frees and re-allocates gathered parameters
        so): the old size dies and the new one is born now, so the breakdown at the peak holds."""
        key = id(storage)
        info = self._live.get(key)
        if not self._active or info is None:
            return
        size = self._size(storage)
        if size == info.nbytes:
            return
        self._event += 1
        info.died_at = self._event
        self.current_bytes -= info.nbytes
        fqn = self._current_fqn()
        reborn = _Storage(size, info.device, 0, self._phase, self._segment, fqn, info.category)
        self._event += 1
        reborn.created_at = self._event
        self._track(storage, reborn)
        self.current_bytes += size
        if size > info.nbytes:
            self._on_growth(self._phase, fqn)

    # ---------------------------------------------------------------------------------- hooks
    def _name(self, module: torch.nn.Module) -> str:
        name = self._names.get(id(module))
        return name if name is not None else type(module).__name__

    def _current_fqn(self) -> str:
        if self._fw_stack:
            return self._fw_stack[-1]
        return self._bw_module if self._phase == "backward" else _ROOT

    def _ancestors_of(self, fqn: str) -> tuple[str, ...]:
        cached = self._ancestors.get(fqn)
        if cached is None:
            parts = fqn.split(".") if fqn else []
            cached = tuple(".".join(parts[:i]) for i in range(len(parts), -1, -1))
            self._ancestors[fqn] = cached
        return cached

    def _on_forward_pre(self, module: torch.nn.Module, args: Any) -> None:
        fqn = self._name(module)
        self._fw_stack.append(fqn)
        if not _compat.in_backward() and self._segment == 0:
            self._modules[fqn].calls += 1

    def _on_forward_post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        fqn = self._name(module)
        if self._fw_stack and self._fw_stack[-1] == fqn:
            self._fw_stack.pop()
        elif fqn in self._fw_stack:  # a forward raised inside: unwind to this module
            del self._fw_stack[self._fw_stack.index(fqn) :]
        tensors = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
        in_backward = _compat.in_backward()
        if self._segment == 0 and not in_backward:
            acc = self._modules[fqn]
            for tensor in tensors:
                storage = self._storage(tensor)
                info = self._live.get(id(storage)) if storage is not None else None
                if info is not None and info.created_at != _STATIC and info not in acc.outputs:
                    acc.outputs.append(info)
        needing_grad = [t for t in tensors if t.requires_grad]
        if needing_grad and torch.is_grad_enabled() and not in_backward:

            def on_output_grad(_grad: Any, fqn: str = fqn) -> None:
                # A module's output is often its parent's output too; both hooks fire before any op
                # runs, and the innermost module, whose hook fires first, is the one running.
                inner = self._bw_module
                same_moment = self._bw_set_at == self._num_ops
                if not ((same_moment and inner.startswith(fqn + ".")) or (same_moment and not fqn)):
                    self._bw_module = fqn
                self._bw_set_at = self._num_ops

            torch.autograd.graph.register_multi_grad_hook(needing_grad, on_output_grad, mode="any")

    def _on_optimizer_pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._in_optimizer += 1

    def _on_optimizer_post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._in_optimizer -= 1
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    storage = self._storage(value)
                    info = self._live.get(id(storage)) if storage is not None else None
                    if info is not None and (
                        info.created_at != _STATIC or info.category == "input"
                    ):
                        info.category = "optimizer_state"  # step counters are first seen as inputs

    def _on_grad(self, param: torch.Tensor) -> None:
        if param.grad is None:
            return
        storage = self._storage(param.grad)
        info = self._live.get(id(storage)) if storage is not None else None
        if info is not None and info.created_at != _STATIC:
            info.category = "gradient"

    # ------------------------------------------------------------------------------- dispatch
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self._time_ops:
            self._synchronize()
            start = time.perf_counter()
            out = func(*args, **kwargs)
            self._synchronize()
            elapsed_ms = (time.perf_counter() - start) * 1e3
        else:
            out = func(*args, **kwargs)
            elapsed_ms = 0.0
        self._on_op(func, args, kwargs, out, elapsed_ms)
        return out

    def _synchronize(self) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def _on_op(self, func: Any, args: Any, kwargs: Any, out: Any, elapsed_ms: float) -> None:
        self._num_ops += 1
        phase = (
            "backward"
            if _compat.in_backward()
            else "optimizer"
            if self._in_optimizer
            else "forward"
        )
        if phase != self._phase:
            if self._phase == "forward":
                self._segment_end.setdefault(self._segment, self._event)
            elif phase == "forward":
                self._segment += 1
            self._phase = phase
        fqn = self._current_fqn()
        for leaf in tree_flatten((args, kwargs))[0]:
            if isinstance(leaf, torch.Tensor):
                storage = self._storage(leaf)
                if storage is None or id(storage) in self._live:
                    continue
                if phase == "optimizer" and not isinstance(leaf, torch.nn.Parameter):
                    # Optimizers create step counters without an aten op (torch.tensor(0.0)): they
                    # are new, not part of the static base.
                    self._new_storage(storage, phase, fqn, "optimizer_state")
                    continue
                category = "parameter" if isinstance(leaf, torch.nn.Parameter) else "input"
                self._add_static(leaf, category)
        grew = False
        for leaf in tree_flatten(out)[0]:
            if not isinstance(leaf, torch.Tensor):
                continue
            storage = self._storage(leaf)
            if storage is None:
                continue
            info = self._live.get(id(storage))
            if info is None and getattr(_HOST, "depth", 0):
                self._new_host_storage(storage, fqn)
            elif info is None:
                grew = self._new_storage(storage, phase, fqn) > 0 or grew
            else:
                size = self._size(storage)
                if size != info.nbytes:  # resized in place (resize_, out= variants)
                    self.current_bytes += size - info.nbytes
                    info.nbytes = size
                    grew = grew or size > 0
        if grew:
            self._on_growth(phase, fqn)
        if self._segment == 0:
            self._account_op(func, args, kwargs, out, phase, fqn, elapsed_ms)
        if phase == "forward":
            name = getattr(getattr(func, "overloadpacket", func), "__name__", str(func))
            if name in DATA_DEPENDENT_OPS or (
                name == "index"
                and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool
                    for i in tree_flatten(args[1:])[0]
                )
            ):
                self._data_dependent[fqn].add(name)
        if self.observer is not None:
            self.observer(func, phase, fqn, self._event)

    def _new_storage(
        self, storage: torch.UntypedStorage, phase: str, fqn: str, category: str | None = None
    ) -> int:
        info = _Storage(self._size(storage), storage.device.type, 0, phase, self._segment, fqn)
        info.category = category
        self._event += 1
        info.created_at = self._event
        self._track(storage, info)
        self.current_bytes += info.nbytes
        return info.nbytes

    def _new_host_storage(self, storage: torch.UntypedStorage, fqn: str) -> None:
        info = _Storage(self._size(storage), "host", self._event, "host", self._segment, fqn)
        info.category = "host"
        self._live[id(storage)] = info
        self._finalizers.append(weakref.finalize(storage, self._release, id(storage), info))
        self.host_bytes += info.nbytes
        self.host_peak_bytes = max(self.host_peak_bytes, self.host_bytes)

    def mark(self, label: Any) -> None:
        """Start a new interval called ``label``; its live bytes at the start and its peak are
        recorded in ``marks`` (the profiler marks unit boundaries with it)."""
        self.marks.append(Mark(label, self.current_bytes, self.current_bytes, self._event))

    def lifetimes(self) -> list[tuple[int, int | None, int]]:
        """(creation event, death event or None if alive, bytes) of every storage created inside.
        Events count allocations and frees; compare them with ``Mark.event``."""
        return [(i.created_at, i.died_at, i.nbytes) for i in self._all if i.created_at != _STATIC]

    def _on_growth(self, phase: str, fqn: str) -> None:
        current = self.current_bytes
        capacity = _CAPACITY.get()
        if capacity is not None and current > capacity:
            self._out_of_memory(current, capacity, phase, fqn)
        if self.marks and current > self.marks[-1].peak_bytes:
            self.marks[-1].peak_bytes = current
        if current > self.peak_bytes:
            self.peak_bytes = current
            self._peak_event = self._event
            self._peak_phase = phase
            self._peak_fqn = fqn
        for name in self._ancestors_of(fqn):
            peaks = self._module_peaks[name]
            if current > peaks.get(phase, -1):
                peaks[phase] = current

    def _out_of_memory(self, current: int, capacity: int, phase: str, fqn: str) -> None:
        """A simulated device of ``capacity`` bytes is full: raise as CUDA's allocator would.
        The peak is not raised past the capacity (the allocation never happened there)."""
        raise torch.OutOfMemoryError(
            f"remat simulated capacity: the step would hold {current:,} bytes of tensors, over the"
            f" capacity of {capacity:,} bytes (in {phase} of {fqn or 'the model'}); as CUDA's"
            " 'CUDA out of memory'"
        )

    def _account_op(
        self, func: Any, args: Any, kwargs: Any, out: Any, phase: str, fqn: str, elapsed_ms: float
    ) -> None:
        if phase == "optimizer":
            return
        formula = _compat.flop_formula(func)
        flops = 0
        if formula is not None:
            try:
                flops = int(formula(*args, **kwargs, out_val=out))
            except Exception:  # a formula that cannot read these arguments counts nothing
                logger.debug("no FLOP count for %s", func, exc_info=True)
        if not flops and not elapsed_ms:
            return
        for name in self._ancestors_of(fqn):
            acc = self._modules[name]
            acc.flops[phase] += flops
            acc.ms[phase] += elapsed_ms

    # --------------------------------------------------------------------------------- report
    def _category(self, info: _Storage) -> str:
        if info.category is not None:
            return info.category
        if info.phase == "forward" and self._alive_at_forward_end(info):
            return "activation"
        return "transient"

    def _alive_at_forward_end(self, info: _Storage) -> bool:
        """Whether a storage outlived the forward it was created in (a forward with no backward
        yet ends when the report is made)."""
        end = self._segment_end.get(info.segment)
        if end is None:
            return info.died_at is None
        return info.died_at is None or info.died_at > end

    def _make_report(self) -> MemoryReport:
        by_category = dict.fromkeys(CATEGORIES, 0)
        activation: dict[str, int] = defaultdict(int)
        for info in self._all:
            alive_at_peak = info.created_at <= self._peak_event and (
                info.died_at is None or info.died_at > self._peak_event
            )
            if alive_at_peak:
                by_category[self._category(info)] += info.nbytes
            if (
                info.created_at != _STATIC
                and info.segment == 0
                and info.phase == "forward"
                and self._alive_at_forward_end(info)
            ):
                for name in self._ancestors_of(info.fqn):
                    activation[name] += info.nbytes
        modules: dict[str, ModuleStats] = {}
        for fqn in sorted(set(self._modules) | set(activation), key=self._order_key):
            acc = self._modules.get(fqn, _ModuleAcc())
            modules[fqn] = ModuleStats(
                calls=acc.calls,
                activation_bytes=activation.get(fqn, 0),
                output_bytes=sum(info.nbytes for info in acc.outputs),
                forward_flops=acc.flops["forward"],
                backward_flops=acc.flops["backward"],
                forward_ms=acc.ms["forward"] if self._time_ops else None,
                backward_ms=acc.ms["backward"] if self._time_ops else None,
            )
        return MemoryReport(
            peak_bytes=self.peak_bytes,
            current_bytes=self.current_bytes,
            static_bytes=self.static_bytes,
            peak_phase=self._peak_phase,
            peak_module=self._peak_fqn,
            peak_by_category=by_category,
            module_peaks={name: dict(phases) for name, phases in self._module_peaks.items()},
            modules=modules,
            data_dependent_ops={k: sorted(v) for k, v in self._data_dependent.items()},
            num_allocations=sum(1 for info in self._all if info.created_at != _STATIC),
            host_peak_bytes=self.host_peak_bytes,
        )

    def _order_key(self, fqn: str) -> tuple[int, str]:
        order = {name: i for i, name in enumerate(self._names.values())}
        return (order.get(fqn, len(order)), fqn)


_CAPACITY: ContextVar[int | None] = ContextVar("remat_capacity_bytes", default=None)


def current_capacity() -> int | None:
    """The simulated device capacity in bytes (:func:`simulated_capacity`), or ``None``."""
    return _CAPACITY.get()


@contextlib.contextmanager
def simulated_capacity(capacity_bytes: int | None) -> Iterator[None]:
    """Within: every tracked step (:func:`track_memory`) whose live tensor bytes would exceed
    ``capacity_bytes`` raises ``torch.OutOfMemoryError``, as a CUDA device of that size would.
    So planning for a GPU one does not have, or a step that does not fit, can be tried on the
    CPU. ``None``: no limit (the default).

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(64, 64, bias=False)  # 16 KiB of weights
        >>> with simulated_capacity(20_000), track_memory(layer):
        ...     try:
        ...         _ = layer(torch.ones(32, 64))  # 8 KiB more
        ...     except torch.OutOfMemoryError as error:
        ...         print(str(error).split(";")[0])
        remat simulated capacity: the step would hold 24,576 bytes of tensors, over the capacity of 20,000 bytes (in forward of the model)
    """
    if capacity_bytes is not None and (
        isinstance(capacity_bytes, bool)
        or not isinstance(capacity_bytes, int)
        or capacity_bytes < 1
    ):
        raise ValueError(
            f"capacity: got {capacity_bytes!r}; expected a number of bytes >= 1 (or None for no"
            " limit). Fix: pass an int, e.g. remat.units.parse_bytes('40GiB')"
        )
    token = _CAPACITY.set(capacity_bytes)
    try:
        yield
    finally:
        _CAPACITY.reset(token)


def track_memory(
    *roots: Any,
    device: str | torch.device | None = None,
    time_ops: bool = False,
    round_bytes: int | None = None,
) -> MemoryTracker:
    """Measure the live tensor memory of everything run inside a ``with`` block.

    Args:
        *roots: modules, optimizers or tensors that exist before entry. Their parameters, buffers,
            gradients and optimizer state are counted from the start as the static base and
            categorised; modules also give FQNs to the per-module numbers. Tensors not passed but read
            by an op are added to the static base when first seen.
        device: count only storages on this device type (``"cuda"``); ``None`` counts all.
        time_ops: time every op (synchronising on CUDA) to report forward and backward time per module.
        round_bytes: round each storage up to a multiple of this; default 512 on CUDA (as its caching
            allocator does), 1 elsewhere.

    Returns:
        The tracker; read ``peak_bytes`` and ``current_bytes`` at any time, ``report()`` for the rest.

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(4, 4, bias=False)
        >>> with track_memory(layer) as tracker:
        ...     y = layer(torch.ones(2, 4))
        >>> tracker.static_bytes, tracker.peak_bytes - tracker.static_bytes
        (64, 64)
    """
    return MemoryTracker(roots, device=device, time_ops=time_ops, round_bytes=round_bytes)
