"""MRML side of the Slicer module: volume nodes <-> (array, affine), display, colours, layout.

Uses only the MRML API (``slicer.vtkMRML*`` and ``slicer.util`` array helpers), so it works in
the Slicer application and with the PyPI package ``slicer-core`` alike. Arrays here follow the
engine's convention: ``array[i, j, k]`` with a 4x4 IJK-to-RAS ``affine`` (Slicer's own numpy
views are ``[k, j, i]``).
"""

from __future__ import annotations

import numpy as np
import slicer
import vtk

# Node attributes and references that tie outputs to their input, so re-runs find them.
ROLE_ATTRIBUTE = "SimpleSliceNet.Role"
INPUT_REFERENCE_ROLE = "simpleSliceNetInput"
COLOR_ATTRIBUTE = "SimpleSliceNet.ColorTable"
HEATMAP_ROLE = "heatmap"
LABEL_ROLE = "label"
# Extra maps of models that give them (U2AD); the roles are the engine's output keys.
UNCERTAINTY_ROLE = "uncertainty"
ALEATORIC_ROLE = "aleatoric"
UNCERTAINTY_ROLES = (UNCERTAINTY_ROLE, ALEATORIC_ROLE)
ROLE_NAMES = {
    HEATMAP_ROLE: "anomaly heatmap",
    LABEL_ROLE: "anomaly lesions",
    UNCERTAINTY_ROLE: "uncertainty",
    ALEATORIC_ROLE: "aleatoric uncertainty",
}

# matplotlib's "inferno" sampled at 17 evenly spaced points (perceptually uniform, colour-blind
# safe, dark = normal); interpolated to 256 entries. Slicer ships no such table.
INFERNO_ANCHORS = (
    (0.001, 0.000, 0.014),
    (0.042, 0.028, 0.141),
    (0.129, 0.047, 0.291),
    (0.238, 0.037, 0.396),
    (0.342, 0.062, 0.429),
    (0.441, 0.099, 0.432),
    (0.541, 0.135, 0.415),
    (0.640, 0.171, 0.381),
    (0.736, 0.216, 0.330),
    (0.822, 0.275, 0.266),
    (0.894, 0.353, 0.194),
    (0.947, 0.449, 0.115),
    (0.978, 0.558, 0.035),
    (0.988, 0.675, 0.065),
    (0.975, 0.798, 0.206),
    (0.948, 0.917, 0.411),
    (0.988, 0.998, 0.645),
)

# matplotlib's "viridis" sampled the same way, for uncertainty maps: also perceptually uniform and
# colour-blind safe, but visibly not the heatmap (dark purple = certain).
VIRIDIS_ANCHORS = (
    (0.267, 0.005, 0.329),
    (0.282, 0.095, 0.417),
    (0.279, 0.175, 0.483),
    (0.259, 0.252, 0.525),
    (0.230, 0.322, 0.546),
    (0.199, 0.388, 0.555),
    (0.173, 0.449, 0.558),
    (0.149, 0.508, 0.557),
    (0.128, 0.567, 0.551),
    (0.121, 0.626, 0.533),
    (0.158, 0.684, 0.502),
    (0.246, 0.739, 0.452),
    (0.369, 0.789, 0.383),
    (0.516, 0.831, 0.294),
    (0.678, 0.864, 0.190),
    (0.846, 0.887, 0.100),
    (0.993, 0.906, 0.144),
)

# Distinct, saturated lesion colours (cycled), readable over grey MRI.
LESION_COLORS = (
    (0.90, 0.10, 0.10),
    (0.10, 0.75, 0.95),
    (0.95, 0.85, 0.10),
    (0.20, 0.85, 0.25),
    (0.95, 0.45, 0.05),
    (0.75, 0.30, 0.95),
    (0.95, 0.35, 0.70),
    (0.55, 0.90, 0.85),
)


# -- geometry ------------------------------------------------------------------------------


