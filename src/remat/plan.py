"""Plans: which action each unit of a model takes, as an ordered mapping from selector to action.

A :class:`Plan` consumes nothing but names: selectors are an exact module FQN, a ``re:`` regular
expression over unit FQNs, or ``_default``. Resolution for a unit is: its exact FQN if present, else the
first ``re:`` selector (in mapping order) that fully matches it, else ``_default``, else ``keep``.

Actions (this module imports no torch):

- ``keep``: nothing changes;
- ``recompute``: full activation checkpointing of the unit (non-reentrant);
- ``segment:<label>``: consecutive units with the same label are checkpointed as one region, whose
  only stored input is the first unit's; its backward replays the region once, keeping what every
  unit saves (as ``torch.utils.checkpoint.checkpoint_sequential`` does);
- ``nested:<label>``: the same region, but its backward first replays it keeping only each unit's
  input, then replays each unit again just before its own backward: less memory than ``segment``
  (one unit's activations at a time), at one more forward of the inner units.
- ``selective:<policy>``: op-level selective recompute of the unit: the outputs of some ops are
  saved, the rest recomputed in backward. Policies: ``save_matmuls`` (save matmul and attention
  outputs, as torchtitan's op-level mode), ``megatron`` (recompute only the attention core,
  Korthikanti et al. 2022) or ``ops.<op>.<op>...`` (save the outputs of these aten ops, named by
  their overload packet such as ``mm`` or ``addmm``, or by a device-independent family such as
  ``attention`` or ``layer_norm`` for ops whose kernel differs per device, see
  :mod:`remat.opnames`; what the solver chooses);
- ``offload``: the unit's saved tensors go to host memory in forward and come back for backward.

Plans round-trip through JSON with a ``format_version`` and may carry the fingerprint of the model
they were made for, the budget they were solved for, and the predicted peak and overhead.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remat.opnames import canonical_ops

__all__ = ["FORMAT_VERSION", "PRECISIONS", "Action", "Plan", "closest_names"]

FORMAT_VERSION = 1
DEFAULT = "_default"
REGEX_PREFIX = "re:"
PRECISIONS = ("32", "bf16-mixed", "fp16-mixed", "bf16-true")
"""The precisions of a training step, by Lightning's names."""
ACTION_KINDS = ("keep", "recompute", "segment", "nested", "selective", "offload")
_GROUPS = ("segment", "nested")
_LABELLED = ("segment", "nested", "selective")
_LABEL = re.compile(r"^[A-Za-z0-9_.\-]+$")
SELECTIVE_POLICIES = ("save_matmuls", "megatron")
"""Named policies of ``selective``; ``ops.<op>.<op>...`` names a save set directly."""
_OPS_POLICY = re.compile(r"^ops(\.[A-Za-z0-9_]+)*$")


