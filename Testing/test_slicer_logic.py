"""The Slicer module's logic on real slicer-core MRML nodes, running the real engine as a child process.

One tiny model is trained once for the module (through ``logic.train`` from volume nodes, which
is itself under test); detections then run the real ``simpleslicenet detect`` CLI on small
synthetic healthy brains with a planted lesion.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import slicer
import tomllib
import vtk

from SimpleSliceNetLib import mrml_adapter as mrml
from SimpleSliceNetLib.job_runner import JobError, child_environment, cli_command
from SimpleSliceNetLib.lesions import MIN_LESION_ML
from SimpleSliceNetLib.slicer_logic import (
    LESION_COLUMNS,
    REQUIREMENTS,
    UNCERTAINTY_COLUMN,
    AnomalyDetectionLogic,
    Job,
    elapsed_text,
    lesion_rows,
    metric_text,
    missing_requirements,
    model_info_text,
    plant_lesion,
    write_lesion_csv,
)
from SimpleSliceNetLib.volume_io import load_volume, save_volume

ROOT = Path(__file__).resolve().parents[1]
# A model small enough to train in ~20 s here; the plumbing, not the accuracy, is under test.
TINY_MODEL_ARGS = ["--shape", "48,48,24", "--spacing", "4,4,6", "--blocks", "2", "--encoder-weights", "none"]
MODEL_ID = "tiny-test"
U2AD_MODEL_ID = "u2ad-t1-synth"  # bundled; about 10 s of CPU per detection on these small volumes


def healthy_brain(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic healthy T1 brain at 3 mm (small, so every detection stays quick)."""
    synth = pytest.importorskip("SimpleSliceNetTraining.synth")
    volume, _ = synth.make_healthy_subject("mni152_nilearn", np.random.default_rng(seed))
    affine = volume.affine.copy()
    affine[:3, :3] *= 3
    return np.ascontiguousarray(volume.array[::3, ::3, ::3]), affine


def add_volume(scene, array: np.ndarray, affine: np.ndarray, name: str):
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    scene.AddNode(node)
    mrml.update_node_from_array(node, array, affine)
    return node


