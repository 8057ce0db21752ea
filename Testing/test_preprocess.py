"""Model-grid mapping and its exact inverse on RAS, LPS, oblique and anisotropic inputs; brain mask,
coverage, normalisation and the errors for volumes that are not brain MRI."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BRAIN_AXES, BRAIN_CENTRE, grid_affine, phantom, rotation, world_coordinates
from scipy import ndimage

from SimpleSliceNetLib.arrays import filled_at, values_at
from SimpleSliceNetLib.errors import VolumeError
from SimpleSliceNetLib.preprocess import (
    ALIGN_SCALE_RANGE,
    ALIGNS,
    REFERENCE_SD_MM,
    SUPERIOR_MARGIN_MM,
    GridMapping,
    PreprocessConfig,
    _brain_axes,
    _covered,
    _grid_sample_threaded,
    _thread_grid,
    model_affine,
    preprocess,
)
from SimpleSliceNetLib.volume_io import Volume

CONFIG = PreprocessConfig(shape=(64, 64, 48), spacing=(2.5, 2.5, 3.0))
BLOBS = [((20.0, 10.0, 25.0), 1.0), ((-30.0, -22.0, 4.0), 1.0), ((6.0, -45.0, 31.0), 1.0), ((-8.0, 30.0, -10.0), 1.0)]
SIGMA = 5.0

# name -> (shape, affine): every grid covers the phantom's brain with some margin.
GRIDS = {
    "ras_1p5mm": ((100, 120, 90), grid_affine((100, 120, 90), (1.5, 1.5, 1.5), centre_ras=(2.0, -4.0, 11.0))),
    "lps_aniso": ((140, 180, 52), grid_affine((140, 180, 52), (1.0, 1.0, 2.5), np.diag([-1.0, -1.0, 1.0]),
                                              (-3.0, -6.0, 14.0))),
    "oblique_aniso": ((150, 140, 50), grid_affine((150, 140, 50), (1.1, 1.3, 3.0), rotation((0.4, -0.3, 0.85), 13.0),
                                                  (1.0, -5.0, 12.0))),
    "permuted_sagittal": ((60, 150, 120), grid_affine((60, 150, 120), (2.5, 1.2, 1.1),
                                                      np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], float).T,
                                                      (0.0, -5.0, 12.0))),
}


def blob_field(shape, affine) -> np.ndarray:
    """Smooth Gaussian blobs (sigma 5 mm, peak 1) at the known RAS positions, sampled on a grid."""
    ras = world_coordinates(shape, affine)
    out = np.zeros(shape)
    for centre, amplitude in BLOBS:
        out += amplitude * np.exp(-((ras - np.asarray(centre)) ** 2).sum(-1) / (2 * SIGMA**2))
    return out.astype(np.float32)


def blob_centres(field: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World position of each blob in ``field``: intensity-weighted centroid within 9 mm of the known centre."""
    ras = world_coordinates(field.shape, affine)
    found = []
    for centre, _ in BLOBS:
        near = ((ras - np.asarray(centre)) ** 2).sum(-1) < 9.0**2
        weight = np.clip(field[near], 0, None) ** 2
        assert weight.sum() > 0, f"no signal near {centre}"
        found.append((ras[near] * weight[:, None]).sum(0) / weight.sum())
    return np.array(found)


def mapping_for(grid: str, config: PreprocessConfig = CONFIG) -> GridMapping:
    shape, affine = GRIDS[grid]
    return GridMapping(affine, shape, model_affine(config, BRAIN_CENTRE), config.shape)


