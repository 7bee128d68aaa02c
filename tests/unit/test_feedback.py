"""progress=True / a callable / None on the long calls (issue 16 item 5)."""

from __future__ import annotations

import io
import logging

import pytest
import torch
from torch import nn

import remat
from remat.feedback import StderrProgress, as_progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_redraws_one_line_with_a_bar() -> None:
    out = _Terminal()
    say = StderrProgress(out, width=4, clock=iter([0.0, 1.0, 2.0]).__next__)
    say("profile: tracked step 1/4 (every unit kept)")
    say("done")
    first, second = out.getvalue().split("\r")[1:]
    assert first == "[#...] remat [   1.0 s] profile: tracked step 1/4 (every unit kept)"
    # The shorter line is padded over the longer one, and says no count, so it has no bar.
    assert second.rstrip() == "remat [   2.0 s] done" and len(second) == len(first)
    assert "\n" not in out.getvalue()


def test_elsewhere_every_line_is_written_on_its_own() -> None:
    out = io.StringIO()
    say = StderrProgress(out, clock=iter([5.0, 5.0, 7.25]).__next__)
    say("a 1/2")
    say("b 2/2")
    assert out.getvalue() == "remat [   0.0 s] a 1/2\nremat [   2.2 s] b 2/2\n"


@pytest.mark.parametrize("bad", ["yes", 1, b"x"])
def test_anything_else_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="progress: got"):
        as_progress(bad)  # type: ignore[arg-type]


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(3)])


def test_auto_says_each_stage_to_stderr_with_progress_true(capsys: pytest.CaptureFixture) -> None:
    handle = remat.auto_(
        _model(),
        (torch.randn(8, 16),),
        budget="min",
        optimizer="sgd",
        actions=["keep", "recompute"],
        progress=True,
    )
    handle.remove()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("] ", 1)[1] for line in lines[:3]] == [
        "profile: tracked step 1/3 (every unit kept)",
        "profile: tracked step 2/3 (every unit recomputed)",
        "profile: tracked step 3/3 (one segment)",
    ]
    assert any("plan: solving for min, measuring the plan's step" in line for line in lines)


def test_by_default_the_remat_logger_hears_it_and_stderr_does_not(
    capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    lines: list[str] = []
    with caplog.at_level(logging.INFO, logger="remat"):
        remat.profile(_model(), (torch.randn(8, 16),), optimizer="sgd", options=(), repeats=0)
        remat.profile(
            _model(),
            (torch.randn(8, 16),),
            optimizer="sgd",
            options=(),
            repeats=0,
            progress=lines.append,
        )
    assert capsys.readouterr().err == ""
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("profile:")]
    assert logged == lines and len(lines) == 3