def node_ids(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("simpleslicenet-home")


@pytest.fixture(scope="module")
def logic(home) -> AnomalyDetectionLogic:
    return AnomalyDetectionLogic(env={"SIMPLESLICENET_HOME": str(home)})


@pytest.fixture(scope="module")
def trained(logic):
    """Train the tiny model from two volume nodes, recording what the callbacks saw."""
    scene = slicer.vtkMRMLScene()
    nodes = [add_volume(scene, *healthy_brain(seed), name=f"Healthy {seed}") for seed in (1, 2)]
    seen = {"metrics": [], "fractions": [], "messages": []}
    path = logic.train(
        nodes,
        MODEL_ID,
        epochs=1,
        device="cpu",
        extraArgs=TINY_MODEL_ARGS,
        progressCallback=lambda fraction, message: seen["fractions"].append(fraction),
        metricCallback=seen["metrics"].append,
        messageCallback=seen["messages"].append,
    )
    return path, seen


@pytest.fixture(scope="module")
def case():
    """A healthy brain with a planted lesion, and the lesion's RAS centre."""
    array, affine = healthy_brain(3)
    planted, centre = plant_lesion(array, affine, radius_mm=12.0)
    return planted, affine, centre


def oblique_lps_anisotropic(affine: np.ndarray) -> np.ndarray:
    """The same voxels under an oblique, LPS-like (flipped i and j), anisotropic geometry."""
    angle = np.deg2rad(20.0)
    rotation = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    result = np.eye(4)
    result[:3, :3] = rotation @ np.diag([-3.0, -2.5, 4.0])
    result[:3, 3] = [95.123456789, 120.5, -70.25]
    return result


def study_scene(array: np.ndarray, geometry: np.ndarray):
    """A scene with slice views and a volume "T1" in a patient's study: ``(scene, node, study)``."""
    scene = slicer.vtkMRMLScene()
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient"), "MR")
    node = add_volume(scene, array, geometry, name="T1")
    hierarchy.CreateItem(study, node)
    for view in ("Red", "Green", "Yellow"):
        composite = slicer.vtkMRMLSliceCompositeNode()
        composite.SetLayoutName(view)
        scene.AddNode(composite)
    return scene, node, study


def assert_same_geometry(output, node) -> None:
    """``output`` has exactly the voxel grid of ``node``: dimensions, IJK-to-RAS, spacing, origin, directions."""
    assert output.GetImageData().GetDimensions() == node.GetImageData().GetDimensions()
    assert np.array_equal(mrml.ijk_to_ras(output), mrml.ijk_to_ras(node))
    assert output.GetSpacing() == node.GetSpacing()
    assert output.GetOrigin() == node.GetOrigin()
    out_dirs, in_dirs = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    output.GetIJKToRASDirectionMatrix(out_dirs)
    node.GetIJKToRASDirectionMatrix(in_dirs)
    assert all(out_dirs.GetElement(r, c) == in_dirs.GetElement(r, c) for r in range(3) for c in range(3))


def output_roles(scene) -> list[str]:
    nodes = scene.GetNodesByClass("vtkMRMLVolumeNode")
    roles = (nodes.GetItemAsObject(i).GetAttribute(mrml.ROLE_ATTRIBUTE) for i in range(nodes.GetNumberOfItems()))
    return sorted(role for role in roles if role)


@pytest.fixture(scope="module")
def detected(logic, trained, case):
    """One detection on the oblique/LPS-like/anisotropic input, with the scene state around it."""
    array, affine, _ = case
    scene, node, study = study_scene(array, oblique_lps_anisotropic(affine))
    before = {
        "array": mrml.array_from_node(node),
        "matrix": mrml.ijk_to_ras(node),
        "mtime": node.GetMTime(),
        "image_mtime": node.GetImageData().GetMTime(),
    }
    fractions: list[float] = []
    result = logic.detect(node, model=MODEL_ID, device="cpu", progressCallback=lambda f, m: fractions.append(f))
    return {"scene": scene, "node": node, "result": result, "before": before, "study": study, "fractions": fractions}


# -- training and models ------------------------------------------------------------------------


def test_train_from_nodes_reports_progress_and_writes_a_model(trained, home):
    path, seen = trained
    assert path == home / "models" / f"{MODEL_ID}.json"
    assert path.is_file() and path.with_suffix(".safetensors").is_file()
    assert seen["metrics"] and seen["metrics"][0]["epoch"] == 1 and np.isfinite(seen["metrics"][0]["loss"])
    assert seen["fractions"] == sorted(seen["fractions"]) and seen["fractions"][-1] > 0.9
    assert metric_text(seen["metrics"][0]).startswith("Epoch 1, loss ")


def test_list_models_shows_the_new_user_model(logic, trained):
    models = logic.listModels()
    mine = [m for m in models if m["id"] == MODEL_ID]
    assert len(mine) == 1 and mine[0]["source"] == "user"
    assert Path(mine[0]["path"]) == trained[0]
    assert "simpleslicenet" in model_info_text(mine[0])


def test_model_info_shows_the_kept_epochs_validation_score():
    training = {"train_volumes": 40, "epochs_run": 12, "final": {"epoch": 12, "val_auroc": 0.91},
                "selected": {"epoch": 6, "val_auroc": 0.94}}
    model = {"method": "simpleslicenet", "modality": "T1", "training": training, "threshold": 0.7,
             "version": "1.0.0", "source": "bundled"}
    text = model_info_text(model)
    assert "validation AUROC 0.940 (epoch 6)" in text and "0.910" not in text
    del training["selected"]  # files written before the kept epoch was recorded
    assert "validation AUROC 0.910 (epoch 12)" in model_info_text(model)
    meta = json.loads((ROOT / "Resources/Models/simpleslicenet-t1-synth.json").read_text())
    bundled = model_info_text({**meta, "threshold": meta["config"]["scoring"]["threshold"], "source": "bundled"})
    selected = meta["training"]["selected"]
    assert f"validation AUROC {selected['val_auroc']:.3f} (epoch {selected['epoch']})" in bundled


def test_import_model_file_validates_and_copies_the_pair(trained, tmp_path):
    other = AnomalyDetectionLogic(env={"SIMPLESLICENET_HOME": str(tmp_path / "home2")})
    imported = other.importModelFile(trained[0])
    assert imported == other.userModelDirectory() / f"{MODEL_ID}.json"
    assert imported.with_suffix(".safetensors").read_bytes() == trained[0].with_suffix(".safetensors").read_bytes()
    assert [m["id"] for m in other.listModels() if m["source"] == "user"] == [MODEL_ID]

    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(trained[0], broken / "broken.json")
    (broken / f"{MODEL_ID}.safetensors").write_bytes(b"not weights")
    with pytest.raises(JobError):
        other.importModelFile(broken / "broken.json")


def test_training_rejects_bad_names_and_missing_sources(logic, tmp_path):
    with pytest.raises(ValueError, match="plain file name"):
        logic.train(tmp_path, "../escape")
    with pytest.raises(ValueError, match="not found"):
        logic.train(tmp_path / "nothing-here", "ok")
    with pytest.raises(ValueError, match="at least one"):
        logic.train([], "ok")


# -- detection ----------------------------------------------------------------------------------


def test_outputs_have_the_inputs_exact_geometry(detected):
    node, result = detected["node"], detected["result"]
    for output in (result.heatmapNode, result.labelNode):
        assert_same_geometry(output, node)


def test_input_node_is_untouched(detected):
    node, before = detected["node"], detected["before"]
    assert np.array_equal(mrml.array_from_node(node), before["array"])
    assert np.array_equal(mrml.ijk_to_ras(node), before["matrix"])
    assert node.GetMTime() == before["mtime"]
    assert node.GetImageData().GetMTime() == before["image_mtime"]


def test_names_display_colours_layers_and_study(detected):
    scene, node, result = detected["scene"], detected["node"], detected["result"]
    assert result.heatmapNode.GetName() == "T1 anomaly heatmap"
    assert result.labelNode.GetName() == "T1 anomaly lesions" and result.labelNode.IsA("vtkMRMLLabelMapVolumeNode")
    heat_display = result.heatmapNode.GetDisplayNode()
    assert heat_display.GetColorNode().GetAttribute(mrml.COLOR_ATTRIBUTE) == "inferno"
    assert not heat_display.GetAutoWindowLevel() and heat_display.GetWindowLevelMin() == 0.0
    assert heat_display.GetWindowLevelMax() == pytest.approx(2 * result.report["threshold"])
    assert result.labelNode.GetDisplayNode().GetColorNode().GetAttribute(mrml.COLOR_ATTRIBUTE) == "lesions"
    composite = scene.GetFirstNodeByClass("vtkMRMLSliceCompositeNode")
    assert composite.GetBackgroundVolumeID() == node.GetID()
    assert composite.GetForegroundVolumeID() == result.heatmapNode.GetID()
    assert composite.GetLabelVolumeID() == result.labelNode.GetID()
    assert composite.GetForegroundOpacity() == pytest.approx(0.5)
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    for output in (result.heatmapNode, result.labelNode):
        assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(output)) == detected["study"]


