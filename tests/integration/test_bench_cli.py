"""``remat bench`` and ``remat report`` end to end on a tiny GPT: files, JSON schema, re-rendering.

Timing is never asserted (CPU time here is noisy); what is asserted holds on any machine: the peaks
are the tracker's exact bytes, remat's plans fit their budgets, the files are what they claim.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

import remat
from memory_oracle import oracle_step_peak
from remat.cli.main import main
from remat.models.spec import load_model

TINY_GPT = [
    "--set",
    "n_layer=3",
    "d_model=32",
    "n_head=2",
    "vocab=64",
    "dropout=0.1",
    "--seq",
    "32",
    "--batch",
    "2",
]
ROW_FIELDS = {
    "strategy",
    "budget_bytes",
    "peak_bytes",
    "predicted_peak_bytes",
    "step_ms",
    "overhead",
    "budget_met",
    "warmup_ms",
    "samples_ms",
}


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    out = tmp_path_factory.mktemp("bench")
    buffer = io.StringIO()  # capsys is function-scoped; the run is shared by the module
    with contextlib.redirect_stdout(buffer):
        code = main(
            [
                "bench",
                "gpt",
                *TINY_GPT,
                "--strategies",
                "full,every_n:2",
                "sqrt_n",
                "--budgets",
                "50%,min",
                "--steps",
                "2",
                "--out",
                str(out),
                "--json",
            ]
        )
    assert code == 0
    return json.loads(buffer.getvalue()), out, buffer.getvalue()


def test_bench_json_has_the_promised_fields(bench_run: tuple[dict, Path, str]) -> None:
    data, _, _ = bench_run
    assert data["format_version"] == 1 and data["kind"] == "remat.bench"
    for key in ("torch_version", "device", "dtype", "seed", "machine", "date"):
        assert data[key] not in (None, ""), key
    rows = {r["strategy"]: r for r in data["results"]}
    assert list(rows)[:6] == ["none", "full", "every_n:2", "sqrt_n", "remat:50%", "remat:min"]
    assert {"remat:@full", "remat:@every_n:2", "remat:@sqrt_n"} <= set(rows)
    for name, row in rows.items():
        assert ROW_FIELDS <= set(row), name
        assert len(row["samples_ms"]) == 2 and len(row["warmup_ms"]) == 1, name
        assert row["peak_bytes"] > 0 and row["step_ms"] > 0, name
    assert rows["none"]["overhead"] == 1.0
    assert rows["full"]["peak_bytes"] < rows["none"]["peak_bytes"]
    # the simulator reproduces the two plans the profile measured, to the byte
    for name in ("none", "full"):
        assert rows[name]["predicted_peak_bytes"] == rows[name]["peak_bytes"], name
    for name in ("remat:50%", "remat:min", "remat:@full"):
        assert rows[name]["budget_met"] is True, name
        assert rows[name]["peak_bytes"] <= rows[name]["budget_bytes"], name
    assert rows["remat:@full"]["budget_bytes"] == rows["full"]["peak_bytes"]
    # every strategy starts from the same weights and seed (dropout on): the same first loss
    assert len({r["loss"] for r in rows.values()}) == 1
    assert {d["peer"] for d in data["dominance"]} == {"none", "full", "every_n:2", "sqrt_n"}
    claims = {c["name"]: c for c in data["claims"]}
    assert claims["budgets_met"]["status"] == "pass"  # what the bench says; measured below
    assert all(c["status"] in ("pass", "fail", "not_evaluated") for c in claims.values())


def test_remat_rows_fit_their_budgets_by_the_independent_oracle(
    bench_run: tuple[dict, Path, str],
) -> None:
    # A remat row's peak_bytes is the closed loop's own measurement (for min, its budget too),
    # so a row cannot miss its budget by the bench's numbers. Each row's plan is applied to the
    # same model here and measured by tests/memory_oracle.py, outside remat.
    data, _, _ = bench_run
    rows = {r["strategy"]: r for r in data["results"]}
    torch.manual_seed(data["seed"])
    built = load_model(
        "gpt", batch=2, seq=32, overrides={"n_layer": 3, "d_model": 32, "n_head": 2, "vocab": 64,
                                           "dropout": 0.1},
    )  # fmt: skip
    for name in ("remat:50%", "remat:min", "remat:@full", "remat:@every_n:2", "remat:@sqrt_n"):
        plan = remat.Plan(actions=rows[name]["plan"])
        with remat.apply_(built.model, plan):
            peak = oracle_step_peak(built.model, built.example_inputs, loss_fn=built.loss_fn)
        assert peak <= rows[name]["budget_bytes"], name
        assert peak == rows[name]["peak_bytes"], name  # and the bench reports that step's peak


def test_bench_writes_the_report_and_report_re_renders_it(
    bench_run: tuple[dict, Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, out, _ = bench_run
    for suffix in ("json", "md", "png", "html"):
        assert (out / f"bench.{suffix}").stat().st_size > 0, suffix
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    page = (out / "bench.html").read_text()
    assert "data:image/png;base64," in page and "remat:@full" in page  # self-contained
    table = (out / "bench.md").read_text()
    assert "| remat:min |" in table and "## Claims" in table
    assert json.loads((out / "bench.json").read_text()) == data

    assert main(["report", str(out / "bench.json"), "--out", str(tmp_path)]) == 0
    assert str(tmp_path / "bench.html") in capsys.readouterr().out
    assert (tmp_path / "bench.md").read_text() == table
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_report_refuses_what_is_not_a_bench_result(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = tmp_path / "plan.json"
    wrong.write_text('{"format_version": 1, "actions": {}}')
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(wrong)])
    assert exit_info.value.code == 2
    assert "not a remat bench result" in capsys.readouterr().err


def test_bench_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["bench", "gpt", "--strategies", "every_other"],
        ["bench", "gpt", "--budgets", "lots"],
        ["bench", "gpt", "--steps", "0"],
        ["bench", "gpt", "--device", "meta"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2, argv
    assert "every_n:K" in capsys.readouterr().err
