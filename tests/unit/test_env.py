"""``remat.env`` and ``remat env``: sane values on a CPU machine, JSON, and a faked CUDA device."""

from __future__ import annotations

import argparse
import doctest
import json
from types import SimpleNamespace

import pytest
import torch

import remat.env
from remat.cli import env as env_cmd
from remat.env import DeviceInfo, EnvReport, collect_env

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only machine")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="remat")
    env_cmd.register(parser.add_subparsers(dest="command"))
    return parser


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    args = _parser().parse_args(argv)
    code = args.func(args)
    return code, capsys.readouterr().out


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """One fake H100-like CUDA device, without touching real CUDA."""
    props = SimpleNamespace(name="Fake H100", total_memory=80 * 2**30, major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90100)
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: (2, 21, 5))


@needs_no_cuda
def test_collect_env_on_cpu_machine() -> None:
    report = collect_env()
    assert isinstance(report, EnvReport)
    assert report.format_version == 1
    assert report.torch_version == torch.__version__
    assert report.default_device in ("cpu", "mps")
    if not torch.backends.mps.is_available():
        assert report.default_device == "cpu"
        assert report.devices == []
    assert report.cpu_threads >= 1
    assert report.cpu_count is None or report.cpu_count >= 1
    assert report.cudnn_version is None
    assert report.nccl_version is None
    assert isinstance(report.cpu_bf16_supported, bool)
    assert isinstance(report.remat_version, str) and report.remat_version
    assert any("no CUDA device" in note for note in report.notes)


def test_collect_env_does_not_initialise_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    # On a CPU build CUDA cannot be initialised at all, so "is_initialized() stays False" could
    # not fail there. Instead: with is_available() False, every call that would touch (and so
    # initialise) CUDA is recorded, on any machine; documented: none is made. A collect_env
    # that queried devices, cuDNN or NCCL before checking is_available() fails here.
    touched: list[str] = []

    def recorder(name: str) -> object:
        def touch(*args: object, **kwargs: object) -> object:
            touched.append(name)
            raise RuntimeError(f"{name} called")

        return touch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("device_count", "get_device_properties", "get_device_name", "init", "_lazy_init"):
        monkeypatch.setattr(torch.cuda, name, recorder(f"torch.cuda.{name}"))
    monkeypatch.setattr(torch.cuda.nccl, "version", recorder("torch.cuda.nccl.version"))
    monkeypatch.setattr(torch.backends.cudnn, "version", recorder("torch.backends.cudnn.version"))
    report = collect_env()
    assert touched == []
    assert report.devices == [] or all(d.kind != "cuda" for d in report.devices)
    assert report.cudnn_version is None


def test_to_dict_is_json_and_round_trips() -> None:
    data = collect_env().to_dict()
    assert data["format_version"] == 1
    assert json.loads(json.dumps(data)) == data
    assert isinstance(data["devices"], list)
    assert isinstance(data["notes"], list)


def test_to_dict_device_fields() -> None:
    device = DeviceInfo(
        index=0,
        name="x",
        total_memory_bytes=1024,
        compute_capability="8.0",
        bf16_supported=True,
        kind="cuda",
    )
    report = EnvReport(
        remat_version="0.1.0",
        python_version="3.11.0",
        platform="Linux",
        torch_version="2.13.0",
        cuda_version="12.4",
        cudnn_version=90100,
        nccl_version="2.21.5",
        cpu_threads=4,
        cpu_count=8,
        cpu_bf16_supported=True,
        devices=[device],
        default_device="cuda:0",
        notes=[],
    )
    data = json.loads(json.dumps(report.to_dict()))
    assert data["devices"] == [
        {
            "index": 0,
            "name": "x",
            "total_memory_bytes": 1024,
            "compute_capability": "8.0",
            "bf16_supported": True,
            "kind": "cuda",
        }
    ]
    assert next(iter(data)) == "format_version"


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run_cli(["env", "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    for key in (
        "torch_version",
        "cuda_version",
        "cudnn_version",
        "nccl_version",
        "devices",
        "default_device",
        "cpu_threads",
        "format_version",
    ):
        assert key in data
    assert data["torch_version"] == torch.__version__
    assert data["format_version"] == 1


def test_cli_human(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run_cli(["env"], capsys)
    assert code == 0
    assert torch.__version__ in out
    assert "default device" in out
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert "no CUDA devices" in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)


def test_cli_help_mentions_versions() -> None:
    parser = _parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["env", "--bogus"])
    assert exit_info.value.code == 2


def test_fake_cuda_device(fake_cuda: None) -> None:
    report = collect_env()
    assert report.default_device == "cuda:0"
    assert report.cuda_version == "12.4"
    assert report.cudnn_version == 90100
    assert report.nccl_version == "2.21.5"
    assert report.devices == [
        DeviceInfo(
            index=0,
            name="Fake H100",
            total_memory_bytes=80 * 2**30,
            compute_capability="9.0",
            bf16_supported=True,
            kind="cuda",
        )
    ]
    assert not any("no CUDA device" in note for note in report.notes)
    assert json.loads(json.dumps(report.to_dict()))["devices"][0]["compute_capability"] == "9.0"


def test_fake_cuda_human_output(fake_cuda: None, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run_cli(["env"], capsys)
    assert code == 0
    assert "Fake H100" in out
    assert "80.0 GiB" in out
    assert "9.0" in out
    assert "9.1.0 (90100)" in out
    assert "2.21.5" in out
    assert "cuda:0" in out
    assert "no CUDA devices" not in out


def test_fake_old_cuda_device_has_no_bf16(fake_cuda: None, monkeypatch: pytest.MonkeyPatch) -> None:
    props = SimpleNamespace(name="Fake V100", total_memory=16 * 2**30, major=7, minor=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    report = collect_env()
    assert report.devices[0].compute_capability == "7.0"
    assert report.devices[0].bf16_supported is False
    assert any("bfloat16" in note for note in report.notes)


def test_fake_cuda_without_nccl(fake_cuda: None, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_nccl() -> tuple[int, ...]:
        raise RuntimeError("torch built without NCCL")

    monkeypatch.setattr(torch.cuda.nccl, "version", no_nccl)
    report = collect_env()
    assert report.nccl_version is None
    assert report.devices


@pytest.mark.parametrize(
    ("raw", "expected"),
    [((2, 21, 5), "2.21.5"), ((2, 21, 5, "a0"), "2.21.5-a0"), (21805, "2.18.5"), (2708, "2.7.8")],
)
def test_format_nccl(raw: object, expected: str) -> None:
    assert remat.env._format_nccl(raw) == expected


def test_doctests() -> None:
    results = doctest.testmod(remat.env, optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0
    assert results.failed == 0
