"""Non-reentrant activation checkpointing of units and segments, installed in place.

A *region* is one unit (``recompute``) or consecutive units (``segment:<label>``). Each unit of a
region gets an instance-level ``forward`` that runs the original one under saved-tensor hooks: what
autograd would save is replaced by a small slot, and the first time backward asks for a slot, the
region's recorded calls are replayed to produce every saved tensor again.

A *frame* is one execution of a region. It records, per unit call: the original forward, its
arguments (a unit's input that is the previous unit's output is linked, not stored, which is what makes
a segment store only its first input), the CPU and CUDA RNG states, the autocast state, and which
its buffers. Replay restores each of them, so dropout draws the same masks, autocast
runs the same kernels, and BatchNorm running statistics are not updated a second time.

Only the autograd graph of the original forward is used for backward; replay produces values, never
graph edges, so gradients are those of the unplanned model, bit for bit.

A ``selective`` region is a one-unit region whose forward also runs under an op log
(:mod:`remat.apply.selective`): saved tensors produced by ops its policy keeps are held as they are,
and the replay skips those ops. An ``offload`` region has no frame: its forward runs under
saved-tensor hooks that move what it saves to host memory.

While dynamo traces a unit's forward (whole-model ``torch.compile``), the wrapper runs it as
``torch.utils.checkpoint`` instead, which dynamo compiles (:mod:`remat.apply.compile`).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from remat._compat import (
    detached,
    function_modes,
    is_fake_tensor,
    tensor_version,
    tree_flatten,
    tree_unflatten,
)
from remat.apply.compile import checkpoint_traced, selective_contexts
from remat.apply.selective import (
    CheckpointMismatchError,
    Offloader,
    OpLog,
    ReplayCache,
    eager_policy,
    policy_for,
    replay_graph,
)

__all__ = ["CheckpointMismatchError", "Region"]

logger = logging.getLogger(__name__)
_AUTOCAST_DEVICES = ("cpu", "cuda")


@dataclass
class _Call:
    fqn: str
    forward: Callable[..., Any]
    spec: Any
    leaves: list[tuple[str, Any, Any]]
    """Per argument leaf: ("const", value, _), ("ref", tensor, version) or ("chain", (call, leaf),
    requires_grad)."""
    cpu_rng: torch.Tensor | None
    cuda_rng: dict[int, torch.Tensor]
    autocast: list[tuple[str, bool, torch.dtype]]
    module: nn.Module
    buffers_before: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    """Buffers the forward changed in place (version bumped), with their values before it."""
    saved_meta: list[tuple[torch.Size, torch.dtype]] = field(default_factory=list)
    saved_versions: list[list[Any]] = field(default_factory=list)
    function_modes: list[Any] = field(default_factory=list)
    """Torch function modes active at the call; replay re-enters them (backward drops them)."""
    """A weak reference to each tensor autograd saved, and its version then: an in-place change
    before backward would make the replay's value differ from the forward's."""
    parameter_versions: list[tuple[torch.Tensor, int]] = field(default_factory=list)
    """The unit's parameters and their versions at the call: replay reads them again."""
    kept_ops: dict[Any, Any] | None = None
    """``selective``: outputs of the ops the policy kept (the replay does not run them again)."""
    skippable_ops: dict[Any, Any] | None = None
    """``selective``: ops whose outputs only kept ops read (the replay stands in for them)."""
    kept_indices: set[int] = field(default_factory=set)
    """``selective``: which saved tensors were kept rather than dropped."""


class _Slot:
    """What autograd holds in place of a saved tensor."""

    __slots__ = ("call", "frame", "index")

    def __init__(self, frame: _Frame, call: int, index: int) -> None:
        self.frame, self.call, self.index = frame, call, index


