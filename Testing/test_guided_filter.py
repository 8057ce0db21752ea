"""The guided refinement of heatmaps: it follows the image's edges, keeps flat maps flat, ignores background."""

from __future__ import annotations

import numpy as np

from SimpleSliceNetLib.guided_filter import Guide, refine
from SimpleSliceNetLib.preprocess import GridMapping

SHAPE = (32, 32, 16)  # model grid; the map grid is 2x coarser
FACTOR = 2
# The input grid is the model grid itself.
MAPPING = GridMapping(np.eye(4), SHAPE, np.eye(4), SHAPE).coarse(FACTOR)


def _refine(values: np.ndarray, image: np.ndarray, brain: np.ndarray, radius=(2, 2, 2), eps=1e-3) -> np.ndarray:
    """Refine a map-grid ``values`` by ``image`` (input grid)."""
    guide = Guide.of(image, brain, FACTOR, image, (0.0, 1.0), brain)
    return refine(values.astype(np.float32), guide, MAPPING, brain, radius, eps)


def _coarse_to_fine(values: np.ndarray, brain: np.ndarray) -> np.ndarray:
    return MAPPING.to_input(values, where=brain)


def test_a_blurred_map_follows_a_sharp_edge_of_the_image():
    brain = np.ones(SHAPE, bool)
    x = np.arange(SHAPE[0])[:, None, None] * np.ones(SHAPE)
    image = np.where(x >= 16, 0.8, 0.3).astype(np.float32)  # a lesion boundary at x = 15.5
    truth = (x >= 16).astype(np.float32)
    xc = np.arange(SHAPE[0] // FACTOR)[:, None, None] * np.ones([n // FACTOR for n in SHAPE])
    blurred = 1.0 / (1.0 + np.exp(-(xc - 7.5) / 1.5))  # the model's map: right place, soft border
    before, after = _coarse_to_fine(blurred, brain), _refine(blurred, image, brain)
    # The jump across the boundary is several times steeper, at the boundary itself (not moved) ...
    # (Away from the grid's outer half voxel, where linear resampling fades every map to 0.)
    inner = (slice(1, -1), slice(1, -1))
    jump_before = (before[16] - before[15])[inner]
    jump_after = (after[16] - after[15])[inner]
    assert np.all(jump_after > 3 * jump_before)
    assert np.all(after[15][inner] < 0.5) and np.all(after[16][inner] > 0.5)
    # ... and the map is closer to the true mask next to it.
    near = np.abs(x - 15.5) < 3
    assert np.abs(after - truth)[near].mean() < 0.85 * np.abs(before - truth)[near].mean()


def test_a_flat_map_stays_flat_and_the_background_is_no_edge():
    rng = np.random.default_rng(0)
    brain = np.zeros(SHAPE, bool)
    brain[4:28, 5:27, 3:13] = True
    image = np.where(brain, rng.uniform(0.2, 1.0, SHAPE), 0.0).astype(np.float32)
    flat = np.full([n // FACTOR for n in SHAPE], 1.7, np.float32)
    refined = _refine(flat, image, brain)
    np.testing.assert_allclose(refined[brain], 1.7, atol=1e-5)
    assert np.all(refined[~brain] == 0)


def test_windows_without_intensity_change_keep_the_model_map():
    # Uniform tissue: the fit has nothing to follow, so the map is only averaged over the window.
    brain = np.ones(SHAPE, bool)
    image = np.full(SHAPE, 0.6, np.float32)
    values = np.random.default_rng(1).normal(size=[n // FACTOR for n in SHAPE]).astype(np.float32)
    refined = _refine(values, image, brain, radius=(1, 1, 1))
    from scipy import ndimage

    def window_mean(x: np.ndarray) -> np.ndarray:  # over the 3x3x3 window's voxels inside the grid
        return ndimage.uniform_filter(x, 3, mode="constant") / ndimage.uniform_filter(np.ones_like(x), 3,
                                                                                      mode="constant")

    np.testing.assert_allclose(refined, _coarse_to_fine(window_mean(window_mean(values)), brain), atol=1e-5)
