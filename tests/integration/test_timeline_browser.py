"""The timeline page in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``) driven by Selenium opens the file, with no JavaScript console error; the
chart has both steps' series, each peak marker sits where the measured peak is on the chart's own
axis ticks, a synthetic mouse move shows the tooltip of the op at the peak, clicking a unit draws
its tensors' lifetimes; and the screenshot is saved (``REMAT_TIMELINE_SCREENSHOT=path`` also
writes it there: docs/img/timeline.png is made so).

Skipped, saying why, without selenium or the browser, except under ``CI=true``, where ``make test``
installs them and their absence fails."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import remat
from remat.auto import measure_plan
from remat.plan import Plan
from remat.profiling.step import Step
from remat.timeline.build import Timeline

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
DRIVER = ("chromedriver", "chromium-driver")


def _first(names: tuple[str, ...]) -> str | None:
    return next((path for name in names if (path := shutil.which(name))), None)


def _missing(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: make test installs chromium and chromium-driver)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def driver():  # type: ignore[no-untyped-def]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium is not installed (pip install 'remat[dev]')")
    browser, chromedriver = _first(CHROMIUM), _first(DRIVER)
    if browser is None or chromedriver is None:
        _missing(
            "no headless Chromium here: apt-get install chromium chromium-driver (found browser"
            f" {browser}, driver {chromedriver})"
        )
    options = Options()
    options.binary_location = browser
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1200,1000",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(options=options, service=Service(chromedriver))
    yield chrome
    chrome.quit()


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Step, Plan, Timeline]:
    torch.manual_seed(0)
    model = nn.Sequential(
        *[nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)) for _ in range(4)]
    )
    step = Step(model, (torch.randn(256, 32),), optimizer="adamw")
    plan = Plan(
        actions={"0": "recompute", "1": "recompute", "2": "keep", "3": "keep"},
        budget_bytes=measure_plan(step) * 9 // 10,
    )
    path = tmp_path_factory.mktemp("timeline") / "timeline.html"
    result = remat.timeline(step, plan=plan, out=path, x_axis="op")
    return path, step, plan, result


def _linear(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    """Slope and intercept through the first and last (value, pixel) pairs."""
    (v0, p0), (v1, p1) = pairs[0], pairs[-1]
    slope = (p1 - p0) / (v1 - v0)
    return slope, p0 - slope * v0


def test_page_renders_in_chromium(driver, page, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    path, step, plan, result = page
    driver.get(path.as_uri())
    css = driver.find_elements

    # Both steps' stacked areas and totals, the budget line, one peak marker per step.
    for label in ("unplanned", "planned"):
        assert len(css(By.CSS_SELECTOR, f'path.area[data-step="{label}"]')) >= 5, label
        assert len(css(By.CSS_SELECTOR, f'path.total[data-step="{label}"]')) == 1, label
    assert driver.find_element(By.ID, "budget").get_attribute("data-bytes") == str(
        plan.budget_bytes
    )

    # Each peak marker sits at the measured peak (the tracker's measure_plan, apart from the
    # timeline) on the chart's own y ticks, and at the op of the peak on its x ticks.
    yticks = [
        (float(t.get_attribute("data-bytes")), float(t.get_attribute("data-y")))
        for t in css(By.CSS_SELECTOR, "text.ytick")
    ]
    xticks = [
        (float(t.get_attribute("data-x")), float(t.get_attribute("x")))
        for t in css(By.CSS_SELECTOR, "text.xtick")
    ]
    y_slope, y_cut = _linear(yticks)
    x_slope, x_cut = _linear(xticks)
    for label, oracle, line in (
        ("unplanned", measure_plan(step), result.unplanned),
        ("planned", measure_plan(step, plan), result.planned),
    ):
        marker = driver.find_element(By.CSS_SELECTOR, f'circle.peak[data-step="{label}"]')
        cy, cx = float(marker.get_attribute("cy")), float(marker.get_attribute("cx"))
        assert abs((cy - y_cut) / y_slope - oracle) <= abs(1 / y_slope), label  # within a pixel
        assert abs((cx - x_cut) / x_slope - line.peak_index) <= abs(1 / x_slope), label
        # and it is the highest point of that step's total line
        d = driver.find_element(By.CSS_SELECTOR, f'path.total[data-step="{label}"]').get_attribute(
            "d"
        )
        top = min(float(y) for y in re.findall(r"[ML][\d.]+,([\d.]+)", d))
        assert abs(top - cy) < 0.6, label

    # A synthetic mouse move onto the planned peak shows that op in the tooltip.
    chart = driver.find_element(By.ID, "chart")
    planned = driver.find_element(By.CSS_SELECTOR, 'circle.peak[data-step="planned"]')
    width, height = chart.size["width"], chart.size["height"]
    dx = float(planned.get_attribute("cx")) - width / 2
    dy = float(planned.get_attribute("cy")) + 20 - height / 2  # a little under it: the overlay
    ActionChains(driver).move_to_element_with_offset(chart, round(dx), round(dy)).perform()
    tooltip = driver.find_element(By.ID, "tooltip")
    assert tooltip.is_displayed()
    text = tooltip.text
    peak = result.planned
    assert f"op {peak.peak_index} of {len(peak.ops)}" in text, text
    assert peak.ops[peak.peak_index] in text and "planned step" in text
    assert re.search(r"total [\d.]+ (KiB|MiB)", text) and "parameters:" in text

    # Clicking a recomputed unit draws its saved tensors and, planned, their recompute.
    driver.find_element(By.CSS_SELECTOR, '#legend .unit[data-unit="0"]').click()
    saved = css(By.CSS_SELECTOR, "#lifetimes rect.life.saved")
    replayed = css(By.CSS_SELECTOR, '#lifetimes rect.life.recompute[data-step="planned"]')
    expected = [s for s in result.planned.storages if s.recompute and s.module.startswith("0")]
    assert saved and len(replayed) == len(expected) > 0
    assert "unit 0 (plan: recompute):" in driver.find_element(By.ID, "unit-info").text
    driver.find_element(By.CSS_SELECTOR, '#legend .unit[data-unit="0"]').click()  # unselect

    errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors
    shot = tmp_path / "timeline.png"
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    target = os.environ.get("REMAT_TIMELINE_SCREENSHOT")
    if target:
        shutil.copyfile(shot, target)


def screenshot(html: Path, png: Path, driver) -> None:  # type: ignore[no-untyped-def]
    """Save ``html``'s page as ``png`` (how docs/img/timeline.png was made from a GPT page)."""
    driver.get(Path(html).resolve().as_uri())
    driver.save_screenshot(str(png))
