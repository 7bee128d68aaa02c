"""``apply_``: install a plan on a model in place, and the handle that takes it off again.

Consumes a model and a :class:`~remat.plan.Plan`; produces a :class:`Handle`. Each planned unit gets
an instance-level ``forward`` (the class's is untouched); module structure, FQNs, ``state_dict`` keys
and ``named_parameters`` do not change, and ``Handle.remove()`` restores every ``forward`` exactly as
it was.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from remat import _compat
from remat.apply.checkpoint import Region
from remat.apply.shapes import watch_batches
from remat.apply.units import NoUnitsError, UnitSpec, find_units
from remat.plan import Action, Plan, closest_names

__all__ = [
    "Handle",
    "apply_",
    "fingerprint",
    "kv_cache_off",
    "precision_check_off",
    "running_precision",
    "say_once",
    "warn_eval_mode",
]

logger = logging.getLogger(__name__)
_MISSING = object()


def fingerprint(model: nn.Module, units: list[str] | None = None) -> dict[str, Any]:
    """What identifies a model for a plan: class, parameter FQNs and shapes, and the units.

    Dtypes and devices are left out on purpose: a plan made on ``meta`` in bfloat16 applies to the
    same model on CUDA in float32.

    Example:
        >>> from torch import nn
        >>> fp = fingerprint(nn.Linear(3, 2), units=[])
        >>> fp["model_class"], fp["parameters"], fp["num_parameters"]
        ('Linear', {'weight': [2, 3], 'bias': [2]}, 8)
    """
    shapes = {name: list(p.shape) for name, p in model.named_parameters()}
    digest = hashlib.sha256(repr(sorted(shapes.items())).encode()).hexdigest()
    return {
        "model_class": type(model).__name__,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "parameters_sha256": digest,
        "parameters": shapes,
        "units": list(units) if units is not None else None,
    }


def _check_fingerprint(expected: dict[str, Any], model: nn.Module) -> None:
    actual = fingerprint(model)
    if (
        expected.get("parameters_sha256") == actual["parameters_sha256"]
        and expected.get("model_class", actual["model_class"]) == actual["model_class"]
    ):
        return
    problems = []
    if expected.get("model_class") != actual["model_class"]:
        problems.append(f"model class {expected.get('model_class')!r} != {actual['model_class']!r}")
    want, have = expected.get("parameters") or {}, actual["parameters"]
    missing = [n for n in want if n not in have][:5]
    extra = [n for n in have if n not in want][:5]
    reshaped = [f"{n}: {want[n]} -> {have[n]}" for n in want if n in have and want[n] != have[n]]
    if missing:
        problems.append(f"parameters missing from the model: {missing}")
    if extra:
        problems.append(f"parameters the plan does not know: {extra}")
    if reshaped:
        problems.append(f"shapes differ: {reshaped[:5]}")
    raise ValueError(
        "apply_: the plan was made for another model ("
        + "; ".join(problems or ["fingerprint"])
        + "). Re-plan for this model, or pass check_fingerprint=False to apply it anyway."
    )


def say_once(model: nn.Module, key: str, message: str, *, stacklevel: int = 2) -> bool:
    """Warn ``message`` the first time ``key`` is said about ``model`` (profiling and solving apply
    plans many times; each warning is given once per model). Returns whether it warned.

    Example:
        >>> import warnings
        >>> model = nn.Linear(2, 2)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     said = [say_once(model, "k", "remat: once") for _ in range(3)]
        >>> said, len(caught)
        ([True, False, False], 1)
    """
    said = model.__dict__.setdefault("_remat_said", set())
    if key in said:
        return False
    said.add(key)
    warnings.warn(message, stacklevel=stacklevel + 1)
    return True


def warn_eval_mode(model: nn.Module) -> bool:
    """Warn once per model when a model in eval mode is about to be measured for training: dropout
    is off and BatchNorm uses its running statistics, so the step is not the training step.
    Returns whether the model is in eval mode.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn_eval_mode(nn.Linear(2, 2).eval())
        True
        >>> "model.train()" in str(caught[0].message)
        True
    """
    if model.training:
        return False
    say_once(
        model,
        "eval",
        f"remat: {type(model).__name__} is in eval mode (model.training is False; Hugging Face's"
        " from_pretrained returns models in eval mode): dropout is off and BatchNorm uses its"
        " running statistics, so the step remat measures is not the training step, and a plan"
        " made from it may not fit in training. Call model.train() before remat.auto_ /"
        " remat.profile (or ignore this if you train in eval mode on purpose)",
        stacklevel=3,
    )
    return True


def _cached_configs(model: nn.Module) -> tuple[list[tuple[str, Any]], bool]:
    """(FQN, config) of every distinct config in the model with ``use_cache`` True, and whether
    any config has a ``use_cache`` setting at all (a Hugging Face model)."""
    seen: set[int] = set()
    cached: list[tuple[str, Any]] = []
    has_setting = False
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if config is None or id(config) in seen or not hasattr(config, "use_cache"):
            continue
        seen.add(id(config))
        has_setting = True
        if config.use_cache is True:
            cached.append((name, config))
    return cached, has_setting


def _no_cache_kwarg(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook: ``use_cache=True`` passed to a model in training is turned off, as
    transformers takes the call's value over the config's."""
    if kwargs.get("use_cache") and module.training and torch.is_grad_enabled():
        say_once(
            module,
            "use_cache_kwarg",
            "remat: use_cache=True passed to the model in training is turned off under remat: the"
            " KV cache would keep every layer's keys and values alive, and a recomputed layer"
            " would append to it again",
            stacklevel=4,
        )
        return args, {**kwargs, "use_cache": False}
    return None


