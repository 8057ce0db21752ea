"""Edge-aware refinement of a coarse heatmap by the MRI itself (fast guided filter, He and Sun 2015).

The flow scores 8 mm cells and the heatmap is smoothed, so a lesion's border is blurred over
several millimetres while the image shows it sharply. The guided filter fits the heatmap, in
windows of the coarse map grid, as a linear function of the image's intensity there, and applies
the fitted coefficients to the image at the input's own resolution: inside each window the map
follows the image's edges, and its local mean stays what the model gave.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .arrays import filled_at, values_at
from .preprocess import GridMapping


@dataclass
class Guide:
    """The image a heatmap is refined by: on the coarse map grid and on the input grid."""

    coarse: np.ndarray  # map grid: mean normalised intensity of each map voxel's brain voxels
    weight: np.ndarray  # map grid: fraction of each map voxel that is brain
    intensity: np.ndarray  # normalised as for the model (0..1) at the input's brain voxels, in their memory order

    @classmethod
    def of(cls, image: np.ndarray, brain: np.ndarray, factor: int, array: np.ndarray,
           intensity_range: tuple[float, float], where: np.ndarray, dtype: type = np.float32) -> Guide:
        """The guide of one preprocessed volume.

        ``image``, ``brain``: the model grid's normalised image and brain; ``factor``: the map grid's
        coarsening; ``array``: the input volume, normalised like ``image`` by ``intensity_range``
        (the model grid's clip range) at ``where`` (its brain voxels). ``dtype`` of the input-grid
        intensity (training keeps float16 to halve its memory).
        """
        weight = _block_mean(brain.astype(np.float32), factor)
        coarse = _block_mean(image, factor) / np.maximum(weight, 1e-6)
        lo, hi = intensity_range
        # Only the brain's voxels (the refined map is 0 elsewhere): a sixth of a typical input grid.
        intensity = np.subtract(values_at(array, where), np.float32(lo), dtype=np.float32)
        intensity *= np.float32(1.0 / max(hi - lo, 1e-6))
        np.clip(intensity, 0.0, 1.0, out=intensity)
        return cls(coarse.astype(np.float32), weight, intensity.astype(dtype, copy=False))


def refine(values: np.ndarray, guide: Guide, mapping: GridMapping, where: np.ndarray, radius: tuple[int, int, int],
           eps: float) -> np.ndarray:
    """``values`` (the map grid ``mapping`` leads from) refined by ``guide``, on the input grid at ``where``.

    The coefficients are fitted on the map grid, resampled at the input's ``where`` voxels (both on one
    sampling grid) and applied to the input's own intensities there; outside ``where`` the map is 0.
    ``where`` must be the one ``guide`` was made with.
    """
    a, b = mapping.at_voxels(list(guided_coefficients(values, guide, radius, eps)), where)
    a *= guide.intensity
    a += b
    return filled_at(where, a)


def guided_coefficients(values: np.ndarray, guide: Guide, radius: tuple[int, int, int],
                        eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Per map voxel (a, b) such that ``a * intensity + b`` is ``values`` refined by the guide.

    ``radius`` in map voxels per axis (window 2r+1); ``eps`` regularises the fit: windows whose
    intensity varies less than about sqrt(eps) keep their mean value. Window means count brain
    voxels only (weighted by ``guide.weight``), so the background's zero intensity is no edge.
    """
    size = tuple(2 * r + 1 for r in radius)
    weight = guide.weight
    norm = np.maximum(ndi.uniform_filter(weight, size, mode="constant"), 1e-6)

    def mean(x: np.ndarray) -> np.ndarray:
        return ndi.uniform_filter(x * weight, size, mode="constant") / norm

    image = guide.coarse
    mean_i, mean_v = mean(image), mean(values)
    a = (mean(image * values) - mean_i * mean_v) / (mean(image * image) - mean_i * mean_i + eps)
    b = mean_v - a * mean_i
    return mean(a).astype(np.float32), mean(b).astype(np.float32)


def _block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor``-cubed blocks (the map grid's voxels; shapes divide by ``factor``)."""
    # A sum of strided views reads the volume once in its own memory order (a reshape copies it first).
    total = np.zeros([n // factor for n in volume.shape], np.float32)
    for i, j, k in itertools.product(range(factor), repeat=3):
        total += volume[i::factor, j::factor, k::factor]
    return total / np.float32(factor**3)
