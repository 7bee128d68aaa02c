"""Finding the units of a model: the modules a plan may act on.

Default: the outermost modules whose class repeats (two or more instances, none nested inside another
unit): transformer layers, ResNet blocks, U-Net stages. A repeated module that holds a stack of layers
(a ``Sequential`` or ``ModuleList`` of two or more blocks) without being a layer of a stack itself, such
as T5's encoder and decoder, is looked into: its layers are the units. Children of the same ``Sequential`` or
``ModuleList`` as a unit become units too when they are blocks (have submodules), so a ``Sequential``
of mixed block classes is planned whole. Single layers (modules without children, such as ``Linear``)
are units only when no larger module repeats.

Users override the choice with class names or classes, exact FQNs, ``re:`` patterns over FQNs, or a
``(module, fqn) -> bool`` filter; the outermost matches are kept.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from remat._compat import tree_flatten
from remat.plan import closest_names

__all__ = ["UnitSpec", "execution_order", "find_units"]

UnitSpec = None | str | type | Callable[[nn.Module, str], bool] | Sequence[str | type]
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


def _key(module: nn.Module) -> Any:
    if isinstance(module, nn.Sequential):  # a Sequential is known by what it holds
        return ("Sequential", tuple(type(child).__name__ for child in module.children()))
    return type(module)


def _outermost(names: Iterable[str]) -> list[str]:
    chosen: list[str] = []
    for name in names:  # named_modules order: parents before children
        if not any(name.startswith(parent + ".") for parent in chosen):
            chosen.append(name)
    return chosen


def _holds_a_stack(module: nn.Module) -> bool:
    """True when ``module`` (or a module inside it) is a ``Sequential`` / ``ModuleList`` holding two
    or more blocks: a stack of layers such as an encoder."""
    return any(
        isinstance(inner, nn.Sequential | nn.ModuleList)
        and sum(1 for child in inner.children() if any(True for _ in child.children())) >= 2
        for inner in module.modules()
    )


def _default_units(model: nn.Module) -> list[str]:
    named = [(n, m) for n, m in model.named_modules() if n and not isinstance(m, _CONTAINERS)]
    modules = dict(model.named_modules())
    counts = Counter(_key(m) for _, m in named)
    is_block = {n: any(True for _ in m.children()) for n, m in named}
    # A repeated module that is not itself a layer of a stack but holds one (T5's encoder and
    # decoder, two instances of one class) is a stack, not a layer: its layers are the units.
    repeated_blocks = [
        n
        for n, m in named
        if counts[_key(m)] >= 2
        and is_block[n]
        and (
            isinstance(modules.get(n.rpartition(".")[0]), nn.Sequential | nn.ModuleList)
            or not _holds_a_stack(m)
        )
    ]
    if repeated_blocks:
        units = _outermost(repeated_blocks)
        # Siblings of a unit inside a Sequential / ModuleList are units too when they are blocks.
        extra: set[str] = set()
        for unit in units:
            parent_name = unit.rpartition(".")[0]
            parent = modules.get(parent_name)
            if isinstance(parent, nn.Sequential | nn.ModuleList):
                for child_name, child in parent.named_children():
                    full = f"{parent_name}.{child_name}" if parent_name else child_name
                    if any(True for _ in child.children()):
                        extra.add(full)
        units = _outermost(n for n, _ in named if n in set(units) | extra)
        return units
    leaves = [n for n, m in named if counts[_key(m)] >= 2 and not is_block[n]]
    return _outermost(leaves)


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
        units: ``None`` for the default rule, or class names / classes / exact FQNs / ``re:``
            patterns (a string or a list), or a ``(module, fqn) -> bool`` filter. The outermost
            matching modules are the units.

    Raises:
        ValueError: a name matches no class or FQN of the model, or nothing matches at all.

    Example:
        >>> from torch import nn
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         return self.fc(x).relu()
        >>> model = nn.Sequential(nn.Linear(4, 4), Block(), Block(), nn.Linear(4, 2))
        >>> find_units(model), find_units(model, "re:[03]")
        (['1', '2'], ['0', '3'])
    """
    if units is None:
        found = _default_units(model)
    else:
        match = _matcher(units, model)
        found = _outermost(n for n, m in model.named_modules() if n and match(m, n))
    if not found:
        raise ValueError(
            f"units: no module of {type(model).__name__} qualifies as a unit (got units={units!r})."
            " Name the blocks to plan with units= (class names, FQNs or re: patterns)."
        )
    return found


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
