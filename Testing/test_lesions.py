"""Thresholded heatmap -> label map and lesion list."""

from __future__ import annotations

import json

import numpy as np
import pytest

from SimpleSliceNetLib.lesions import extract_lesions

AFFINE = np.array([[0.0, 0.0, 2.0, -40.0], [-1.0, 0.0, 0.0, 30.0], [0.0, 1.5, 0.0, -10.0], [0.0, 0.0, 0.0, 1.0]])
VOXEL_ML = 1.0 * 1.5 * 2.0 / 1000


def _heatmap() -> np.ndarray:
    heat = np.zeros((30, 30, 20), np.float32)
    heat[2:6, 3:8, 4:7] = 2.0  # 60 voxels, max 2.5
    heat[3, 4, 5] = 2.5
    heat[20:23, 20:22, 10:12] = 4.0  # 12 voxels, max 4
    heat[10, 25, 1] = 1.5  # a single voxel
    return heat


@pytest.mark.parametrize("layout", [np.ascontiguousarray, np.asfortranarray])  # NIfTI arrays are Fortran-ordered
def test_regions_are_numbered_by_decreasing_maximum_with_world_centroids(layout):
    heat = layout(_heatmap())
    labels, lesions = extract_lesions(heat, AFFINE, threshold=1.0)
    assert labels.dtype == np.uint8 and labels.shape == heat.shape
    assert labels.flags.f_contiguous == heat.flags.f_contiguous  # laid out like the heatmap: written without a copy
    assert [les.id for les in lesions] == [1, 2, 3]
    assert [les.max_score for les in lesions] == [4.0, 2.5, 1.5]
    assert [les.voxels for les in lesions] == [12, 60, 1]
    for lesion in lesions:
        region = labels == lesion.id
        assert region.sum() == lesion.voxels
        assert lesion.volume_ml == pytest.approx(lesion.voxels * VOXEL_ML, abs=1e-4)
        centroid = np.argwhere(region).mean(axis=0)
        np.testing.assert_allclose(lesion.centroid_ras, (AFFINE @ np.append(centroid, 1))[:3], atol=0.01)
        assert lesion.mean_score == pytest.approx(float(heat[region].mean()))
    np.testing.assert_array_equal(labels > 0, heat >= 1.0)
    json.dumps([les.to_dict() for les in lesions])  # plain JSON types


def test_threshold_is_inclusive_and_higher_threshold_keeps_fewer_voxels():
    heat = _heatmap()
    _, at_two = extract_lesions(heat, AFFINE, threshold=2.0)
    assert [les.voxels for les in at_two] == [12, 60]
    _, above = extract_lesions(heat, AFFINE, threshold=2.01)
    assert [les.voxels for les in above] == [12, 1]


def test_brain_mask_and_minimum_volume():
    heat = _heatmap()
    brain = np.ones(heat.shape, bool)
    brain[20:23, 20:22, 10:12] = False
    labels, lesions = extract_lesions(heat, AFFINE, 1.0, brain_mask=brain)
    assert [les.max_score for les in lesions] == [2.5, 1.5]
    assert not labels[~brain].any()
    _, big = extract_lesions(heat, AFFINE, 1.0, min_volume_ml=5 * VOXEL_ML)
    assert [les.voxels for les in big] == [12, 60]


def test_diagonal_neighbours_are_one_region():
    heat = np.zeros((10, 10, 10), np.float32)
    heat[2, 2, 2] = heat[3, 3, 3] = heat[4, 4, 4] = 1.0  # corner to corner: 26-connected
    heat[7, 7, 7] = 1.0
    labels, lesions = extract_lesions(heat, np.eye(4), 0.5)
    assert sorted(les.voxels for les in lesions) == [1, 3]
    assert len(np.unique(labels[heat > 0])) == 2


def test_nothing_above_threshold():
    labels, lesions = extract_lesions(_heatmap(), AFFINE, threshold=10.0)
    assert lesions == [] and not labels.any() and labels.dtype == np.uint8


def test_more_than_255_regions_keep_the_hottest():
    heat = np.zeros((40, 40, 40), np.float32)
    values = np.arange(1, 301, dtype=np.float32)
    positions = [(2 * (i % 20), 2 * ((i // 20) % 20), 2 * (i // 400)) for i in range(300)]
    for value, (x, y, z) in zip(values, positions, strict=True):
        heat[x, y, z + 1] = value
    labels, lesions = extract_lesions(heat, np.eye(4), 0.5)
    assert len(lesions) == 255 and labels.max() == 255
    assert lesions[0].max_score == 300.0 and lesions[-1].max_score == 46.0
    assert (labels > 0).sum() == 255
