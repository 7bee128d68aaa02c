"""Budgets: what the user types, parsed in one place, and resolved to bytes against a profile.

Forms: a size (``22GiB`` binary, ``22GB`` decimal, or plain bytes), a percentage (``60%``: 60% of
the way from the least peak any plan reaches, 0%, to the unplanned step's peak, 100%, as
torch.compile's ``activation_memory_budget=0.6`` sits between recomputing everything and nothing;
every percentage has a plan), ``min`` (the least peak any plan reaches), or ``device`` (the capacity
of the device the profile is for, less the stated reserve of :mod:`remat.devices`;
``device:h100-80gb`` names one). Imports no torch.

Until issue 14 a percentage was the static bytes plus that share of the unplanned peak minus the
static bytes; gradients alive at the backward peak counted as activation memory no plan frees, so
50% had no plan on ordinary models (ConvNeXt, Swin, ViT, BERT).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

from remat.devices import get_device, is_device_name
from remat.units import parse_bytes

__all__ = ["ACCEPTED_BUDGETS", "Budget"]

ACCEPTED_BUDGETS = (
    "a size (22GiB binary, 22GB decimal, or bytes such as 1500000000), a percentage from 0 to 100"
    " (60%: 60% of the way from the least peak any plan reaches, 0%, to the unplanned peak, 100%),"
    " min (the least peak any plan reaches), or device (the profiled device's capacity less its reserve; device:NAME names one"
    " of remat.devices)"
)
_PERCENT = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*%\s*$")


@dataclass(frozen=True)
class Budget:
    """A memory budget as given; :meth:`resolve` turns it into bytes for one profile.

    Example:
        >>> Budget.parse("22GiB").value, Budget.parse("22GB").value
        (23622320128, 22000000000)
        >>> Budget.parse("60%").resolve(peak_bytes=300, min_peak_bytes=100)
        220
        >>> Budget.parse("0%").resolve(peak_bytes=300, min_peak_bytes=100)
        100
        >>> Budget.parse("min").kind
        'min'
        >>> Budget.parse("device:a100-40gb").resolve(peak_bytes=0) / 2**30
        37.0
    """

    kind: str
    """``bytes``, ``percent``, ``min`` or ``device``."""
    value: float
    text: str

    @classmethod
    def parse(cls, text: str | int | Budget) -> Budget:
        """Parse a budget; anything else is a ``ValueError`` listing the accepted forms."""
        if isinstance(text, Budget):
            return text
        if isinstance(text, int) and not isinstance(text, bool):
            if text <= 0:
                raise ValueError(f"budget: got {text}; expected {ACCEPTED_BUDGETS}")
            return cls("bytes", text, str(text))
        if not isinstance(text, str):
            raise ValueError(f"budget: got {text!r}; expected {ACCEPTED_BUDGETS}")
        stripped = text.strip()
        if stripped.lower() == "min":
            return cls("min", 0, stripped)
        if stripped.lower() == "device" or stripped.lower().startswith("device:"):
            name = stripped.partition(":")[2].strip()
            if name:
                get_device(name)  # an unknown name is an error now, with the close names
            return cls("device", 0, stripped)
        match = _PERCENT.match(stripped)
        if match:
            percent = float(match.group(1))
            if not 0 <= percent <= 100:
                raise ValueError(
                    f"budget: got {text!r}; a percentage must be from 0 (the least peak any plan"
                    f" reaches) to 100 (the unplanned step). Expected {ACCEPTED_BUDGETS}"
                )
            return cls("percent", percent, stripped)
        try:
            value = parse_bytes(stripped)
        except ValueError:
            raise ValueError(f"budget: got {text!r}; expected {ACCEPTED_BUDGETS}") from None
        if value <= 0:
            raise ValueError(f"budget: got {text!r}; expected a positive size. {ACCEPTED_BUDGETS}")
        return cls("bytes", value, stripped)

    @property
    def device_name(self) -> str | None:
        """The device a ``device:NAME`` budget names (``None``: the profile's device)."""
        return self.text.partition(":")[2].strip() or None if self.kind == "device" else None

    def resolve(
        self,
        *,
        peak_bytes: int,
        min_peak_bytes: int | None = None,
        device: str | None = None,
        static_bytes: int | None = None,
    ) -> int:
        """Bytes for a step whose unplanned peak and least achievable peak are given.

        A percentage ``P%`` is ``min_peak_bytes + P/100 * (peak_bytes - min_peak_bytes)``, rounded
        down to a byte (computed in exact fractions): ``0%`` is the least peak (as ``min``),
        ``100%`` the unplanned one; an unplanned peak below the least one counts as the least.
        Percentages and ``min`` need ``min_peak_bytes`` (the least peak any plan reaches, which
        :func:`remat.solve` computes before resolving); without it they raise ``TypeError``, a
        caller's bug: there is no fallback. ``device`` needs ``device`` (the profile's target,
        e.g. ``h100-80gb``) unless it names one. ``static_bytes`` is accepted and unused: no form
        depends on it any more.
        """
        del static_bytes
        if self.kind == "device":
            name = self.device_name or device
            if not name or not is_device_name(name):
                raise ValueError(
                    f"budget {self.text!r}: got the device {name!r}, which has no entry in the"
                    " device table; expected a profile estimated for a named device. Fix: profile"
                    " with mode='estimate', device=NAME (remat plan --device NAME), or write"
                    " --budget device:NAME, or give a size"
                )
            return get_device(name).usable_bytes
        if self.kind == "bytes":
            return int(self.value)
        if min_peak_bytes is None:
            raise TypeError(
                f"internal error: budget {self.text!r} was resolved without min_peak_bytes, the"
                " least peak any plan reaches; remat.solve computes it before resolving"
            )
        if self.kind == "min":
            return int(min_peak_bytes)
        span = max(peak_bytes - min_peak_bytes, 0)
        return min_peak_bytes + math.floor(span * Fraction(str(self.value)) / 100)