class _Frame:
    def __init__(self, region: Region) -> None:
        self.region = region
        self.calls: list[_Call] = []
        self.next_unit = 0
        self.recomputed: dict[tuple[int, int], torch.Tensor] = {}
        self.kept: dict[tuple[int, int], torch.Tensor] = {}
        """``selective``: saved tensors held as they are, by (call, index)."""
        # Nested regions: each call's output leaves from a replay that kept nothing else.
        self._boundaries: list[list[Any]] | None = None
        self._versions_checked = False
        self._outputs: dict[int, tuple[int, int, weakref.ref[torch.Tensor], int]] = {}

    # ------------------------------------------------------------------------------ forward side
    def record(
        self, fqn: str, module: nn.Module, forward: Callable[..., Any], args: Any, kwargs: Any
    ) -> int:
        leaves, spec = tree_flatten((args, kwargs))
        recorded: list[tuple[str, Any, Any]] = []
        for leaf in leaves:
            if not isinstance(leaf, torch.Tensor):
                recorded.append(("const", leaf, None))
                continue
            link = self._outputs.get(id(leaf))
            if link is not None and link[2]() is leaf and tensor_version(leaf) == link[3]:
                recorded.append(("chain", (link[0], link[1]), leaf.requires_grad))
            else:
                recorded.append(("ref", leaf, tensor_version(leaf)))
        cuda_devices = sorted(
            {
                leaf.device.index or 0
                for leaf in leaves
                if isinstance(leaf, torch.Tensor) and leaf.device.type == "cuda"
            }
            | {p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"}
        )
        self.calls.append(
            _Call(
                fqn=fqn,
                forward=forward,
                spec=spec,
                leaves=recorded,
                cpu_rng=torch.get_rng_state(),
                cuda_rng={d: torch.cuda.get_rng_state(d) for d in cuda_devices},
                autocast=[
                    (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
                    for dev in _AUTOCAST_DEVICES
                ],
                module=module,
                parameter_versions=[(p, tensor_version(p)) for p in module.parameters()],
                function_modes=function_modes(),
            )
        )
        return len(self.calls) - 1

    def pack_hook(self, call: int, log: OpLog | None = None) -> Callable[[torch.Tensor], _Slot]:
        record = self.calls[call]
        meta = record.saved_meta
        versions = record.saved_versions

        def pack(tensor: torch.Tensor) -> _Slot:
            meta.append((tensor.shape, tensor.dtype))
            versions.append([weakref.ref(tensor), tensor_version(tensor), _identity(tensor)])
            index = len(meta) - 1
            if log is not None:
                if log.keep(tensor):
                    self.kept[(call, index)] = detached(tensor)
                    record.kept_indices.add(index)
                else:
                    log.note_recomputed(tensor)
            return _Slot(self, call, index)

        return pack

    def record_output(self, call: int, output: Any) -> None:
        # A saved output reaches the pack hook as a Python object that may not be the one the
        # unit returns; watch the returned one (same tensor, same version counter) instead.
        leaves = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
        for entry in self.calls[call].saved_versions:
            if entry[2] is not None and entry[0]() is not None:  # alive: its address is its own
                match = next((t for t in leaves if _identity(t) == entry[2]), None)
                if match is not None:
                    entry[0] = weakref.ref(match)
        if len(self.region.units) == 1:
            return  # nothing can chain onto the output of a one-unit region
        for index, leaf in enumerate(tree_flatten(output)[0]):
            if isinstance(leaf, torch.Tensor):
                self._outputs[id(leaf)] = (call, index, weakref.ref(leaf), tensor_version(leaf))

    # ----------------------------------------------------------------------------- backward side
    def unpack(self, slot: _Slot) -> torch.Tensor:
        key = (slot.call, slot.index)
        if not self._versions_checked:
            self._check_saved_versions()
        kept = self.kept.pop(key, None)
        if kept is not None:
            return kept
        if key not in self.recomputed:
            if self.region.nested and len(self.calls) > 1:
                self.replay_one(slot.call)
            else:
                self.replay()
        try:
            return self.recomputed.pop(key)
        except KeyError:
            raise CheckpointMismatchError(
                f"remat: replaying {self.calls[slot.call].fqn} did not produce saved tensor"
                f" #{slot.index}; the unit saves different tensors on each run (data-dependent"
                " control flow?). Keep this unit (action 'keep')."
            ) from None

    def _check_saved_versions(self) -> None:
        """Before the first replay: a saved tensor changed in place since the forward (which plain
        autograd refuses too) would be recomputed from the old values; refuse, naming the unit."""
        self._versions_checked = True
        for call in self.calls:
            for ref, version, _ in call.saved_versions:
                tensor = ref()
                if tensor is not None and tensor_version(tensor) != version:
                    raise RuntimeError(
                        f"remat: a tensor that {call.fqn} saved for backward was modified in place"
                        " after its forward (its version counter moved); without checkpointing"
                        " autograd would refuse this too. Avoid the in-place op (use an"
                        " out-of-place one), or keep this unit."
                    )
            call.saved_versions = []
            for param, version in call.parameter_versions:
                if tensor_version(param) != version:
                    raise RuntimeError(
                        f"remat: a parameter of {call.fqn} was modified in place between its"
                        " forward and backward (an optimizer step before backward?); recomputing"
                        " it would use the new values. Step the optimizer after backward, or keep"
                        " this unit."
                    )

    def replay(self) -> None:
        """Run the recorded calls again and keep every tensor they save."""
        outputs: list[list[Any]] = []
        cuda_devices = sorted({d for call in self.calls for d in call.cuda_rng})
        with ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=cuda_devices))
            stack.enter_context(torch.enable_grad())
            for index, call in enumerate(self.calls):
                outputs.append(self._replay_call(index, call, outputs))

    def replay_one(self, index: int) -> None:
        """Nested regions: replay call ``index`` alone from its inputs, keeping what it saves.

        The first time, the calls before the last are replayed without autograd, keeping only
        their outputs (the inputs of the calls after them).
        """
        cuda_devices = sorted({d for call in self.calls for d in call.cuda_rng})
        with ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=cuda_devices))
            if self._boundaries is None:
                boundaries: list[list[Any]] = []
                with torch.no_grad():
                    for position, call in enumerate(self.calls[:-1]):
                        boundaries.append(
                            self._replay_call(position, call, boundaries, keep_saved=False)
                        )
                self._boundaries = boundaries
            stack.enter_context(torch.enable_grad())
            self._replay_call(index, self.calls[index], self._boundaries)

    def _replay_call(
        self, index: int, call: _Call, outputs: list[list[Any]], keep_saved: bool = True
    ) -> list[Any]:
        leaves: list[Any] = []
        for kind, value, extra in call.leaves:
            if kind == "const":
                leaves.append(value)
            elif kind == "chain":
                produced = outputs[value[0]][value[1]]
                leaves.append(produced.detach().requires_grad_(extra))
            else:
                if tensor_version(value) != extra:
                    raise RuntimeError(
                        f"remat: an input of {call.fqn} was modified in place during or after its"
                        " forward"
                        " (its version counter moved), so recomputing it would give different"
                        " values. Avoid the in-place op on the unit's input, or keep this unit."
                    )
                leaves.append(value.detach().requires_grad_(value.requires_grad))
        args, kwargs = tree_unflatten(leaves, call.spec)
        if call.cpu_rng is not None:
            torch.set_rng_state(call.cpu_rng)
        for device, state in call.cuda_rng.items():
            torch.cuda.set_rng_state(state, device)
        # Forward already updated buffers such as BatchNorm's running statistics (whose in-place
        # update does not even bump a version counter): put them back after the replay.
        buffers = list(call.module.buffers())
        before = [buffer.clone() for buffer in buffers]
        with torch.no_grad():
            for buffer, value in call.buffers_before:
                buffer.copy_(value)  # the unit read these before updating them: replay the same
        saved: list[torch.Tensor] = []

        def pack(tensor: torch.Tensor) -> None:
            saved.append(detached(tensor) if tensor.requires_grad else tensor)

        with ExitStack() as stack:
            for device, enabled, dtype in call.autocast:
                if enabled or torch.is_autocast_enabled(device):
                    stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
            active = function_modes()
            for mode in call.function_modes:
                if not any(mode is other for other in active):
                    stack.enter_context(mode)
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, _unreachable))
            if call.kept_ops is not None:
                stack.enter_context(ReplayCache(call.kept_ops, call.skippable_ops))
            output = call.forward(*args, **kwargs)
        with torch.no_grad():
            for buffer, value in zip(buffers, before, strict=True):
                buffer.copy_(value)  # the forward already updated it once
        if not keep_saved:
            return tree_flatten(output)[0]
        if len(saved) != len(call.saved_meta) or any(
            tensor.shape != shape or tensor.dtype != dtype
            for tensor, (shape, dtype) in zip(saved, call.saved_meta, strict=False)
        ):
            raise CheckpointMismatchError(
                f"remat: replaying {call.fqn} saved {len(saved)} tensors, the forward saved"
                f" {len(call.saved_meta)} (or their shapes differ); the unit is not deterministic"
                " in what it computes (data-dependent ops such as nonzero or top-k routing?)."
                " Keep this unit (action 'keep')."
            )
        for position, tensor in enumerate(saved):
            if position not in call.kept_indices:
                self.recomputed[(index, position)] = tensor
        call.kept_ops = call.skippable_ops = None
        return tree_flatten(output)[0]


