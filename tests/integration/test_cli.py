"""The command line as a user runs it: exit codes, JSON fields, agreement with --help docs."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from remat.cli.main import main
from remat.units import parse_bytes

ROOT = Path(__file__).resolve().parents[2]
TINY_GPT = [
    "--set",
    "n_layer=2",
    "d_model=64",
    "n_head=4",
    "vocab=128",
    "--seq",
    "32",
    "--batch",
    "2",
]


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_profile_json_has_the_promised_fields(capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(capsys, "profile", "gpt", *TINY_GPT)
    assert data["format_version"] == 1
    assert data["peak_bytes"] > data["static_bytes"] > 0
    assert [u["fqn"] for u in data["units"]] == ["blocks.0", "blocks.1"]
    assert all(u["saved_bytes"] > 0 and u["forward_ms"] is not None for u in data["units"])
    assert sum(data["peak_by_category"].values()) == data["peak_bytes"]
    assert {c["fqn"] for c in data["context"]} >= {"wte", "lm_head"}


def test_profile_cpu_and_meta_agree_to_the_byte(capsys: pytest.CaptureFixture[str]) -> None:
    for strategy in ("none", "full", "sqrt_n"):
        cpu = run_json(capsys, "profile", "gpt", *TINY_GPT, "--strategy", strategy)
        meta = run_json(
            capsys, "profile", "gpt", *TINY_GPT, "--strategy", strategy, "--device", "meta"
        )
        assert cpu["peak_bytes"] == meta["peak_bytes"], strategy
        assert [u["saved_bytes"] for u in cpu["units"]] == [u["saved_bytes"] for u in meta["units"]]
        assert all(u["forward_ms"] is None for u in meta["units"])  # nothing runs on meta


def test_profile_full_checkpointing_frees_the_units(capsys: pytest.CaptureFixture[str]) -> None:
    bigger = [*TINY_GPT, "--seq", "256", "--batch", "8", "--device", "meta"]  # activations dominate
    none = run_json(capsys, "profile", "gpt", *bigger)
    full = run_json(capsys, "profile", "gpt", *bigger, "--strategy", "full")
    assert full["peak_bytes"] < none["peak_bytes"]
    assert all(u["action"] == "recompute" and u["saved_bytes"] == 0 for u in full["units"])
    # recompute shows up as extra forward FLOPs inside backward
    assert full["units"][0]["backward_flops"] > none["units"][0]["backward_flops"]


def test_profile_48_layer_gpt_on_meta_uses_no_memory(capsys: pytest.CaptureFixture[str]) -> None:
    # 2.4 B parameters: 9 GiB of float32 weights alone; on meta nothing is allocated.
    # The time limit (under a minute) is checked by benchmarks/meta_profile.py, not here.
    data = run_json(
        capsys,
        "profile",
        "gpt",
        "--device",
        "meta",
        "--seq",
        "2048",
        "--set",
        "n_layer=48",
        "d_model=2048",
        "n_head=16",
    )
    assert data["num_units"] == 48
    assert data["static_bytes"] > 9 * 2**30
    assert data["peak_bytes"] > 100 * 2**30


def test_profile_units_override_and_human_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            ["profile", "mlp", "--batch", "8", "--units", "re:blocks\\.[0-4]", "--strategy", "full"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "step peak:" in out
    # the table's rows: the five units recomputed, every other module shown as context
    rows = {
        line.split()[0]: line.split()[2]
        for line in out.splitlines()
        if line.startswith(("stem.", "blocks.", "head "))
    }
    assert {m for m, action in rows.items() if action == "recompute"} == {
        f"blocks.{i}" for i in range(5)
    }
    assert rows["blocks.5"] == rows["head"] == "context"
    assert "\n5 units." in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["profile", "gtp"], "did you mean 'gpt'"),
        (["profile", "no_such_pkg.models:build"], "cannot import module"),
        (["profile", "remat.models:no_such_factory"], "no callable"),
        (["profile", "mlp", "--strategy", "everything"], "expected none, full"),
        (["profile", "mlp", "--strategy", "every_n"], "positive integer"),
        (["profile", "mlp", "--strategy", "every_n:0"], "positive integer"),
        (["profile", "mlp", "--strategy", "every_n:two"], "positive integer"),
        (["profile", "mlp", "--set", "n_blocks"], "KEY=VALUE"),
        (["profile", "mlp", "--set", "layers=3"], "unknown override"),
        (["profile", "mlp", "--units", "Blok"], "closest"),
        (["profile", "mlp", "--batch", "0"], "positive integer"),
        (["profile", "mlp", "--device", "tpu9"], "--device"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message.lower() in capsys.readouterr().err.lower()


def test_unknown_flag_and_missing_model_are_usage_errors() -> None:
    for argv in (["profile"], ["profile", "mlp", "--bogus"], ["nocommand"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2


def test_user_factory_returning_a_tuple(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "class Block(nn.Module):\n"
        "    def __init__(self, width):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(width, width)\n"
        "        self.norm = nn.BatchNorm1d(width)\n"
        "    def forward(self, x):\n"
        "        return x + self.norm(self.fc(x)).relu()\n"
        "def build(width=16, depth=3, batch=4):\n"
        "    model = nn.Sequential(*[Block(width) for _ in range(depth)])\n"
        "    return model, (torch.randn(batch, width),), lambda out: out.square().mean()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    data = run_json(
        capsys, "profile", "my_models:build", "--set", "depth=4", "--strategy", "every_n:2"
    )
    assert [u["fqn"] for u in data["units"]] == ["0", "1", "2", "3"]
    assert [u["action"] for u in data["units"]] == ["keep", "recompute", "keep", "recompute"]


def test_env_json(capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(capsys, "env")
    assert data["torch_version"] and data["default_device"] in ("cpu", "cuda:0", "mps")


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("remat")
    assert script.exists(), "pip install -e . creates the remat console script"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "profile" in result.stdout


def test_cli_reference_matches_help(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    namespace = runpy.run_path(str(ROOT / "scripts" / "gen_cli_docs.py"))
    expected = namespace["render"]()
    assert (ROOT / "docs" / "cli.md").read_text() == expected, (
        "docs/cli.md is stale: run .venv/bin/python scripts/gen_cli_docs.py and commit it"
    )


def test_plan_per_rank_under_fsdp(capsys: pytest.CaptureFixture[str]) -> None:
    one = run_json(capsys, "plan", "gpt", *TINY_GPT, "--budget", "min", "--no-measure")
    ranked = run_json(
        capsys, "plan", "gpt", *TINY_GPT, "--budget", "min", "--world-size", "4", "--fsdp"
    )
    assert (ranked["world_size"], ranked["fsdp"], one["world_size"], one["fsdp"]) == (
        4,
        True,
        1,
        False,
    )
    assert ranked["static_bytes"] < one["static_bytes"] / 3  # sharded over 4 ranks
    assert ranked["measured_peak_bytes"] is None  # one process cannot measure a rank
    assert not any(a.startswith("segment") for a in ranked["plan"]["actions"].values())
    for wrong in (["--strategy", "sqrt_n", "--fsdp"], ["--budget", "60%", "--world-size", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["plan", "gpt", *TINY_GPT, *wrong])
        assert exit_info.value.code == 2


def test_plan_lines_show_what_each_block_holds_and_costs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each line is one block of the plan with what it holds under its own action: a recomputed
    block holds far less than a kept one (the old output printed every unit's kept bytes)."""
    import doctest

    import remat.cli._common

    doctests = doctest.testmod(remat.cli._common, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert doctests.failed == 0 and doctests.attempted > 0
    four = [*TINY_GPT, "--set", "n_layer=4"]
    assert main(["plan", "gpt", *four, "--strategy", "every_n:2", "--no-measure"]) == 0
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        words = line.split()
        if len(words) == 8 and words[2] == "holds" and words[5] == "costs":
            rows[words[0]] = (words[1], parse_bytes(f"{words[3]} {words[4]}"))
    assert set(rows) == {"blocks.0", "blocks.1", "blocks.2", "blocks.3"}, out
    actions = {fqn: action for fqn, (action, _) in rows.items()}
    assert sorted(actions.values()) == ["keep", "keep", "recompute", "recompute"], out
    kept = [held for action, held in rows.values() if action == "keep"]
    recomputed = [held for action, held in rows.values() if action == "recompute"]
    assert max(recomputed) * 4 < min(kept), out


def test_plan_compile_prices_the_compiled_path(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import remat
    import remat.profiling.compiled as compiled
    from remat.models import build_builtin

    backends: list[str] = []
    original = compiled.compiled_profile

    def recording(step, prof, **kwargs):  # type: ignore[no-untyped-def]
        backends.append(kwargs["backend"])
        return original(step, prof, **{**kwargs, "repeats": 1})

    monkeypatch.setattr(compiled, "compiled_profile", recording)
    out = tmp_path / "plan.json"
    payload = run_json(
        capsys,
        *("plan", "gpt", *TINY_GPT, "--budget", "50%", "--compile", "aot_eager"),
        *("--no-measure", "--out", str(out)),
    )
    assert backends == ["aot_eager"]  # the solver priced the compiled path's times
    assert payload["compile"] == "aot_eager"
    actions = set(payload["plan"]["actions"].values())
    assert all(a == "keep" or a == "recompute" or a.startswith("selective:") for a in actions)
    plan = remat.Plan.load(out)
    assert plan.metadata == {"compile": "aot_eager"}
    # What the note says to do runs: apply the plan, compile its units, train a step.
    built = build_builtin("gpt", n_layer=2, d_model=64, n_head=4, vocab=128, seq=32, batch=2)
    with remat.apply_(built.model, plan):
        remat.compile_units_(built.model, plan.units, backend="aot_eager")
        loss = built.loss_fn(built.model(*built.example_inputs))
        loss.backward()
    for wrong in (["--strategy", "full"], ["--budget", "50%", "--world-size", "2"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["plan", "gpt", *TINY_GPT, *wrong, "--compile"])
        assert exit_info.value.code == 2
