"""Op-level selective recompute and activation offload, the two actions finer than a whole unit.

**Selective** (``selective:<policy>``). While a unit's forward runs, :class:`OpLog` numbers every
aten op by its overload and call index (as ``torch.utils.checkpoint``'s selective checkpointing does)
and remembers, weakly, which storages each op created. When autograd saves a tensor, the unit's
checkpoint frame asks :meth:`OpLog.keep` whether its producing op is one the policy saves; if so the
op's outputs are kept (strongly) and that saved tensor is handed back as it is in backward. Everything
else is replayed, and in the replay :class:`ReplayCache` returns the kept outputs instead of running
those ops again. So a policy costs only what autograd saves anyway among the ops it names: a saved
op's output that autograd does not save is not kept.

Policies (names are aten overload packets, the part before ``.default``, or the device-independent
families of :mod:`remat.opnames` for ops whose kernel differs per device):

- ``save_matmuls``: keep the outputs of matmuls and fused attention (torchtitan's op-level mode);
- ``megatron``: keep everything except the attention core (Korthikanti et al. 2022, arXiv
  2205.05198): softmax and fused attention kernels, and every non-matmul op fed by them (masking,
  dropout of the probabilities, views), up to the matmul with the values;
- ``ops.<op>.<op>...``: keep the outputs of these ops (what the solver chooses per unit). Each op
  is matched by its family (:func:`save_name`): ``ops.attention`` keeps the output of whichever
  fused attention kernel the device runs, and so does ``ops._scaled_dot_product_flash_attention``
  (a CUDA kernel's name) on the CPU. After a unit's first forward, a name that matched no op there
  and is no aten op nor family at all (a typo) is a ``ValueError`` naming the ops that ran.

An op that draws random numbers (dropout) may be kept too: the generator's state after it is
recorded in forward and restored when the replay skips it, so later random ops of the replay draw
what they drew in forward.

**Offload** (``offload``). :class:`Offloader` is a pair of saved-tensor hooks: what the unit saves is
copied to host memory in forward (on CUDA: pinned memory, copied on a side stream) and copied back
the first time its backward asks for any of it, all of the unit's tensors at once (on CUDA, the
previous unit's come back at the same moment, on the side stream, so the copy overlaps the
backward). On the CPU, host and device are the same memory: the copies are made anyway, inside
:func:`~remat.profiling.tracker.host_allocations` so the tracker counts them as host bytes, and the
action is correct if useless. Parameters and tensors under 1 KiB stay where they are.
"""

from __future__ import annotations

import warnings
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from remat._compat import (
    TorchDispatchMode,
    detached,
    op_is_view,
    op_writes_inputs,
    op_writes_self,
    storage_id,
    storage_ref,
    tensor_base,
    tensor_version,
    tree_flatten,
    tree_unflatten,
)
from remat.opnames import OP_FAMILIES, canonical_op, canonical_ops, is_family
from remat.plan import closest_names
from remat.profiling.tracker import host_allocations

__all__ = [
    "ATTENTION_OPS",
    "CORE_ATTENTION_OPS",
    "MATMUL_OPS",
    "CheckpointMismatchError",
    "Offloader",
    "OpLog",
    "ReplayCache",
    "ReplayGraph",
    "SaveRule",
    "eager_policy",
    "is_op_name",
    "lenient_save_sets",
    "op_name",
    "policy_for",
    "replay_graph",
    "replayed_by",
    "save_name",
]

MATMUL_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_addmm_activation"})
ATTENTION_OPS = OP_FAMILIES["attention"]
"""Fused attention kernels (what ``F.scaled_dot_product_attention`` dispatches to in training)."""
CORE_ATTENTION_OPS = ATTENTION_OPS | OP_FAMILIES["softmax"]
SHAPE_ONLY_OPS = frozenset(
    {
        "empty_like",
        "zeros_like",
        "ones_like",
        "full_like",
        "rand_like",
        "randn_like",
        "randint_like",
        "new_empty",
        "new_empty_strided",
        "new_zeros",
        "new_ones",
        "new_full",
    }
)
"""Ops that read only the layout of their tensor inputs: running them needs no input values."""
OFFLOAD_MIN_BYTES = 1024


class CheckpointMismatchError(RuntimeError):
    """Replay did not reproduce what the forward saved (a data-dependent or stateful unit)."""


def op_name(func: Any) -> str:
    """The aten overload packet's name of an op (``aten.mm.default`` -> ``mm``).

    Example:
        >>> import torch
        >>> op_name(torch.ops.aten.addmm.default)
        'addmm'
    """
    packet = getattr(func, "overloadpacket", func)
    return str(getattr(packet, "__name__", func))


def save_name(func: Any) -> str:
    """The name save sets use for an op: its device-independent family or, outside the families,
    its overload packet (:func:`remat.opnames.canonical_op` of :func:`op_name`).

    Example:
        >>> import torch
        >>> save_name(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default)
        'attention'
        >>> save_name(torch.ops.aten.native_layer_norm.default), save_name(torch.ops.aten.addmm.default)
        ('layer_norm', 'addmm')
    """
    return canonical_op(op_name(func))


def _is_random(func: Any) -> bool:
    return torch.Tag.nondeterministic_seeded in getattr(func, "tags", ())