def ijk_to_ras(node: slicer.vtkMRMLVolumeNode) -> np.ndarray:
    """The node's 4x4 IJK-to-RAS matrix (exact: read from the node, not from a file)."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def set_ijk_to_ras(node: slicer.vtkMRMLVolumeNode, affine: np.ndarray) -> None:
    """Set origin, spacing and directions from a 4x4 IJK-to-RAS matrix."""
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(affine[r, c]))
    node.SetIJKToRASMatrix(matrix)


def copy_geometry(source: slicer.vtkMRMLVolumeNode, target: slicer.vtkMRMLVolumeNode) -> None:
    """Give ``target`` exactly the IJK-to-RAS geometry (and parent transform) of ``source``."""
    set_ijk_to_ras(target, ijk_to_ras(source))
    target.SetAndObserveTransformNodeID(source.GetTransformNodeID())


def array_from_node(node: slicer.vtkMRMLVolumeNode) -> np.ndarray:
    """A copy of the voxels as ``array[i, j, k]`` (the node is never modified)."""
    if node.GetImageData() is None:
        raise ValueError(f"volume '{node.GetName()}' has no voxels")
    components = node.GetImageData().GetNumberOfScalarComponents()
    if components != 1:
        raise ValueError(f"volume '{node.GetName()}' has {components} components per voxel; a scalar volume is needed")
    return np.array(slicer.util.arrayFromVolume(node).transpose(2, 1, 0), copy=True)


def volume_from_node(node: slicer.vtkMRMLVolumeNode) -> tuple[np.ndarray, np.ndarray]:
    """``(array[i, j, k], ijk_to_ras)`` of a scalar volume node."""
    return array_from_node(node), ijk_to_ras(node)


def update_node_from_array(node: slicer.vtkMRMLVolumeNode, array: np.ndarray, affine: np.ndarray) -> None:
    """Replace the voxels (``array[i, j, k]``) and geometry of ``node`` in one update."""
    if array.ndim != 3:
        raise ValueError(f"a 3D array is needed, got shape {array.shape}")
    was_modifying = node.StartModify()
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array.transpose(2, 1, 0)))
    set_ijk_to_ras(node, affine)
    node.EndModify(was_modifying)


# -- colour tables -------------------------------------------------------------------------


def _find_color_node(scene: slicer.vtkMRMLScene, key: str) -> slicer.vtkMRMLColorTableNode | None:
    nodes = scene.GetNodesByClass("vtkMRMLColorTableNode")
    for index in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(index)
        if node.GetAttribute(COLOR_ATTRIBUTE) == key:
            return node
    return None


def anchor_colors(anchors: tuple[tuple[float, float, float], ...], count: int = 256) -> np.ndarray:
    """``count`` RGB rows interpolated along evenly spaced ``anchors`` (e.g. :data:`INFERNO_ANCHORS`)."""
    points = np.asarray(anchors)
    positions = np.linspace(0.0, 1.0, len(points))
    samples = np.linspace(0.0, 1.0, count)
    return np.stack([np.interp(samples, positions, points[:, c]) for c in range(3)], axis=1)


def continuous_color_node(
    scene: slicer.vtkMRMLScene, key: str, anchors: tuple[tuple[float, float, float], ...]
) -> slicer.vtkMRMLColorTableNode:
    """The scene's 256-entry colour table ``key`` interpolated along ``anchors``, created once per scene."""
    node = _find_color_node(scene, key)
    if node is not None:
        return node
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(scene.GenerateUniqueName(f"SimpleSliceNet {key.capitalize()}"))
    node.SetAttribute(COLOR_ATTRIBUTE, key)
    node.SetTypeToUser()
    node.SetHideFromEditors(False)
    colors = anchor_colors(anchors, 256)
    node.SetNumberOfColors(len(colors))
    for index, (r, g, b) in enumerate(colors):
        node.SetColor(index, f"{key} {index}", float(r), float(g), float(b), 1.0)
    scene.AddNode(node)
    return node


def heatmap_color_node(scene: slicer.vtkMRMLScene) -> slicer.vtkMRMLColorTableNode:
    """The scene's inferno-like table for anomaly heatmaps."""
    return continuous_color_node(scene, "inferno", INFERNO_ANCHORS)


def uncertainty_color_node(scene: slicer.vtkMRMLScene) -> slicer.vtkMRMLColorTableNode:
    """The scene's viridis-like table for uncertainty maps (epistemic and aleatoric share it)."""
    return continuous_color_node(scene, "viridis", VIRIDIS_ANCHORS)


