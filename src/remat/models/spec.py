"""Turning a MODEL argument into a built model: built-in names, ``hf:NAME`` and ``package.module:factory``.

Consumes a spec string, a device, a dtype, and size overrides; produces a
:class:`~remat.models.BuiltModel` built on that device (on ``meta``, with no real memory).
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from remat.models import BUILTIN_MODELS, BuiltModel, build_builtin

__all__ = ["DTYPES", "load_model", "parse_overrides"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_FORMS = (
    f"a built-in name ({', '.join(BUILTIN_MODELS)}), hf:NAME (gpt2, llama, bert, t5; the hf extra)"
    " or package.module:factory, where the factory returns (model, example_inputs) or (model,"
    " example_inputs, loss_fn)"
)


def _from_hf(spec: str, overrides: Mapping[str, Any]) -> BuiltModel:
    """``hf:NAME``: a Hugging Face model from its config class (:mod:`remat.integrations.hf`)."""
    from remat.integrations import hf

    return hf.build(spec.removeprefix("hf:"), **overrides)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` strings; values are Python literals when they parse as one.

    Example:
        >>> parse_overrides(["n_layer=48", "dropout=0.0", "channels=32,64", "name=tiny"])
        {'n_layer': 48, 'dropout': 0.0, 'channels': (32, 64), 'name': 'tiny'}
    """
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(f"--set: got {item!r}; expected KEY=VALUE, e.g. --set n_layer=48")
        try:
            value: Any = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = {"true": True, "false": False}.get(text.lower(), text)
        overrides[key.strip()] = value
    return overrides


def _from_factory(spec: str, overrides: Mapping[str, Any]) -> BuiltModel:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"model {spec!r}: cannot import module {module_name!r} ({error}); expected {_FORMS}."
            " Check the name and that it is importable (PYTHONPATH)."
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise ValueError(
            f"model {spec!r}: module {module_name!r} has no callable {attr!r}; callables there:"
            f" {public[:10]}"
        )
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = [k for k in overrides if k not in params and not takes_any]
    if unknown:
        raise ValueError(
            f"model {spec!r}: the factory takes no argument {unknown[0]!r}; it accepts"
            f" {[n for n in params]}"
        )
    result = factory(**overrides)
    if isinstance(result, BuiltModel):
        return result
    if (
        isinstance(result, tuple)
        and len(result) in (2, 3)
        and isinstance(result[0], torch.nn.Module)
    ):
        return BuiltModel(
            model=result[0],
            example_inputs=result[1],
            loss_fn=result[2] if len(result) == 3 else None,
            name=spec,
        )
    raise ValueError(
        f"model {spec!r}: the factory returned {type(result).__name__}; expected (model,"
        " example_inputs) or (model, example_inputs, loss_fn)"
    )


def load_model(
    spec: str,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    batch: int | None = None,
    seq: int | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> BuiltModel:
    """Build the model named by ``spec`` on ``device``.

    Args:
        spec: a built-in name, ``hf:NAME`` (a Hugging Face model, see
            :mod:`remat.integrations.hf`) or ``package.module:factory``.
        device: where to build; ``meta`` uses no memory (the factory runs under
            ``torch.device(device)``, so it must not name a device itself; transformers models
            in it are readied for meta by :func:`remat.integrations.hf.prepare_meta`).
        dtype: floating-point dtype for parameters, buffers and floating inputs.
        batch, seq: passed to the factory as ``batch=`` / ``seq=`` when given.
        overrides: more keyword arguments for the factory (``--set``).

    Raises:
        ValueError: an unknown name, a factory that cannot be imported or called, an argument the
            factory does not take.

    Example:
        >>> built = load_model("mlp", device="meta", batch=4, overrides={"n_blocks": 2})
        >>> built.example_inputs[0].shape, built.example_inputs[0].device.type
        (torch.Size([4, 784]), 'meta')
    """
    kwargs = dict(overrides or {})
    if batch is not None:
        kwargs["batch"] = batch
    if seq is not None:
        kwargs["seq"] = seq
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype: got {dtype!r}; expected one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    with torch.device(device):
        if spec in BUILTIN_MODELS:
            built = build_builtin(spec, **kwargs)
        elif spec.startswith("hf:"):
            built = _from_hf(spec, kwargs)
        elif ":" in spec:
            built = _from_factory(spec, kwargs)
        else:
            close = difflib.get_close_matches(spec, list(BUILTIN_MODELS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"model: got {spec!r}; expected {_FORMS}.{hint}")
    if dtype is not None:
        built.model.to(dtype)
        cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
        inputs = built.example_inputs
        if isinstance(inputs, dict):
            built.example_inputs = {k: cast(v) for k, v in inputs.items()}
        elif isinstance(inputs, tuple | list):
            built.example_inputs = tuple(cast(v) for v in inputs)
        else:
            built.example_inputs = cast(inputs)
    if not built.name:
        built.name = spec
    if torch.device(device).type == "meta" and "transformers" in sys.modules:
        from remat.integrations.hf import prepare_meta

        prepare_meta(built.model)  # transformers reads mask values; answer them as a full batch
    return built