def test_a_simpleslicenet_model_gives_no_uncertainty(detected, logic):
    scene, result = detected["scene"], detected["result"]
    assert result.uncertaintyNode is None and result.aleatoricNode is None and result.lesionUncertainty is None
    assert output_roles(scene) == [mrml.HEATMAP_ROLE, mrml.LABEL_ROLE]
    assert logic.overlayNodes(result.heatmapNode) == [result.heatmapNode]
    assert logic.lesionUncertainty(result.heatmapNode) is None
    assert all("mean_uncertainty" not in lesion for lesion in logic.report(result.heatmapNode)["lesions"])
    rows = lesion_rows(result.lesions, logic.lesionUncertainty(result.heatmapNode))
    assert all(len(row) == UNCERTAINTY_COLUMN for row in rows)


def test_result_report_and_progress(detected):
    result = detected["result"]
    assert result.report["model"]["id"] == MODEL_ID
    assert result.device == "cpu"
    assert result.volumeScore == pytest.approx(result.report["volume_score"])
    assert result.threshold == pytest.approx(result.report["threshold"])
    assert detected["fractions"] and detected["fractions"][-1] == pytest.approx(1.0)
    heatmap = mrml.array_from_node(result.heatmapNode)
    brain = np.count_nonzero(heatmap)
    assert heatmap.dtype == np.float32 and np.all(np.isfinite(heatmap)) and brain > 0.1 * heatmap.size