def true_centres() -> np.ndarray:
    return np.array([c for c, _ in BLOBS])


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_to_model_puts_world_points_at_the_same_world_points(grid):
    mapping = mapping_for(grid)
    on_model = mapping.to_model(blob_field(mapping.input_shape, mapping.input_affine))
    assert on_model.shape == CONFIG.shape
    expected = blob_field(CONFIG.shape, mapping.model_affine)
    np.testing.assert_allclose(on_model, expected, atol=0.06)
    np.testing.assert_allclose(blob_centres(on_model, mapping.model_affine), true_centres(), atol=0.5)


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_to_input_is_the_inverse_mapping(grid):
    mapping = mapping_for(grid)
    truth = blob_field(mapping.input_shape, mapping.input_affine)
    back = mapping.to_input(blob_field(CONFIG.shape, mapping.model_affine))
    assert back.shape == mapping.input_shape
    np.testing.assert_allclose(back, truth, atol=0.1)  # linear interpolation of 3 mm samples
    round_trip = mapping.to_input(mapping.to_model(truth))
    np.testing.assert_allclose(blob_centres(round_trip, mapping.input_affine), true_centres(), atol=0.75)
    # Blobs are blurred by two linear interpolations, never moved or flipped.
    assert np.corrcoef(round_trip.ravel(), truth.ravel())[0, 1] > 0.98


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_masked_and_multi_channel_resampling_match_the_full_one(grid):
    mapping = mapping_for(grid)
    on_model = blob_field(CONFIG.shape, mapping.model_affine)
    full = mapping.to_input(on_model)
    where = full > 0.05
    assert 0 < where.sum() < where.size
    for layout in (np.ascontiguousarray, np.asfortranarray):  # voxels are visited in the mask's memory order
        masked = mapping.to_input(on_model, where=layout(where))
        assert masked.shape == where.shape
        np.testing.assert_allclose(masked[where], full[where], atol=1e-5)
        assert not masked[~where].any()
        # The voxel vector of at_voxels is in the order values_at reads any volume (of either layout) in,
        # and filled_at puts it back where it was.
        vector = mapping.at_voxels(on_model, layout(where))
        for volume in (np.ascontiguousarray(full), np.asfortranarray(full)):
            np.testing.assert_allclose(vector, values_at(volume, layout(where)), atol=1e-5)
        np.testing.assert_array_equal(filled_at(layout(where), vector), masked)
    # Channels share one sampling grid and come back in order; Fortran-ordered input (as NIfTI reads) too.
    truth = np.asfortranarray(blob_field(mapping.input_shape, mapping.input_affine))
    first, second = mapping.to_model([truth, 2.0 * truth])
    np.testing.assert_allclose(first, mapping.to_model(np.ascontiguousarray(truth)), atol=1e-5)  # float32 positions
    np.testing.assert_allclose(second, 2.0 * first, atol=1e-5)
    # Big-endian, reversed-stride, mixed-layout and integer or bool inputs read the same values.
    reference = mapping.to_model(np.ascontiguousarray(truth))
    big_endian = truth.astype(">f4")
    reversed_copy = np.ascontiguousarray(truth[::-1, ::-1, ::-1])[::-1, ::-1, ::-1]
    for variant in (big_endian, reversed_copy):
        np.testing.assert_allclose(mapping.to_model(variant), reference, atol=1e-5)
    mixed = mapping.to_model([truth, np.ascontiguousarray(truth)])
    np.testing.assert_allclose(mixed[1], reference, atol=1e-5)
    counts, flags = (truth * 1000).astype(np.int16), truth > 0.5
    as_int, as_bool = mapping.to_model([counts, flags])
    np.testing.assert_allclose(as_int, mapping.to_model(counts.astype(np.float32)), atol=1e-3)
    np.testing.assert_allclose(as_bool, mapping.to_model(flags.astype(np.float32)), atol=1e-6)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_sampling_split_over_threads_equals_one_batch_to_the_bit(threads, mode):
    # The output grid's first axis is cut into one part per thread (7 and 1 do not divide evenly:
    # padding must be dropped); every value must equal plain grid_sample's.
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(threads)
    source = torch.rand((1, 2, 9, 8, 7), generator=generator)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for shape in ((7, 5, 6), (1, 4, 3), (11, 1, 1)):
            grid = torch.rand((1, *shape, 3), generator=generator) * 2.4 - 1.2  # some points outside
            expected = F.grid_sample(source, grid, mode=mode, padding_mode="zeros", align_corners=True)[0]
            padded = _thread_grid(shape[0], shape[1:])
            padded[0, : shape[0]] = grid[0]
            split = _grid_sample_threaded(source, padded, shape[0], mode)
            assert split.shape == expected.shape
            assert torch.equal(split, expected)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_model_box_holds_every_model_voxel_the_mask_reaches(grid):
    # Preprocessing resamples only inside this box: it must hold every voxel where the mask's linear
    # resampling is non-zero, and the voxels there must equal those of the whole grid to the bit.
    mapping = mapping_for(grid)
    field = blob_field(mapping.input_shape, mapping.input_affine)
    for threshold in (0.3, 0.9):  # a large mask and a few small ones
        for mask in (field > threshold, np.asfortranarray(field > threshold)):
            full_image, full_mask = mapping.to_model([field, mask])
            box = mapping.model_box(mask)
            outside = np.ones(CONFIG.shape, bool)
            outside[box] = False
            assert full_mask.any() and not full_mask[outside].any()
            assert outside.sum() > 0.2 * outside.size  # it does leave work out
            image, boxed_mask = mapping.to_model([field, mask], box=box)
            np.testing.assert_array_equal(image, full_image[box])
            np.testing.assert_array_equal(boxed_mask, full_mask[box])
    assert all(b.stop == b.start for b in mapping.model_box(np.zeros(mapping.input_shape, bool)))


