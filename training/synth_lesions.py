"""Synthetic lesions planted into a healthy T1 subject on a 1 mm grid (intensities: white matter ~ 1).

Families:
- ``glioma``: irregular tumour with a necrotic core (dark in T1), a tumour rim, surrounding
  oedema (mildly hypointense, spreading along white matter) and mass effect (tissue pushed
  outward). The mask is the whole abnormal region, like BraTS "whole tumour".
- ``wm_lesions``: 3-8 small hypointense white-matter lesions (radius 4-8 mm); mask = union.
- ``large_region``: one large irregular region (20-40 mm across), hypointense (infarct/cyst-like)
  or hyperintense (haemorrhage-like).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from SimpleSliceNetLib.volume_io import Volume

LESION_FAMILIES = ("glioma", "wm_lesions", "large_region")
# Width (mm) of the soft lesion border: partial-volume blending instead of a hard step.
EDGE_MM = 1.5


def plant_lesion(
    volume: Volume, brain: np.ndarray, wm: np.ndarray, family: str, rng: np.random.Generator
) -> tuple[Volume, np.ndarray]:
    """Return a copy of ``volume`` with one lesion of ``family`` and its boolean mask (inside ``brain``).

    ``wm`` is the white-matter probability map on the same grid (it guides lesion placement).
    """
    image = volume.array.astype(np.float32, copy=True)
    wm = wm.astype(np.float32, copy=True)  # the glioma's mass effect moves it; leave the caller's intact
    spacing = volume.spacing
    depth = _depth_mm(brain, spacing)
    if family == "glioma":
        mask = _glioma(image, brain, wm, depth, spacing, rng)
    elif family == "wm_lesions":
        mask = _wm_lesions(image, brain, wm, depth, spacing, rng)
    elif family == "large_region":
        mask = _large_region(image, brain, depth, spacing, rng)
    else:
        raise ValueError(f"unknown lesion family {family!r}; expected one of {LESION_FAMILIES}")
    image *= brain
    return Volume(image, volume.affine.copy()), mask & brain


def _depth_mm(brain: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance (mm) from each voxel to the outside of the brain, computed on a 2x coarser grid for speed."""
    coarse = ndi.distance_transform_edt(brain[::2, ::2, ::2], sampling=2 * spacing)
    full = np.repeat(np.repeat(np.repeat(coarse, 2, 0), 2, 1), 2, 2)
    return full[: brain.shape[0], : brain.shape[1], : brain.shape[2]]


def _pick_centre(candidates: np.ndarray, fallback: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random voxel index among ``candidates`` (or ``fallback`` when there are none)."""
    points = np.flatnonzero(candidates)
    if points.size == 0:
        points = np.flatnonzero(fallback)
    if points.size == 0:
        raise ValueError("no room in the brain mask to place a lesion")
    return np.array(np.unravel_index(int(points[rng.integers(points.size)]), candidates.shape))


def _box(centre: np.ndarray, radius_mm: float, spacing: np.ndarray, shape: tuple[int, ...]) -> tuple[slice, ...]:
    half = np.ceil(radius_mm / spacing).astype(int)
    return tuple(slice(max(int(c - h), 0), min(int(c + h + 1), n)) for c, h, n in zip(centre, half, shape, strict=True))


def _offsets_mm(box: tuple[slice, ...], centre: np.ndarray, spacing: np.ndarray) -> list[np.ndarray]:
    """Broadcastable per-axis offsets (mm) of the box voxels from ``centre``."""
    axes = []
    for axis, (s, c, sp) in enumerate(zip(box, centre, spacing, strict=True)):
        shape = [1, 1, 1]
        shape[axis] = s.stop - s.start
        axes.append(((np.arange(s.start, s.stop) - c) * sp).astype(np.float32).reshape(shape))
    return axes


def _smooth_noise(shape: tuple[int, ...], sigma_vox: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth random field with zero mean and unit standard deviation."""
    field = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox, mode="reflect")
    return (field - field.mean()) / max(float(field.std()), 1e-6)


def _soft_inside(rho: np.ndarray, radius_mm: float) -> np.ndarray:
    """Weight 1 inside the surface rho = 1, 0 outside, with a ramp EDGE_MM wide (rho is distance / radius)."""
    return np.clip((1.0 - rho) * radius_mm / EDGE_MM + 0.5, 0.0, 1.0)


