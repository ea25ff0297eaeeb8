"""What `pip install fewstep` brings: the CPU fast path (OpenVINO) is part of the default install
wherever OpenVINO publishes wheels, and torch is left for users to choose (CUDA or CPU build)."""

import tomllib
from pathlib import Path

from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    return {Requirement(text).name: Requirement(text) for text in project["dependencies"]}


def _environment(machine: str, system: str = "Linux") -> dict[str, str]:
    return {"platform_machine": machine, "platform_system": system, "sys_platform": "linux",
            "python_version": "3.11", "python_full_version": "3.11.7", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "platform_release": "", "platform_version": "", "implementation_version": "3.11.7",
            "extra": ""}


def test_openvino_comes_with_the_default_install_where_it_has_wheels():
    openvino = _requirements()["openvino"]
    for machine in ("x86_64", "AMD64", "aarch64", "arm64"):
        assert openvino.marker.evaluate(_environment(machine)), machine
    for machine in ("ppc64le", "s390x", "riscv64"):
        assert not openvino.marker.evaluate(_environment(machine)), machine


def test_torch_is_not_pinned_to_a_build():
    torch = _requirements()["torch"]
    assert not torch.url and "+" not in str(torch.specifier) and "==" not in str(torch.specifier)


def test_the_speed_defaults_take_the_fast_path(monkeypatch):
    from fewstep.config import EngineOptions

    for name in ("FEWSTEP_SPEED", "FEWSTEP_OPENVINO"):  # the suite turns OpenVINO off
        monkeypatch.delenv(name, raising=False)
    options = EngineOptions()
    assert options.speed == "auto" and options.openvino == "auto"