def test_label_map_lesion_list_and_threshold_agree(detected, logic):
    result = detected["result"]
    heatmap = mrml.array_from_node(result.heatmapNode)
    brain = logic.brainMask(result.heatmapNode)
    assert np.all(heatmap[~brain] == 0)
    for threshold in (np.percentile(heatmap[brain], 90), np.percentile(heatmap[brain], 99.5)):
        lesions = logic.applyThreshold(result.heatmapNode, result.labelNode, float(threshold), minLesionVolumeMl=0.0)
        labels = mrml.array_from_node(result.labelNode)
        assert labels.dtype == np.uint8
        assert np.array_equal(labels > 0, (heatmap >= threshold) & brain)
        assert int(labels.max()) == len(lesions)
        for lesion in lesions:
            assert int(np.count_nonzero(labels == lesion.id)) == lesion.voxels
            assert lesion.max_score == pytest.approx(float(heatmap[labels == lesion.id].max()))
        assert [lesion.max_score for lesion in lesions] == sorted((x.max_score for x in lesions), reverse=True)
        assert logic.lesions(result.heatmapNode) == lesions
    assert logic.applyThreshold(result.heatmapNode, result.labelNode, float(heatmap.max()) + 1) == []
    assert mrml.array_from_node(result.labelNode).max() == 0


def test_minimum_lesion_size_drops_small_regions(detected, logic):
    result = detected["result"]
    heatmap = mrml.array_from_node(result.heatmapNode)
    threshold = float(np.percentile(heatmap[heatmap != 0], 97))
    every = logic.applyThreshold(result.heatmapNode, result.labelNode, threshold, minLesionVolumeMl=0.0)
    cutoff = float(np.median([lesion.volume_ml for lesion in every])) + 1e-6
    large = logic.applyThreshold(result.heatmapNode, result.labelNode, threshold, minLesionVolumeMl=cutoff)
    assert 0 < len(large) < len(every) or len(every) == 1
    assert all(lesion.volume_ml >= cutoff for lesion in large)
    assert logic.report(result.heatmapNode)["min_lesion_ml"] == cutoff


