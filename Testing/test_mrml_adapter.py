"""The MRML adapter against real slicer-core nodes: geometry, arrays, colours, layers, hierarchy."""

from __future__ import annotations

import numpy as np
import pytest
import slicer
import vtk

from SimpleSliceNetLib import mrml_adapter as mrml

GEOMETRIES = {
    "identity": np.eye(4),
    "anisotropic": np.diag([0.45, 0.45, 5.0, 1.0]),
    # LPS-like: what a DICOM series loaded in Slicer typically has (flipped first two axes).
    "lps": np.array([[-0.9, 0, 0, 110.0], [0, -0.9, 0, 95.5], [0, 0, 1.2, -60.25], [0, 0, 0, 1]]),
}


def oblique_affine() -> np.ndarray:
    angle = np.deg2rad(17.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    tilt = np.deg2rad(8.0)
    rotation = rotation @ np.array([[1, 0, 0], [0, np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 1.1, 3.3])
    affine[:3, 3] = [-12.345678, 40.5, 7.0000001]
    return affine


GEOMETRIES["oblique"] = oblique_affine()


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def add_volume(scene, array: np.ndarray, affine: np.ndarray, name: str = "T1"):
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    scene.AddNode(node)
    mrml.update_node_from_array(node, array, affine)
    return node


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_array_and_geometry_round_trip(scene, geometry):
    affine = GEOMETRIES[geometry]
    array = np.random.default_rng(0).random((13, 17, 9)).astype(np.float32)
    node = add_volume(scene, array, affine)
    assert node.GetImageData().GetDimensions() == (13, 17, 9)
    np.testing.assert_array_equal(mrml.array_from_node(node), array)
    np.testing.assert_allclose(mrml.ijk_to_ras(node), affine, rtol=0, atol=1e-12)
    np.testing.assert_allclose(node.GetSpacing(), np.linalg.norm(affine[:3, :3], axis=0), atol=1e-12)
    # Voxel (i, j, k) of the array is where Slicer places IJK (i, j, k).
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ras = matrix.MultiplyPoint((3, 5, 7, 1))
    np.testing.assert_allclose(ras[:3], (affine @ [3, 5, 7, 1])[:3], atol=1e-9)


def test_copy_geometry_is_exact_and_keeps_parent_transform(scene):
    source = add_volume(scene, np.zeros((8, 9, 10), np.float32), GEOMETRIES["oblique"])
    transform = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(transform)
    source.SetAndObserveTransformNodeID(transform.GetID())
    target = slicer.vtkMRMLScalarVolumeNode()
    scene.AddNode(target)
    mrml.copy_geometry(source, target)
    assert np.array_equal(mrml.ijk_to_ras(target), mrml.ijk_to_ras(source))
    assert target.GetTransformNodeID() == transform.GetID()


def test_array_from_node_is_a_copy_and_rejects_vectors(scene):
    node = add_volume(scene, np.ones((8, 8, 8), np.float32), np.eye(4))
    copy = mrml.array_from_node(node)
    copy[:] = 5
    assert mrml.array_from_node(node).max() == 1
    rgb = slicer.vtkMRMLVectorVolumeNode()
    scene.AddNode(rgb)
    slicer.util.updateVolumeFromArray(rgb, np.zeros((8, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="3 components"):
        mrml.array_from_node(rgb)
    with pytest.raises(ValueError, match="no voxels"):
        empty = slicer.vtkMRMLScalarVolumeNode()
        scene.AddNode(empty)
        mrml.array_from_node(empty)


def test_inferno_table_is_dark_to_bright_and_shared(scene):
    colors = mrml.anchor_colors(mrml.INFERNO_ANCHORS, 256)
    luminance = colors @ [0.2126, 0.7152, 0.0722]
    assert np.all(np.diff(luminance) > -1e-3)  # perceptually ordered: brighter means more anomalous
    assert luminance[0] < 0.02 and luminance[-1] > 0.9
    node = mrml.heatmap_color_node(scene)
    assert node.GetNumberOfColors() == 256 and node.GetName() == "SimpleSliceNet Inferno"
    rgba = [0.0] * 4
    node.GetColor(255, rgba)
    np.testing.assert_allclose(rgba[:3], colors[255], atol=1 / 255)  # stored as 8-bit
    assert mrml.heatmap_color_node(scene) is node  # one table per scene


def test_uncertainty_table_is_its_own_ordered_table(scene):
    heatmap_table = mrml.heatmap_color_node(scene)
    node = mrml.uncertainty_color_node(scene)
    assert node is not heatmap_table and node.GetName() == "SimpleSliceNet Viridis"
    assert node.GetAttribute(mrml.COLOR_ATTRIBUTE) == "viridis" and node.GetNumberOfColors() == 256
    colors = mrml.anchor_colors(mrml.VIRIDIS_ANCHORS, 256)
    luminance = colors @ [0.2126, 0.7152, 0.0722]
    assert np.all(np.diff(luminance) > -1e-3) and luminance[-1] - luminance[0] > 0.6
    table, heat = [0.0] * 4, [0.0] * 4
    for index in (0, 128, 255):
        node.GetColor(index, table)
        np.testing.assert_allclose(table[:3], colors[index], atol=1 / 255)
        heatmap_table.GetColor(index, heat)
        assert np.abs(np.subtract(table[:3], heat[:3])).max() > 0.2  # visibly not the heatmap's colours
    assert mrml.uncertainty_color_node(scene) is node
    assert scene.GetNodesByClass("vtkMRMLColorTableNode").GetNumberOfItems() == 2


def test_lesion_table_has_transparent_background_and_named_lesions(scene):
    node = mrml.lesion_color_node(scene)
    rgba = [0.0] * 4
    node.GetColor(0, rgba)
    assert rgba[3] == 0.0
    node.GetColor(1, rgba)
    assert rgba[3] == 1.0 and node.GetColorName(1) == "lesion 1"
    assert node.GetColorName(0) == "background"
    assert mrml.lesion_color_node(scene) is node


def test_output_nodes_are_named_tagged_and_found_again(scene):
    t1 = add_volume(scene, np.zeros((8, 8, 8), np.float32), np.eye(4), name="Patient T1")
    heatmap = mrml.new_output_node(t1, mrml.HEATMAP_ROLE)
    label = mrml.new_output_node(t1, mrml.LABEL_ROLE)
    assert heatmap.GetName() == "Patient T1 anomaly heatmap" and heatmap.IsA("vtkMRMLScalarVolumeNode")
    assert label.GetName() == "Patient T1 anomaly lesions" and label.IsA("vtkMRMLLabelMapVolumeNode")
    assert mrml.find_output_node(t1, mrml.HEATMAP_ROLE) is None
    for node, role in ((heatmap, mrml.HEATMAP_ROLE), (label, mrml.LABEL_ROLE)):
        scene.AddNode(node)
        mrml.tag_output_node(node, t1, role)
    assert mrml.find_output_node(t1, mrml.HEATMAP_ROLE) is heatmap
    assert mrml.find_output_node(t1, mrml.LABEL_ROLE) is label
    other = add_volume(scene, np.zeros((8, 8, 8), np.float32), np.eye(4), name="Other")
    assert mrml.find_output_node(other, mrml.HEATMAP_ROLE) is None


def test_uncertainty_outputs_are_scalar_volumes_found_from_their_heatmap(scene):
    t1 = add_volume(scene, np.zeros((8, 8, 8), np.float32), np.eye(4), name="Patient T1")
    heatmap = mrml.new_output_node(t1, mrml.HEATMAP_ROLE)
    scene.AddNode(heatmap)
    mrml.tag_output_node(heatmap, t1, mrml.HEATMAP_ROLE)
    assert mrml.sibling_output_node(heatmap, mrml.UNCERTAINTY_ROLE) is None
    made = {}
    for role, name in ((mrml.UNCERTAINTY_ROLE, "Patient T1 uncertainty"),
                       (mrml.ALEATORIC_ROLE, "Patient T1 aleatoric uncertainty")):
        node = made[role] = mrml.new_output_node(t1, role)
        assert node.GetName() == name and node.IsA("vtkMRMLScalarVolumeNode")
        assert not node.IsA("vtkMRMLLabelMapVolumeNode")
        scene.AddNode(node)
        mrml.tag_output_node(node, t1, role)
    for role, node in made.items():
        assert mrml.find_output_node(t1, role) is node
        assert mrml.sibling_output_node(heatmap, role) is node
    assert mrml.find_output_node(t1, mrml.HEATMAP_ROLE) is heatmap  # roles do not mix
    assert mrml.sibling_output_node(t1, mrml.UNCERTAINTY_ROLE) is None  # the input is no output


def test_remove_node_takes_its_display_node_along(scene):
    node = add_volume(scene, np.ones((8, 8, 8), np.float32), np.eye(4), name="u")
    mrml.style_uncertainty(node, np.ones((8, 8, 8), np.float32))
    display_id = node.GetDisplayNodeID()
    mrml.remove_node(node)
    assert scene.GetNodeByID(display_id) is None and scene.GetNodeByID(node.GetID()) is None
    assert scene.GetNodesByClass("vtkMRMLColorTableNode").GetNumberOfItems() == 1  # shared table stays


def test_heatmap_style_fixed_window_colour_and_transparent_background(scene):
    heatmap = np.zeros((10, 10, 10), np.float32)
    heatmap[4:6, 4:6, 4:6] = 0.8
    node = add_volume(scene, heatmap, np.eye(4), name="h")
    mrml.style_heatmap(node, heatmap)
    display = node.GetDisplayNode()
    assert display.GetColorNode().GetAttribute(mrml.COLOR_ATTRIBUTE) == "inferno"
    assert not display.GetAutoWindowLevel()
    assert display.GetWindowLevelMin() == pytest.approx(0.0) and display.GetWindowLevelMax() == pytest.approx(1.0)
    assert display.GetApplyThreshold() and 0.0 < display.GetLowerThreshold() < 0.1
    mrml.style_heatmap(node, heatmap * 3)  # scores beyond 1 widen the window
    assert display.GetWindowLevelMax() == pytest.approx(2.4)
    mrml.style_heatmap(node, heatmap * 3, threshold=1.5)  # with a threshold: fixed [0, 2 * threshold]
    assert display.GetWindowLevelMin() == pytest.approx(0.0) and display.GetWindowLevelMax() == pytest.approx(3.0)
    assert display.GetUpperThreshold() > 2.4  # the hottest voxels stay visible
    assert node.GetDisplayNode() is display


def test_uncertainty_style_robust_window_own_colours_and_transparent_background(scene):
    values = np.zeros((20, 20, 20), np.float32)
    values[2:18, 2:18, 2:18] = np.random.default_rng(0).uniform(0.0, 2e-3, (16, 16, 16))
    values[10, 10, 10] = 5.0  # one extreme voxel must not set the scale
    node = add_volume(scene, values, np.eye(4), name="u")
    mrml.style_uncertainty(node, values)
    display = node.GetDisplayNode()
    assert display.GetColorNode().GetAttribute(mrml.COLOR_ATTRIBUTE) == "viridis"
    assert not display.GetAutoWindowLevel() and display.GetWindowLevelMin() == 0.0
    assert display.GetWindowLevelMax() == pytest.approx(np.percentile(values[values > 0], 99.5), rel=1e-6)
    assert display.GetWindowLevelMax() < 2.1e-3
    assert display.GetApplyThreshold() and 0.0 < display.GetLowerThreshold() < 1e-4  # zero is see-through
    assert display.GetUpperThreshold() > 5.0  # the extreme voxel stays visible (saturated)
    assert mrml.uncertainty_window(np.zeros((4, 4, 4))) == (0.0, 1.0)


def test_label_style_uses_lesion_colours(scene):
    label = slicer.vtkMRMLLabelMapVolumeNode()
    scene.AddNode(label)
    mrml.update_node_from_array(label, np.zeros((8, 8, 8), np.uint8), np.eye(4))
    mrml.style_label(label)
    assert label.GetDisplayNode().IsA("vtkMRMLLabelMapVolumeDisplayNode")
    assert label.GetDisplayNode().GetColorNode().GetAttribute(mrml.COLOR_ATTRIBUTE) == "lesions"


def test_slice_view_layers_only_where_views_exist(scene):
    t1 = add_volume(scene, np.zeros((8, 8, 8), np.float32), np.eye(4))
    heatmap = add_volume(scene, np.zeros((8, 8, 8), np.float32), np.eye(4), name="h")
    label = slicer.vtkMRMLLabelMapVolumeNode()
    scene.AddNode(label)
    assert mrml.show_in_slice_views(t1, heatmap, label) == 0  # no GUI: nothing to change, no error
    composites = []
    for view in ("Red", "Green", "Yellow"):
        composite = slicer.vtkMRMLSliceCompositeNode()
        composite.SetLayoutName(view)
        scene.AddNode(composite)
        composites.append(composite)
    assert mrml.show_in_slice_views(t1, heatmap, label, foreground_opacity=0.4) == 3
    for composite in composites:
        assert composite.GetBackgroundVolumeID() == t1.GetID()
        assert composite.GetForegroundVolumeID() == heatmap.GetID()
        assert composite.GetLabelVolumeID() == label.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.4)
    mrml.set_foreground_opacity(scene, 0.75)
    assert all(c.GetForegroundOpacity() == pytest.approx(0.75) for c in composites)


def test_jump_slices_centres_views_on_a_point(scene):
    slices = []
    for view, orientation in (("Red", "Axial"), ("Green", "Coronal"), ("Yellow", "Sagittal")):
        node = slicer.vtkMRMLSliceNode()
        node.SetLayoutName(view)
        node.SetOrientation(orientation)
        scene.AddNode(node)
        slices.append(node)
    mrml.jump_slices_to(scene, (12.5, -30.0, 44.0))
    for node in slices:
        matrix = vtk.vtkMatrix4x4()
        matrix.DeepCopy(node.GetSliceToRAS())
        np.testing.assert_allclose([matrix.GetElement(r, 3) for r in range(3)], (12.5, -30.0, 44.0), atol=1e-6)


def test_outputs_are_placed_in_the_inputs_study(scene):
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient")
    study = hierarchy.CreateStudyItem(patient, "MR Brain")
    t1 = add_volume(scene, np.zeros((8, 8, 8), np.float32), np.eye(4))
    hierarchy.CreateItem(study, t1)
    heatmap = add_volume(scene, np.zeros((8, 8, 8), np.float32), np.eye(4), name="h")
    label = slicer.vtkMRMLLabelMapVolumeNode()
    scene.AddNode(label)
    hierarchy.CreateItem(hierarchy.GetSceneItemID(), label)  # already in the hierarchy elsewhere
    mrml.place_in_study(t1, [heatmap, label])
    for node in (heatmap, label):
        assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == study


def test_outputs_stay_put_when_the_input_has_no_study(scene):
    t1 = add_volume(scene, np.zeros((8, 8, 8), np.float32), np.eye(4))
    heatmap = add_volume(scene, np.zeros((8, 8, 8), np.float32), np.eye(4), name="h")
    mrml.place_in_study(t1, [heatmap])  # no hierarchy item for the input: nothing happens
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    assert hierarchy.GetItemByDataNode(heatmap) == 0