@pytest.mark.parametrize("slice_axis", ["axial", "coronal", "sagittal"])
def test_slice_axes_round_trip_and_model_axes(slice_axis):
    config = PreprocessConfig(shape=(64, 56, 48), spacing=(2.5, 2.6, 3.0), slice_axis=slice_axis)
    affine = model_affine(config, BRAIN_CENTRE)
    slice_direction = {"axial": 2, "coronal": 1, "sagittal": 0}[slice_axis]
    # The third model axis runs along the chosen anatomical axis with the slice spacing.
    np.testing.assert_allclose(np.abs(affine[:3, 2]), 3.0 * np.eye(3)[slice_direction])
    # The grid is centred on the requested point.
    np.testing.assert_allclose(affine @ np.append((np.array(config.shape) - 1) / 2, 1)[:4], [*BRAIN_CENTRE, 1])
    mapping = mapping_for("oblique_aniso", config)
    truth = blob_field(mapping.input_shape, mapping.input_affine)
    on_model = mapping.to_model(truth)
    np.testing.assert_allclose(blob_centres(on_model, mapping.model_affine), true_centres(), atol=0.5)
    np.testing.assert_allclose(blob_centres(mapping.to_input(on_model), mapping.input_affine), true_centres(),
                               atol=0.75)


def test_coarse_mapping_voxels_are_block_centres_and_map_back_exactly():
    mapping = mapping_for("lps_aniso")
    coarse = mapping.coarse(2)
    assert coarse.model_shape == (32, 32, 24)
    assert coarse.input_shape == mapping.input_shape
    np.testing.assert_array_equal(coarse.input_affine, mapping.input_affine)
    fine = world_coordinates(mapping.model_shape, mapping.model_affine)
    block_means = fine.reshape(32, 2, 32, 2, 24, 2, 3).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(world_coordinates(coarse.model_shape, coarse.model_affine), block_means, atol=1e-9)
    # A map computed on the coarse grid lands on the input grid at the right world positions.
    back = coarse.to_input(blob_field(coarse.model_shape, coarse.model_affine))
    np.testing.assert_allclose(blob_centres(back, mapping.input_affine), true_centres(), atol=1.0)
    truth = blob_field(mapping.input_shape, mapping.input_affine)
    assert np.corrcoef(back.ravel(), truth.ravel())[0, 1] > 0.97  # 5-6 mm samples of 5 mm blobs: blurred, not moved
    with pytest.raises(ValueError):
        mapping.coarse(5)


def test_points_outside_the_input_read_as_zero():
    shape, affine = (30, 30, 30), grid_affine((30, 30, 30), (1.0, 1.0, 1.0), centre_ras=(60.0, 0.0, 0.0))
    mapping = GridMapping(affine, shape, model_affine(CONFIG, np.zeros(3)), CONFIG.shape)
    on_model = mapping.to_model(np.ones(shape, np.float32))
    ras = world_coordinates(CONFIG.shape, mapping.model_affine)
    far = np.abs(ras - np.array([60.0, 0.0, 0.0])).max(-1) > 16.0
    assert np.all(on_model[far] == 0.0)
    assert on_model.max() == pytest.approx(1.0)


# --- preprocess(): brain mask, coverage, normalisation -----------------------------------------


def _phantom_volume(grid: str, scale: float = 1.0) -> Volume:
    shape, affine = GRIDS[grid]
    return Volume(phantom(shape, affine) * np.float32(scale), affine)