def test_default_minimum_lesion_size_is_the_clis(detected, logic, home, tmp_path):
    """Without a minimum given, the logic lists the findings ``simpleslicenet detect`` lists by default."""
    result = detected["result"]
    heatmap = mrml.array_from_node(result.heatmapNode)
    threshold = float(np.percentile(heatmap[heatmap != 0], 97))
    every = logic.applyThreshold(result.heatmapNode, result.labelNode, threshold, minLesionVolumeMl=0.0)
    assert any(lesion.volume_ml < MIN_LESION_ML for lesion in every)  # so the default has something to drop
    ours = logic.applyThreshold(result.heatmapNode, result.labelNode, threshold)
    array, affine = mrml.volume_from_node(detected["node"])
    save_volume(tmp_path / "t1.nii.gz", array, affine)
    done = subprocess.run(
        cli_command(["detect", tmp_path / "t1.nii.gz", "--output-dir", tmp_path / "out", "--model", MODEL_ID,
                     "--device", "cpu", "--threshold", repr(threshold), "--no-overlay"]),
        env=child_environment({"SIMPLESLICENET_HOME": str(home)}), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    theirs = json.loads((tmp_path / "out" / "t1_report.json").read_text())["lesions"]
    assert 0 < len(ours) < len(every)
    assert [lesion.voxels for lesion in ours] == [lesion["voxels"] for lesion in theirs]
    assert all(lesion.volume_ml >= MIN_LESION_ML for lesion in ours)


def test_threshold_works_on_a_heatmap_from_a_saved_scene(detected):
    """A fresh logic (e.g. after reopening a scene) rebuilds its arrays from the heatmap node."""
    result = detected["result"]
    fresh = AnomalyDetectionLogic()
    heatmap = mrml.array_from_node(result.heatmapNode)
    threshold = float(np.percentile(heatmap[heatmap != 0], 95))
    lesions = fresh.applyThreshold(result.heatmapNode, result.labelNode, threshold, minLesionVolumeMl=0.0)
    labels = mrml.array_from_node(result.labelNode)
    assert np.array_equal(labels > 0, (heatmap >= threshold) & (heatmap != 0)) and int(labels.max()) == len(lesions)


def test_the_planted_lesion_scores_higher_than_healthy_tissue(logic, case):
    # With the bundled model (the tiny one-epoch model above only proves the wiring) on the case's own
    # grid (the distorted oblique copy above tests geometry, not detection).
    array, affine, centre = case
    scene = slicer.vtkMRMLScene()
    result = logic.detect(add_volume(scene, array, affine, name="T1 planted"), model=None, device="cpu")
    heatmap = mrml.array_from_node(result.heatmapNode)
    matrix = mrml.ijk_to_ras(result.heatmapNode)
    ijk = np.indices(heatmap.shape).reshape(3, -1)
    ras = (matrix[:3, :3] @ ijk + matrix[:3, 3:4]).T.reshape(*heatmap.shape, 3)
    distance = np.linalg.norm(ras - np.asarray(centre), axis=-1)
    inside, outside = heatmap[distance < 12.0], heatmap[(distance > 30.0) & (heatmap != 0)]
    assert inside.max() > np.percentile(outside, 99)


def test_jump_to_lesion_centres_the_slice_views(detected, logic):
    scene = slicer.vtkMRMLScene()
    red = slicer.vtkMRMLSliceNode()
    red.SetLayoutName("Red")
    scene.AddNode(red)
    lesion = {"centroid_ras": [10.0, -20.0, 30.0]}
    logic.jumpToLesion(scene, lesion)
    assert [red.GetSliceToRAS().GetElement(r, 3) for r in range(3)] == pytest.approx([10.0, -20.0, 30.0])


def test_rerun_updates_the_same_nodes(detected, logic):
    scene, node, first = detected["scene"], detected["node"], detected["result"]
    logic.applyThreshold(first.heatmapNode, first.labelNode, first.threshold)
    ids = node_ids(scene)
    again = logic.detect(node, model=MODEL_ID, device="cpu")
    assert again.heatmapNode is first.heatmapNode and again.labelNode is first.labelNode
    assert node_ids(scene) == ids  # no new heatmap, label, display or colour nodes
    assert scene.GetNodesByClass("vtkMRMLColorTableNode").GetNumberOfItems() == 2
    assert np.array_equal(mrml.ijk_to_ras(again.heatmapNode), mrml.ijk_to_ras(node))


def test_failed_and_cancelled_runs_leave_the_scene_alone(logic, trained, case):
    scene = slicer.vtkMRMLScene()
    node = add_volume(scene, case[0], case[1], name="T1")
    before = node_ids(scene)
    with pytest.raises(JobError, match="no-such-model"):
        logic.detect(node, model="no-such-model", device="cpu")
    assert node_ids(scene) == before

    job = logic.detect(node, model=MODEL_ID, device="cpu", waitForCompletion=False)
    assert isinstance(job, Job) and job.running
    job.cancel()
    with pytest.raises(JobError, match="Cancelled"):
        job.wait()
    assert node_ids(scene) == before
    assert not job.running


def test_detect_refuses_label_maps_and_nodes_outside_a_scene(logic):
    with pytest.raises(ValueError, match="in the scene"):
        logic.detect(slicer.vtkMRMLScalarVolumeNode())
    scene = slicer.vtkMRMLScene()
    label = slicer.vtkMRMLLabelMapVolumeNode()
    scene.AddNode(label)
    with pytest.raises(ValueError, match="label map"):
        logic.detect(label)


# -- U2AD: uncertainty maps and per-lesion uncertainty -----------------------------------------


@pytest.fixture(scope="module")
def u2ad_detected(logic, case):
    """The bundled U2AD model on the planted case under the oblique/LPS-like/anisotropic geometry."""
    array, affine, _ = case
    scene, node, study = study_scene(array, oblique_lps_anisotropic(affine))
    result = logic.detect(node, model=U2AD_MODEL_ID, device="cpu")
    return {"scene": scene, "node": node, "result": result, "study": study}


def test_u2ad_uncertainty_nodes_have_the_inputs_geometry_and_their_own_colours(u2ad_detected, logic):
    scene, node, result = u2ad_detected["scene"], u2ad_detected["node"], u2ad_detected["result"]
    assert result.report["model"]["method"] == "u2ad"
    uncertainty, aleatoric = result.uncertaintyNode, result.aleatoricNode
    assert uncertainty is not None and aleatoric is not None
    assert uncertainty.GetName() == "T1 uncertainty" and aleatoric.GetName() == "T1 aleatoric uncertainty"
    assert output_roles(scene) == sorted(
        [mrml.HEATMAP_ROLE, mrml.LABEL_ROLE, mrml.UNCERTAINTY_ROLE, mrml.ALEATORIC_ROLE]
    )
    assert logic.overlayNodes(result.heatmapNode) == [result.heatmapNode, uncertainty, aleatoric]
    brain = logic.brainMask(result.heatmapNode)
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    heat_colours = result.heatmapNode.GetDisplayNode().GetColorNode()
    for output in (uncertainty, aleatoric):
        assert_same_geometry(output, node)
        values = mrml.array_from_node(output)
        assert values.dtype == np.float32 and values.min() >= 0.0
        assert np.all(values[~brain] == 0) and np.count_nonzero(values[brain]) > 0.5 * brain.sum()
        display = output.GetDisplayNode()
        colours = display.GetColorNode()
        assert colours.GetAttribute(mrml.COLOR_ATTRIBUTE) == "viridis" and colours.GetID() != heat_colours.GetID()
        assert not display.GetAutoWindowLevel() and display.GetWindowLevelMin() == 0.0
        assert display.GetWindowLevelMax() == pytest.approx(np.percentile(values[values > 0], 99.5), rel=1e-5)
        assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(output)) == u2ad_detected["study"]
    assert heat_colours.GetAttribute(mrml.COLOR_ATTRIBUTE) == "inferno"
    assert scene.GetNodesByClass("vtkMRMLColorTableNode").GetNumberOfItems() == 3  # inferno, lesions, viridis
    composite = scene.GetFirstNodeByClass("vtkMRMLSliceCompositeNode")
    assert composite.GetForegroundVolumeID() == result.heatmapNode.GetID()  # the heatmap stays the overlay


