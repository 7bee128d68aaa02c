"""The docs stay true to the code: docs/api.md names every public name with the parameters it takes,
and every Python block of docs/quickstart.md runs."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import remat

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_api_md_names_every_public_name() -> None:
    text = (DOCS / "api.md").read_text()
    missing = [name for name in remat.__all__ if f"`remat.{name}" not in text]
    assert not missing, f"docs/api.md does not mention: {missing}"


@pytest.mark.parametrize(
    "name", [n for n in remat.__all__ if inspect.isfunction(getattr(remat, n))]
)
def test_api_md_signatures_name_every_parameter(name: str) -> None:
    text = (DOCS / "api.md").read_text()
    match = re.search(rf"^`remat\.{name}\((.*)\)( -> .*)?`$", text, re.MULTILINE)
    assert match, f"docs/api.md has no signature line for remat.{name}"
    documented = match.group(1)
    for parameter in inspect.signature(getattr(remat, name)).parameters:
        assert re.search(rf"\b{parameter}\b", documented), (name, parameter)


def test_quickstart_python_blocks_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / "quickstart.md").read_text(), re.DOTALL)
    assert len(blocks) >= 3
    namespace: dict[str, object] = {}
    with pytest.warns(UserWarning, match="use_cache=True turned off"):  # as the page says
        for block in blocks:  # one namespace: later blocks use what earlier ones built
            exec(compile(block, "docs/quickstart.md", "exec"), namespace)
    assert namespace["report"].ok  # type: ignore[attr-defined]


README = DOCS.parent / "README.md"


def test_readme_your_own_model_blocks_run() -> None:
    """The README's "Your own model" section: a transformers model with its default config and a
    PEFT LoRA model, planned at 50%, trained and verified, as the text says."""
    pytest.importorskip("peft")
    section = README.read_text().split("## Your own model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 2
    namespace: dict[str, object] = {}
    with pytest.warns(UserWarning, match="use_cache") as caught:
        for block in blocks:
            exec(compile(block, "README.md", "exec"), namespace)
    cache_warnings = [w for w in caught if "use_cache" in str(w.message)]
    assert len(cache_warnings) == 2, [str(w.message) for w in cache_warnings]  # once per model
    assert set(namespace["handle"].actions.values()) != {"keep"}  # type: ignore[attr-defined]
    assert namespace["model"].config.use_cache is True  # type: ignore[attr-defined]  # restored
    report = namespace["report"]
    assert report.grads_equal and report.buffers_equal and report.applied  # type: ignore[attr-defined]