def _turn_cache_off(model: nn.Module) -> Callable[[], None]:
    """Turn Hugging Face's KV cache off for training under remat, as its own gradient
    checkpointing does: ``use_cache`` False on every config, and a ``use_cache=True`` keyword
    overridden in training. Warns once per model; returns the function that undoes it."""
    cached, has_setting = _cached_configs(model)
    for _, config in cached:
        config.use_cache = False
    hook = (
        model.register_forward_pre_hook(_no_cache_kwarg, with_kwargs=True) if has_setting else None
    )
    if cached:
        where = ", ".join(f"{n or type(model).__name__}.config" for n, _ in cached[:3])
        say_once(
            model,
            "use_cache",
            f"remat: use_cache=True is turned off ({where}) while remat measures the model and"
            " while a plan is applied, as Hugging Face's gradient checkpointing does: in training"
            " the KV cache keeps every layer's keys and values alive, and a recomputed layer would"
            " append to it again. Handle.remove() turns it back on",
            stacklevel=4,
        )

    def undo() -> None:
        for _, config in cached:
            config.use_cache = True
        if hook is not None:
            hook.remove()

    return undo


@contextmanager
def kv_cache_off(model: nn.Module) -> Iterator[None]:
    """Inside the block the model runs without Hugging Face's KV cache, as it trains under a plan
    (``use_cache`` False on every config; a ``use_cache=True`` keyword overridden in training);
    restored on exit. A model without ``use_cache`` is untouched.

    Example:
        >>> from types import SimpleNamespace
        >>> model = nn.Linear(2, 2)
        >>> model.config = SimpleNamespace(use_cache=True)
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     with kv_cache_off(model):
        ...         inside = model.config.use_cache
        >>> inside, model.config.use_cache
        (False, True)
    """
    undo = _turn_cache_off(model)
    try:
        yield
    finally:
        undo()


@dataclass(eq=False)
class Handle:
    """A plan installed on a model. ``remove()`` (or leaving a ``with`` block) takes it off.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> with apply_(model, Plan(actions={"1": "recompute"})) as handle:
        ...     handle.actions, handle.active
        ({'0': 'keep', '1': 'recompute'}, True)
        >>> handle.active
        False
    """

    model: nn.Module
    plan: Plan
    units: list[str]
    """Unit FQNs the plan was resolved against, in execution order when the plan knew it."""
    actions: dict[str, str]
    """Every planned module FQN -> its action (``keep`` units included)."""
    result: Any = None
    """The ``SolveResult`` when the plan came from the solver (``remat.auto_``)."""
    notes: list[str] = field(default_factory=list)
    """Warnings raised while applying (forward hooks that run again during recompute)."""
    _installed: list[tuple[nn.Module, Any]] = field(default_factory=list, repr=False)
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    @property
    def active(self) -> bool:
        return bool(self._installed)

    @property
    def checkpointed(self) -> list[str]:
        """FQNs whose activations are recomputed."""
        return [fqn for fqn, action in self.actions.items() if action != "keep"]

    def remove(self) -> None:
        """Restore every module's ``forward`` as it was before ``apply_``, and the KV cache
        settings ``apply_`` turned off; idempotent."""
        while self._undo:
            self._undo.pop()()
        while self._installed:
            module, previous = self._installed.pop()
            if previous is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = previous

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()


_PRECISION_CHECKS_OFF = [0]


@contextmanager
def precision_check_off() -> Iterator[None]:
    """Plans applied inside are not checked against the autocast state (the profiler applies
    its own plans, made without a precision, inside the step's autocast).

    Example:
        >>> with precision_check_off():
        ...     _PRECISION_CHECKS_OFF[0]
        1
    """
    _PRECISION_CHECKS_OFF[0] += 1
    try:
        yield
    finally:
        _PRECISION_CHECKS_OFF[0] -= 1