def test_u2ad_lesion_uncertainty_column_follows_the_threshold(u2ad_detected, logic):
    result = u2ad_detected["result"]
    uncertainty = mrml.array_from_node(result.uncertaintyNode)

    def means(lesions) -> list[float]:
        labels = mrml.array_from_node(result.labelNode)
        return [float(uncertainty[labels == lesion.id].mean()) for lesion in lesions]

    assert result.lesions and len(result.lesionUncertainty) == len(result.lesions)
    assert result.lesionUncertainty == pytest.approx(means(result.lesions), rel=1e-5)
    # Where the engine found the same lesion, its report gives the same mean uncertainty.
    engine = {(e["id"], e["voxels"]): e["mean_uncertainty"] for e in result.report["lesions"]}
    same = [(engine[(x.id, x.voxels)], u) for x, u in zip(result.lesions, result.lesionUncertainty, strict=True)
            if (x.id, x.voxels) in engine]
    assert same and all(a == pytest.approx(b, rel=1e-5) for a, b in same)
    rows = lesion_rows(result.lesions, result.lesionUncertainty)
    assert [row[UNCERTAINTY_COLUMN] for row in rows] == [f"{value:.3g}" for value in result.lesionUncertainty]

    heatmap = mrml.array_from_node(result.heatmapNode)
    lower = float(np.percentile(heatmap[logic.brainMask(result.heatmapNode)], 97))
    lesions = logic.applyThreshold(result.heatmapNode, result.labelNode, lower)
    assert len(lesions) != len(result.lesions)
    values = logic.lesionUncertainty(result.heatmapNode)
    assert values == pytest.approx(means(lesions), rel=1e-5)
    assert [entry["mean_uncertainty"] for entry in logic.report(result.heatmapNode)["lesions"]] == values
    # A fresh logic (a reopened scene) finds the uncertainty node from the heatmap.
    fresh = AnomalyDetectionLogic()
    assert fresh.lesionUncertainty(result.heatmapNode) == []
    assert fresh.applyThreshold(result.heatmapNode, result.labelNode, lower) == lesions
    assert fresh.lesionUncertainty(result.heatmapNode) == pytest.approx(values, rel=1e-6)
    logic.applyThreshold(result.heatmapNode, result.labelNode, result.threshold)