def _identity(tensor: torch.Tensor) -> tuple[Any, ...] | None:
    """Storage address, offset, shape and dtype: equal for two Python objects of one tensor."""
    if tensor.device.type == "meta" or is_fake_tensor(tensor):
        return None  # no addresses: shapes only
    try:
        pointer = tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    return (pointer, tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)


def _output_bytes(output: Any) -> int:
    storages = {}
    for leaf in tree_flatten(output)[0]:
        if isinstance(leaf, torch.Tensor):
            storage = leaf.untyped_storage()
            storages[id(storage)] = storage.nbytes()
    return sum(storages.values())


_LAST = threading.local()


def _last_offloader() -> Offloader | None:
    """The offloader of the unit call that ran before this one in this thread (prefetched when
    this one is brought back), if it is still alive."""
    ref = getattr(_LAST, "offloader", None)
    return ref() if ref is not None else None


def _unreachable(_: Any) -> torch.Tensor:
    raise AssertionError("the replay's own graph is never run backward")


class Region:
    """One checkpointed region: one unit, or the consecutive units of a segment."""

    def __init__(
        self,
        name: str,
        units: Sequence[tuple[str, nn.Module]],
        *,
        nested: bool = False,
        policy: str | None = None,
        offload: bool = False,
    ) -> None:
        if (policy is not None or offload) and len(units) != 1:
            raise ValueError("remat: selective and offload regions hold exactly one unit")
        self.name = name
        self.units = list(units)
        self.nested = nested
        self.policy = policy
        """``selective``: the policy (``save_matmuls``, ``megatron``, ``ops.<op>...``)."""
        self._rule = policy_for(policy) if policy is not None else None
        self.offload = offload
        self.on_call: Callable[[], None] | None = None
        """Called at the next eager call of any of its units (apply_'s precision check)."""
        self.last_kept_bytes: dict[Any, int] = {}
        """``selective``: per op key kept by the last call, the bytes of its output."""
        self.last_replayed: set[Any] = set()
        """``selective``: the op keys the last call's replay runs (views aside)."""
        self._last_graph_parts: Any = None
        self.last_offloaded_bytes = 0
        """``offload``: bytes the last call sent to host memory."""
        self._open: _Frame | None = None
        # Per unit: None until its first call, then the buffers its forward updates in place.
        self._mutating: list[list[torch.Tensor] | None] = [None] * len(self.units)

    @property
    def last_graph(self) -> Any:
        """``selective``: the last call's :class:`~remat.apply.selective.ReplayGraph` (built when
        asked for), or ``None`` before the first call."""
        if self._last_graph_parts is None:
            return None
        return replay_graph(self._last_graph_parts, self.last_kept_bytes)

    def watched_buffers(self, position: int) -> list[torch.Tensor]:
        """Buffers to snapshot before the unit's forward: all of them on the first call (to learn
        which change), then only those that did."""
        known = self._mutating[position]
        return list(self.units[position][1].buffers()) if known is None else known

    def learn_buffers(self, position: int, changed: list[torch.Tensor]) -> None:
        if self._mutating[position] is None:
            self._mutating[position] = changed

    def _frame_for(self, position: int) -> _Frame:
        frame = self._open
        if position == 0 or frame is None or frame.next_unit != position:
            frame = _Frame(self)
        frame.next_unit = position + 1
        self._open = frame if position + 1 < len(self.units) else None
        return frame

    def make_forward(self, position: int, original: Callable[..., Any]) -> Callable[..., Any]:
        """The instance-level forward for the unit at ``position`` of this region."""
        fqn, module = self.units[position]
        region = self
        traced = selective_contexts(self.policy) if self.policy is not None else None

        def forward(*args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return original(*args, **kwargs)  # no_grad / inference: nothing is saved anyway
            if torch.compiler.is_compiling() and not region.offload:
                # Whole-model torch.compile traces this wrapper: dynamo's own checkpoint instead.
                return checkpoint_traced(traced, original, args, kwargs)
            if region.on_call is not None:
                region.on_call()
            if region.offload:
                offloader = Offloader(previous=_last_offloader())
                _LAST.offloader = weakref.ref(offloader)
                with torch.autograd.graph.saved_tensors_hooks(offloader.pack, offloader.unpack):
                    output = original(*args, **kwargs)
                region.last_offloaded_bytes = offloader.offloaded_bytes
                return output
            frame = region._frame_for(position)
            call = frame.record(fqn, module, original, args, kwargs)
            watched = region.watched_buffers(position)
            before = [(b, tensor_version(b), b.clone()) for b in watched]
            log = None
            if region._rule is not None:
                log = OpLog(region._rule, eager=eager_policy(region.policy or ""), unit=fqn)
            with ExitStack() as stack:
                stack.enter_context(
                    torch.autograd.graph.saved_tensors_hooks(
                        frame.pack_hook(call, log), frame.unpack
                    )
                )
                if log is not None:
                    stack.enter_context(log)
                output = original(*args, **kwargs)
            if log is not None:
                log.watch_outputs(output)
                kept, skippable = log.finish()
                frame.calls[call].kept_ops = kept
                frame.calls[call].skippable_ops = skippable
                region.last_kept_bytes = {
                    key: _output_bytes(value) for key, value in log.kept_outputs.items()
                }
                region._last_graph_parts = log.graph_parts
                region.last_replayed = log.needed
            changed = [(b, old) for b, version, old in before if tensor_version(b) != version]
            region.learn_buffers(position, [b for b, _ in changed])
            frame.calls[call].buffers_before = changed
            frame.record_output(call, output)
            return output

        forward.__wrapped__ = original  # type: ignore[attr-defined]
        forward.__remat_region__ = region  # type: ignore[attr-defined]
        return forward