def lesion_color_node(scene: slicer.vtkMRMLScene) -> slicer.vtkMRMLColorTableNode:
    """The scene's discrete lesion table: 0 transparent background, 1..255 named lesions."""
    node = _find_color_node(scene, "lesions")
    if node is not None:
        return node
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(scene.GenerateUniqueName("SimpleSliceNet Lesions"))
    node.SetAttribute(COLOR_ATTRIBUTE, "lesions")
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    node.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
    for index in range(1, 256):
        r, g, b = LESION_COLORS[(index - 1) % len(LESION_COLORS)]
        node.SetColor(index, f"lesion {index}", r, g, b, 1.0)
    scene.AddNode(node)
    return node


# -- output nodes --------------------------------------------------------------------------


def find_output_node(input_node: slicer.vtkMRMLVolumeNode, role: str) -> slicer.vtkMRMLVolumeNode | None:
    """The output node of ``role`` (heatmap, label, uncertainty...) an earlier run made for ``input_node``."""
    scene = input_node.GetScene()
    class_name = "vtkMRMLLabelMapVolumeNode" if role == LABEL_ROLE else "vtkMRMLScalarVolumeNode"
    nodes = scene.GetNodesByClass(class_name)
    for index in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(index)
        if (
            node.GetAttribute(ROLE_ATTRIBUTE) == role
            and node.GetNodeReferenceID(INPUT_REFERENCE_ROLE) == input_node.GetID()
        ):
            return node
    return None


def sibling_output_node(output_node: slicer.vtkMRMLVolumeNode, role: str) -> slicer.vtkMRMLVolumeNode | None:
    """The output of ``role`` made from the same input as ``output_node`` (e.g. a heatmap's uncertainty)."""
    input_node = output_node.GetNodeReference(INPUT_REFERENCE_ROLE)
    return find_output_node(input_node, role) if input_node is not None else None


def output_name(input_node: slicer.vtkMRMLVolumeNode, role: str) -> str:
    return f"{input_node.GetName()} {ROLE_NAMES[role]}"


def new_output_node(input_node: slicer.vtkMRMLVolumeNode, role: str) -> slicer.vtkMRMLVolumeNode:
    """A new (not yet added) output node of ``role`` named after ``input_node``."""
    node = slicer.vtkMRMLLabelMapVolumeNode() if role == LABEL_ROLE else slicer.vtkMRMLScalarVolumeNode()
    node.SetName(input_node.GetScene().GenerateUniqueName(output_name(input_node, role)))
    return node


def tag_output_node(node: slicer.vtkMRMLVolumeNode, input_node: slicer.vtkMRMLVolumeNode, role: str) -> None:
    node.SetAttribute(ROLE_ATTRIBUTE, role)
    node.SetNodeReferenceID(INPUT_REFERENCE_ROLE, input_node.GetID())


def remove_node(node: slicer.vtkMRMLDisplayableNode) -> None:
    """Remove ``node`` with its display and storage nodes (the scene alone would leave them behind)."""
    scene = node.GetScene()
    helpers = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    helpers += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
    for helper in helpers:
        if helper is not None:
            scene.RemoveNode(helper)
    scene.RemoveNode(node)


def ensure_display_node(node: slicer.vtkMRMLVolumeNode) -> slicer.vtkMRMLVolumeDisplayNode:
    display = node.GetDisplayNode()
    if display is None:
        is_label = node.IsA("vtkMRMLLabelMapVolumeNode")
        display = slicer.vtkMRMLLabelMapVolumeDisplayNode() if is_label else slicer.vtkMRMLScalarVolumeDisplayNode()
        node.GetScene().AddNode(display)
        node.SetAndObserveDisplayNodeID(display.GetID())
    return display


def heatmap_window(heatmap: np.ndarray, threshold: float | None = None) -> tuple[float, float]:
    """Display range ``[0, 2 * threshold]``: the model's threshold sits mid-scale, so the same model
    colours every case alike. Without a positive threshold: ``[0, max(1, heatmap max)]``."""
    if threshold is not None and threshold > 0:
        return 0.0, 2.0 * float(threshold)
    upper = float(np.max(heatmap)) if heatmap.size else 1.0
    return 0.0, max(1.0, upper)


