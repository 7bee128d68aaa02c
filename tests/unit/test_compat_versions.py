"""remat._compat on the installed torch, and its fallbacks on an older one (simulated).

Each private or version-dependent torch API is named in ``_compat.VERSION_PATHS``; every one must
exist here, none may be newer than the oldest torch remat supports (pyproject), and every function
of ``_compat`` must be named there. The functions are checked against torch's own behaviour (the
dispatcher, hand counts), and each fallback by hiding or replacing what it falls back from.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from remat import _compat

ROOT = Path(__file__).resolve().parents[2]
aten = torch.ops.aten


@pytest.mark.parametrize(
    "path", _compat.VERSION_PATHS, ids=[f"{p.function}:{p.api}" for p in _compat.VERSION_PATHS]
)
def test_each_version_path_exists_here_and_in_the_oldest_supported_torch(
    path: _compat.VersionPath,
) -> None:
    assert path.resolve() is not None
    assert path.since <= _compat.MIN_TORCH, f"{path.api} is newer than torch {_compat.MIN_TORCH}"
    assert path.fallback is None or path.fallback.strip()


def test_oldest_torch_is_pyprojects() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    found = re.search(r'"torch>=(\d+)\.(\d+)"', text)
    assert found is not None
    assert (int(found[1]), int(found[2])) == _compat.MIN_TORCH


def test_every_compat_function_is_named_in_version_paths() -> None:
    named = {p.function for p in _compat.VERSION_PATHS}
    registry = {"MIN_TORCH", "VERSION_PATHS", "VersionPath"}
    assert set(_compat.__all__) - registry <= named


def test_in_backward_is_true_only_inside_the_engine() -> None:
    seen: list[bool] = []
    x = torch.ones(3, requires_grad=True)
    y = x * 2
    y.register_hook(lambda grad: seen.append(_compat.in_backward()))
    y.sum().backward()
    assert seen == [True]
    assert _compat.in_backward() is False


def test_is_fake_tensor() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.empty(2)
    assert _compat.is_fake_tensor(fake) and not _compat.is_fake_tensor(torch.empty(2))


def test_op_schema_readers() -> None:
    assert _compat.op_is_view(aten.view.default) and not _compat.op_is_view(aten.add.Tensor)
    assert _compat.op_writes_inputs(aten.add_.Tensor)
    assert not _compat.op_writes_inputs(aten.add.Tensor)
    assert _compat.op_writes_self(aten.add_.Tensor) and not _compat.op_writes_self(aten.add.Tensor)


def test_op_schema_fallbacks_without_schema() -> None:
    unknown = SimpleNamespace()  # an op object of a torch without is_view / _schema
    assert _compat.op_is_view(unknown) is False
    assert _compat.op_writes_inputs(unknown) is True
    assert _compat.op_writes_self(unknown) is False


def test_flop_formula_counts_a_matmul_by_hand() -> None:
    a, b = torch.ones(3, 4), torch.ones(4, 5)
    formula = _compat.flop_formula(aten.mm.default)
    assert formula is not None
    assert formula(a, b, out_val=a @ b) == 2 * 3 * 4 * 5
    assert _compat.flop_formula(aten.relu.default) is None


class _Seen(_compat.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_no_dispatch_modes_hides_ops_from_modes() -> None:
    seen = _Seen()
    with seen:
        torch.ones(2).neg()
        with _compat.no_dispatch_modes():
            torch.ones(2).exp()
    assert "neg" in seen.names and "exp" not in seen.names


def test_function_modes_lists_the_active_mode() -> None:
    from torch.overrides import TorchFunctionMode

    mode = TorchFunctionMode()
    with mode:
        assert mode in _compat.function_modes()
    assert mode not in _compat.function_modes()


def test_tree_flatten_round_trip() -> None:
    value = {"a": (torch.ones(1), [torch.zeros(2)]), "b": 3}
    leaves, spec = _compat.tree_flatten(value)
    assert len(leaves) == 3
    rebuilt = _compat.tree_unflatten(leaves, spec)
    assert rebuilt["b"] == 3 and torch.equal(rebuilt["a"][1][0], torch.zeros(2))


def test_local_tensor_and_its_fallback() -> None:
    plain = torch.ones(2)
    assert _compat.local_tensor(plain) is plain  # not a DTensor: the tensor itself
    shard = torch.zeros(1)
    assert _compat.local_tensor(SimpleNamespace(_local_tensor=shard)) is shard  # DTensor-like


def test_is_module_compiled_and_its_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    module = torch.nn.Linear(2, 2)
    assert not _compat.is_module_compiled(module)
    module.compile()  # lazy: nothing compiles until it is called
    assert _compat.is_module_compiled(module)
    monkeypatch.delattr(torch.nn.Module, "_compiled_call_impl")  # before torch 2.2: no such thing
    assert not _compat.is_module_compiled(torch.nn.Linear(2, 2))


def test_compiled_original_and_its_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    module = torch.nn.Linear(2, 2)
    assert _compat.compiled_original(torch.compile(module)) is module  # lazy: no compile
    assert _compat.compiled_original(module) is module
    monkeypatch.delitem(sys.modules, "torch._dynamo.eval_frame")  # dynamo never imported
    assert _compat.compiled_original(module) is module


def test_on_storage_resize_calls_back_and_restores() -> None:
    original = torch.UntypedStorage.resize_
    sizes: list[int] = []
    handle = _compat.on_storage_resize(lambda storage: sizes.append(storage.nbytes()))
    storage = torch.empty(4).untyped_storage()
    storage.resize_(0)
    storage.resize_(32)
    handle.remove()
    storage.resize_(8)
    assert sizes == [0, 32]
    assert torch.UntypedStorage.resize_ is original


def _sdpa_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)


def test_sdpa_backend_names_the_kernel_the_dispatcher_runs() -> None:
    q, k, v = _sdpa_inputs()
    seen = _Seen()
    with seen:
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ran_flash = "_scaled_dot_product_flash_attention_for_cpu" in seen.names
    expected = "flash_attention" if ran_flash else "math"
    assert _compat.sdpa_backend(q, k, v, None, 0.0, True, None) == expected


def test_sdpa_backend_on_a_torch_without_enable_gqa(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before torch 2.5 ``_fused_sdp_choice`` took no ``enable_gqa``: it is passed only when set."""
    math = int(torch.nn.attention.SDPBackend.MATH)

    def older(q, k, v, attn_mask, dropout_p, is_causal, *, scale=None):  # type: ignore[no-untyped-def]
        return math

    monkeypatch.setattr(torch, "_fused_sdp_choice", older)
    q, k, v = _sdpa_inputs()
    assert _compat.sdpa_backend(q, k, v, None, 0.0, True, None) == "math"
    with pytest.raises(TypeError):
        _compat.sdpa_backend(q, k, v, None, 0.0, True, None, enable_gqa=True)