class _OpInfo:
    """What the op log asks of an op on every call, worked out once per op."""

    __slots__ = (
        "name",
        "random",
        "save_name",
        "shape_only",
        "view",
        "writes_inputs",
        "writes_self",
    )

    def __init__(self, func: Any) -> None:
        self.name = op_name(func)
        self.save_name = canonical_op(self.name)
        self.random = _is_random(func)
        self.writes_inputs = op_writes_inputs(func)
        self.writes_self = op_writes_self(func)
        self.view = op_is_view(func)
        self.shape_only = self.name in SHAPE_ONLY_OPS


_INFO: dict[int, tuple[Any, _OpInfo]] = {}


def _info(func: Any) -> _OpInfo:
    found = _INFO.get(id(func))
    if found is None or found[0] is not func:
        found = _INFO[id(func)] = (func, _OpInfo(func))
    return found[1]


_ONE = object()
"""Output structure of an op that returns one tensor."""


class _Seq:
    __slots__ = ("kind",)

    def __init__(self, kind: type) -> None:
        self.kind = kind


_TUPLE, _LIST = _Seq(tuple), _Seq(list)


def _flatten(out: Any) -> tuple[list[Any], Any]:
    """``tree_flatten`` for what aten ops return, fast for one tensor or a flat tuple or list."""
    if isinstance(out, torch.Tensor):
        return [out], _ONE
    kind = type(out)
    if kind is tuple or kind is list:
        if not any(isinstance(x, (list, tuple, dict)) for x in out):
            return list(out), _TUPLE if kind is tuple else _LIST
    return tree_flatten(out)


def _unflatten(values: list[Any], spec: Any) -> Any:
    if spec is _ONE:
        return values[0]
    if isinstance(spec, _Seq):
        return spec.kind(values)
    return tree_unflatten(values, spec)