def _region(
    rho: np.ndarray, radius_mm: float, box: tuple[slice, ...], centre: np.ndarray, brain: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Soft blending weight and boolean region {rho < 1} inside the brain, keeping only the connected
    part that holds ``centre`` (irregular surfaces can otherwise leave stray islands)."""
    region = (rho < 1.0) & brain[box]
    labels, _ = ndi.label(region)
    keep = labels[tuple(int(c - s.start) for c, s in zip(centre, box, strict=True))]
    if keep:
        region = labels == keep
    # The soft edge reaches at most one voxel beyond the region.
    weight = _soft_inside(rho, radius_mm) * ndi.binary_dilation(region) * brain[box]
    return weight.astype(np.float32), region


def _blend(image: np.ndarray, box: tuple[slice, ...], weight: np.ndarray, value: np.ndarray | float) -> None:
    region = image[box]
    region += weight * (value - region)


def _glioma(image, brain, wm, depth, spacing, rng) -> np.ndarray:
    r_core = rng.uniform(8.0, 18.0)
    r_whole = r_core + rng.uniform(6.0, 16.0)
    deep = depth >= r_core + 8.0
    centre = _pick_centre(deep & (wm > 0.5), deep, rng)

    _mass_effect(image, wm, centre, r_core * rng.uniform(0.5, 0.8), spacing)

    box = _box(centre, 1.4 * r_whole + 2.0, spacing, image.shape)
    dx, dy, dz = _offsets_mm(box, centre, spacing)
    dist = np.sqrt(dx**2 + dy**2 + dz**2)
    shape = dist.shape
    core_shape = 1.0 + 0.22 * _smooth_noise(shape, r_core / 3.0 / spacing.mean(), rng)
    rho_core = dist / (r_core * np.clip(core_shape, 0.55, 1.5))
    # Oedema spreads along white matter: its reach grows with the local WM probability.
    oedema_shape = (1.0 + 0.3 * _smooth_noise(shape, r_whole / 4.0 / spacing.mean(), rng)) * (0.7 + 0.4 * wm[box])
    rho_oedema = np.minimum(dist / (r_whole * np.clip(oedema_shape, 0.45, 1.6)), rho_core)
    necrosis_fraction = rng.uniform(0.35, 0.7)

    w_oedema, whole = _region(rho_oedema, r_whole, box, centre, brain)
    w_core, _ = _region(rho_core, r_core, box, centre, brain)
    w_necrosis, _ = _region(rho_core / necrosis_fraction, r_core * necrosis_fraction, box, centre, brain)
    _blend(image, box, w_oedema, image[box] * rng.uniform(0.5, 0.65))
    _blend(image, box, w_core, rng.uniform(0.62, 0.82) * (1.0 + 0.08 * _smooth_noise(shape, 1.5, rng)))
    _blend(image, box, w_necrosis, rng.uniform(0.15, 0.3) * (1.0 + 0.04 * _smooth_noise(shape, 2.0, rng)))

    mask = np.zeros(image.shape, dtype=bool)
    mask[box] = whole
    return mask


def _mass_effect(image: np.ndarray, wm: np.ndarray, centre: np.ndarray, r_push: float, spacing: np.ndarray) -> None:
    """Push tissue radially away from ``centre`` as if a ball of radius ``r_push`` had grown there.

    A point at distance s moves to (s^3 + r^3)^(1/3) (volume-preserving insertion); the displacement
    falls off as 1/s^2 and is tapered to zero at the box edge. Applied in place to image and wm.
    """
    reach = r_push + 35.0
    box = _box(centre, reach, spacing, image.shape)
    offsets = _offsets_mm(box, centre, spacing)
    dist = np.sqrt(sum(o**2 for o in offsets))
    source = np.cbrt(np.maximum(dist**3 - r_push**3, 0.0))
    taper = np.clip(1.0 - dist / reach, 0.0, 1.0) ** 0.5
    # Backward map: each output point samples the tissue that was closer to the centre.
    factor = np.where(dist > 1e-3, 1.0 - taper * (1.0 - source / np.maximum(dist, 1e-3)), 1.0)
    coords = np.stack(
        [(o * factor / sp + (c - s.start)).ravel() for o, sp, c, s in zip(offsets, spacing, centre, box, strict=True)]
    ).astype(np.float32)
    for array in (image, wm):
        local = array[box].copy()
        array[box] = ndi.map_coordinates(local, coords, order=1, mode="nearest").reshape(local.shape)


def _wm_lesions(image, brain, wm, depth, spacing, rng) -> np.ndarray:
    mask = np.zeros(image.shape, dtype=bool)
    candidates = (wm > 0.9) & (depth >= 8.0)
    for _ in range(int(rng.integers(3, 9))):
        radius = rng.uniform(4.0, 8.0)
        centre = _pick_centre(candidates, brain & (depth >= 8.0), rng)
        box = _box(centre, 1.6 * radius + 2.0, spacing, image.shape)
        axes = rng.uniform(0.75, 1.3, 3)
        dx, dy, dz = _offsets_mm(box, centre, spacing)
        dist = np.sqrt((dx / axes[0]) ** 2 + (dy / axes[1]) ** 2 + (dz / axes[2]) ** 2)
        shape = 1.0 + 0.15 * _smooth_noise(dist.shape, 1.5, rng)
        weight, region = _region(dist / (radius * np.clip(shape, 0.6, 1.4)), radius, box, centre, brain)
        _blend(image, box, weight, rng.uniform(0.3, 0.5))
        mask[box] |= region
    return mask


def _large_region(image, brain, depth, spacing, rng) -> np.ndarray:
    radius = rng.uniform(10.0, 20.0)
    centre = _pick_centre(depth >= 0.7 * radius, brain, rng)
    box = _box(centre, 1.9 * radius + 2.0, spacing, image.shape)
    axes = rng.uniform(0.75, 1.3, 3)
    dx, dy, dz = _offsets_mm(box, centre, spacing)
    dist = np.sqrt((dx / axes[0]) ** 2 + (dy / axes[1]) ** 2 + (dz / axes[2]) ** 2)
    shape = 1.0 + 0.28 * _smooth_noise(dist.shape, radius / 3.0 / spacing.mean(), rng)
    weight, region = _region(dist / (radius * np.clip(shape, 0.5, 1.5)), radius, box, centre, brain)
    # Mostly infarct/cyst-like (dark in T1), sometimes haemorrhage-like (bright in T1).
    level = rng.uniform(0.25, 0.45) if rng.random() < 0.65 else rng.uniform(1.3, 1.55)
    _blend(image, box, weight, level * (1.0 + 0.05 * _smooth_noise(dist.shape, 2.0, rng)))
    mask = np.zeros(image.shape, dtype=bool)
    mask[box] = region
    return mask