def uncertainty_window(values: np.ndarray) -> tuple[float, float]:
    """Display range ``[0, 99.5th percentile of the positive voxels]`` (1 when none): uncertainty has no
    calibrated scale, and a few extreme voxels must not wash out the rest."""
    positive = values[values > 0]
    return 0.0, float(np.percentile(positive, 99.5)) if positive.size else 1.0


def _style_overlay(
    node: slicer.vtkMRMLScalarVolumeNode, values: np.ndarray, color: slicer.vtkMRMLColorTableNode, window: tuple
) -> None:
    """Colours, a fixed window, and see-through voxels in the lowest 2% of it (background, normal tissue)."""
    display = ensure_display_node(node)
    lower, upper = window
    was_modifying = display.StartModify()
    display.SetAndObserveColorNodeID(color.GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(lower, upper)
    display.AutoThresholdOff()
    display.SetThreshold(lower + 0.02 * (upper - lower), max(upper, float(np.max(values, initial=upper))) + 1.0)
    display.ApplyThresholdOn()
    display.SetInterpolate(True)
    display.EndModify(was_modifying)


def style_heatmap(node: slicer.vtkMRMLScalarVolumeNode, heatmap: np.ndarray, threshold: float | None = None) -> None:
    """Inferno colours in the window of :func:`heatmap_window`; background and normal tissue see-through."""
    _style_overlay(node, heatmap, heatmap_color_node(node.GetScene()), heatmap_window(heatmap, threshold))


def style_uncertainty(node: slicer.vtkMRMLScalarVolumeNode, values: np.ndarray) -> None:
    """Viridis colours in the window of :func:`uncertainty_window`; background and certain voxels see-through."""
    _style_overlay(node, values, uncertainty_color_node(node.GetScene()), uncertainty_window(values))


def style_label(node: slicer.vtkMRMLLabelMapVolumeNode) -> None:
    display = ensure_display_node(node)
    display.SetAndObserveColorNodeID(lesion_color_node(node.GetScene()).GetID())


def place_in_study(input_node: slicer.vtkMRMLNode, nodes: list[slicer.vtkMRMLNode]) -> None:
    """Put ``nodes`` beside ``input_node`` in the subject hierarchy (its study), when it has one."""
    scene = input_node.GetScene()
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return
    input_item = hierarchy.GetItemByDataNode(input_node)
    if not input_item:
        return
    parent = hierarchy.GetItemParent(input_item)
    if not parent or parent == hierarchy.GetSceneItemID():
        return
    for node in nodes:
        item = hierarchy.GetItemByDataNode(node)
        if item:
            hierarchy.SetItemParent(item, parent)
        else:
            hierarchy.CreateItem(parent, node)


def show_in_slice_views(
    background: slicer.vtkMRMLVolumeNode | None,
    foreground: slicer.vtkMRMLVolumeNode | None,
    label: slicer.vtkMRMLVolumeNode | None,
    foreground_opacity: float = 0.5,
) -> int:
    """Set the layers of every slice view in the scene; returns how many views were changed.

    Works on the slice composite nodes directly (what ``slicer.util.setSliceViewerLayers``
    does), so it is a no-op without a GUI, where the scene has no slice views.
    """
    scene = next(n.GetScene() for n in (background, foreground, label) if n is not None)
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for index in range(composites.GetNumberOfItems()):
        composite = composites.GetItemAsObject(index)
        if background is not None:
            composite.SetBackgroundVolumeID(background.GetID())
        if foreground is not None:
            composite.SetForegroundVolumeID(foreground.GetID())
            composite.SetForegroundOpacity(foreground_opacity)
        if label is not None:
            composite.SetLabelVolumeID(label.GetID())
    return composites.GetNumberOfItems()


def set_foreground_opacity(scene: slicer.vtkMRMLScene, opacity: float) -> None:
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for index in range(composites.GetNumberOfItems()):
        composites.GetItemAsObject(index).SetForegroundOpacity(opacity)


def jump_slices_to(scene: slicer.vtkMRMLScene, ras: list[float] | tuple[float, float, float]) -> None:
    """Centre every slice view on the RAS point (e.g. a lesion centroid)."""
    r, a, s = (float(v) for v in ras)
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, r, a, s, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