def _tensors_of(args: Any, kwargs: Any) -> list[torch.Tensor]:
    """The tensor arguments of an aten call (tensors and lists of them), in order."""
    found: list[torch.Tensor] = []
    for value in (*args, *kwargs.values()) if kwargs else args:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, torch.Tensor):
                    found.append(item)
                elif isinstance(item, (list, tuple, dict)):
                    return [
                        t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
                    ]
        elif isinstance(value, dict):
            return [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    return found


def eager_policy(label: str) -> bool:
    """Whether a policy keeps its ops' outputs even where autograd does not save them
    (``save_matmuls``, as torchtitan's op-level mode) rather than only where it does.

    Example:
        >>> eager_policy("save_matmuls"), eager_policy("megatron"), eager_policy("ops.mm")
        (True, False, False)
    """
    return label == "save_matmuls"


class SaveRule:
    """The save rule of a ``selective`` policy: ``rule(op, fed_by_core) -> keep its output?``,
    called with the op's :func:`op_name`. ``fed_by_core`` says whether an input of the op comes
    from the attention core (used by ``megatron`` only). For ``ops.<op>...``, :attr:`names` holds
    the save set by family (:func:`save_name`), and :meth:`check_ran` checks it against the ops
    of the unit's first forward.

    Example:
        >>> rule = SaveRule("ops._scaled_dot_product_flash_attention.native_layer_norm")
        >>> sorted(rule.names)
        ['attention', 'layer_norm']
        >>> rule("_scaled_dot_product_flash_attention_for_cpu", False), rule("addmm", False)
        (True, False)
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.names: frozenset[str] | None = None
        """``ops.<op>...``: the save set, by family; ``None`` for the named policies."""
        self.checked = False
        """Whether :meth:`check_ran` has checked a forward (only the first one is)."""
        self.uses_core = label == "megatron"
        """Whether the rule asks if an op is fed by the attention core (an op log that knows it
        does not tracks the core's storages)."""
        if label == "save_matmuls":
            saved = MATMUL_OPS | ATTENTION_OPS
            self._rule: Callable[[str, bool], bool] = lambda name, _core: name in saved
        elif label == "megatron":
            self._rule = lambda name, core: (
                name not in CORE_ATTENTION_OPS and (not core or name in MATMUL_OPS)
            )
        elif label.startswith("ops"):
            chosen = self.names = frozenset(canonical_ops(p for p in label.split(".")[1:] if p))
            self._rule = lambda name, _core: canonical_op(name) in chosen
        else:
            raise ValueError(
                f"selective policy: got {label!r}; expected save_matmuls, megatron or"
                " ops.<op>.<op>..."
            )

    def __call__(self, name: str, fed_by_core: bool) -> bool:
        return self._rule(name, fed_by_core)

    def check_ran(self, ran: Iterable[str], unit: str | None = None) -> None:
        """After a unit's first forward under this rule, with the :func:`save_name` of every op
        that ran: a saved name that ran nowhere in the unit is a ``ValueError`` naming it (a
        typo, or an aten op this unit does not run on this device, such as the CPU's dropout
        mask ``div_`` under CUDA's fused dropout). A family that did not run (its kernels differ
        by device) and a save set of which nothing ran are warned about: the unit keeps nothing
        there. Later calls check nothing. While :func:`lenient_save_sets` is entered (the
        profiler measures one save set on every unit), real ops that did not run are let
        through.

        Example:
            >>> rule = SaveRule("ops.addmm.div_")
            >>> try:
            ...     rule.check_ran({"addmm", "gelu", "attention"}, "blocks.0")
            ... except ValueError as error:
            ...     print(str(error).split(";")[0])
            selective unit 'blocks.0': got op div_ in save set ops.addmm.div_, which did not run
            in the unit
        """
        if self.checked or self.names is None:
            return
        self.checked = True
        ran = set(ran)
        where = f"selective unit {unit!r}" if unit is not None else "a selective unit"
        missing = sorted(self.names - ran)
        refused = [n for n in missing if not (is_op_name(n) and (_LENIENT or is_family(n)))]
        if refused:
            known = [n for n in refused if is_op_name(n)]
            close = list(
                dict.fromkeys(c for n in refused for c in closest_names(n, sorted(ran), count=8))
            )
            typos = [n for n in refused if n not in known]
            why = "which did not run in the unit"
            if typos and not known:
                why = "which ran nowhere in the unit and is no aten op or op family"
            elif typos:
                why += f" ({', '.join(typos)}: no aten op or op family)"
            raise ValueError(
                f"{where}: got op{'s' if len(refused) > 1 else ''} {', '.join(refused)} in save"
                f" set {self.label}, {why}; expected ops that ran there (closest:"
                f" {', '.join(close)}). Fix: name ops from that list (aten overload packets, or"
                f" the families {', '.join(sorted(OP_FAMILIES))}), or plan the model again on"
                " this device."
            )
        if self.names and not self.names & ran and not _LENIENT:
            warnings.warn(
                f"remat: {where}: nothing in save set {self.label} ran there, so the unit keeps"
                f" nothing and is recomputed as a whole (ops that ran: {', '.join(sorted(ran))})."
                " Name ops that run in it, or use recompute.",
                stacklevel=2,
            )
        elif missing and not _LENIENT:
            warnings.warn(
                f"remat: {where}: the op families {', '.join(missing)} of save set {self.label}"
                " did not run there on this device (their kernels differ by device), so they"
                " keep nothing in it.",
                stacklevel=2,
            )


_LENIENT = False
"""Set while :func:`lenient_save_sets` is entered."""


@contextmanager
def lenient_save_sets() -> Iterator[None]:
    """Within: a save set's real ops that a unit does not run are let through (a typo is still
    refused). The profiler enters it to measure one save set on every unit of a model, whose
    units run different ops; the plans it records name, per unit, only the ops that ran there
    (and no option for a unit where none of them ran), so nothing is warned about either.

    Example:
        >>> rule = SaveRule("ops.addmm.div_")
        >>> with lenient_save_sets():
        ...     rule.check_ran({"addmm"}, "blocks.0")
        >>> rule.checked
        True
    """
    global _LENIENT
    previous, _LENIENT = _LENIENT, True
    try:
        yield
    finally:
        _LENIENT = previous


def is_op_name(name: str) -> bool:
    """Whether ``name`` is a family of :mod:`remat.opnames` or an aten overload packet of this
    build (what a save set may name).

    Example:
        >>> is_op_name("attention"), is_op_name("addmm"), is_op_name("flash_attn_nonexistent")
        (True, True, False)
    """
    if is_family(name):
        return True
    try:
        getattr(torch.ops.aten, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def policy_for(label: str) -> SaveRule:
    """The save rule of a ``selective`` policy: ``rule(op, fed_by_core) -> keep its output?``
    (a :class:`SaveRule`).

    ``fed_by_core`` says whether an input of the op comes from the attention core (used by
    ``megatron`` only).

    Example:
        >>> rule = policy_for("save_matmuls")
        >>> rule("addmm", False), rule("gelu", False)
        (True, False)
        >>> policy_for("ops.gelu.addmm")("gelu", False)
        True
        >>> megatron = policy_for("megatron")
        >>> megatron("_softmax", False), megatron("bmm", True), megatron("add", False)
        (False, True, True)
    """
    return SaveRule(label)


def _rng_after(outputs: list[Any]) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
    """The states of the generators a random op with these outputs drew from, after it."""
    devices = {t.device for t in outputs if isinstance(t, torch.Tensor)}
    cpu = torch.get_rng_state() if any(d.type == "cpu" for d in devices) else None
    cuda = {
        d.index or 0: torch.cuda.get_rng_state(d.index or 0) for d in devices if d.type == "cuda"
    }
    return cpu, cuda


def _restore_rng(rng: tuple[torch.Tensor | None, dict[int, torch.Tensor]]) -> None:
    cpu, cuda = rng
    if cpu is not None:
        torch.set_rng_state(cpu)
    for index, state in cuda.items():
        torch.cuda.set_rng_state(state, index)


def _signature(tensors: list[torch.Tensor]) -> tuple[Any, ...]:
    return tuple([(t.shape, t.dtype) for t in tensors])


def _check_signature(func: Any, expected: tuple[Any, ...] | None, args: Any, kwargs: Any) -> None:
    """The replay's op with this number must read what the forward's did; if not, the two runs
    executed different ops (code that runs only in forward, such as a hook that copies outputs
    but skips backward, or data-dependent control flow)."""
    if expected is None:
        return
    if _signature(_tensors_of(args, kwargs or {})) != expected:
        raise CheckpointMismatchError(
            f"remat: replaying a selective unit, {op_name(func)} call received other shapes than in"
            " the forward: the replay runs different ops (a forward hook or code that runs only"
            " outside backward, data-dependent control flow, or a cache the unit appends to, such"
            " as a Hugging Face KV cache passed in as past_key_values). Use recompute for this"
            " unit, or move that code out of it."
        )


_storage_id = storage_id


@dataclass(frozen=True)
class ReplayGraph:
    """What one selective unit call's replay must run, for any save set: the ops each op read
    from (``deps``), the ops it always runs (random draws not kept, ops returning Python values),
    the ops whose saved outputs could not be kept whatever the policy (``forced``), and per kept
    op its bytes and the ops keeping it covers. :func:`replayed_by` walks it.
    """

    deps: dict[Any, frozenset[Any]]
    always: frozenset[Any]
    forced: frozenset[Any]
    kept_bytes: dict[Any, int]
    covers: dict[Any, tuple[Any, ...]]


def replayed_by(graph: ReplayGraph, names: frozenset[str] | set[str]) -> set[Any]:
    """The ops a replay runs when only the kept ops named in ``names`` stay kept (the graph is
    from a call that kept everything it could): the closure, through ``deps``, of the saved
    outputs no longer kept, the forced ones and the ops that always run, stopping at kept ops.
    Ops and names are compared by family (:func:`save_name`).

    Example:
        >>> a, b, c = ("a", 0), ("b", 0), ("c", 0)  # c reads b, b reads a; a and c are saved
        >>> graph = ReplayGraph(deps={b: frozenset({a}), c: frozenset({b})}, always=frozenset(),
        ...     forced=frozenset(), kept_bytes={a: 4, c: 4}, covers={a: (a,), c: (c,)})
        >>> sorted(k[0] for k in replayed_by(graph, {"a"}))  # c again, from b, from kept a
        ['b', 'c']
        >>> sorted(k[0] for k in replayed_by(graph, set()))
        ['a', 'b', 'c']
    """
    done: set[Any] = set()
    roots: list[Any] = []
    names = set(canonical_ops(names))
    for key in graph.kept_bytes:
        if save_name(key[0]) in names:
            done.update(graph.covers.get(key, (key,)))
        else:
            roots.append(key)
    return _closure([*roots, *graph.forced, *graph.always], graph.deps, done)


def _closure(starts: Any, deps: dict[Any, Any], done: set[Any]) -> set[Any]:
    """The ops a replay must run to produce ``starts``: them and, through ``deps``, what they
    read, except what ``done`` (kept, or covered by a kept op) already holds."""
    needed: set[Any] = set()
    stack = [k for k in starts if k not in done]
    while stack:
        key = stack.pop()
        if key in needed:
            continue
        needed.add(key)
        stack.extend(d for d in deps.get(key, ()) if d not in needed and d not in done)
    return needed


class _Skip:
    """Replay entry of an op whose in-place write into a kept tensor is already in it."""

    __slots__ = ("rng", "signature")

    def __init__(self, rng: Any, signature: Any) -> None:
        self.rng, self.signature = rng, signature


class _Leaf:
    """A weak record of one output tensor of an op: enough to get it back at pack time."""

    __slots__ = ("offset", "ref", "sid", "size", "stride", "version")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.ref = weakref.ref(tensor)
        self.sid = _storage_id(tensor)
        self.size, self.stride = tuple(tensor.shape), tuple(tensor.stride())
        self.offset = tensor.storage_offset()
        self.version = tensor_version(tensor)

    def recover(self, saved: torch.Tensor, saved_sid: int) -> torch.Tensor | None:
        """The output as the op returned it (detached), or ``None`` if it is gone or changed."""
        tensor = self.ref()
        if tensor is None and self.sid == saved_sid:
            # Only a view of it is alive (a reshape of a clone): the same bytes, seen as it was.
            tensor = detached(saved).as_strided(self.size, self.stride, self.offset)
        if tensor is None or tensor_version(tensor) != self.version:
            return None
        return detached(tensor)


class OpLog(TorchDispatchMode):
    """Forward of a ``selective`` unit: numbers ops and keeps the outputs its policy saves.

    Example:
        >>> import torch
        >>> x = torch.randn(4, 4, requires_grad=True)
        >>> log = OpLog(policy_for("save_matmuls"))
        >>> with log:
        ...     h = x @ x
        ...     y = h.relu()
        >>> log.keep(h), log.keep(y)
        (True, False)
        >>> kept, skippable = log.finish()
        >>> [op_name(key[0]) for key in kept]
        ['mm']
    """

    def __init__(
        self, rule: Callable[[str, bool], bool], *, eager: bool = False, unit: str | None = None
    ) -> None:
        super().__init__()
        self.rule = rule
        self.unit = unit
        """The unit's name, for the error of a save set naming ops that never ran."""
        self.ran: set[str] = set()
        """The :func:`save_name` of every op of the forward (checked against a
        :class:`SaveRule`'s save set by :meth:`finish`)."""
        self.eager = eager
        """Keep the outputs of every op the rule names, saved by autograd or not (as
        ``torch.utils.checkpoint``'s selective mode does): the replay never runs them. Otherwise
        only those autograd saves are kept."""
        self.counter: dict[Any, int] = defaultdict(int)
        """Per op (its :class:`_OpInfo`): how many calls the forward made so far."""
        self._uses_core = getattr(rule, "uses_core", True)
        """Whether the rule asks if an op is fed by the attention core (``megatron``)."""
        self.created: dict[int, tuple[tuple[Any, int], Any]] = {}
        """Storage id -> (key of the op that created it, weak reference to the storage:
        :func:`~remat._compat.storage_ref`)."""
        self.saveable: dict[tuple[Any, int], tuple[Any, list[Any], Any]] = {}
        """Op key -> (output structure; its leaves, each a :class:`_Leaf` or a constant; for a
        random op, the generator states after it)."""
        self.core: dict[int, Any] = {}
        """Storages created by the attention core (``megatron``)."""
        self.kept: dict[tuple[Any, int], tuple[Any, list[int], Any]] = {}
        """Op key -> (its output, detached; the versions of its tensors; generator states after
        it, for a random op), for the replay."""
        self._busy = False
        self.signatures: dict[tuple[Any, int], tuple[Any, ...]] = {}
        """Per op that the replay may skip: the shapes and dtypes of its tensor arguments."""
        self.overwritten: set[tuple[Any, int]] = set()
        """Kept ops whose outputs a later op of the forward wrote into."""
        self.writers: dict[int, list[tuple[Any, int]]] = {}
        """Storage id -> keys of the ops that created it or wrote into it."""
        self.deps: dict[tuple[Any, int], set[tuple[Any, int]]] = {}
        """Op key -> keys of the ops that wrote what it read."""
        self.always: set[tuple[Any, int]] = set()
        self.shapes: dict[tuple[Any, int], tuple[Any, list[Any]]] = {}
        """Op key -> output structure and (shape, stride, dtype, device) per tensor, for the ops
        the replay may skip."""
        self.needed_roots: set[tuple[Any, int]] = set()
        """Ops that wrote saved tensors that are not kept: the replay must produce those."""
        self.rng_after: dict[tuple[Any, int], Any] = {}
        """Random op key -> the generator states after it."""
        self.chains: dict[tuple[Any, int], tuple[tuple[Any, int], ...]] = {}
        """Kept in-place op key -> the ops that wrote the same memory before it (its creator
        first): a tensor made and then filled in place (dropout's mask: ``empty_like``,
        ``bernoulli_``, ``div_``) is kept as a whole, and the replay runs none of them."""
        self.first_read: dict[int, int] = {}
        """Storage id -> how many ops had written it when an op that does not write it first
        read it."""
        self.covers: dict[tuple[Any, int], tuple[tuple[Any, int], ...]] = {}
        """After :meth:`finish`: kept op key -> every op the replay skips because of it."""

    def _writers_of(self, sid: int | None) -> list[tuple[Any, int]]:
        """The ops that created and wrote the storage ``sid`` of a live tensor; ``[]`` if it was
        made outside the log (or the storage the log saw with this identity is gone: identities
        of freed storages are reused)."""
        if sid is None:
            return []
        known = self.created.get(sid)
        if known is None or known[1].expired():
            return []
        return self.writers.get(sid, [])

    def note_recomputed(self, tensor: torch.Tensor) -> None:
        """Autograd saved ``tensor`` and it is not kept: the replay must recompute it."""
        self.needed_roots.update(self._writers_of(_storage_id(tensor)))

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._busy:
            return out  # our own as_strided while keeping: not one of the unit's ops
        info = _info(func)
        index = self.counter[info]
        self.counter[info] = index + 1
        key = (func, index)
        name = info.name
        self.ran.add(info.save_name)
        arg_tensors = _tensors_of(args, kwargs)
        inputs = {_storage_id(t) for t in arg_tensors}
        core = self.core
        fed_by_core = self._uses_core and any(
            (ref := core.get(sid)) is not None and not ref.expired() for sid in inputs
        )
        flat, spec = _flatten(out)
        signature = _signature(arg_tensors)
        writers_of = self._writers_of
        if not info.shape_only:  # empty_like(x) reads x's layout, not its values
            self.deps[key] = {w for sid in inputs for w in writers_of(sid)}
        written: set[int | None] = set()
        if info.writes_inputs:
            # An in-place op writes its first argument only; for other writers (out= variants)
            # every argument is taken as written.
            targets = arg_tensors[:1] if info.writes_self else arg_tensors
            for leaf in targets:
                sid = _storage_id(leaf)
                writers = writers_of(sid)
                if writers:
                    # An alias kept at this level may not share the output's version counter, so
                    # in-place writes into kept outputs are noted here.
                    self.overwritten.update(w for w in writers if w in self.kept)
                    writers.append(key)
                    written.add(sid)
        for sid in inputs - written if written else inputs:
            if sid in self.writers and writers_of(sid):
                # How many ops had written it when something first read it: a tensor read
                # before its last write cannot be handed out whole, filled, in the replay.
                self.first_read.setdefault(sid, len(self.writers[sid]))

        new = []
        tensors = []
        for leaf in flat:
            if isinstance(leaf, torch.Tensor):
                tensors.append(leaf)
                sid = _storage_id(leaf)
                if sid is None or sid in inputs:
                    continue  # views and in-place results share their input's storage
                known = self.created.get(sid)
                if known is None or known[1].expired():  # new (a freed storage's id is reused)
                    self.created[sid] = (key, storage_ref(leaf))
                    self.writers[sid] = [key]
                    self.first_read.pop(sid, None)  # what a freed storage of this id saw
                    new.append(sid)
        if len(tensors) != len(flat) or not tensors or info.random:
            self.always.add(key)  # Python values, nothing, or random draws: the replay runs it
        elif len(new) == len(tensors) and not info.view:
            # Every output is new memory (no alias of an input, such as _unsafe_view's): the
            # replay may stand in for it if nothing it must produce reads them.
            self.shapes[key] = (spec, [(x.shape, x.stride(), x.dtype, x.device) for x in tensors])
            self.signatures[key] = signature
        if self._uses_core and (
            name in CORE_ATTENTION_OPS or (fed_by_core and name not in MATMUL_OPS)
        ):
            for sid in new:
                core[sid] = self.created[sid][1]
        rng = None
        if info.random:
            rng = self.rng_after[key] = _rng_after(flat)
        if self.rule(name, fed_by_core):
            if self.eager:
                values = [detached(x) if isinstance(x, torch.Tensor) else x for x in flat]
                versions = [tensor_version(v) for v in values if isinstance(v, torch.Tensor)]
                self.kept[key] = (_unflatten(values, spec), versions, rng)
                self.signatures[key] = signature
            else:
                leaves = [_Leaf(x) if isinstance(x, torch.Tensor) else x for x in flat]
                if leaves and isinstance(leaves[0], _Leaf) and info.writes_self:
                    # Autograd bumps the version of what an in-place op wrote after this mode
                    # returns (the ADInplaceOrView key sits above Python dispatch).
                    leaves[0].version += 1
                self.saveable[key] = (spec, leaves, rng)
                self.signatures[key] = signature
        return out

    def keep(self, tensor: torch.Tensor) -> bool:
        """Autograd saves ``tensor``: keep its producing op's outputs if the policy saves that op,
        they are all alive still (or views of ``tensor``'s storage) and unchanged since the op.
        ``False``: the tensor is recomputed in backward."""
        sid = _storage_id(tensor)
        found = self.created.get(sid) if sid is not None else None
        if found is None or found[1].expired():
            return False
        key = found[0]
        writers = self.writers.get(sid, [key])
        if writers[-1] != key:
            return self._keep_filled(tensor, sid, key, writers)
        if key in self.kept:
            return True
        entry = self.saveable.get(key)
        if entry is None:
            return False
        spec, leaves, rng = entry
        self._busy = True
        try:
            values = [
                x.recover(tensor, sid) if isinstance(x, _Leaf) else x  # type: ignore[arg-type]
                for x in leaves
            ]
        finally:
            self._busy = False
        if any(v is None for v, x in zip(values, leaves, strict=True) if isinstance(x, _Leaf)):
            return False  # an output died, or changed in place (a mask that bernoulli_ fills)
        self.kept[key] = (
            _unflatten(values, spec),
            [tensor_version(v) for v in values if isinstance(v, torch.Tensor)],
            rng,
        )
        return True

    def _keep_filled(
        self, tensor: torch.Tensor, sid: int, creator: Any, writers: list[Any]
    ) -> bool:
        """Keep a tensor that ops filled in place after its creator made it, if the policy saves
        the last of them, each wrote into the whole tensor as the creator made it, and it has not
        changed since: the replay hands the kept tensor out as the creator's output and skips the
        writers (restoring the generator after random ones)."""
        last = writers[-1]
        if last in self.kept:
            return True
        entry = self.saveable.get(last)
        layout = self.shapes.get(creator)
        if entry is None or layout is None or len(layout[1]) != 1:
            return False
        if not all(op_writes_self(w[0]) for w in writers[1:]):
            return False
        if self.first_read.get(sid, len(writers)) < len(writers):
            return False  # read before its last write: the replay must see the earlier values
        _spec, leaves, _rng = entry
        if len(leaves) != 1 or not isinstance(leaves[0], _Leaf):
            return False
        self._busy = True
        try:
            value = leaves[0].recover(tensor, sid)
        finally:
            self._busy = False
        shape, stride, dtype, _device = layout[1][0]
        if (
            value is None
            or tuple(value.shape) != tuple(shape)
            or tuple(value.stride()) != tuple(stride)
            or value.storage_offset() != 0
            or value.dtype != dtype
        ):
            return False  # written through a view, or changed again since
        self.kept[last] = (value, [tensor_version(value)], None)
        self.chains[last] = tuple(writers[:-1])
        return True

    def watch_outputs(self, output: Any) -> None:
        """The unit returned ``output``: kept op outputs among it (same storage) are checked for
        in-place changes again when the replay would use them (what the caller does to them after
        the forward is invisible to the log)."""
        leaves = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
        by_storage = {_storage_id(t): t for t in leaves}
        for key, entry in list(self.kept.items()):
            kept_storages = {
                _storage_id(t) for t in tree_flatten(entry[0])[0] if isinstance(t, torch.Tensor)
            }
            # Called outside the log: this detach shares the output's version counter.
            watch = [
                (t.detach(), tensor_version(t))
                for sid, t in by_storage.items()
                if sid in kept_storages
            ]
            if watch:
                self.kept[key] = (*entry[:3], watch)

    def finish(self) -> tuple[dict[tuple[Any, int], Any], dict[tuple[Any, int], Any]]:
        """After the forward: the kept outputs, and the ops the replay may skip (their outputs
        feed only kept ops or nothing saved) with the shapes to stand in for them. The log's
        weak tables are dropped. On the rule's first forward, a :class:`SaveRule` checks its save
        set against the ops that ran (:meth:`SaveRule.check_ran`)."""
        check_ran = getattr(self.rule, "check_ran", None)
        if check_ran is not None:
            check_ran(self.ran, self.unit)
        for key, (output, versions, *_rest) in list(self.kept.items()):
            tensors = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
            if [tensor_version(t) for t in tensors] != versions or key in self.overwritten:
                del self.kept[key]  # changed in place after the op: the replay runs it
                self.chains.pop(key, None)
        covered = {k for key in self.kept for k in self.chains.get(key, ())}
        done = covered | set(self.kept)
        needed = _closure(self.needed_roots | self.always, self.deps, done)
        skippable = {
            key: (*shapes, self.signatures.get(key))
            for key, shapes in self.shapes.items()
            if key not in needed and key not in done
        }
        self.covers = {key: (key, *self.chains.get(key, ())) for key in self.kept}
        self.kept_outputs = {key: entry[0] for key, entry in self.kept.items()}
        replay: dict[Any, Any] = {}
        for key, entry in self.kept.items():
            chain = self.chains.get(key)
            watch = entry[3] if len(entry) > 3 else []
            if chain is None:
                replay[key] = (*entry[:3], watch, self.signatures.get(key))
                continue
            # The creator hands out the filled tensor; the writers after it are skipped.
            creator = chain[0]
            replay[creator] = (
                *entry[:2],
                self.rng_after.get(creator),
                watch,
                self.signatures.get(creator),
            )
            for writer in (*chain[1:], key):
                replay[writer] = _Skip(self.rng_after.get(writer), self.signatures.get(writer))
        self.needed = needed
        self.graph_parts = (self.deps, self.always, self.needed_roots - done, self.covers)
        """The call's :class:`ReplayGraph` in parts (:func:`replay_graph` builds it, only when the
        profiler asks)."""
        self.kept = replay
        self.created.clear()
        self.saveable.clear()
        self.core.clear()
        self.writers.clear()
        self.signatures.clear()
        self.deps = {}
        self.shapes.clear()
        self.chains.clear()
        self.rng_after.clear()
        self.first_read.clear()
        return self.kept, skippable


def replay_graph(parts: tuple[Any, Any, Any, Any], kept_bytes: dict[Any, int]) -> ReplayGraph:
    """The :class:`ReplayGraph` of an :class:`OpLog`'s ``graph_parts`` (kept by a region between
    calls, so that a step builds no graph nobody reads).

    Example:
        >>> a, b = ("a", 0), ("b", 0)
        >>> graph = replay_graph(({b: {a}}, set(), set(), {a: (a,)}), {a: 4})
        >>> graph.deps[b], graph.kept_bytes
        (frozenset({('a', 0)}), {('a', 0): 4})
    """
    deps, always, forced, covers = parts
    return ReplayGraph(
        deps={k: frozenset(v) for k, v in deps.items()},
        always=frozenset(always),
        forced=frozenset(forced),
        kept_bytes=dict(kept_bytes),
        covers=dict(covers),
    )


class ReplayCache(TorchDispatchMode):
    """Replay of a ``selective`` unit: ops whose outputs were kept are not run again.

    Example:
        >>> import torch
        >>> cache = ReplayCache({(torch.ops.aten.mm.default, 0): (torch.ones(2, 2), [0], None)})
        >>> with cache:
        ...     y = torch.zeros(2, 2) @ torch.zeros(2, 2)
        >>> y.sum().item(), cache.skipped
        (4.0, 1)
    """

    def __init__(
        self,
        kept: dict[tuple[Any, int], tuple[Any, list[int], Any]],
        skippable: dict[tuple[Any, int], tuple[Any, list[Any]]] | None = None,
    ) -> None:
        super().__init__()
        self.kept = kept
        self.skippable = skippable or {}
        self.counter: dict[Any, int] = defaultdict(int)
        self.skipped = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        info = _info(func)  # counted per op as OpLog counts
        index = self.counter[info]
        self.counter[info] = index + 1
        key = (func, index)
        entry = self.kept.pop(key, None) if self.kept else None
        if isinstance(entry, _Skip):
            # An in-place writer of a kept tensor: what it wrote is in the tensor already.
            _check_signature(func, entry.signature, args, kwargs)
            self.skipped += 1
            if entry.rng is not None:
                _restore_rng(entry.rng)
            return args[0]
        if entry is not None:
            output, versions, rng, *rest = entry
            watch = rest[0] if rest else []
            _check_signature(func, rest[1] if len(rest) > 1 else None, args, kwargs)
            tensors = [t for t in _flatten(output)[0] if isinstance(t, torch.Tensor)]
            changed = [tensor_version(t) for t in tensors] != versions or any(
                tensor_version(alias) != version for alias, version in watch
            )
            if changed:
                raise CheckpointMismatchError(
                    f"remat: the output of {op_name(func)} that a selective unit kept was changed"
                    " in place after its forward, so the replay cannot use it. Avoid the in-place"
                    " op, or use recompute for this unit."
                )
            self.skipped += 1
            if rng is not None:
                _restore_rng(rng)
            return output
        stand_in = self.skippable.pop(key, None) if self.skippable else None
        if stand_in is not None:
            # Nothing the replay must produce reads this op's outputs (only kept ops and ops as
            # idle as this one do): stand in with uninitialised tensors of the same layout.
            spec, layouts, *signature = stand_in
            _check_signature(func, signature[0] if signature else None, args, kwargs)
            self.skipped += 1
            return _unflatten(
                [
                    torch.empty_strided(shape, stride, dtype=dtype, device=device)
                    for shape, stride, dtype, device in layouts
                ],
                spec,
            )
        return func(*args, **(kwargs or {}))


class Offloader:
    """Saved-tensor hooks that move what one unit call saves to host memory and back.

    ``pack`` / ``unpack`` are given to ``torch.autograd.graph.saved_tensors_hooks``. ``previous`` is
    the offloader of the unit that ran before (prefetched on CUDA when this one is brought back).

    Example:
        >>> import torch
        >>> x = torch.randn(64, 64, requires_grad=True)
        >>> off = Offloader()
        >>> with torch.autograd.graph.saved_tensors_hooks(off.pack, off.unpack):
        ...     y = (x * 2).exp()
        >>> off.offloaded_bytes
        16384
        >>> y.sum().backward(); bool(torch.allclose(x.grad, 2 * y.detach()))
        True
    """

    def __init__(self, previous: Offloader | None = None) -> None:
        self._previous = weakref.ref(previous) if previous is not None else None
        self.entries: list[list[Any]] = []
        """Per packed tensor: [host copy or None, the tensor itself if not offloaded, device,
        event]."""
        self.loaded: list[torch.Tensor | None] | None = None
        self.offloaded_bytes = 0
        self._stream: Any = None

    def pack(self, tensor: torch.Tensor) -> int:
        if (
            isinstance(tensor, torch.nn.Parameter)
            or isinstance(
                tensor_base(tensor), torch.nn.Parameter
            )  # weight.t(), saved by every Linear
            or tensor.device.type not in ("cpu", "cuda")
            or tensor.untyped_storage().nbytes() < OFFLOAD_MIN_BYTES
            or tensor.is_sparse
        ):
            self.entries.append([None, tensor, tensor.device, None])
            return len(self.entries) - 1
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.device.type == "cuda":
            stream = self._side_stream(tensor.device)
            event = torch.cuda.Event()
            stream.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(stream), host_allocations():
                host = torch.empty(
                    tensor.shape, dtype=tensor.dtype, pin_memory=True, device="cpu"
                ).copy_(tensor, non_blocking=True)
                event.record(stream)
            tensor.record_stream(stream)  # the device copy is freed only after the copy ran
            self.entries.append([host, None, tensor.device, event])
        else:
            with host_allocations():
                host = tensor.detach().clone()
            self.entries.append([host, None, tensor.device, None])
        self.offloaded_bytes += nbytes
        return len(self.entries) - 1

    def unpack(self, index: int) -> torch.Tensor:
        if self.loaded is None:
            on_cuda = any(entry[2].type == "cuda" for entry in self.entries)
            self.bring_back()
            previous = self._previous() if self._previous is not None else None
            if on_cuda and previous is not None:
                previous.bring_back()  # prefetch on the side stream: its backward comes next
        assert self.loaded is not None
        tensor = self.loaded[index]
        if tensor is None:
            raise RuntimeError(
                "remat: an offloaded saved tensor was asked for twice; backward through an"
                " offloaded unit runs once (retain_graph=True is not supported with offload)"
            )
        self.loaded[index] = None
        return tensor

    def bring_back(self) -> None:
        """Copy every offloaded tensor of this call back to its device (once)."""
        if self.loaded is not None:
            return
        loaded: list[torch.Tensor | None] = []
        for host, same, device, event in self.entries:
            if host is None:
                loaded.append(same)
            elif device.type == "cuda":
                stream = self._side_stream(device)
                if event is not None:
                    stream.wait_event(event)
                with torch.cuda.stream(stream):
                    back = host.to(device, non_blocking=True)
                torch.cuda.current_stream(device).wait_stream(stream)
                back.record_stream(torch.cuda.current_stream(device))
                loaded.append(back)
            else:
                loaded.append(host.clone())  # device memory again, as on CUDA
        self.loaded = loaded
        self.entries = []

    def _side_stream(self, device: torch.device) -> Any:
        if self._stream is None:
            self._stream = _SIDE_STREAMS.get(device.index or 0)
            if self._stream is None:
                self._stream = torch.cuda.Stream(device)
                _SIDE_STREAMS[device.index or 0] = self._stream
        return self._stream


_SIDE_STREAMS: dict[int, Any] = {}