def test_sdpa_backend_names_a_backend_its_enum_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "_fused_sdp_choice", lambda *args, **kwargs: 99)
    q, k, v = _sdpa_inputs()
    assert _compat.sdpa_backend(q, k, v, None, 0.0, True, None) == "backend_99"


def test_version_path_resolve_reports_a_missing_api() -> None:
    missing = _compat.VersionPath("x", "torch._no_such_api_in_any_torch", (2, 0))
    with pytest.raises(AttributeError):
        missing.resolve()
    with pytest.raises(ImportError):
        _compat.VersionPath("x", "torch._no_such_module:attr", (2, 0)).resolve()


def test_tensor_version_counts_in_place_writes() -> None:
    x = torch.zeros(2)
    before = _compat.tensor_version(x)
    x.add_(1)
    x.mul_(2)
    assert _compat.tensor_version(x) == before + 2


_PRIVATE = re.compile(r"\btorch\.(?:\w+\.)*_[a-z]\w*|\._(?:base|version|forward_hooks)\b")


def test_private_torch_apis_are_used_only_through_compat() -> None:
    # Code only: docstrings and comments may name the APIs _compat wraps.
    found = []
    for path in sorted((ROOT / "src" / "remat").rglob("*.py")):
        if path.name == "_compat.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                text = ast.unparse(node)
                if _PRIVATE.search(text) and not text.startswith("self."):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {text}")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch"):
                if any(part.startswith("_") for part in node.module.split(".")):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module}")
    assert not found, "\n".join(sorted(set(found)))
