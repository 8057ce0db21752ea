"""Thresholding a heatmap into a label map and a list of candidate lesions (numpy/scipy only).

Used by the CLI and by the Slicer module's live threshold slider, so it must stay cheap and
free of torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage


@dataclass
class Lesion:
    """One connected region of the thresholded heatmap."""

    id: int
    voxels: int
    volume_ml: float
    centroid_ras: list[float]
    max_score: float
    mean_score: float

    def to_dict(self) -> dict:
        return asdict(self)


def extract_lesions(
    heatmap: np.ndarray,
    affine: np.ndarray,
    threshold: float,
    brain_mask: np.ndarray | None = None,
    min_volume_ml: float = 0.0,
) -> tuple[np.ndarray, list[Lesion]]:
    """Label the regions where ``heatmap >= threshold`` (inside ``brain_mask``).

    Returns a uint8 label map (0 background; 1..N numbered by decreasing max score, capped at
    255 regions) and the matching lesions. Regions smaller than ``min_volume_ml`` are dropped.
    Connectivity is 26-neighbour, as lesion counting tools usually do.
    """
    above = heatmap >= threshold
    if brain_mask is not None:
        above &= brain_mask.astype(bool)
    labels, count = ndimage.label(above, structure=np.ones((3, 3, 3), dtype=bool))
    out = np.zeros(heatmap.shape, dtype=np.uint8)
    if count == 0:
        return out, []
    index = np.arange(1, count + 1)
    sizes = ndimage.sum_labels(above, labels, index)
    maxima = ndimage.maximum(heatmap, labels, index)
    means = ndimage.mean(heatmap, labels, index)
    centroids = ndimage.center_of_mass(above, labels, index)
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    keep = [i for i in range(count) if sizes[i] * voxel_ml >= min_volume_ml]
    keep.sort(key=lambda i: -maxima[i])
    keep = keep[:255]
    lesions: list[Lesion] = []
    remap = np.zeros(count + 1, dtype=np.uint8)
    for new_id, i in enumerate(keep, start=1):
        remap[i + 1] = new_id
        ras = affine @ np.append(np.asarray(centroids[i], dtype=float), 1.0)
        lesions.append(
            Lesion(
                id=new_id,
                voxels=int(sizes[i]),
                volume_ml=round(float(sizes[i] * voxel_ml), 4),
                centroid_ras=[round(float(v), 2) for v in ras[:3]],
                max_score=float(maxima[i]),
                mean_score=float(means[i]),
            )
        )
    out[...] = remap[labels]
    return out, lesions
