"""Install the engine's Python dependencies into Slicer's own Python, once, after the user agrees.

Slicer ships numpy and SimpleITK built for it (SimpleITK with Slicer's ITK IO); replacing them can
break Slicer, so they are never installed here and every pip call is constrained to the versions
already present. torch comes from the PyTorch extension's ``PyTorchUtils`` when it is installed
(it picks the CUDA build matching the GPU), else from pip. Requirement ranges match pyproject.toml.
No Qt here: the Widget shows :func:`describe_plan` in a confirm dialog and calls :func:`install`.

Usage in Slicer's Python console::

    from VSCochleaSegLib import slicer_deps
    plan = slicer_deps.install_plan()
    print(slicer_deps.describe_plan(plan))
    needs_restart = slicer_deps.install(plan)
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from typing import Callable, List, Optional, Sequence, Tuple

# (module to import, pip requirement). Keep in step with pyproject.toml's dependencies
# (a test checks this).
REQUIREMENTS: Tuple[Tuple[str, str], ...] = (
    ("torch", "torch>=2.1,<3"),
    ("monai", "monai>=1.3,<2"),
    ("nibabel", "nibabel>=5"),
    ("scipy", "scipy>=1.9"),
    ("cc3d", "connected-components-3d>=3.12"),
    ("safetensors", "safetensors>=0.4"),
    ("tqdm", "tqdm>=4.60"),
    ("PIL", "Pillow>=9"),
)

# Slicer's own builds: never installed, upgraded or downgraded from here.
PROTECTED = ("numpy", "SimpleITK")

TORCH_REQUIREMENT = dict(REQUIREMENTS)["torch"]


@dataclass
class InstallPlan:
    """What is missing and how it will be installed."""

    torch: Optional[str] = None  # "PyTorchUtils" | "pip" | None (torch present)
    pip: List[str] = field(default_factory=list)  # requirement strings for pip, torch excluded

    @property
    def empty(self) -> bool:
        return self.torch is None and not self.pip


def _requirement_name(requirement: str) -> str:
    for separator in "<>=!~[; ":
        requirement = requirement.split(separator)[0]
    return requirement


def _satisfied(module: str, requirement: str) -> bool:
    """True when ``module`` is importable and its distribution's version is in the requirement's range."""
    if importlib.util.find_spec(module) is None:
        return False
    try:
        from packaging.requirements import Requirement
        from packaging.version import Version
    except ImportError:  # cannot check versions: presence is enough
        return True
    parsed = Requirement(requirement)
    try:
        installed = metadata.version(parsed.name)
    except metadata.PackageNotFoundError:
        return True  # importable but not pip-installed (e.g. bundled): trust it
    return Version(installed) in parsed.specifier


def missing_requirements(requirements: Sequence[Tuple[str, str]] = REQUIREMENTS) -> List[str]:
    """Requirement strings that are not installed or not in range (never numpy/SimpleITK)."""
    return [req for module, req in requirements
            if _requirement_name(req) not in PROTECTED and not _satisfied(module, req)]


def pytorch_utils_available() -> bool:
    """True when the PyTorch extension's PyTorchUtils module can be imported."""
    return importlib.util.find_spec("PyTorchUtils") is not None


def install_plan(missing: Optional[Sequence[str]] = None) -> InstallPlan:
    """How to install ``missing`` (default: :func:`missing_requirements`)."""
    missing = list(missing_requirements() if missing is None else missing)
    torch = [r for r in missing if _requirement_name(r) == "torch"]
    plan = InstallPlan(pip=[r for r in missing if _requirement_name(r) != "torch"])
    if torch:
        plan.torch = "PyTorchUtils" if pytorch_utils_available() else "pip"
    return plan


def describe_plan(plan: InstallPlan) -> str:
    """Text for the confirm dialog: what will be installed, from where, and what is left alone."""
    if plan.empty:
        return "All Python packages VSCochleaSeg needs are installed."
    lines = ["VSCochleaSeg needs these Python packages in Slicer's Python:"]
    if plan.torch == "PyTorchUtils":
        lines.append(f"  • PyTorch ({TORCH_REQUIREMENT}) through the PyTorch extension, which picks the build for your GPU")
    elif plan.torch == "pip":
        lines.append(f"  • PyTorch ({TORCH_REQUIREMENT}) from pip (install the 'PyTorch' extension first for a GPU build)")
    lines += [f"  • {requirement}" for requirement in plan.pip]
    lines += ["", f"Slicer's own {' and '.join(PROTECTED)} are kept as they are.",
              "The download can be large (PyTorch: up to a few GB) and take several minutes. Install now?"]
    return "\n".join(lines)


def constraints_text() -> str:
    """pip constraints pinning the installed numpy and SimpleITK, so no dependency replaces them."""
    lines = []
    for name in PROTECTED:
        try:
            lines.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return "\n".join(lines) + "\n"


def _already_imported(plan: InstallPlan) -> List[str]:
    modules = {_requirement_name(r): m for m, r in REQUIREMENTS}
    names = (["torch"] if plan.torch else []) + [_requirement_name(r) for r in plan.pip]
    return [n for n in names if modules.get(n, n) in sys.modules]


def install(plan: Optional[InstallPlan] = None, *, pip_install: Optional[Callable[[List[str]], None]] = None,
            torch_installer: Optional[Callable[[str], object]] = None, log: Callable[[str], None] = print) -> bool:
    """Install what ``plan`` lists. Returns True when Slicer must be restarted before use.

    ``pip_install`` defaults to ``slicer.util.pip_install`` and gets a list of pip arguments;
    ``torch_installer(requirement)`` defaults to PyTorchUtils' ``installTorch``. A restart is needed
    when a package being replaced was already imported in this Python session.

    Raises:
        RuntimeError: PyTorch could not be installed.
    """
    plan = plan if plan is not None else install_plan()
    if plan.empty:
        return False
    if pip_install is None:
        import slicer

        pip_install = slicer.util.pip_install
    needs_restart = bool(_already_imported(plan))
    fd, constraints = tempfile.mkstemp(prefix="vscochleaseg-constraints-", suffix=".txt")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            stream.write(constraints_text())
        if plan.torch == "PyTorchUtils":
            log(f"Installing PyTorch ({TORCH_REQUIREMENT}) with PyTorchUtils...")
            installer = torch_installer or _pytorch_utils_installer
            if installer(TORCH_REQUIREMENT) is None:
                raise RuntimeError("PyTorch could not be installed by the PyTorch extension; see the Python console.")
        elif plan.torch == "pip":
            log(f"Installing PyTorch ({TORCH_REQUIREMENT}) with pip...")
            pip_install(["-c", constraints, TORCH_REQUIREMENT])
        if plan.pip:
            log("Installing " + ", ".join(plan.pip) + "...")
            pip_install(["-c", constraints, *plan.pip])
    finally:
        os.unlink(constraints)
    importlib.invalidate_caches()
    return needs_restart


def _pytorch_utils_installer(requirement: str):
    import PyTorchUtils

    spec = requirement[len("torch"):]
    return PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=spec)