def _ellipsoid(shape, affine, shrink: float = 1.0) -> np.ndarray:
    rel = (world_coordinates(shape, affine) - BRAIN_CENTRE) / (BRAIN_AXES * shrink)
    return (rel**2).sum(-1) <= 1.0


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_preprocess_finds_the_brain_and_keeps_the_input_grid(grid):
    volume = _phantom_volume(grid)
    pre = preprocess(volume, CONFIG, name=grid)
    assert pre.image.shape == CONFIG.shape and pre.image.dtype == np.float32
    assert pre.input_brain.shape == volume.array.shape
    np.testing.assert_array_equal(pre.mapping.input_affine, volume.affine)
    assert pre.mapping.input_shape == volume.array.shape
    # Every brain voxel of the input is covered by the model grid.
    np.testing.assert_array_equal(pre.input_brain, volume.array > 0)
    assert pre.coverage == 1.0
    # The model grid is centred on the brain and its brain mask is the same ellipsoid in world space.
    centre = pre.mapping.model_affine @ np.append((np.array(CONFIG.shape) - 1) / 2, 1.0)
    np.testing.assert_allclose(centre[:3], BRAIN_CENTRE, atol=3.0)
    expected = _ellipsoid(CONFIG.shape, pre.mapping.model_affine)
    dice = 2 * (pre.brain & expected).sum() / (pre.brain.sum() + expected.sum())
    assert dice > 0.97
    # Normalised to 0..1 inside the brain, exactly 0 outside.
    assert pre.image.min() >= 0.0 and pre.image.max() <= 1.0
    assert np.all(pre.image[~pre.brain] == 0.0)
    inside = pre.image[pre.brain]
    assert (inside == 1.0).mean() < 0.02 and inside.std() > 0.1
    assert pre.stats["brain_ml"] == pytest.approx(4 / 3 * np.pi * np.prod(BRAIN_AXES) / 1000, rel=0.05)


def test_same_world_content_on_ras_and_lps_grids_gives_the_same_model_image():
    shape, spacing = (110, 130, 50), (1.3, 1.3, 2.6)
    ras_affine = grid_affine(shape, spacing, centre_ras=(1.0, -3.0, 10.0))
    # The LPS grid holds the very same voxel centres, with i and j reversed.
    lps_affine = ras_affine @ np.array([[-1, 0, 0, shape[0] - 1], [0, -1, 0, shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]])
    ras = Volume(phantom(shape, ras_affine), ras_affine)
    lps = Volume(phantom(shape, lps_affine), lps_affine)
    np.testing.assert_array_equal(lps.array, ras.array[::-1, ::-1, :])
    a, b = preprocess(ras, CONFIG), preprocess(lps, CONFIG)
    # Both model grids are RAS-aligned and centred on the brain (within a voxel of each other).
    np.testing.assert_allclose(a.mapping.model_affine[:3, :3], b.mapping.model_affine[:3, :3])
    np.testing.assert_allclose(a.mapping.model_affine[:3, 3], b.mapping.model_affine[:3, 3], atol=3.0)
    np.testing.assert_array_equal(b.input_brain, a.input_brain[::-1, ::-1, :])
    # Read b's model image at a's model voxels: the same anatomy, the same normalised intensities.
    b_on_a = GridMapping(b.mapping.model_affine, CONFIG.shape, a.mapping.model_affine, CONFIG.shape).to_model(b.image)
    interior = ndimage.binary_erosion(a.brain, iterations=2)
    np.testing.assert_allclose(b_on_a[interior], a.image[interior], atol=0.03)


