"""Installing dependencies inside Slicer (VSCochleaSegLib.slicer_deps), with pip and PyTorchUtils faked."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

from VSCochleaSegLib import slicer_deps

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _pyproject_dependencies() -> dict:
    text = PYPROJECT.read_text(encoding="utf-8")
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    requirements = re.findall(r'"([^"]+)"', block)
    return {slicer_deps._requirement_name(r).lower(): r for r in requirements}


def test_requirement_ranges_match_pyproject():
    ours = {slicer_deps._requirement_name(r).lower(): r for _, r in slicer_deps.REQUIREMENTS}
    theirs = {name: r for name, r in _pyproject_dependencies().items() if name not in ("numpy", "simpleitk")}
    assert ours == theirs


def test_numpy_and_simpleitk_are_never_installed():
    missing = slicer_deps.missing_requirements([("no_such_numpy", "numpy>=99"), ("no_such_sitk", "SimpleITK>=99"),
                                                ("no_such_monai", "monai>=1.3,<2")])
    assert missing == ["monai>=1.3,<2"]


def test_nothing_to_do_when_everything_is_installed():
    plan = slicer_deps.install_plan([])
    assert plan.empty and "installed" in slicer_deps.describe_plan(plan)
    assert slicer_deps.install(plan, pip_install=lambda args: pytest.fail("pip should not run")) is False


def test_pip_installs_the_missing_packages_with_numpy_and_simpleitk_pinned(tmp_path):
    calls = []

    def pip_install(args):
        constraints = Path(args[args.index("-c") + 1]).read_text(encoding="utf-8")
        calls.append((args, constraints))

    plan = slicer_deps.InstallPlan(pip=["monai>=1.3,<2", "safetensors>=0.4"])
    slicer_deps.install(plan, pip_install=pip_install, log=lambda message: None)

    (args, constraints), = calls
    assert args[2:] == ["monai>=1.3,<2", "safetensors>=0.4"]
    assert re.search(r"^numpy==[\d.]+", constraints, re.M) and re.search(r"^SimpleITK==[\d.]+", constraints, re.M)


def test_torch_comes_from_pytorch_utils_when_the_extension_is_installed(monkeypatch):
    asked = []
    fake = types.ModuleType("PyTorchUtils")

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation, torchVersionRequirement):
            asked.append((askConfirmation, torchVersionRequirement))
            return object()

    fake.PyTorchUtilsLogic = PyTorchUtilsLogic
    monkeypatch.setitem(sys.modules, "PyTorchUtils", fake)
    monkeypatch.setattr(slicer_deps, "pytorch_utils_available", lambda: True)
    pip_calls = []

    plan = slicer_deps.install_plan(["torch>=2.1,<3"])
    assert plan.torch == "PyTorchUtils" and "PyTorch extension" in slicer_deps.describe_plan(plan)
    slicer_deps.install(plan, pip_install=pip_calls.append, log=lambda message: None)

    assert asked == [(False, ">=2.1,<3")]
    assert pip_calls == []


def test_torch_comes_from_pip_without_the_extension(monkeypatch):
    monkeypatch.setattr(slicer_deps, "pytorch_utils_available", lambda: False)
    calls = []
    plan = slicer_deps.install_plan(["torch>=2.1,<3", "monai>=1.3,<2"])
    slicer_deps.install(plan, pip_install=calls.append, log=lambda message: None)
    assert [c[2:] for c in calls] == [["torch>=2.1,<3"], ["monai>=1.3,<2"]]


def test_a_failed_pytorch_install_is_reported():
    plan = slicer_deps.InstallPlan(torch="PyTorchUtils")
    with pytest.raises(RuntimeError, match="PyTorch"):
        slicer_deps.install(plan, pip_install=lambda a: None, torch_installer=lambda r: None, log=lambda m: None)


def test_replacing_an_imported_package_asks_for_a_restart():
    assert "tqdm" in sys.modules or __import__("tqdm")
    plan = slicer_deps.InstallPlan(pip=["tqdm>=4.60"])
    assert slicer_deps.install(plan, pip_install=lambda a: None, log=lambda m: None) is True