def test_u2ad_export_writes_uncertainty_maps_and_column(u2ad_detected, logic, tmp_path):
    result = u2ad_detected["result"]
    lesions = logic.applyThreshold(result.heatmapNode, result.labelNode, result.threshold)
    paths = logic.exportResults(result.heatmapNode, result.labelNode, tmp_path, fileFormat="nrrd")
    for role, node in (("uncertainty", result.uncertaintyNode), ("aleatoric", result.aleatoricNode)):
        assert paths[role].name == f"T1_{role}.nrrd"
        exported = load_volume(paths[role])
        np.testing.assert_array_equal(exported.array, mrml.array_from_node(node))
        np.testing.assert_allclose(exported.affine, mrml.ijk_to_ras(node), atol=1e-9)
    with paths["lesions"].open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(lesions) > 0
    expected = logic.lesionUncertainty(result.heatmapNode)
    assert [float(row["mean_uncertainty"]) for row in rows] == pytest.approx(expected)


def test_one_logic_keeps_the_results_of_two_scenes_apart(detected, u2ad_detected, logic):
    slicenet, u2ad = detected["result"].heatmapNode, u2ad_detected["result"].heatmapNode
    assert slicenet.GetID() == u2ad.GetID()  # each scene numbers its nodes from 1
    assert logic.report(slicenet)["model"]["id"] == MODEL_ID
    assert logic.report(u2ad)["model"]["method"] == "u2ad"
    assert logic.lesionUncertainty(slicenet) is None and logic.lesionUncertainty(u2ad) is not None


def test_u2ad_rerun_updates_its_nodes_and_another_model_removes_them(u2ad_detected, logic, trained):
    scene, node, first = u2ad_detected["scene"], u2ad_detected["node"], u2ad_detected["result"]
    ids = node_ids(scene)
    again = logic.detect(node, model=U2AD_MODEL_ID, device="cpu")
    assert again.uncertaintyNode is first.uncertaintyNode and again.aleatoricNode is first.aleatoricNode
    assert again.heatmapNode is first.heatmapNode
    assert node_ids(scene) == ids  # no new output, display or colour nodes

    # A SimpleSliceNet run replaces the heatmap: uncertainty of the U2AD run would no longer match it.
    removed = set()
    for output in (first.uncertaintyNode, first.aleatoricNode):
        removed |= {output.GetID(), output.GetDisplayNodeID()}
    other = logic.detect(node, model=MODEL_ID, device="cpu")
    assert other.heatmapNode is first.heatmapNode and other.report["model"]["id"] == MODEL_ID
    assert other.uncertaintyNode is None and other.lesionUncertainty is None
    assert node_ids(scene) == ids - removed
    assert output_roles(scene) == [mrml.HEATMAP_ROLE, mrml.LABEL_ROLE]
    assert logic.overlayNodes(other.heatmapNode) == [other.heatmapNode]
    assert logic.lesionUncertainty(other.heatmapNode) is None


# -- export -------------------------------------------------------------------------------------


@pytest.mark.parametrize("file_format", ["nii.gz", "nrrd"])
def test_export_writes_volumes_report_and_csv(detected, logic, tmp_path, file_format):
    result = detected["result"]
    heatmap = mrml.array_from_node(result.heatmapNode)
    lesions = logic.applyThreshold(
        result.heatmapNode, result.labelNode, float(np.percentile(heatmap[heatmap != 0], 98))
    )
    paths = logic.exportResults(result.heatmapNode, result.labelNode, tmp_path, fileFormat=file_format)
    assert paths["heatmap"].name == f"T1_heatmap.{file_format}"
    exported = load_volume(paths["heatmap"])
    np.testing.assert_array_equal(exported.array, heatmap)
    # NIfTI stores the affine as float32; NRRD keeps full precision.
    np.testing.assert_allclose(exported.affine, mrml.ijk_to_ras(result.heatmapNode), atol=1e-4)
    mask = load_volume(paths["mask"])
    np.testing.assert_array_equal(mask.array, mrml.array_from_node(result.labelNode))
    report = json.loads(paths["report"].read_text())
    assert report["lesions"] == [lesion.to_dict() for lesion in lesions]
    assert report["model"]["id"] == MODEL_ID
    with paths["lesions"].open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(lesions)
    if rows:
        assert float(rows[0]["volume_ml"]) == pytest.approx(lesions[0].volume_ml)
        assert float(rows[0]["centroid_s"]) == pytest.approx(lesions[0].centroid_ras[2])
    with pytest.raises(ValueError, match="unknown volume format"):
        logic.exportResults(result.heatmapNode, result.labelNode, tmp_path, fileFormat="png")


