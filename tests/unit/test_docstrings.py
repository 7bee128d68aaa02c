"""Every docstring example runs, and every public function and class has one."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest

import remat

MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(remat.__path__, prefix="remat.")
    if not name.startswith("remat.cli")  # the CLI is covered by tests/integration/test_cli.py
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
    # A module that defines a public function or class runs at least one example: "0 failed"
    # is also what a runner that found nothing (or a module whose examples were lost) says.
    own = [
        key
        for key, value in vars(module).items()
        if not key.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and value.__module__ == name
    ]
    if own and name not in WITHOUT_EXAMPLES:
        assert result.attempted > 0, f"{name} defines {own[:3]} but ran no example"


WITHOUT_EXAMPLES = {"remat.apply.checkpoint"}
"""Modules with public names but no example: ``checkpoint``'s ``Region`` is an internal
protocol of the apply package (not exported by remat)."""


def test_public_api_has_examples() -> None:
    missing = []
    for name in remat.__all__:
        obj = getattr(remat, name)
        if not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        doc = inspect.getdoc(obj) or ""
        if ">>>" not in doc:
            missing.append(name)
    assert not missing, f"public names without a docstring example: {missing}"


def test_import_does_not_initialise_cuda() -> None:
    import torch

    importlib.reload(remat)
    assert not torch.cuda.is_initialized()


def test_solvers_and_plans_import_no_torch() -> None:
    import subprocess
    import sys

    # remat/__init__ imports torch, so load the stdlib-only modules by path, without the package.
    loader = (
        "import sys, types, pathlib\n"
        "root = pathlib.Path(sys.argv[1])\n"
        "pkg = types.ModuleType('remat'); pkg.__path__ = [str(root)]; sys.modules['remat'] = pkg\n"
        "sub = types.ModuleType('remat.solve'); sub.__path__ = [str(root / 'solve')]\n"
        "sys.modules['remat.solve'] = sub\n"
        "import remat.units, remat.plan, remat.solve.baselines\n"
        "sys.exit(1 if 'torch' in sys.modules else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", loader, remat.__path__[0]], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr or "a stdlib-only module imported torch"