def running_precision(device_type: str) -> str:
    """The precision the autocast state says a step on ``device_type`` runs in now: ``32``
    (no autocast), ``bf16-mixed``, ``fp16-mixed`` or ``autocast(<dtype>)``.

    Example:
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     running_precision("cpu")
        'bf16-mixed'
        >>> running_precision("cpu")
        '32'
    """
    if not torch.is_autocast_enabled(device_type):
        return "32"
    dtype = torch.get_autocast_dtype(device_type)
    names = {torch.bfloat16: "bf16-mixed", torch.float16: "fp16-mixed"}
    return names.get(dtype, f"autocast({str(dtype).replace('torch.', '')})")


def _watch_precision(
    model: nn.Module, plan: Plan, regions: list[Region]
) -> Callable[[], None] | None:
    """At the model's first forward under ``plan``, warn once (per model) if the autocast state
    is not the one of the precision the plan was made for (``32`` and ``bf16-true`` run without
    autocast). Autocast entered outside the model is seen by the model's pre-hook. Wrappers such
    as accelerate's enter it inside the model's ``forward``, after that hook ran: where the hook
    sees none, the state is read again at the first eager call of a planned unit (a module hook
    there would change how ``torch.compile`` traces the unit). Returns what removes the checks,
    or ``None`` on a device autocast does not run on."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type not in ("cpu", "cuda"):
        return None
    expected = "32" if plan.precision in ("32", "bf16-true") else plan.precision

    def compare() -> None:
        running = running_precision(device.type)
        if _PRECISION_CHECKS_OFF[0] or running == expected:
            return
        say_once(
            model,
            "precision",
            f"remat: the plan was made for precision {plan.precision!r} but the model's forward"
            f" runs as {running!r} (autocast on {device.type}); its predicted peak is that of the"
            f" other step. Re-plan with precision={running!r} (remat plan --precision), or train"
            " under the plan's precision.",
            stacklevel=4,
        )

    def disarm() -> None:
        for region in regions:
            region.on_call = None

    def in_unit() -> None:
        disarm()
        compare()

    def check_model(_module: nn.Module, _args: Any) -> None:
        handle.remove()
        if running_precision(device.type) != "32" or not regions:
            compare()
            return
        for region in regions:  # none outside: a wrapper may enter it inside the forward
            region.on_call = in_unit

    handle = model.register_forward_pre_hook(check_model)

    def remove() -> None:
        handle.remove()
        disarm()

    return remove


def _refuse_double_checkpointing(
    model: nn.Module, modules: dict[str, nn.Module], targets: list[str]
) -> None:
    """A model that checkpoints itself and a plan on top recompute twice (and reentrant inner
    checkpoints can drop gradients): refuse, saying which to turn off."""
    for name, module in model.named_modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            raise ValueError(
                f"apply_: {name or type(model).__name__} already checkpoints itself"
                " (gradient_checkpointing=True, as Hugging Face's gradient_checkpointing_enable()"
                " sets). Turn one off: call model.gradient_checkpointing_disable() (or"
                " remat.integrations.hf.prepare_model(model, disable_gradient_checkpointing=True))"
                " and let remat plan, or do not apply a remat plan."
            )
    for fqn in targets:
        for name, module in modules[fqn].named_modules(prefix=fqn):
            if type(module).__name__ == "CheckpointWrapper":
                raise ValueError(
                    f"apply_: {name} is wrapped by torch's checkpoint_wrapper, inside {fqn}, which"
                    " this plan checkpoints too. Remove the wrapper, or keep that unit."
                )


def _hooks_that_rerun(modules: dict[str, nn.Module], targets: list[str]) -> list[str]:
    """Forward hooks inside a recomputed unit run again when it is replayed: name them."""
    notes = []
    for fqn in targets:
        hooked = [
            name
            for name, module in modules[fqn].named_modules(prefix=fqn)
            if name != fqn and _compat.forward_hook_count(module)
        ]
        if hooked:
            notes.append(
                f"remat: forward hooks on {', '.join(hooked[:5])} will run again when {fqn} is"
                " recomputed in backward (hooks on the unit itself run once)"
            )
    if targets and _compat.global_forward_hook_count():
        notes.append(
            "remat: global module forward hooks (register_module_forward_hook) will run again for"
            " the submodules of every recomputed unit"
        )
    return notes


def _units_for(model: nn.Module, plan: Plan, units: UnitSpec) -> list[str]:
    """The units to resolve ``plan`` against: ``find_units``, or, where no block repeats, the
    modules the plan names exactly (a plan such as ``{"head": "recompute"}`` needs no repeated
    block); a plan of ``_default`` or ``re:`` selectors still needs units, and re-raises."""
    try:
        return find_units(model, units)
    except NoUnitsError:
        named = [s for s in plan.actions if s != "_default" and not s.startswith("re:")]
        if units is not None or not named or len(named) != len(plan.actions):
            raise
        return named


def apply_(
    model: nn.Module,
    plan: Plan,
    *,
    units: UnitSpec = None,
    check_fingerprint: bool = True,
) -> Handle:
    """Install ``plan`` on ``model`` in place.

    Args:
        model: any ``nn.Module``.
        plan: the plan; its ``units`` (if recorded) are the units, else they are found with
            ``units`` (see :func:`remat.find_units`).
        units: how to find units when the plan does not list them.
        check_fingerprint: refuse a plan whose fingerprint names another model.

    Returns:
        A :class:`Handle`; ``handle.remove()`` undoes everything. While it is on, a Hugging Face
        model runs without its KV cache (``config.use_cache`` False, warned once per model), as
        under Hugging Face's own gradient checkpointing.

    Raises:
        ValueError: a selector matches nothing (closest names listed), a unit of the plan is not in
            the model, planned modules nest, the plan is for another model, or the model already
            carries a plan.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(4)])
        >>> handle = apply_(model, Plan(actions={"_default": "recompute"}))
        >>> handle.checkpointed
        ['0', '1', '2', '3']
        >>> model(torch.randn(2, 8, requires_grad=True)).sum().backward()
        >>> handle.remove()
        >>> "forward" in model[0].__dict__
        False
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"apply_: model must be an nn.Module, got {type(model).__name__}")
    model = _compat.compiled_original(model)  # torch.compile(model): plan the model inside it
    if not isinstance(plan, Plan):
        raise ValueError(
            f"apply_: plan must be a remat.Plan, got {type(plan).__name__}; load a file with"
            " remat.Plan.load(path)"
        )
    modules = dict(model.named_modules())
    if check_fingerprint and plan.fingerprint:
        _check_fingerprint(plan.fingerprint, model)
    if plan.units is not None:
        unknown = [u for u in plan.units if u not in modules]
        if unknown:
            raise ValueError(
                f"apply_: the plan's units {unknown[:5]} are not modules of this model; closest:"
                f" {closest_names(unknown[0], sorted(modules))}. Re-plan for this model."
            )
        unit_fqns = list(plan.units)
    else:
        unit_fqns = _units_for(model, plan, units)
    resolved = plan.resolve(unit_fqns, modules)
    targets = [fqn for fqn, action in resolved.items() if action.checkpoints]
    for fqn in targets:
        inner = [o for o in targets if o.startswith(fqn + ".")]
        if inner:
            raise ValueError(
                f"apply_: planned modules nest: {fqn!r} contains {inner[:3]}; plan one of them"
            )
        current = modules[fqn].__dict__.get("forward")
        if current is not None and hasattr(current, "__remat_region__"):
            raise ValueError(
                f"apply_: {fqn!r} already carries a remat plan; call remove() on its handle first"
            )
    _refuse_double_checkpointing(model, modules, targets)
    notes = _hooks_that_rerun(modules, targets)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    handle = Handle(
        model=model,
        plan=plan,
        units=unit_fqns,
        actions={fqn: str(action) for fqn, action in resolved.items()},
        notes=notes,
    )
    order = {fqn: i for i, fqn in enumerate(unit_fqns)}
    regions: dict[str, list[str]] = {}
    for fqn in targets:
        action: Action = resolved[fqn]
        key = str(action) if action.kind in ("segment", "nested") else fqn
        regions.setdefault(key, []).append(fqn)
    try:
        # the KV cache off while the plan is on, as Hugging Face's gradient checkpointing does
        handle._undo.append(_turn_cache_off(model))
        unwatch = watch_batches(model, plan)  # a larger batch than planned: warned about once
        if unwatch is not None:
            handle._undo.append(unwatch)
        made: list[Region] = []
        for name, members in regions.items():
            members.sort(key=lambda f: order.get(f, -1))
            first = resolved[members[0]]
            region = Region(
                name,
                [(fqn, modules[fqn]) for fqn in members],
                nested=first.kind == "nested",
                policy=first.label if first.kind == "selective" else None,
                offload=first.kind == "offload",
            )
            made.append(region)
            for position, (_, module) in enumerate(region.units):
                previous = module.__dict__.get("forward", _MISSING)
                original = module.forward
                module.__dict__["forward"] = region.make_forward(position, original)
                handle._installed.append((module, previous))
        unwatch_precision = _watch_precision(model, plan, made)  # another autocast: said once
        if unwatch_precision is not None:
            handle._undo.append(unwatch_precision)
    except BaseException:
        handle.remove()
        raise
    logger.info(
        "remat: %d of %d units checkpointed in %d regions (%s)",
        len([u for u in unit_fqns if resolved[u].checkpoints]),
        len(unit_fqns),
        len(regions),
        plan.strategy,
    )
    return handle
