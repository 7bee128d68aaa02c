"""Budgets: what the user types, parsed in one place, and resolved to bytes against a profile.

Forms: a size (``22GiB`` binary, ``22GB`` decimal, or plain bytes), a percentage (``60%``: the static
bytes plus that share of the unplanned step's activation memory, its peak minus the static bytes, as
torch.compile's ``activation_memory_budget`` is a share of activation memory), or ``min`` (the least
peak any plan reaches), or ``device`` (the capacity of the device the profile is for, less the
stated reserve of :mod:`remat.devices`; ``device:h100-80gb`` names one). Imports no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from remat.devices import get_device, is_device_name
from remat.units import parse_bytes

__all__ = ["ACCEPTED_BUDGETS", "Budget"]

ACCEPTED_BUDGETS = (
    "a size (22GiB binary, 22GB decimal, or bytes such as 1500000000), a percentage of the"
    " unplanned step's activation memory (60%, between 0 and 100), min (the least peak any plan"
    " reaches), or device (the profiled device's capacity less its reserve; device:NAME names one"
    " of remat.devices)"
)
_PERCENT = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*%\s*$")


@dataclass(frozen=True)
class Budget:
    """A memory budget as given; :meth:`resolve` turns it into bytes for one profile.

    Example:
        >>> Budget.parse("22GiB").value, Budget.parse("22GB").value
        (23622320128, 22000000000)
        >>> Budget.parse("60%").resolve(static_bytes=100, peak_bytes=300)
        220
        >>> Budget.parse("min").kind
        'min'
        >>> Budget.parse("device:a100-40gb").resolve(static_bytes=0, peak_bytes=0) / 2**30
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
            if not 0 < percent <= 100:
                raise ValueError(
                    f"budget: got {text!r}; a percentage must be above 0 and at most 100"
                    f" (100% is the unplanned step). Expected {ACCEPTED_BUDGETS}"
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
        static_bytes: int,
        peak_bytes: int,
        min_peak_bytes: int | None = None,
        device: str | None = None,
    ) -> int:
        """Bytes for a step whose static memory and unplanned peak are given.

        ``min`` needs ``min_peak_bytes`` (what the solver finds as the least achievable peak);
        ``device`` needs ``device`` (the profile's target, e.g. ``h100-80gb``) unless it names one.
        """
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
        if self.kind == "percent":
            activation = max(peak_bytes - static_bytes, 0)
            return int(static_bytes + activation * self.value / 100)
        if min_peak_bytes is None:
            raise ValueError("budget 'min' needs the least achievable peak; solve() provides it")
        return int(min_peak_bytes)