def test_normalisation_ignores_the_intensity_scale():
    a = preprocess(_phantom_volume("ras_1p5mm"), CONFIG)
    b = preprocess(_phantom_volume("ras_1p5mm", scale=7.3), CONFIG)
    np.testing.assert_allclose(a.image, b.image, atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_covered_voxels_are_those_whose_position_falls_in_the_model_grid(seed):
    """The row-interval shortcut against the per-voxel test, on oblique anisotropic grids cutting the mask."""
    rng = np.random.default_rng(seed)
    mask = rng.random((37, 41, 23)) < 0.7
    in_to_model = np.eye(4)
    in_to_model[:3, :3] = rotation(rng.normal(size=3), rng.uniform(5, 40)) * rng.uniform(0.5, 2.0, 3)
    # anisotropic and oblique, with axes flipped at random
    in_to_model[:3, :3] *= rng.choice([-1, 1], 3)[:, None]
    shape = (30, 28, 16)
    # The mask's centre lands up to 15 voxels from the grid's centre.
    in_to_model[:3, 3] = (np.array(shape) - 1) / 2 - in_to_model[:3, :3] @ [18, 20, 11] + rng.uniform(-15, 15, 3)
    index = np.argwhere(mask)
    pos = index @ in_to_model[:3, :3].T + in_to_model[:3, 3]
    inside = np.all((pos >= -0.5) & (pos <= np.array(shape) - 0.5), axis=1)
    expected = np.zeros(mask.shape, dtype=bool)
    expected[tuple(index[inside].T)] = True
    assert 0 < inside.sum() < len(index)  # the grid cuts the mask
    np.testing.assert_array_equal(_covered(mask, in_to_model, shape), expected)


def test_partial_field_of_view_reports_coverage():
    config = PreprocessConfig(shape=(40, 40, 24), spacing=(2.0, 2.0, 3.0))  # 80 x 80 x 72 mm: smaller than the brain
    shape, affine = GRIDS["ras_1p5mm"]
    volume = _phantom_volume("ras_1p5mm")
    pre = preprocess(volume, config)
    brain = volume.array > 0
    # Brain voxels within the model grid's box (half a model voxel beyond the outer centres).
    points = np.c_[world_coordinates(shape, affine)[brain], np.ones(brain.sum())]
    index = np.linalg.inv(pre.mapping.model_affine) @ points.T
    inside = np.all((index[:3] >= -0.5) & (index[:3] <= np.array(config.shape)[:, None] - 0.5), axis=0)
    assert 0.2 < pre.coverage < 0.9
    assert pre.coverage == pytest.approx(inside.mean(), abs=0.01)
    assert pre.input_brain.sum() == pytest.approx(inside.sum(), rel=0.02)
    assert not np.any(pre.input_brain & ~brain)


def test_given_mask_replaces_the_non_zero_voxels():
    shape, affine = GRIDS["oblique_aniso"]
    volume = _phantom_volume("oblique_aniso")
    mask = _ellipsoid(shape, affine, shrink=0.6)
    pre = preprocess(volume, CONFIG, mask=mask.astype(np.uint8))
    np.testing.assert_array_equal(pre.input_brain, mask)
    expected = _ellipsoid(CONFIG.shape, pre.mapping.model_affine, shrink=0.6)
    dice = 2 * (pre.brain & expected).sum() / (pre.brain.sum() + expected.sum())
    assert dice > 0.95
    assert np.all(pre.image[~pre.brain] == 0.0)


def test_mask_of_another_shape_is_refused():
    volume = _phantom_volume("ras_1p5mm")
    with pytest.raises(VolumeError) as exc:
        preprocess(volume, CONFIG, mask=np.ones((10, 10, 10)), name="case.nii.gz")
    assert "case.nii.gz" in str(exc.value) and "mask" in str(exc.value)


@pytest.mark.parametrize("value", [0.0, 250.0])
def test_constant_volume_is_refused(value):
    shape, affine = GRIDS["ras_1p5mm"]
    volume = Volume(np.full(shape, value, np.float32), affine)
    with pytest.raises(VolumeError) as exc:
        preprocess(volume, CONFIG, name="flat.nii.gz")
    message = str(exc.value)
    assert "flat.nii.gz" in message and "\n" not in message
    assert ("constant" in message) if value else ("mL" in message)


def test_constant_brain_with_zero_background_is_refused():
    shape, affine = GRIDS["lps_aniso"]
    volume = Volume((phantom(shape, affine) > 0).astype(np.float32) * 300, affine)
    with pytest.raises(VolumeError, match="constant"):
        preprocess(volume, CONFIG, name="flat.nii.gz")


def test_too_little_brain_is_refused():
    shape, affine = (40, 40, 40), grid_affine((40, 40, 40), (1.0, 1.0, 1.0))
    array = np.zeros(shape, np.float32)
    array[15:25, 15:25, 15:25] = np.random.default_rng(0).uniform(100, 200, (10, 10, 10))  # 1 mL
    with pytest.raises(VolumeError) as exc:
        preprocess(Volume(array, affine), CONFIG, name="speck.nii.gz")
    assert "speck.nii.gz" in str(exc.value) and "--mask" in str(exc.value)


@pytest.mark.parametrize("grid", ["lps_aniso", "oblique_aniso", "permuted_sagittal"])
def test_superior_anchor_puts_the_vertex_at_the_grid_top_whatever_the_inferior_coverage(grid):
    config = PreprocessConfig(shape=(64, 64, 48), spacing=(2.5, 2.5, 3.0), anchor="superior")
    shape, affine = GRIDS[grid]
    volume = _phantom_volume(grid)
    full = preprocess(volume, config)
    # The top slice's centre sits the margin above the height with 2 mL of brain above it, which on a rounded
    # top lies a few mm below the vertex: the grid's top is at the vertex within a couple of voxels.
    top_z = (full.mapping.model_affine @ np.array([0.0, 0.0, config.shape[2] - 1, 1.0]))[2]
    vertex = BRAIN_CENTRE[2] + BRAIN_AXES[2]
    assert abs(top_z - vertex) < SUPERIOR_MARGIN_MM + 2.0
    # Cutting away the inferior third of the brain (a short field of view) moves the grid by at most a
    # fraction of a slice; centring on the brain would move it by a sixth of the brain's height.
    ras_z = world_coordinates(shape, affine)[..., 2]
    cut = BRAIN_CENTRE[2] - BRAIN_AXES[2] / 3
    truncated = Volume(np.where(ras_z > cut, volume.array, 0.0).astype(np.float32), affine)
    shifted = preprocess(truncated, config).mapping.model_affine[:3, 3] - full.mapping.model_affine[:3, 3]
    assert abs(shifted[2]) < 0.5 * config.spacing[2]
    centred = PreprocessConfig(shape=config.shape, spacing=config.spacing)
    moved = (preprocess(truncated, centred).mapping.model_affine[2, 3]
             - preprocess(volume, centred).mapping.model_affine[2, 3])
    assert moved > BRAIN_AXES[2] / 4
    # In-plane the grid stays centred on the brain.
    centre = full.mapping.model_affine @ np.append((np.array(config.shape) - 1) / 2, 1.0)
    np.testing.assert_allclose(centre[:2], BRAIN_CENTRE[:2], atol=3.0)


def test_config_validation_and_serialisation():
    with pytest.raises(ValueError):
        PreprocessConfig(slice_axis="oblique")
    with pytest.raises(ValueError):
        PreprocessConfig(anchor="inferior")
    config = PreprocessConfig(shape=[64, 64, 48], spacing=[2, 2, 3])
    assert config.shape == (64, 64, 48) and config.spacing == (2.0, 2.0, 3.0)
    assert PreprocessConfig(**config.to_dict()) == config


def test_detection_outputs_share_the_input_grid(tiny_model):
    """Detector.detect on an oblique anisotropic phantom: heatmap and brain mask on the input's grid."""
    from SimpleSliceNetLib.detector import Detector

    detector = Detector.load(str(tiny_model.json), "cpu")
    shape, affine = GRIDS["oblique_aniso"]
    volume = Volume(phantom(shape, affine), affine)
    result = detector.detect(volume, name="phantom")
    assert result.heatmap.shape == shape and result.heatmap.dtype == np.float32
    assert result.brain_mask.shape == shape
    np.testing.assert_array_equal(result.brain_mask, volume.array > 0)
    assert np.isfinite(result.heatmap).all()
    assert np.all(result.heatmap[~result.brain_mask] == 0.0)
    assert result.volume_score == pytest.approx(float(result.heatmap[result.brain_mask].max()))
    assert result.coverage == 1.0


# The aligned grid is scaled to the reference brain: this phantom is smaller than that (scale 0.84), so
# the grid needs room to still hold its 156 mm front-to-back.
ALIGNED = PreprocessConfig(shape=(80, 80, 56), spacing=CONFIG.spacing, align="brain-axes")


def _turned_head(shape, affine, turn: np.ndarray, scale: float) -> Volume:
    """The phantom turned by ``turn`` and enlarged by ``scale`` about its centre, on the same grid."""
    move = np.eye(4)
    move[:3, :3] = scale * turn
    move[:3, 3] = BRAIN_CENTRE - move[:3, :3] @ BRAIN_CENTRE
    return Volume(phantom(shape, np.linalg.inv(move) @ affine), affine)


@pytest.mark.parametrize("grid", ["ras_1p5mm", "lps_aniso", "oblique_aniso"])
def test_brain_axes_alignment_follows_a_turned_and_larger_head(grid):
    shape, affine = GRIDS[grid]
    turn = rotation((1.0, 0.0, 0.0), 14.0) @ rotation((0.0, 0.0, 1.0), -9.0)  # pitch and yaw
    upright = Volume(phantom(shape, affine), affine)
    turned = _turned_head(shape, affine, turn, 1.08)
    agreement = {}
    for align in ALIGNS:
        config = PreprocessConfig(shape=ALIGNED.shape, spacing=ALIGNED.spacing, align=align)
        a, b = preprocess(upright, config), preprocess(turned, config)
        both = ndimage.binary_erosion(a.brain & b.brain, iterations=2)
        agreement[align] = np.corrcoef(a.image[both], b.image[both])[0, 1]
        if align == "brain-axes":
            # The grid turned with the head and grew with it: its axes are the head's.
            ratio = np.linalg.norm(b.mapping.model_affine[:3, :3], axis=0) / np.linalg.norm(
                a.mapping.model_affine[:3, :3], axis=0)
            np.testing.assert_allclose(ratio, 1.08, rtol=0.02)
            relative = b.mapping.model_affine[:3, :3] @ np.linalg.inv(a.mapping.model_affine[:3, :3]) / 1.08
            turned_anterior = relative @ np.array([0.0, 1.0, 0.0])
            cosine = np.clip(turned_anterior @ (turn @ np.array([0.0, 1.0, 0.0])), -1.0, 1.0)
            assert np.degrees(np.arccos(cosine)) < 1.5
    # The same anatomy lands at the same grid positions only when the grid follows the brain.
    assert agreement["brain-axes"] > 0.97
    assert agreement["none"] < agreement["brain-axes"] - 0.1


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_brain_axes_alignment_keeps_the_input_grid_and_the_brain(grid):
    volume = _phantom_volume(grid)
    pre = preprocess(volume, ALIGNED, name=grid)
    np.testing.assert_array_equal(pre.input_brain, volume.array > 0)
    assert pre.coverage == 1.0
    expected = _ellipsoid(ALIGNED.shape, pre.mapping.model_affine)
    assert 2 * (pre.brain & expected).sum() / (pre.brain.sum() + expected.sum()) > 0.97
    # Maps computed on the model grid come back onto the input grid where the brain is.
    back = pre.mapping.to_input(pre.image.astype(np.float32), where=pre.input_brain)
    interior = ndimage.binary_erosion(volume.array > 0, iterations=3)
    assert np.corrcoef(back[interior], volume.array[interior])[0, 1] > 0.95


def test_brain_axes_rotation_is_trusted_only_for_a_clear_long_axis_near_anterior():
    rng = np.random.default_rng(0)
    unit = rng.normal(size=(20000, 3))
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    ball = unit * rng.uniform(0, 1, (20000, 1)) ** (1 / 3)
    for degrees, expect_turn in ((20.0, True), (45.0, False)):
        turn = rotation((1.0, 0.0, 0.0), degrees)
        points = (ball * BRAIN_AXES) @ turn.T + BRAIN_CENTRE
        found, scale = _brain_axes(points)
        anterior = found @ np.array([0.0, 1.0, 0.0])
        if expect_turn:
            cosine = np.clip(anterior @ (turn @ np.array([0.0, 1.0, 0.0])), -1.0, 1.0)
            assert np.degrees(np.arccos(cosine)) < 1.0
        else:
            np.testing.assert_array_equal(found, np.eye(3))
        np.testing.assert_allclose(scale, np.clip(np.cbrt(np.prod(BRAIN_AXES / np.sqrt(5))) / REFERENCE_SD_MM,
                                                  *ALIGN_SCALE_RANGE), rtol=0.02)
    # No clearly longest axis (a ball): no rotation.
    found, _ = _brain_axes(ball * 70.0)
    np.testing.assert_array_equal(found, np.eye(3))


def test_brain_axes_alignment_needs_the_centre_anchor():
    with pytest.raises(ValueError, match="centre anchor"):
        PreprocessConfig(align="brain-axes", anchor="superior")
    with pytest.raises(ValueError, match="align must be one of"):
        PreprocessConfig(align="rigid")
