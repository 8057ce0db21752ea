"""From any input grid to the model grid and back.

One affine resampling takes the input (any orientation, spacing, obliquity) onto a model grid of
fixed shape and spacing centred on the brain, with the chosen anatomical axis as the slice axis:
RAS-aligned, or (``align="brain-axes"``) turned to the brain's long axis and scaled to a reference
brain size, a registration-free alignment. The inverse resampling takes maps computed on the model
grid back onto the input's own voxel grid, so every output shares the input's shape and affine
exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .arrays import filled_at, memory_order, nonzero_in_memory_order, values_at
from .errors import VolumeError
from .volume_io import Volume

if TYPE_CHECKING:
    import torch

# Model axes for each slice axis, as RAS unit directions: in-plane rows, in-plane columns, slices.
SLICE_AXES = {
    "axial": ((1, 0, 0), (0, 1, 0), (0, 0, 1)),
    "coronal": ((1, 0, 0), (0, 0, 1), (0, 1, 0)),
    "sagittal": ((0, 1, 0), (0, 0, 1), (1, 0, 0)),
}

ANCHORS = ("centre", "superior")
SUPERIOR_MARGIN_MM = 4.0  # room above the brain's top (below) for the vertex itself
TOP_ML = 2.0  # the brain's top for the superior anchor: the height with this much brain above it
ALIGNS = ("none", "brain-axes")
# Reference brain size for align="brain-axes": the cube root of the product of the brain mask's three
# principal standard deviations in nilearn's MNI152 2009 (about 32, 41 and 30 mm).
REFERENCE_SD_MM = 34.3
ALIGN_SCALE_RANGE = (0.8, 1.25)  # beyond this the mask is more likely wrong than the head that size
ALIGN_MAX_DEGREES = 30.0  # a long axis further from anterior than this is not trusted (no rotation)
ALIGN_MIN_ELONGATION = 1.1  # the long axis's SD over the next one: below this no axis is clearly the longest


@dataclass
class PreprocessConfig:
    """How a volume is put on the model grid (stored in every model file)."""

    shape: tuple[int, int, int] = (192, 192, 96)
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.5)
    slice_axis: str = "axial"
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    # Voxels darker than this fraction of the bright end count as background (skull-stripped input).
    background_fraction: float = 0.02
    min_brain_ml: float = 50.0
    # Where the grid sits on the brain: "centre" of its bounding box, or "superior": the grid's top just
    # above the vertex, which every scan covers, while inferior coverage (brainstem, cerebellum, cut-off
    # fields of view) varies from scan to scan and would shift every slice's position with it.
    anchor: str = "centre"
    # "none": the grid is RAS-aligned. "brain-axes": the grid's anterior axis follows the brain mask's
    # longest principal axis (front-back: corrects pitch and yaw; the two shorter axes are too alike in
    # size to fix roll) and its spacing scales with the brain's size (REFERENCE_SD_MM), so the same
    # anatomy lands at the same grid positions the flow is conditioned on, without a registration.
    align: str = "none"

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        self.spacing = tuple(float(s) for s in self.spacing)
        self.clip_percentiles = tuple(float(p) for p in self.clip_percentiles)
        if self.slice_axis not in SLICE_AXES:
            raise ValueError(f"slice_axis must be one of {sorted(SLICE_AXES)}, not {self.slice_axis!r}")
        if self.anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}, not {self.anchor!r}")
        if self.align not in ALIGNS:
            raise ValueError(f"align must be one of {ALIGNS}, not {self.align!r}")
        if self.align != "none" and self.anchor != "centre":
            raise ValueError(f"align {self.align!r} works with the centre anchor only, not {self.anchor!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GridMapping:
    """The pair of grids (input and model) and resampling between them."""

    input_affine: np.ndarray
    input_shape: tuple[int, int, int]
    model_affine: np.ndarray
    model_shape: tuple[int, int, int]

    @property
    def input_to_model(self) -> np.ndarray:
        """4x4: the model-grid voxel index of an input voxel index."""
        return np.linalg.inv(self.model_affine) @ self.input_affine

    def to_model(self, array: np.ndarray | Sequence[np.ndarray], order: int = 1,
                 box: tuple[slice, slice, slice] | None = None) -> np.ndarray | list[np.ndarray]:
        """``array`` on the input grid (or a sequence of them: one shared sampling grid) on the model grid.

        With ``box`` (slices of the model grid, e.g. ``model_box``) only that part is computed and returned.
        """
        return _resample(array, np.linalg.inv(self.input_affine) @ self.model_affine, self.model_shape, order,
                         box=box)

    def model_box(self, mask: np.ndarray) -> tuple[slice, slice, slice]:
        """The box of model voxels where linear resampling of ``mask`` (input grid) can be non-zero.

        Outside it every sample reads only voxels outside the mask; inside the brain is all that
        preprocessing keeps, and the brain is about half of the model grid.
        """
        # Model positions are linear along each row of the input's first axis, so the extremes over a
        # row's mask voxels are at its first and last one: two passes find them for all rows at once.
        rows = mask.any(axis=0)
        if not rows.any():
            return tuple(slice(0, 0) for _ in range(3))
        first = mask.argmax(axis=0)[rows]
        last = mask.shape[0] - 1 - mask[::-1].argmax(axis=0)[rows]
        j, k = np.nonzero(rows)
        in_to_model = self.input_to_model
        ends = [in_to_model[:3, :3] @ np.stack([i, j, k]) for i in (first, last)]
        low = np.minimum(*ends).min(axis=1) + in_to_model[:3, 3]
        high = np.maximum(*ends).max(axis=1) + in_to_model[:3, 3]
        # A linear sample is non-zero within one input voxel of a mask voxel along each axis; one more
        # model voxel covers rounding.
        margin = np.abs(in_to_model[:3, :3]).sum(axis=1) + 1.0
        first_voxel = np.clip(np.floor(low - margin), 0, self.model_shape).astype(int)
        stop = np.clip(np.ceil(high + margin) + 1, 0, self.model_shape).astype(int)
        return tuple(slice(int(a), int(max(a, b))) for a, b in zip(first_voxel, stop, strict=True))

    def to_input(self, array: np.ndarray | Sequence[np.ndarray], order: int = 1,
                 where: np.ndarray | None = None) -> np.ndarray | list[np.ndarray]:
        """``array`` on the model grid (or a sequence of them) resampled onto the input grid.

        With ``where`` (bool, input grid) only those voxels are computed and the rest are 0: maps are
        brain-masked anyway, and the brain is a fraction of a typical input grid.
        """
        if where is None:
            return _resample(array, self.input_to_model, self.input_shape, order)
        values = self.at_voxels(array, where, order)
        if isinstance(array, np.ndarray):
            return filled_at(where, values)
        return [filled_at(where, channel) for channel in values]

    def at_voxels(self, array: np.ndarray | Sequence[np.ndarray], where: np.ndarray,
                  order: int = 1) -> np.ndarray | list[np.ndarray]:
        """``array`` on the model grid (or a sequence of them) sampled at the input voxels ``where`` marks,
        as a vector in ``where``'s memory order (``arrays.values_at`` gives input volumes' values in the
        same order, ``arrays.filled_at`` puts them back on the grid)."""
        sampled = _resample(array, self.input_to_model, self.input_shape, order, where)
        return sampled[0] if isinstance(array, np.ndarray) else list(sampled)

    def coarse(self, factor: int) -> GridMapping:
        """The same mapping for a model grid ``factor`` times coarser (same field of view).

        Smooth maps (the heatmap is Gaussian-filtered) lose nothing there and cost far less.
        """
        if any(n % factor for n in self.model_shape):
            raise ValueError(f"model grid {self.model_shape} does not divide by {factor}")
        scale = np.diag([factor, factor, factor, 1.0])
        scale[:3, 3] = (factor - 1) / 2.0  # coarse voxel centres sit at the middle of each block
        shape = tuple(n // factor for n in self.model_shape)
        return GridMapping(self.input_affine, self.input_shape, self.model_affine @ scale, shape)


def _resample(
    array: np.ndarray | Sequence[np.ndarray], out_to_in: np.ndarray, shape: tuple[int, int, int], order: int,
    where: np.ndarray | None = None, box: tuple[slice, slice, slice] | None = None,
) -> np.ndarray | list[np.ndarray]:
    """Resample ``array`` onto a grid of ``shape`` whose voxel o sits at input index ``out_to_in @ o``.

    ``array`` is one (X, Y, Z) array or a sequence of them sharing one sampling grid (a list comes
    back). torch's grid_sample does this several times faster than scipy on a few cores; voxel
    centres map exactly (align_corners) and points outside the input read as 0. With ``where``,
    only the output voxels it marks are sampled, and come back as (channels, voxels) in ``where``'s
    memory order; with ``box`` only that part of the output grid is (and is returned), each voxel
    with the same value as on the whole grid.
    """
    import torch

    arrays = [array] if isinstance(array, np.ndarray) else list(array)
    # grid_sample reads (D, H, W) = (i, j, k) of a C-ordered (X, Y, Z) array, and its coordinates are
    # (x, y, z) = (k, j, i). nibabel's arrays are Fortran-ordered: their transposes are C-ordered (k, j, i),
    # read as they are (coordinates (i, j, k)) instead of copied into C order first; the output grid then
    # runs in (k, j, i) order too (reading memory in order) and comes back Fortran-ordered.
    fortran = all(memory_order(a) == "F" for a in arrays)
    planes = [a.T if fortran else a for a in arrays]
    source = torch.empty((1, len(planes), *planes[0].shape), dtype=torch.float32)
    for channel, plane in enumerate(planes):
        source[0, channel] = torch.from_numpy(np.ascontiguousarray(plane, dtype=plane.dtype.newbyteorder("=")))
    flip = np.eye(4)[[2, 1, 0, 3]]
    in_size = np.array(planes[0].shape[::-1], dtype=float)
    to_norm = np.diag(np.append(2.0 / (in_size - 1), 1.0))
    to_norm[:3, 3] = -1.0
    to_source = to_norm if fortran else to_norm @ flip
    mode = "nearest" if order == 0 else "bilinear"
    if where is None:
        # The affine grid as a sum of three per-axis terms: a third of F.affine_grid's time.
        theta = torch.as_tensor((to_source @ out_to_in)[:3], dtype=torch.float32)
        ranges = box or tuple(slice(0, n) for n in shape)
        terms = [torch.arange(r.start, r.stop, dtype=torch.float32)[:, None] * theta[:, axis]
                 for axis, r in enumerate(ranges)]
        outer, middle, inner = terms[::-1] if fortran else terms
        length = len(outer)
        grid = _thread_grid(length, (len(middle), len(inner)))
        torch.add((outer + theta[:, 3])[:, None, None] + middle[None, :, None], inner[None, None, :],
                  out=grid[0, :length])
    else:
        # Voxels found in ``where``'s memory order.
        _, index = nonzero_in_memory_order(where)
        to_grid = (to_source @ out_to_in)[:3].astype(np.float32)
        length = len(index[0])
        coords = np.empty((3, length), dtype=np.float32)
        for axis, axis_index in enumerate(index):
            coords[axis] = axis_index  # cast on assignment: no stacked int64 copy
        grid = _thread_grid(length, (1, 1))
        points = grid[0, :length, 0, 0].numpy()  # (length, 3): the positions are written into the grid itself
        np.matmul(coords.T, to_grid[:, :3].T, out=points)
        points += to_grid[:, 3]
    with torch.inference_mode():
        sampled = _grid_sample_threaded(source, grid, length, mode).numpy()
    if where is None and fortran:
        sampled = sampled.transpose(0, 3, 2, 1)
    if where is not None:
        return sampled[:, :, 0, 0]
    return sampled[0] if isinstance(array, np.ndarray) else list(sampled)


def _thread_parts(length: int) -> tuple[int, int]:
    """How ``_grid_sample_threaded`` cuts a grid's first axis of ``length``: (parts, rows per part)."""
    import torch

    parts = max(1, min(torch.get_num_threads(), length))
    return parts, -(-length // parts)


def _thread_grid(length: int, rest: tuple[int, int]) -> torch.Tensor:
    """An uninitialised sampling grid (1, rows, *rest, 3) for ``_grid_sample_threaded``: its first ``length``
    rows are the caller's to fill, the padding rows after them (up to equal parts) hold points outside
    every source. Filled in place, the grid is never copied to pad it."""
    import torch

    parts, step = _thread_parts(length)
    grid = torch.empty((1, parts * step, *rest, 3), dtype=torch.float32)
    grid[0, length:] = 2.0
    return grid


def _grid_sample_threaded(source: torch.Tensor, grid: torch.Tensor, length: int, mode: str) -> torch.Tensor:
    """``F.grid_sample(source, grid[:, :length])[0]`` for one source (batch 1), on all of torch's CPU threads.

    torch parallelises 3D grid sampling over the batch only, so one volume runs on one core. The
    grid (from ``_thread_grid``) is cut along its first axis into one equal part per thread, each part
    a batch item reading the same source (expanded, not copied); every point is sampled as before,
    so the result is the same to the bit.
    """
    import torch.nn.functional as F

    parts, step = _thread_parts(length)
    grid = grid.view(parts, step, *grid.shape[2:])
    sampled = F.grid_sample(source.expand(parts, *source.shape[1:]), grid, mode=mode,
                            padding_mode="zeros", align_corners=True)
    # (parts, C, step, H, W) -> (C, parts * step, H, W), then the padding dropped.
    return sampled.transpose(0, 1).reshape(sampled.shape[1], -1, *sampled.shape[3:])[:, :length]


def _covered(mask: np.ndarray, in_to_model: np.ndarray, model_shape: tuple[int, int, int]) -> np.ndarray:
    """The voxels of ``mask`` whose position falls inside the model grid (within half a voxel).

    Along each row of the input's last axis the model position is linear in the index, so the inside
    part of a row is one interval of indices: found for all rows at once, without visiting voxels
    (0.01 s instead of 0.07 s per volume for a per-voxel test).
    """
    ni, nj, nk = mask.shape
    i, j = np.meshgrid(np.arange(ni, dtype=float), np.arange(nj, dtype=float), indexing="ij")
    lo, hi = np.zeros((ni, nj)), np.full((ni, nj), nk - 1.0)
    for axis in range(3):
        a = in_to_model[axis]
        base = a[0] * i + a[1] * j + a[3]
        # -0.5 <= base + k * step <= n - 0.5
        low, high, step = -0.5 - base, model_shape[axis] - 0.5 - base, a[2]
        if abs(step) < 1e-12:
            hi[(low > 0) | (high < 0)] = -1.0  # the whole row is outside along this axis
            continue
        first, last = (low / step, high / step) if step > 0 else (high / step, low / step)
        lo, hi = np.maximum(lo, np.ceil(first)), np.minimum(hi, np.floor(last))
    k = np.arange(nk, dtype=float)
    # Both in the mask's memory order (later passes read it fastest; a C-ordered temporary against a
    # Fortran-ordered mask made this 5x slower).
    covered, below = np.empty_like(mask, dtype=bool), np.empty_like(mask, dtype=bool)
    np.greater_equal(k, lo[..., None], out=covered)
    covered &= np.less_equal(k, hi[..., None], out=below)
    covered &= mask
    return covered


@dataclass
class Preprocessed:
    """A volume on the model grid, ready for the encoder."""

    image: np.ndarray  # float32 model grid, 0..1 inside the brain, 0 outside
    brain: np.ndarray  # bool model grid
    input_brain: np.ndarray  # bool input grid: brain voxels the model grid covers
    mapping: GridMapping
    coverage: float  # fraction of the input's brain voxels inside the model grid
    stats: dict = field(default_factory=dict)


def model_affine(config: PreprocessConfig, centre_ras: np.ndarray, rotation: np.ndarray | None = None,
                 scale: float = 1.0) -> np.ndarray:
    """Affine of the model grid centred on ``centre_ras``: RAS-aligned, or turned by ``rotation`` (3x3, in
    RAS) with its spacing times ``scale``."""
    axes = np.array(SLICE_AXES[config.slice_axis], dtype=float).T  # columns = model axes in RAS
    if rotation is not None:
        axes = rotation @ axes
    direction = axes * (np.asarray(config.spacing) * scale)[None, :]
    affine = np.eye(4)
    affine[:3, :3] = direction
    affine[:3, 3] = centre_ras - direction @ ((np.asarray(config.shape) - 1) / 2.0)
    return affine


def foreground_mask(array: np.ndarray, background_fraction: float) -> np.ndarray:
    """Voxels brighter than a small fraction of the robust maximum (skull-stripped background is ~0)."""
    sample = array[::3, ::3, ::3]
    positive = sample[sample > 0]
    if positive.size == 0:
        return np.zeros(array.shape, dtype=bool)
    return array > background_fraction * float(np.percentile(positive, 99.0))


def preprocess(
    volume: Volume, config: PreprocessConfig, mask: np.ndarray | None = None, name: str = "input",
    grid_offset: np.ndarray | None = None,
) -> Preprocessed:
    """Resample ``volume`` onto the model grid, find the brain and normalise intensities.

    ``grid_offset`` (4x4, on model voxel indices) places the grid slightly differently than the
    placement rule does: training augmentation (``placement_jitter``), never used for detection.
    """
    data = volume.array
    if mask is not None:
        if mask.shape != data.shape:
            raise VolumeError(f"{name}: mask shape {mask.shape} differs from the volume's {data.shape}")
        input_mask = np.asarray(mask) > 0
    else:
        input_mask = foreground_mask(data, config.background_fraction)
    mask_voxels = int(np.count_nonzero(input_mask))
    brain_ml = mask_voxels * volume.voxel_volume_ml
    if brain_ml < config.min_brain_ml:
        raise VolumeError(
            f"{name}: only {brain_ml:.1f} mL of non-background voxels (need {config.min_brain_ml:g} mL); "
            "give a skull-stripped brain MRI or a brain mask with --mask"
        )
    # Every third voxel along each axis is plenty to tell a constant brain region, and a strided view
    # reads far less memory than indexing the whole volume with the mask.
    sample = data[::3, ::3, ::3][input_mask[::3, ::3, ::3]]
    if sample.size < 1000:  # coarse voxels: use them all
        sample = data[input_mask]
    lo_all, hi_all = np.percentile(sample, [1, 99])
    if hi_all - lo_all <= 1e-6 * max(abs(hi_all), 1.0):
        raise VolumeError(f"{name}: the brain region has constant intensity; this is not an MRI to analyse")

    centre, rotation, scale = _placement(input_mask, volume.affine, config)
    placed = model_affine(config, centre, rotation, scale)
    if grid_offset is not None:
        placed = placed @ grid_offset
    mapping = GridMapping(volume.affine, data.shape, placed, config.shape)
    box = mapping.model_box(input_mask)
    image_box, brain_box = mapping.to_model([data, input_mask], order=1, box=box)
    brain_box = brain_box > 0.5
    input_brain = _covered(input_mask, mapping.input_to_model, config.shape)
    coverage = np.count_nonzero(input_brain) / max(mask_voxels, 1)

    lo, hi = np.percentile(values_at(image_box, brain_box), config.clip_percentiles)
    scale = max(float(hi - lo), 1e-6)
    # In float64 (the percentiles' type), in place; clipped values are finite, so the product with the
    # mask zeroes the background exactly.
    normalised = np.subtract(image_box, lo)
    normalised /= scale
    np.clip(normalised, 0.0, 1.0, out=normalised)
    normalised *= brain_box
    image_box = normalised.astype(np.float32)
    # Laid out (slices, rows, columns) in memory: the encoder reads the image slice by slice.
    layout = (config.shape[2], config.shape[0], config.shape[1])
    image, brain = np.zeros(layout, np.float32).transpose(1, 2, 0), np.zeros(layout, bool).transpose(1, 2, 0)
    image[box], brain[box] = image_box, brain_box
    return Preprocessed(image, brain, input_brain, mapping, coverage,
                        {"brain_ml": round(brain_ml, 1), "intensity_range": [float(lo), float(hi)]})


def placement_jitter(config: PreprocessConfig, rng: np.random.Generator, shift_mm: float, degrees: float,
                     scale: float) -> np.ndarray:
    """A random ``grid_offset``: the grid turned (<= ``degrees`` about each axis), scaled (+-``scale``) and
    shifted (<= ``shift_mm`` along each axis) about its centre.

    A registration-free placement puts each subject's anatomy a few mm and degrees off where it put the
    training subjects'; showing the flow such placements keeps it from fitting the exact ones it saw.
    """
    angles = np.deg2rad(rng.uniform(-degrees, degrees, 3))
    turn = np.eye(3)
    for axis, angle in enumerate(angles):
        a, b = [i for i in range(3) if i != axis]
        r = np.eye(3)
        r[a, a] = r[b, b] = np.cos(angle)
        r[a, b], r[b, a] = -np.sin(angle), np.sin(angle)
        turn = r @ turn
    spacing = np.asarray(config.spacing)
    # Turn in millimetres (voxels may be anisotropic): index -> mm -> turned and scaled -> index.
    linear = np.diag(1.0 / spacing) @ turn @ np.diag(spacing) * rng.uniform(1.0 - scale, 1.0 + scale)
    centre = (np.asarray(config.shape) - 1) / 2.0
    offset = np.eye(4)
    offset[:3, :3] = linear
    offset[:3, 3] = centre - linear @ centre + rng.uniform(-shift_mm, shift_mm, 3) / spacing
    return offset


def _placement(mask: np.ndarray, affine: np.ndarray, config: PreprocessConfig) -> tuple[np.ndarray, np.ndarray, float]:
    """Where the model grid sits: its RAS centre, its rotation and its spacing scale.

    The centre is that of the mask's bounding box along the grid's axes (robust to a few stray voxels);
    with the superior anchor, it moves in z so the grid's top sits SUPERIOR_MARGIN_MM above the brain's top.
    """
    index = np.argwhere(mask[::2, ::2, ::2]) * 2
    ras = index @ affine[:3, :3].T + affine[:3, 3]
    rotation, scale = _brain_axes(ras) if config.align == "brain-axes" else (np.eye(3), 1.0)
    lo, hi = np.percentile(ras @ rotation, [0.5, 99.5], axis=0)  # along the rotated axes
    centre = rotation @ ((lo + hi) / 2.0)
    if config.anchor == "superior":
        # The top is the height with TOP_ML of brain above it: an absolute amount, so cutting the brain
        # inferiorly does not move it (a percentile would).
        ml_per_point = 8.0 * abs(np.linalg.det(affine[:3, :3])) / 1000.0
        k = min(int(TOP_ML / ml_per_point), len(ras) - 1)
        top = -np.partition(-ras[:, 2], k)[k]
        axes = np.array(SLICE_AXES[config.slice_axis], dtype=float).T
        half_height = (np.abs(axes) @ ((np.asarray(config.shape) - 1) / 2.0 * np.asarray(config.spacing)))[2]
        centre[2] = top + SUPERIOR_MARGIN_MM - half_height
    return centre, rotation, scale


def _brain_axes(ras: np.ndarray) -> tuple[np.ndarray, float]:
    """The rotation taking the anterior axis onto the brain's longest principal axis, and the size scale.

    The rotation is the identity when no axis is clearly the longest or it points more than
    ALIGN_MAX_DEGREES away from anterior (then the mask, not the head, is the likely cause).
    """
    centred = ras - ras.mean(axis=0)
    values, vectors = np.linalg.eigh(centred.T @ centred / len(ras))  # ascending
    sd = np.sqrt(np.clip(values, 0.0, None))
    scale = float(np.clip(np.cbrt(sd.prod()) / REFERENCE_SD_MM, *ALIGN_SCALE_RANGE))
    long_axis = vectors[:, 2] * (1.0 if vectors[1, 2] >= 0 else -1.0)
    off_anterior = np.degrees(np.arccos(np.clip(long_axis[1], -1.0, 1.0)))
    if sd[2] < ALIGN_MIN_ELONGATION * sd[1] or off_anterior > ALIGN_MAX_DEGREES:
        return np.eye(3), scale
    # Rodrigues: the smallest rotation taking a (anterior) onto b (the long axis).
    a = np.array([0.0, 1.0, 0.0])
    v, c = np.cross(a, long_axis), float(a @ long_axis)
    cross = np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])
    return np.eye(3) + cross + cross @ cross / (1.0 + c), scale
