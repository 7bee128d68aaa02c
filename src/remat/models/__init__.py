"""Built-in reference models: the test zoo and the demo models of remat.

Each built-in is a factory, a plain function with keyword-only arguments and defaults, that
returns a :class:`BuiltModel`: the module, example inputs for it and a loss over its output.
The factories create every tensor on the default device and never seed the random number
generator, so ``torch.manual_seed`` before a build makes it reproducible, and building inside
``with torch.device("meta"):`` allocates no real memory (all models run forward and backward on
meta except the mixture of experts, whose routing depends on the data).

========  ==================================================================================
name      model
========  ==================================================================================
``gpt``   GPT-2 style decoder (:mod:`remat.models.gpt`)
``mlp``   deep MLP, the classic checkpointing example (:mod:`remat.models.mlp`)
``cnn``   small ResNet-style CNN with BatchNorm (:mod:`remat.models.cnn`)
``unet``  U-Net with skips that live across stages (:mod:`remat.models.unet`)
``moe``   decoder with top-k mixture-of-experts MLPs (:mod:`remat.models.moe`)
========  ==================================================================================
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

from remat.models import cnn, gpt, mlp, moe, unet
from remat.models.base import BuiltModel, _value_error

__all__ = ["BUILTIN_MODELS", "BuiltModel", "build_builtin"]


def build_builtin(name: str, **overrides: Any) -> BuiltModel:
    """Build the built-in model ``name``, with keyword ``overrides`` of its factory's defaults.

    Raises ``ValueError`` (got / expected / fix) when the name is unknown, when an override is not
    an argument of that factory (the message lists the accepted ones), or when a value is invalid
    (e.g. ``d_model`` not divisible by ``n_head``).

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> built = build_builtin("gpt", n_layer=1, d_model=16, n_head=2, seq=8, batch=2, vocab=32)
        >>> built.name, built.model(*built.example_inputs).shape
        ('gpt', torch.Size([2, 8, 32]))
        >>> build_builtin("gpt", layers=2)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: build_builtin('gpt'): unknown override: got 'layers'; expected one of: ...
    """
    factory = BUILTIN_MODELS.get(name) if isinstance(name, str) else None
    if factory is None:
        names = ", ".join(BUILTIN_MODELS)
        close = difflib.get_close_matches(str(name), list(BUILTIN_MODELS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise _value_error(
            "built-in model name",
            name,
            f"one of: {names}",
            f"{hint}pass one of the listed names, or a factory of your own",
        )
    params = inspect.signature(factory).parameters
    accepted = [
        p.name for p in params.values() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    for key in overrides:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise _value_error(
                f"build_builtin({name!r}): unknown override",
                key,
                f"one of: {', '.join(accepted)}",
                f"{hint}drop it or use one of the accepted keys",
            )
    return factory(**overrides)


BUILTIN_MODELS: dict[str, Callable[..., BuiltModel]] = {
    "gpt": gpt.build,
    "mlp": mlp.build,
    "cnn": cnn.build,
    "unet": unet.build,
    "moe": moe.build,
}
