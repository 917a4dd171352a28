"""The module's Designer file: every widget the Widget uses exists, and Qt's UI loader can build it.

Slicer's own widgets (qMRMLNodeComboBox, ctkCollapsibleButton, qMRMLWidget) are unknown to plain Qt;
QUiLoader falls back to the base class named in the file's <customwidgets>, keeping names and nesting.
"""

from __future__ import annotations

import ast
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "VSCochleaSeg" / "VSCochleaSeg.py"
UI_FILE = ROOT / "VSCochleaSeg" / "Resources" / "UI" / "VSCochleaSeg.ui"


def _ui_names_used_by_widget() -> set:
    """Every ``self.ui.<name>`` in VSCochleaSeg.py."""
    names = set()
    for node in ast.walk(ast.parse(MODULE.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            names.add(node.attr)
    return names


def _widgets_in_ui_file() -> dict:
    """{object name: class} of every widget in the .ui file."""
    return {w.get("name"): w.get("class") for w in ET.parse(UI_FILE).getroot().iter("widget")}


def _parameter_names() -> set:
    """Fields of the parameterNodeWrapper class in VSCochleaSeg.py."""
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "VSCochleaSegParameterNode":
            return {item.target.id for item in node.body if isinstance(item, ast.AnnAssign)}
    raise AssertionError("VSCochleaSegParameterNode not found")


def test_every_widget_the_module_uses_is_in_the_ui_file():
    used = _ui_names_used_by_widget()
    assert len(used) > 10, "the parser found the Widget's self.ui.<name> uses"
    missing = used - set(_widgets_in_ui_file())
    assert not missing, f"VSCochleaSeg.py uses widgets missing from {UI_FILE.name}: {sorted(missing)}"


def test_widgets_bound_to_the_parameter_node_name_real_parameters():
    bound = {}
    for widget in ET.parse(UI_FILE).getroot().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[widget.get("name")] = prop.findtext("string")
    assert set(bound.values()) <= _parameter_names(), bound
    assert {"inputVolume", "outputSegmentation"} <= set(bound.values())


def test_the_output_selector_creates_a_new_segmentation_by_default():
    selector = next(w for w in ET.parse(UI_FILE).getroot().iter("widget") if w.get("name") == "outputSegmentationSelector")
    props = {p.get("name"): p for p in selector.findall("property")}
    assert props["noneEnabled"].findtext("bool") == "true"
    assert props["noneDisplay"].findtext("string") == "Create new segmentation"
    assert props["nodeTypes"].find("stringlist").findtext("string") == "vtkMRMLSegmentationNode"


@pytest.fixture(scope="module")
def qt_app():
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    widgets = pytest.importorskip("PySide6.QtWidgets", reason="PySide6 is not installed (pip install PySide6-Essentials)")
    return widgets.QApplication.instance() or widgets.QApplication([])


def test_the_ui_file_loads_with_qt_and_keeps_names_and_nesting(qt_app):
    from PySide6.QtCore import QFile, QIODevice
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QComboBox, QLabel, QProgressBar, QPushButton, QWidget

    file = QFile(str(UI_FILE))
    assert file.open(QIODevice.ReadOnly)
    loader = QUiLoader()
    root = loader.load(file)
    file.close()
    assert root is not None, loader.errorString()

    assert root.objectName() == "VSCochleaSeg"
    for name in _ui_names_used_by_widget() | {"inputVolumeSelector", "show3DCheckBox"}:
        assert root.findChild(QWidget, name) is not None, name
    assert isinstance(root.findChild(QWidget, "applyButton"), QPushButton)
    assert isinstance(root.findChild(QWidget, "progressBar"), QProgressBar)
    assert isinstance(root.findChild(QWidget, "vsVolumeValueLabel"), QLabel)
    inputs = root.findChild(QWidget, "inputsCollapsibleButton")
    assert inputs.findChild(QComboBox, "modelComboBox") is not None, "children stay inside the collapsible section"
    results = root.findChild(QWidget, "resultsCollapsibleButton")
    assert results.findChild(QPushButton, "exportButton") is not None
    assert root.findChild(QPushButton, "applyButton").text() == "Apply"