# -- helpers ------------------------------------------------------------------------------------


def test_requirements_cover_the_engine_dependencies():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = pyproject["project"]["dependencies"] + pyproject["project"]["optional-dependencies"]["weights"]

    def name(requirement: str) -> str:
        return re.split(r"[<>=!~ \[]", requirement, maxsplit=1)[0].lower().replace("_", "-")

    assert {name(r) for r in wanted} <= {name(r.pip) for r in REQUIREMENTS}
    assert missing_requirements() == []  # the test environment has them all


def test_text_helpers():
    assert elapsed_text(4.4) == "4 s" and elapsed_text(125) == "2:05 min"
    assert metric_text({"epoch": 3, "loss": 0.12345, "val_auroc": 0.9312, "elapsed_s": 61}) == (
        "Epoch 3, loss 0.1235, validation AUROC 0.931, 1:01 min"
    )
    info = model_info_text(
        {
            "method": "simpleslicenet",
            "modality": "T1",
            "threshold": 0.42,
            "version": "1.0",
            "source": "bundled",
            "training": {"train_volumes": 40, "epochs_run": 30, "final": {"val_auroc": 0.95}},
        }
    )
    assert info == (
        "simpleslicenet, T1, trained on 40 volumes for 30 epochs, validation AUROC 0.950, "
        "threshold 0.420, v1.0 (bundled)"
    )
    assert "no calibrated threshold" in model_info_text({"method": "u2ad"})
    lesion = {"id": 1, "volume_ml": 1.234, "max_score": 0.98765, "centroid_ras": [1, -2.25, 3]}
    assert lesion_rows([lesion]) == [["1", "1.23", "0.988", "1.0, -2.2, 3.0"]]
    assert lesion_rows([lesion], [0.000938774]) == [["1", "1.23", "0.988", "1.0, -2.2, 3.0", "0.000939"]]
    assert LESION_COLUMNS[UNCERTAINTY_COLUMN] == "Uncertainty" and len(LESION_COLUMNS) == UNCERTAINTY_COLUMN + 1
    with pytest.raises(ValueError, match="2 uncertainty values for 1 lesions"):
        lesion_rows([lesion], [0.1, 0.2])


def test_lesion_csv(tmp_path):
    lesion = {
        "id": 1,
        "voxels": 8,
        "volume_ml": 0.008,
        "centroid_ras": [1.0, 2.0, 3.0],
        "max_score": 0.9,
        "mean_score": 0.7,
    }
    path = write_lesion_csv(tmp_path / "l.csv", [lesion])
    assert path.read_text().splitlines() == [
        "id,voxels,volume_ml,centroid_r,centroid_a,centroid_s,max_score,mean_score",
        "1,8,0.008,1.0,2.0,3.0,0.9,0.7",
    ]
    path = write_lesion_csv(tmp_path / "u.csv", [{**lesion, "mean_uncertainty": 0.002}])
    assert path.read_text().splitlines() == [
        "id,voxels,volume_ml,centroid_r,centroid_a,centroid_s,max_score,mean_score,mean_uncertainty",
        "1,8,0.008,1.0,2.0,3.0,0.9,0.7,0.002",
    ]


def test_plant_lesion_puts_a_bright_sphere_inside_the_brain():
    array = np.zeros((40, 40, 40), np.float32)
    grid = np.indices(array.shape)
    array[np.linalg.norm(grid - 20, axis=0) < 18] = 1.0
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    planted, centre = plant_lesion(array, affine, radius_mm=6.0)
    ijk = np.linalg.solve(affine, [*centre, 1.0])[:3].round().astype(int)
    assert planted[tuple(ijk)] == pytest.approx(1.8)
    assert array.max() == 1.0  # the input is not modified
    assert np.count_nonzero(planted > 1.0) > 0 and np.all(planted[array == 0] == 0)
