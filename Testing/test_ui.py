"""The panel's .ui file loads with Qt (PySide6, offscreen) and has every widget the module code uses."""

from __future__ import annotations

import ast
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from SimpleSliceNetLib.slicer_logic import LESION_COLUMNS, UNCERTAINTY_COLUMN

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
QtCore = pytest.importorskip("PySide6.QtCore")
QtUiTools = pytest.importorskip("PySide6.QtUiTools")
QtWidgets = pytest.importorskip("PySide6.QtWidgets")

ROOT = Path(__file__).resolve().parents[1]
UI_FILE = ROOT / "Resources" / "UI" / "SimpleSliceNet.ui"
MODULE_FILE = ROOT / "SimpleSliceNet" / "SimpleSliceNet.py"
# Parameter node members bound with SlicerParameterName, and their Python types.
BOUND_TYPES = {"vtkMRMLScalarVolumeNode", "vtkMRMLLabelMapVolumeNode", "str", "int", "float"}


@pytest.fixture(scope="module")
def panel():
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    loader = QtUiTools.QUiLoader()
    handle = QtCore.QFile(str(UI_FILE))
    assert handle.open(QtCore.QFile.ReadOnly)
    widget = loader.load(handle)
    handle.close()
    assert widget is not None, loader.errorString()
    yield widget
    widget.deleteLater()
    app.processEvents()


def module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text())


def ui_names_used_by_the_module() -> set[str]:
    """Every ``self.ui.<name>`` in SimpleSliceNet.py."""
    names = set()
    for node in ast.walk(module_tree()):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui"
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
        ):
            names.add(node.attr)
    return names


def parameter_node_fields() -> dict[str, str]:
    for node in ast.walk(module_tree()):
        if isinstance(node, ast.ClassDef) and any(
            isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in node.decorator_list
        ):
            return {
                item.target.id: ast.unparse(item.annotation)
                for item in node.body
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
            }
    raise AssertionError("no @parameterNodeWrapper class in SimpleSliceNet.py")


def test_every_widget_the_module_uses_exists(panel):
    used = ui_names_used_by_the_module()
    assert len(used) > 20
    missing = sorted(name for name in used if panel.findChild(QtCore.QObject, name) is None)
    assert missing == [], f"SimpleSliceNet.py uses widgets missing from the .ui: {missing}"


def test_widget_names_are_unique_and_the_root_is_named_after_the_module():
    root = ET.parse(UI_FILE).getroot()
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names))
    assert root.find("widget").get("class") == "qMRMLWidget" and names[0] == "SimpleSliceNet"


def test_custom_widgets_are_declared_with_their_headers():
    root = ET.parse(UI_FILE).getroot()
    declared = {c.findtext("class"): c.findtext("header") for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")} - {c for c in dir(QtWidgets) if c.startswith("Q")}
    assert used <= set(declared), f"undeclared custom widgets: {sorted(used - set(declared))}"
    assert all(header == f"{name}.h" for name, header in declared.items())


def test_parameter_bindings_match_the_parameter_node():
    fields = parameter_node_fields()
    assert set(fields.values()) <= BOUND_TYPES
    root = ET.parse(UI_FILE).getroot()
    bound = {}
    for widget in root.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[widget.get("name")] = prop.findtext("string")
    assert len(bound.values()) == len(set(bound.values())), "two widgets bound to one parameter"
    assert set(bound.values()) <= set(fields), f"unknown parameters: {set(bound.values()) - set(fields)}"
    # Everything but the model (filled at runtime from the engine's list) is edited in the panel.
    assert set(fields) - set(bound.values()) == {"model"}


def test_panel_structure(panel):
    detect = panel.findChild(QtWidgets.QPushButton, "detectButton")
    assert detect.text() == "Detect anomalies" and not detect.isEnabled()
    devices = panel.findChild(QtWidgets.QComboBox, "deviceComboBox")
    assert [devices.itemText(i) for i in range(devices.count())] == ["auto", "cpu", "cuda", "mps"]
    formats = panel.findChild(QtWidgets.QComboBox, "exportFormatComboBox")
    assert [formats.itemText(i) for i in range(formats.count())] == ["nii.gz", "nrrd"]
    table = panel.findChild(QtWidgets.QTableWidget, "lesionTable")
    headers = [table.horizontalHeaderItem(i).text() for i in range(table.columnCount())]
    assert headers == list(LESION_COLUMNS)  # the cells lesion_rows() makes, in its order
    assert "epistemic uncertainty" in table.horizontalHeaderItem(UNCERTAINTY_COLUMN).toolTip()
    assert table.editTriggers() == QtWidgets.QAbstractItemView.NoEditTriggers
    assert panel.findChild(QtWidgets.QPushButton, "trainButton").text() == "Start training"
    assert panel.findChild(QtWidgets.QRadioButton, "trainFromNodesRadioButton").isChecked()


def test_uncertainty_overlay_choice_is_hidden_until_a_model_gives_uncertainty(panel):
    # Shown by the module only when the heatmap has uncertainty maps (U2AD); everything else is visible.
    for name in ("overlayLabel", "overlayComboBox"):
        assert panel.findChild(QtWidgets.QWidget, name).isHidden()
    assert not panel.findChild(QtWidgets.QWidget, "heatmapSelector").isHidden()
    overlay = panel.findChild(QtWidgets.QComboBox, "overlayComboBox")
    assert overlay.count() == 0 and "uncertainty" in overlay.toolTip()


def test_training_section_is_collapsed_by_default():
    root = ET.parse(UI_FILE).getroot()
    training = next(w for w in root.iter("widget") if w.get("name") == "trainingCollapsibleButton")
    collapsed = {p.get("name"): p.findtext("bool") for p in training.findall("property")}
    assert collapsed.get("collapsed") == "true"


def test_module_source_stays_python39_and_slicer_only_in_thin_classes():
    source = MODULE_FILE.read_text()
    tree = module_tree()
    # Slicer 5.8 runs Python 3.9: no match statements, no PEP 604 unions evaluated at runtime.
    assert not any(isinstance(node, getattr(ast, "Match", ())) for node in ast.walk(tree))
    assert not re.search(r":\s*\w+\s*\|\s*None", source)
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    assert classes == {
        "SimpleSliceNet",
        "SimpleSliceNetParameterNode",
        "SimpleSliceNetWidget",
        "SimpleSliceNetLogic",
        "SimpleSliceNetTest",
    }