@dataclass(frozen=True)
class Action:
    """One unit's action: ``keep``, ``recompute``, ``offload``, ``segment`` / ``nested`` with a
    label, or ``selective`` with a policy.

    Example:
        >>> Action.parse("segment:0"), str(Action.parse("recompute"))
        (Action(kind='segment', label='0'), 'recompute')
    """

    kind: str
    label: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ACTION_KINDS:
            raise ValueError(
                f"action: got {self.kind!r}; expected one of keep, recompute, offload,"
                " segment:<label>, nested:<label>, selective:<policy>"
            )
        if (self.kind in _LABELLED) != (self.label is not None):
            raise ValueError(
                f"action {self.kind!r}: a label goes with segment, nested and selective only"
                f" (segment:<label>, selective:save_matmuls), got label {self.label!r}"
            )
        if self.kind == "selective":
            assert self.label is not None
            if self.label not in SELECTIVE_POLICIES and not _OPS_POLICY.match(self.label):
                raise ValueError(
                    f"selective policy: got {self.label!r}; expected save_matmuls, megatron or"
                    " ops.<op>.<op>... (aten overload packets or op families, e.g."
                    " ops.addmm.attention)"
                )
        elif self.label is not None and not _LABEL.match(self.label):
            raise ValueError(
                f"segment label: got {self.label!r}; expected letters, digits, '_', '-' or '.'"
            )

    @classmethod
    def parse(cls, text: str | Action) -> Action:
        """Parse ``keep``, ``recompute``, ``segment:<label>`` or ``nested:<label>``."""
        if isinstance(text, Action):
            return text
        if not isinstance(text, str):
            raise ValueError(f"action: got {text!r}; expected a string such as 'recompute'")
        kind, sep, label = text.strip().partition(":")
        return cls(kind, label if sep else None)

    def __str__(self) -> str:
        return self.kind if self.label is None else f"{self.kind}:{self.label}"

    @property
    def checkpoints(self) -> bool:
        """Whether the action changes what the unit keeps for backward (anything but ``keep``)."""
        return self.kind != "keep"

    @property
    def saved_ops(self) -> tuple[str, ...] | None:
        """For ``selective:ops.<op>...``, the ops whose outputs are saved, by their
        device-independent names (:func:`remat.opnames.canonical_op`: a kernel of one device,
        as plans made before the op families name them, reads as its family).

        Example:
            >>> Action.parse("selective:ops.mm.addmm").saved_ops
            ('mm', 'addmm')
            >>> Action.parse("selective:ops._scaled_dot_product_flash_attention_for_cpu").saved_ops
            ('attention',)
        """
        if self.kind != "selective" or self.label is None or not self.label.startswith("ops"):
            return None
        return canonical_ops(part for part in self.label.split(".")[1:] if part)


def closest_names(name: str, candidates: Iterable[str], count: int = 5) -> list[str]:
    """The candidates that look most like ``name`` (for "did you mean" messages).

    Example:
        >>> closest_names("blocks.1O", ["blocks.10", "blocks.1", "head"], count=2)
        ['blocks.1', 'blocks.10']
    """
    candidates = list(candidates)
    close = difflib.get_close_matches(name, candidates, n=count, cutoff=0.4)
    return close or candidates[:count]


