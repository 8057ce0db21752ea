#!/usr/bin/env python
"""Render the README pictures of the Slicer module, headless.

- ``docs/images/slice_views.png``: a real detection (the engine's CLI in a child process, through
  the module's logic) shown by Slicer's own slice pipeline (``vtkMRMLSliceLogic`` of slicer-core:
  MRI background, heatmap foreground at 0.5 opacity, lesion label map), centred on the top lesion.
- ``docs/images/panel.png``: the module panel from ``Resources/UI/SimpleSliceNet.ui`` rendered with
  PySide6 offscreen, Slicer's custom widgets replaced by their closest Qt look-alikes and filled
  with that detection's results.

Usage: ``.venv/bin/python scripts/render_docs_images.py [--model ID_OR_JSON] [--input VOLUME]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SimpleSliceNet"))

VIEWS = (("Red", "Axial"), ("Green", "Coronal"), ("Yellow", "Sagittal"))
VIEW_PIXELS = 360


def input_volume(path: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    """The volume to show: a given file, the bundled sample, or a synthetic brain with a planted lesion."""
    from SimpleSliceNetLib.resources import sample_volume
    from SimpleSliceNetLib.slicer_logic import plant_lesion
    from SimpleSliceNetLib.volume_io import load_volume, volume_stem

    if path or sample_volume().exists():
        chosen = Path(path) if path else sample_volume()
        volume = load_volume(chosen)
        return volume.array, volume.affine, volume_stem(chosen)
    from SimpleSliceNetTraining.synth import make_healthy_subject

    volume, _ = make_healthy_subject("mni152_nilearn", np.random.default_rng(7))
    array, _ = plant_lesion(volume.array, volume.affine, radius_mm=10.0, seed=3)
    return array, volume.affine, "synthetic_t1"


def render_slice_views(args: argparse.Namespace, out: Path) -> dict:
    import slicer
    from PIL import Image, ImageDraw
    from vtk.util.numpy_support import vtk_to_numpy

    from SimpleSliceNetLib import mrml_adapter as mrml
    from SimpleSliceNetLib.slicer_logic import AnomalyDetectionLogic

    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkMRMLApplicationLogic()
    app_logic.SetMRMLScene(scene)
    color_logic = slicer.vtkMRMLColorLogic()  # Slicer's default tables (Grey for the MRI)
    color_logic.SetMRMLScene(scene)
    slice_logics = []
    for name, orientation in VIEWS:
        logic = slicer.vtkMRMLSliceLogic()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app_logic)
        node = logic.AddSliceNode(name)
        node.SetOrientation(orientation)
        node.SetDimensions(VIEW_PIXELS, VIEW_PIXELS, 1)
        node.SetUseLabelOutline(True)  # lesion outlines keep the heatmap beneath them visible
        slice_logics.append(logic)

    array, affine, name = input_volume(args.input)
    volume = slicer.vtkMRMLScalarVolumeNode()
    volume.SetName(name)
    scene.AddNode(volume)
    mrml.update_node_from_array(volume, array.astype(np.float32), affine)
    volume.CreateDefaultDisplayNodes()

    env = {"SIMPLESLICENET_HOME": args.home} if args.home else None
    logic = AnomalyDetectionLogic(env=env)
    result = logic.detect(volume, model=args.model, device="cpu", progressCallback=lambda f, m: None)
    print(f"detected: score {result.volumeScore}, threshold {result.threshold}, {len(result.lesions)} lesion(s)")

    for slice_logic in slice_logics:
        slice_logic.FitSliceToAll()
    if result.lesions:
        logic.jumpToLesion(scene, result.lesions[0])

    panels = []
    for (_, orientation), slice_logic in zip(VIEWS, slice_logics, strict=True):
        slice_logic.UpdateImageData()
        producer = slice_logic.GetImageDataConnection().GetProducer()
        producer.Update()
        image = producer.GetOutputDataObject(0)
        width, height, _ = image.GetDimensions()
        pixels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)[::-1, :, :3]
        panel = Image.fromarray(np.ascontiguousarray(pixels.astype(np.uint8)))
        draw = ImageDraw.Draw(panel)
        draw.rectangle([0, 0, width, 18], fill=(40, 40, 40))
        draw.text((6, 3), f"{orientation}", fill=(255, 255, 255))
        panels.append(panel)
    strip = Image.new("RGB", (sum(p.width for p in panels) + 4 * (len(panels) - 1), panels[0].height), (0, 0, 0))
    x = 0
    for panel in panels:
        strip.paste(panel, (x, 0))
        x += panel.width + 4
    out.mkdir(parents=True, exist_ok=True)
    strip.save(out / "slice_views.png")
    print(f"wrote {out / 'slice_views.png'}")
    # Detach the logics from the scene before they are freed (freeing them attached crashes).
    for slice_logic in slice_logics:
        slice_logic.SetMRMLScene(None)
    color_logic.SetMRMLScene(None)
    app_logic.SetMRMLScene(None)
    models = logic.listModels()
    model = next((m for m in models if m["id"] == result.report.get("model", {}).get("id")), {})
    return {
        "input": name,
        "heatmap": result.heatmapNode.GetName(),
        "label": result.labelNode.GetName(),
        "lesions": [lesion.to_dict() for lesion in result.lesions],
        "threshold": result.threshold,
        "volume_score": result.volumeScore,
        "device": result.device,
        "elapsed_s": result.elapsedSeconds,
        "model": model,
    }


def render_panel(detection: dict, out: Path) -> None:
    """Render the panel filled with ``detection`` (plain data; run in its own process: Qt and
    slicer-core's VTK in one process crash on teardown here)."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6 import QtCore, QtUiTools, QtWidgets

    from SimpleSliceNetLib.slicer_logic import UNCERTAINTY_COLUMN, lesion_rows, model_info_text

    class SlicerLookAlikeLoader(QtUiTools.QUiLoader):
        """Creates plain Qt stand-ins for Slicer's CTK/MRML widgets so the panel renders outside Slicer."""

        def createWidget(self, class_name, parent=None, name=""):  # noqa: N802 (Qt API)
            stand_ins = {
                "qMRMLWidget": QtWidgets.QWidget,
                "qMRMLNodeComboBox": QtWidgets.QComboBox,
                "qMRMLCheckableNodeComboBox": QtWidgets.QComboBox,
                "ctkCollapsibleButton": QtWidgets.QGroupBox,
                "ctkPathLineEdit": QtWidgets.QLineEdit,
            }
            if class_name == "ctkSliderWidget":
                widget = QtWidgets.QWidget(parent)
                layout = QtWidgets.QHBoxLayout(widget)
                layout.setContentsMargins(0, 0, 0, 0)
                slider = QtWidgets.QSlider(QtCore.Qt.Horizontal)
                spin = QtWidgets.QDoubleSpinBox()
                spin.setObjectName(f"{name}Spin")
                slider.setObjectName(f"{name}Slider")
                layout.addWidget(slider)
                layout.addWidget(spin)
                widget.setObjectName(name)
                return widget
            if class_name in stand_ins:
                widget = stand_ins[class_name](parent)
                widget.setObjectName(name)
                return widget
            return super().createWidget(class_name, parent, name)

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    handle = QtCore.QFile(str(ROOT / "Resources" / "UI" / "SimpleSliceNet.ui"))
    handle.open(QtCore.QFile.ReadOnly)
    panel = SlicerLookAlikeLoader().load(handle)
    handle.close()

    def find(kind, name):
        return panel.findChild(kind, name)

    model = detection["model"]
    for name, title in (
        ("inputsCollapsibleButton", "Detection"),
        ("resultsCollapsibleButton", "Results"),
        ("trainingCollapsibleButton", "Training"),
    ):
        find(QtWidgets.QGroupBox, name).setTitle(title)
    find(QtWidgets.QComboBox, "inputSelector").addItem(detection["input"])
    find(QtWidgets.QComboBox, "heatmapSelector").addItem(detection["heatmap"])
    find(QtWidgets.QComboBox, "labelSelector").addItem(detection["label"])
    find(QtWidgets.QComboBox, "trainingNodesSelector").addItem("Healthy scans (2 checked)")
    find(QtWidgets.QComboBox, "modelComboBox").addItem(f"{model.get('name', '?')} ({model.get('source', '?')})")
    find(QtWidgets.QLabel, "modelInfoLabel").setText(model_info_text(model) if model else "")
    detect = find(QtWidgets.QPushButton, "detectButton")
    detect.setEnabled(True)
    find(QtWidgets.QProgressBar, "progressBar").setValue(100)
    find(QtWidgets.QLabel, "statusLabel").setText(
        f"Done on {detection['device']}: {len(detection['lesions'])} candidate lesion(s)."
    )
    find(QtWidgets.QLabel, "elapsedLabel").setText(f"{detection['elapsed_s']:.0f} s")
    find(QtWidgets.QLabel, "scoreLabel").setText(f"{detection['volume_score']:.3f}")
    threshold = detection["threshold"]
    for name, value, top in (
        ("thresholdSliderWidget", threshold, max(1.0, 2 * threshold)),
        ("opacitySliderWidget", 0.5, 1.0),
    ):
        spin = find(QtWidgets.QDoubleSpinBox, f"{name}Spin")
        slider = find(QtWidgets.QSlider, f"{name}Slider")
        spin.setDecimals(3)
        spin.setMaximum(top)
        spin.setValue(value)
        slider.setValue(int(round(99 * value / top)))
    for name in ("thresholdSliderWidget", "minLesionVolumeSpinBox", "exportButton"):
        find(QtWidgets.QWidget, name).setEnabled(True)
    table = find(QtWidgets.QTableWidget, "lesionTable")
    rows = lesion_rows(detection["lesions"][:6])
    table.setColumnHidden(UNCERTAINTY_COLUMN, True)  # a SimpleSliceNet result, as the module shows it
    table.setRowCount(len(rows))
    for row, cells in enumerate(rows):
        for column, text in enumerate(cells):
            item = QtWidgets.QTableWidgetItem(text)
            item.setTextAlignment(QtCore.Qt.AlignRight | QtCore.Qt.AlignVCenter)
            table.setItem(row, column, item)
    table.resizeColumnsToContents()
    table.selectRow(0)
    find(QtWidgets.QLineEdit, "trainingPathLineEdit").hide()
    find(QtWidgets.QLineEdit, "validationPathLineEdit").setPlaceholderText("folder or cases.json with masks")
    panel.resize(440, 1060)
    panel.show()
    app.processEvents()
    panel.grab().save(str(out / "panel.png"))
    print(f"wrote {out / 'panel.png'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model id or .json (default: the bundled default model)")
    parser.add_argument("--home", help="SIMPLESLICENET_HOME holding user models (default: the usual one)")
    parser.add_argument("--input", help="volume to show (default: the bundled sample, else a synthetic brain)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"), help="output folder")
    parser.add_argument("--panel-from", help=argparse.SUPPRESS)  # internal: render the panel from this JSON
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.panel_from:
        render_panel(json.loads(Path(args.panel_from).read_text()), out)
        return 0
    detection = render_slice_views(args, out)
    with tempfile.TemporaryDirectory() as scratch:
        summary = Path(scratch) / "detection.json"
        summary.write_text(json.dumps(detection))
        command = [sys.executable, __file__, "--out", str(out), "--panel-from", str(summary)]
        return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
