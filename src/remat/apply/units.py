"""Finding the units of a model: the modules a plan may act on.

The default rule finds the finest repeated blocks: the layers of a transformer, the blocks inside
the stages of a ConvNeXt, Swin or ResNet (not the stages: the solver already groups consecutive
units into segments, so coarser units buy nothing), never the attention or MLP inside a layer.

Terms:

- A *container* is an ``nn.ModuleList``, an ``nn.ModuleDict`` or a plain ``nn.Sequential`` (a
  subclass of ``Sequential`` is a module of its own). A module's *key* is its class; a plain
  ``Sequential``'s is the classes it holds, in order.
- A module's *weights* are the parameters of two or more dimensions in it and its submodules. A
  *block* holds two or more: a transformer layer, an attention, an MLP, a residual block, a module
  of its own ``nn.Parameter``\\ s and functional ops with two matrices. A ``Linear``, a
  conv-norm-activation or a pre-norm ``Linear`` holds one: it is a *layer*.
- A *stack* is a container in which two or more children share a key, counting only children
  with submodules or with parameters of their own of a class outside ``torch.nn``: a
  ``ModuleList`` of transformer layers, a ResNet stage's ``Sequential``, a ``Sequential`` of mixed
  blocks where one class repeats.
- A *stage* is a module that holds at least one block and whose blocks all lie in containers
  (reached through containers only), each of which is a stack, or holds a single block when the
  module has no weights besides its blocks': a ConvNeXt or Swin stage (a downsampling layer and a
  stack of blocks), a ResNet stage (even of one bottleneck), T5's encoder, a diffusers down block
  (a stack of resnets, one of attentions). Not a transformer layer (its attention and MLP are
  blocks outside any container), a ResNet bottleneck whose convolutions are conv-norm-activation
  layers in a ``Sequential``, T5's block, whose ``ModuleList`` holds distinct sub-layers, none
  repeated, or diffusers' ``Transformer2DModel``, whose one transformer block sits between
  projections that looking into it would leave out of the plan.

From the model down, each child (``ModuleList``, ``ModuleDict`` and a ``Sequential`` that is a
stack are looked through) is:

1. a stage: looked into; if nothing inside it is a unit, it is one itself when it is the child of
   a stack or a block whose key repeats;
2. else a child of a stack that holds no stage: a unit, whether or not it has submodules (a
   ``ReLU`` between blocks too, so that segments cover the whole chain);
3. else a block whose key repeats in the model: a unit (the U-Net's middle block, blocks that are
   attributes of the model);
4. else looked into.

After either pass below, a module of the key of a unit, outside the units, is a unit too when it
has submodules or parameters of a class outside ``torch.nn`` (a lone block in a container beside
a stack of its kind); a layer such as a ``Linear`` is not spread this way.

When that finds nothing, it is run again with every child holding parameters counted in stacks
(a ``Sequential`` of ``Linear`` layers) and every module with submodules counted as a block (toy
models whose blocks hold one ``Linear``). When that finds nothing either, no block repeats and
:class:`NoUnitsError` lists the candidates (the children of the model, looked through wrappers
of one child) to name with ``units=``; :func:`find_units_with_inputs` adds the bytes each saves.

Known limit: a repeated module holding only a router and a ``ModuleList`` of experts is a stage
by this rule, so its experts become units; inside a transformer layer (the usual place) it is not
looked into.

Users override the choice with class names or classes, exact FQNs, ``re:`` patterns over FQNs, or a
``(module, fqn) -> bool`` filter; the outermost matches are kept.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from remat._compat import tree_flatten
from remat.plan import closest_names
from remat.units import format_bytes

__all__ = ["NoUnitsError", "UnitSpec", "execution_order", "find_units", "find_units_with_inputs"]

logger = logging.getLogger(__name__)

UnitSpec = None | str | type | Callable[[nn.Module, str], bool] | Sequence[str | type]
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


class NoUnitsError(ValueError):
    """No block repeats in the model, so there are no default units: name them with ``units=``.

    ``candidates`` are the modules to choose from (FQNs, registration order); ``saved_bytes``, when
    measured (see :func:`find_units_with_inputs`), what each saves for backward.

    Example:
        >>> from torch import nn
        >>> try:
        ...     find_units(nn.Sequential(nn.Linear(2, 3), nn.ReLU()))
        ... except NoUnitsError as error:
        ...     error.candidates
        ['0', '1']
    """

    def __init__(
        self, model_name: str, candidates: list[str], saved_bytes: dict[str, int] | None = None
    ) -> None:
        self.model_name = model_name
        self.candidates = candidates
        self.saved_bytes = saved_bytes or {}
        if not candidates:
            listing = f"{model_name} has no submodules to choose from"
        elif saved_bytes is None:
            listing = "candidates: " + ", ".join(candidates) + " (remat.profile measures the"
            listing += " bytes each saves)"
        else:
            ranked = sorted(candidates, key=lambda fqn: -self.saved_bytes.get(fqn, 0))
            listing = "candidates, by the activation bytes each saves for backward: " + ", ".join(
                f"{fqn} {format_bytes(self.saved_bytes.get(fqn, 0))}" for fqn in ranked
            )
        super().__init__(
            f"units: no block repeats in {model_name}, so it has no default units (a unit is a"
            " block that repeats, such as a transformer layer); expected the modules to plan on"
            f" named with units=[...] (CLI: --units), as class names, FQNs or re: patterns;"
            f" {listing}"
        )


def _key(module: nn.Module) -> Any:
    if type(module) is nn.Sequential:  # a Sequential is known by what it holds
        return ("Sequential", tuple(type(child).__name__ for child in module.children()))
    return type(module)


def _is_list(module: nn.Module) -> bool:
    return isinstance(module, _CONTAINERS)


def _is_container(module: nn.Module) -> bool:
    return _is_list(module) or type(module) is nn.Sequential


def _outermost(names: Iterable[str]) -> list[str]:
    chosen: list[str] = []
    for name in names:  # named_modules order: parents before children
        if not any(name.startswith(parent + ".") for parent in chosen):
            chosen.append(name)
    return chosen


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class _Finder:
    """The default rule (see the module docstring). ``loose``: the second pass, where layers with
    parameters count in stacks and modules with submodules count as blocks."""

    def __init__(self, model: nn.Module, *, loose: bool) -> None:
        self.loose = loose
        self.counts = Counter(_key(m) for n, m in model.named_modules() if n and not _is_list(m))
        self._weights: dict[int, int] = {}

    def weights(self, module: nn.Module) -> int:
        """Parameters of two or more dimensions in ``module`` and its submodules."""
        if id(module) not in self._weights:
            self._weights[id(module)] = sum(
                1
                for p in module.parameters()
                if isinstance(p, nn.parameter.UninitializedParameter) or p.dim() >= 2
            )
        return self._weights[id(module)]

    def is_block(self, module: nn.Module) -> bool:
        if self.weights(module) >= 2:
            return True
        return self.loose and (
            any(True for _ in module.children()) or _own_parameters(module, outside_torch=True)
        )

    def counts_in_stack(self, module: nn.Module) -> bool:
        if _is_list(module):
            return False
        if any(True for _ in module.children()):
            return True
        return _own_parameters(module, outside_torch=not self.loose)

    def is_stack(self, container: nn.Module) -> bool:
        if not _is_container(container):
            return False
        keys = Counter(_key(c) for c in container.children() if self.counts_in_stack(c))
        return any(count >= 2 for count in keys.values())

    def is_stage(self, module: nn.Module) -> bool:
        holders: dict[int, tuple[nn.Module, list[nn.Module]]] = {}

        def walk(parent: nn.Module, container: nn.Module | None) -> bool:
            for child in parent.children():
                if _is_container(child):
                    if not walk(child, child):
                        return False
                elif self.weights(child) >= 2:
                    if container is None:
                        return False  # a block outside any container: attention, MLP
                    holders.setdefault(id(container), (container, []))[1].append(child)
            return True

        if not walk(module, module if _is_container(module) else None) or not holders:
            return False
        blocks = [block for _, held in holders.values() for block in held]
        # A container of one block makes a stage only if nothing around it has weights: looking
        # into it gains no granularity and would leave those layers out of the plan.
        alone = self.weights(module) == sum(self.weights(block) for block in blocks)
        return all(self.is_stack(c) or (len(held) == 1 and alone) for c, held in holders.values())

    def units(self, module: nn.Module, prefix: str) -> list[str]:
        """The units inside ``module`` (whose FQN is ``prefix``), in registration order."""
        children = list(module.named_children())
        in_stack = self.is_stack(module)
        stack = in_stack and not any(
            not _is_list(child) and self.is_stage(child) for _, child in children
        )
        found: list[str] = []
        for name, child in children:
            fqn = _join(prefix, name)
            repeated = self.counts[_key(child)] >= 2 and self.is_block(child)
            if _is_list(child) or (type(child) is nn.Sequential and self.is_stack(child)):
                found += self.units(child, fqn)
            elif self.is_stage(child):  # a unit itself if it would be one, but nothing inside is
                found += self.units(child, fqn) or ([fqn] if in_stack or repeated else [])
            elif stack or repeated:
                found.append(fqn)
            else:
                found += self.units(child, fqn)
        return found


def _own_parameters(module: nn.Module, *, outside_torch: bool) -> bool:
    """Whether ``module`` holds parameters itself (with ``outside_torch``: and its class is not
    one of ``torch.nn``'s, so it is a block of parameters and functional ops, not a layer)."""
    if not any(True for _ in module.parameters(recurse=False)):
        return False
    return not (outside_torch and type(module).__module__.startswith("torch.nn."))


def _candidates(model: nn.Module) -> list[str]:
    """The modules to name as units when none are found: the model's children (through
    ``ModuleList`` / ``ModuleDict``), or those of its only child, and so on down."""
    prefix, module = "", model
    while True:
        parts = list(_parts(module, prefix))
        if len(parts) != 1 or not any(True for _ in _parts(parts[0][1], parts[0][0])):
            return [fqn for fqn, _ in parts]
        prefix, module = parts[0]


def _parts(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_children():
        if _is_list(child):
            yield from _parts(child, _join(prefix, name))
        else:
            yield _join(prefix, name), child


def _default_units(model: nn.Module) -> list[str]:
    found = _Finder(model, loose=False).units(model, "")
    if not found:
        found = _Finder(model, loose=True).units(model, "")
    if not found:
        raise NoUnitsError(type(model).__name__, _candidates(model))
    return _with_same_kind(model, found)


def _with_same_kind(model: nn.Module, found: list[str]) -> list[str]:
    """``found`` and, outside them, the modules of the same key as one of them that have
    submodules or parameters of a class outside ``torch.nn``: a block alone in a container after a
    stack of its kind is a unit too (a layer such as a ``Linear`` is not spread this way)."""
    modules = dict(model.named_modules())
    kinds = {
        _key(modules[fqn])
        for fqn in found
        if any(True for _ in modules[fqn].children())
        or _own_parameters(modules[fqn], outside_torch=True)
    }
    chosen = set(found)
    for name, module in modules.items():
        if (
            name
            and name not in chosen
            and not _is_list(module)
            and _key(module) in kinds
            and not any(fqn.startswith(name + ".") for fqn in found)
        ):
            chosen.add(name)
    return _outermost(name for name in modules if name in chosen)


def _matcher(spec: Any, model: nn.Module) -> Callable[[nn.Module, str], bool]:
    if callable(spec) and not isinstance(spec, type):
        return spec
    if isinstance(spec, str | type):
        items = [spec]
    elif isinstance(spec, list | tuple | set | frozenset):
        items = list(spec)
    else:
        raise ValueError(
            f"units: got {spec!r}; expected class names, classes, FQNs, 're:' patterns (a string or"
            " a list) or a (module, fqn) -> bool filter"
        )
    names = {n for n, _ in model.named_modules()}
    classes = {type(m).__name__ for _, m in model.named_modules()}
    tests: list[Callable[[nn.Module, str], bool]] = []
    for item in items:
        if isinstance(item, type):
            tests.append(lambda m, n, cls=item: isinstance(m, cls))
        elif not isinstance(item, str) or not item:
            raise ValueError(
                f"units: got {item!r}; expected class names, classes, FQNs, 're:' patterns or a"
                " (module, fqn) -> bool filter"
            )
        elif item.startswith("re:"):
            try:
                pattern = re.compile(item[3:])
            except re.error as error:
                raise ValueError(
                    f"units: {item!r} is not a valid regular expression ({error})"
                ) from None
            tests.append(lambda m, n, p=pattern: bool(p.fullmatch(n)))
        elif item in names:
            tests.append(lambda m, n, name=item: n == name)
        elif item in classes:
            tests.append(lambda m, n, cls=item: type(m).__name__ == cls)
        else:
            raise ValueError(
                f"units: {item!r} is neither a module class nor an FQN of this model; closest:"
                f" {closest_names(item, sorted(classes | names))}. Use a class name (Block), an"
                " FQN (blocks.0) or a pattern (re:blocks\\.[0-9]+)."
            )
    return lambda m, n: any(test(m, n) for test in tests)


def find_units(model: nn.Module, units: UnitSpec = None) -> list[str]:
    """The FQNs of the units of ``model``, in registration order.

    Args:
        model: any module.
        units: ``None`` for the default rule (the finest repeated blocks: see
            :mod:`remat.apply.units`), or class names / classes / exact FQNs / ``re:`` patterns
            (a string or a list), or a ``(module, fqn) -> bool`` filter. The outermost matching
            modules are the units.

    Raises:
        NoUnitsError: ``units=None`` and no block repeats (a ``ValueError``; it lists the
            candidates).
        ValueError: a name matches no class or FQN of the model, or nothing matches at all.

    Example:
        >>> from torch import nn
        >>> class Block(nn.Module):  # two weights: a block
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 4)
        ...     def forward(self, x):
        ...         return x + self.fc2(self.fc1(x).relu())
        >>> class Stage(nn.Module):  # a downsampling layer and a stack of blocks
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.down = nn.Linear(4, 4)
        ...         self.blocks = nn.ModuleList([Block(), Block()])
        ...     def forward(self, x):
        ...         for block in self.blocks:
        ...             x = block(x)
        ...         return x
        >>> model = nn.Sequential(Stage(), Stage(), nn.Linear(4, 2))
        >>> find_units(model)
        ['0.blocks.0', '0.blocks.1', '1.blocks.0', '1.blocks.1']
        >>> find_units(model, "re:[01]"), find_units(model, "Linear")[:2]
        (['0', '1'], ['0.down', '0.blocks.0.fc1'])
    """
    if units is None:
        return _default_units(model)
    match = _matcher(units, model)
    found = _outermost(n for n, m in model.named_modules() if n and match(m, n))
    if not found:
        raise ValueError(
            f"units: no module of {type(model).__name__} qualifies as a unit (got units={units!r})."
            " Name the blocks to plan with units= (class names, FQNs or re: patterns)."
        )
    return found


def find_units_with_inputs(model: nn.Module, units: UnitSpec, example_inputs: Any) -> list[str]:
    """:func:`find_units`, where a :class:`NoUnitsError` lists each candidate's saved bytes.

    The bytes are those the candidate's forward leaves alive for backward, its outputs excluded
    (what recomputing it frees: :attr:`remat.profiling.tracker.ModuleStats.saved_bytes`),
    measured by the memory tracker over one forward of ``model(*example_inputs)``. Buffers (such
    as BatchNorm's running statistics) and the RNG state are restored afterwards. If that forward
    fails, the candidates are listed without bytes.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.body = nn.Sequential(nn.Linear(4, 8), nn.GELU())
        ...         self.head = nn.Linear(8, 2)
        ...     def forward(self, x):
        ...         return self.head(self.body(x))
        >>> try:
        ...     find_units_with_inputs(Net(), None, (torch.ones(2, 4),))
        ... except NoUnitsError as error:
        ...     error.saved_bytes  # GELU keeps its input, 2 x 8 floats; a Linear's is not its own
        {'body': 64, 'head': 0}
    """
    try:
        return find_units(model, units)
    except NoUnitsError as error:
        saved = _saved_bytes(model, error.candidates, example_inputs)
        raise NoUnitsError(error.model_name, error.candidates, saved) from None


def _saved_bytes(
    model: nn.Module, candidates: list[str], example_inputs: Any
) -> dict[str, int] | None:
    from remat.profiling.tracker import track_memory  # remat.profiling imports this module

    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices), track_memory(model) as tracker:
            output = call_model(model, example_inputs)
            report = tracker.report()
        del output
    except Exception as error:  # the error about units matters more than this one
        logger.debug("could not measure the candidates' saved bytes: %s", error)
        return None
    finally:
        with torch.no_grad():
            for buffer, before in buffers:
                buffer.copy_(before)
    return {
        fqn: report.modules[fqn].saved_bytes if fqn in report.modules else 0 for fqn in candidates
    }


def execution_order(model: nn.Module, unit_fqns: Sequence[str], example_inputs: Any) -> list[str]:
    """Reorder ``unit_fqns`` by when each unit first runs in ``model(*example_inputs)``.

    The forward runs under ``torch.no_grad()``; units that never run are placed last, in their
    given order. Use the ``meta`` device to do this without memory.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class Swap(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)
        ...     def forward(self, x):
        ...         return self.a(self.b(x))
        >>> execution_order(Swap(), ["a", "b"], (torch.ones(1, 2),))
        ['b', 'a']
    """
    modules = dict(model.named_modules())
    seen: list[str] = []
    handles = []
    for fqn in unit_fqns:

        def hook(module: nn.Module, args: Any, fqn: str = fqn) -> None:
            if fqn not in seen:
                seen.append(fqn)

        handles.append(modules[fqn].register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            call_model(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen + [fqn for fqn in unit_fqns if fqn not in seen]


def call_model(model: nn.Module, example_inputs: Any) -> Any:
    """Call ``model`` with example inputs: a tuple of positional arguments, a dict of keyword
    arguments, or a single object passed as the only argument."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, tuple | list):
        return model(*example_inputs)
    return model(example_inputs)


def tensors_in(tree: Any) -> list[torch.Tensor]:
    """The tensors inside a nested structure of tuples, lists, dicts and dataclasses."""
    return [leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, torch.Tensor)]