@dataclass(kw_only=True)
class Plan:
    """An ordered mapping from selector to :class:`Action`, plus what it was made for.

    Example:
        >>> plan = Plan(actions={"blocks.0": "keep", "re:blocks\\\\.[0-9]+": "recompute"})
        >>> [str(plan.action_for(u)) for u in ("blocks.0", "blocks.1", "head")]
        ['keep', 'recompute', 'keep']
        >>> Plan.from_json(plan.to_json()) == plan
        True
    """

    actions: dict[str, Action] = field(default_factory=dict)
    """Selector -> action, in order: exact FQN, ``re:<regex>`` or ``_default``."""
    units: list[str] | None = None
    """Unit FQNs in execution order, as found when the plan was made (``None``: find them again)."""
    strategy: str = "custom"
    """How the plan was made: ``none``, ``full``, ``every_n:K``, ``sqrt_n``, ``custom``, ..."""
    fingerprint: dict[str, Any] | None = None
    """The model the plan was made for (see ``remat.apply.fingerprint``); checked by ``apply_``."""
    budget_bytes: int | None = None
    predicted_peak_bytes: int | None = None
    predicted_overhead: float | None = None
    precision: str = "32"
    """The precision of the step the plan was made for (Lightning's names: ``32``,
    ``bf16-mixed``, ``fp16-mixed``, ``bf16-true``)."""
    input_shapes: list[list[int]] | None = None
    """Shapes of the example batch's tensors, in order (``None``: unknown): the batch the plan
    was made for. A larger batch under the plan is warned about once."""
    base_bytes: int | None = None
    """Live bytes when the first unit's forward starts (parameters, optimizer state, the
    batch), from the profile: the part of the peak that does not grow with the batch, by which
    :mod:`remat.apply.shapes` scales :attr:`predicted_peak_bytes` to a larger batch."""
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"plan precision: got {self.precision!r}; expected one of {', '.join(PRECISIONS)}"
            )
        parsed: dict[str, Action] = {}
        for selector, action in dict(self.actions).items():
            if not isinstance(selector, str) or not selector:
                raise ValueError(f"plan selector: got {selector!r}; expected a non-empty string")
            if selector.startswith(REGEX_PREFIX):
                try:
                    re.compile(selector[len(REGEX_PREFIX) :])
                except (re.error, OverflowError, RecursionError) as error:
                    raise ValueError(
                        f"plan selector {selector!r}: not a valid regular expression ({error})"
                    ) from None
            parsed[selector] = Action.parse(action)
        self.actions = parsed

    # --------------------------------------------------------------------------------- resolve
    def action_for(self, fqn: str) -> Action:
        """The action for one unit: exact FQN, else first matching ``re:``, else ``_default``."""
        if fqn in self.actions:
            return self.actions[fqn]
        for selector, action in self.actions.items():
            if selector.startswith(REGEX_PREFIX) and re.fullmatch(
                selector[len(REGEX_PREFIX) :], fqn
            ):
                return action
        return self.actions.get(DEFAULT, Action("keep"))

    def resolve(self, units: Sequence[str], module_names: Iterable[str] = ()) -> dict[str, Action]:
        """Map every targeted module FQN to its action, strictly.

        Units take their action by the rules of :meth:`action_for`. An exact selector may also name
        a module that is not a unit (it is then planned too). Every selector must match something.

        Raises:
            ValueError: a selector matches nothing (the message lists the closest names), or a
                segment's units are not consecutive in ``units``.
        """
        known = set(units) | set(module_names)
        for selector in self.actions:
            if selector == DEFAULT:
                continue
            if selector.startswith(REGEX_PREFIX):
                pattern = selector[len(REGEX_PREFIX) :]
                if not any(re.fullmatch(pattern, unit) for unit in units):
                    raise ValueError(
                        f"plan selector {selector!r} matches no unit; units are"
                        f" {_preview(units)}. Fix the pattern, or list units with"
                        " `remat profile MODEL`."
                    )
            elif selector not in known:
                raise ValueError(
                    f"plan selector {selector!r} names no module of this model; closest:"
                    f" {closest_names(selector, sorted(known))}. Fix the name (FQNs as in"
                    " model.named_modules())."
                )
        resolved = {unit: self.action_for(unit) for unit in units}
        for selector, action in self.actions.items():
            if selector != DEFAULT and not selector.startswith(REGEX_PREFIX):
                resolved[selector] = action
        _check_segments(resolved, list(units))
        return resolved

    # ------------------------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with ``format_version``."""
        return {
            "format_version": FORMAT_VERSION,
            "kind": "remat.plan",
            "strategy": self.strategy,
            "actions": {selector: str(action) for selector, action in self.actions.items()},
            "units": self.units,
            "fingerprint": self.fingerprint,
            "budget_bytes": self.budget_bytes,
            "predicted_peak_bytes": self.predicted_peak_bytes,
            "predicted_overhead": self.predicted_overhead,
            "precision": self.precision,
            "input_shapes": self.input_shapes,
            "base_bytes": self.base_bytes,
            "metadata": self.metadata,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "plan") -> Plan:
        """Build a plan from :meth:`to_dict` output; unknown versions and shapes are refused."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(
                f"{source}: missing or invalid 'format_version' (got {str(version)[:20]!r});"
                " not a remat plan"
            )
        if data.get("kind", "remat.plan") != "remat.plan":
            raise ValueError(f"{source}: 'kind' is {str(data.get('kind'))[:40]!r}, not remat.plan")
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{source}: format_version {version} is newer than this remat reads"
                f" ({FORMAT_VERSION}); upgrade remat to read it"
            )
        actions = data.get("actions")
        if not isinstance(actions, Mapping):
            raise ValueError(f"{source}: 'actions' must be an object of selector -> action")
        units = data.get("units")
        if units is not None and (
            not isinstance(units, list) or not all(isinstance(u, str) for u in units)
        ):
            raise ValueError(f"{source}: 'units' must be a list of FQN strings or null")
        fingerprint = data.get("fingerprint")
        if fingerprint is not None and not isinstance(fingerprint, Mapping):
            raise ValueError(f"{source}: 'fingerprint' must be an object or null")
        metadata = data.get("metadata")
        metadata = {} if metadata is None else metadata
        if not isinstance(metadata, Mapping):
            raise ValueError(f"{source}: 'metadata' must be an object")
        precision = data.get("precision", "32")
        if precision not in PRECISIONS:
            raise ValueError(
                f"{source}: 'precision' got {str(precision)[:20]!r}; expected one of"
                f" {', '.join(PRECISIONS)}"
            )
        shapes = data.get("input_shapes")
        if shapes is not None and not (
            isinstance(shapes, list)
            and all(
                isinstance(s, list) and all(isinstance(d, int) and d >= 0 for d in s)
                for s in shapes
            )
        ):
            raise ValueError(f"{source}: 'input_shapes' must be a list of shapes (lists of ints)")
        numbers = {
            "base_bytes": _optional_int(data, "base_bytes", source),
            "budget_bytes": _optional_int(data, "budget_bytes", source),
            "predicted_peak_bytes": _optional_int(data, "predicted_peak_bytes", source),
            "predicted_overhead": _optional_float(data, "predicted_overhead", source),
        }
        try:
            return cls(
                actions=dict(actions),
                units=list(units) if units is not None else None,
                strategy=str(data.get("strategy", "custom")),
                fingerprint=dict(fingerprint) if fingerprint is not None else None,
                metadata=dict(metadata),
                precision=precision,
                input_shapes=[list(s) for s in shapes] if shapes is not None else None,
                **numbers,
            )
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None

    @classmethod
    def from_json(cls, text: str, *, source: str = "plan") -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{source}: not valid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
            ) from None
        except RecursionError:
            raise ValueError(f"{source}: JSON nested too deeply to be a remat plan") from None
        except ValueError as error:  # e.g. an integer longer than Python converts
            raise ValueError(f"{source}: not a remat plan ({error})") from None
        return cls.from_dict(data, source=source)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the plan as JSON atomically (a temporary file, then a rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(handle, "w") as stream:
                stream.write(self.to_json() + "\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        """Read a plan written by :meth:`save`; any problem is a ``ValueError`` naming the file."""
        path = Path(path)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"plan file {path}: cannot read it ({error})") from None
        return cls.from_json(text, source=f"plan file {path}")


def _optional_int(data: Mapping[str, Any], key: str, source: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(
            f"{source}: {key!r} must be a non-negative integer or null, got {str(value)[:40]!r}"
        )
    return value


def _optional_float(data: Mapping[str, Any], key: str, source: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError(f"{source}: {key!r} must be a number or null, got {str(value)[:40]!r}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"{source}: {key!r} must be a finite number, got {str(value)[:40]!r}")
    return number


def _preview(names: Sequence[str], count: int = 6) -> str:
    shown = ", ".join(names[:count])
    return f"[{shown}{', ...' if len(names) > count else ''}] ({len(names)} in all)"


def _check_segments(resolved: Mapping[str, Action], units: list[str]) -> None:
    positions: dict[str, list[int]] = {}
    for fqn, action in resolved.items():
        if action.kind not in _GROUPS:
            continue
        if fqn not in units:
            raise ValueError(
                f"plan: {fqn!r} is given {action} but is not a unit; segments group units only."
                " Use 'recompute' for a single module, or pass it in units=."
            )
        positions.setdefault(str(action), []).append(units.index(fqn))
    for label, indices in positions.items():
        indices.sort()
        if indices != list(range(indices[0], indices[0] + len(indices))):
            members = [units[i] for i in indices]
            raise ValueError(
                f"plan: {label!r} groups units that are not consecutive in execution order"
                f" ({members}); give each run of consecutive units its own label"
            )
