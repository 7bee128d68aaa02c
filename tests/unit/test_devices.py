"""The device table, the reserve, the ``device`` budget and the roofline (issue 5)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import remat
from remat.cost.roofline import op_time_ms
from remat.devices import DEVICES, get_device, is_device_name
from remat.solve.budget import Budget

ISSUE_DEVICES = ["h100-80gb", "h200", "a100-40gb", "a100-80gb", "a40", "l4", "rtx-3090"]
ISSUE_DEVICES += ["rtx-4090", "v100-32gb", "t4", "cpu"]


@pytest.mark.parametrize("name", ISSUE_DEVICES)
def test_every_device_has_positive_figures_and_a_source(name: str) -> None:
    spec = get_device(name)
    assert spec.memory_bytes > spec.reserve_bytes > 0
    assert spec.usable_bytes == spec.memory_bytes - spec.reserve_bytes
    for figure in (
        spec.bf16_flops,
        spec.fp32_flops,
        spec.memory_bandwidth_bytes_per_s,
        spec.host_link_bytes_per_s,
    ):
        assert figure > 0
    assert spec.source
    assert spec.peak_flops("bfloat16") >= spec.peak_flops("float32") or name in ("cpu",)


def test_datasheet_figures_and_aliases() -> None:
    h100 = get_device("H100")
    assert h100.name == "h100-80gb"
    assert h100.bf16_flops == 989.4e12 and h100.memory_bandwidth_bytes_per_s == 3.35e12
    assert get_device("a100-40gb").memory_bytes == 40 * 2**30
    assert is_device_name("t4") and not is_device_name("cuda") and not is_device_name("meta")
    assert set(ISSUE_DEVICES) - {"cpu"} <= set(DEVICES)


def test_unknown_device_names_the_closest() -> None:
    with pytest.raises(ValueError, match=r"got 'a100-40'.*did you mean 'a100-40gb'"):
        get_device("a100-40")


def test_device_budget_resolves_to_usable_bytes() -> None:
    l4 = get_device("l4")
    assert Budget.parse("device").resolve(static_bytes=0, peak_bytes=0, device="l4") == (
        l4.usable_bytes
    )
    assert Budget.parse("device:l4").resolve(static_bytes=0, peak_bytes=0, device="cuda:0") == (
        l4.usable_bytes
    )
    with pytest.raises(ValueError, match="no entry in the device table"):
        Budget.parse("device").resolve(static_bytes=0, peak_bytes=0, device="cuda:0")
    with pytest.raises(ValueError, match="did you mean"):
        Budget.parse("device:h10")


def test_solve_resolves_device_budgets_against_the_profile_device() -> None:
    profile = remat.cost.model.example_profile()
    profile.device = "t4"
    assert remat.solve(profile, "device").budget_bytes == get_device("t4").usable_bytes


def test_roofline_is_the_slower_of_compute_and_memory() -> None:
    a100 = get_device("a100-80gb")
    assert op_time_ms(312e12, 0, a100, "bfloat16") == pytest.approx(1000.0)
    assert op_time_ms(19.5e12, 0, a100, "float32") == pytest.approx(1000.0)
    assert op_time_ms(1e9, 2.039e12, a100, "bfloat16") == pytest.approx(1000.0)


def test_devices_budget_and_roofline_import_no_torch() -> None:
    loader = (
        "import sys, types, pathlib\n"
        "root = pathlib.Path(sys.argv[1])\n"
        "pkg = types.ModuleType('remat'); pkg.__path__ = [str(root)]; sys.modules['remat'] = pkg\n"
        "for name in ('solve', 'cost'):\n"
        "    sub = types.ModuleType('remat.' + name); sub.__path__ = [str(root / name)]\n"
        "    sys.modules['remat.' + name] = sub\n"
        "import remat.devices, remat.solve.budget, remat.cost.roofline\n"
        "sys.exit(1 if 'torch' in sys.modules else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", loader, remat.__path__[0]], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr or "a torch-free module imported torch"
