"""A simple intensity baseline scored beside the detector: how unusual is each voxel's intensity
compared with the rest of the same brain?

Score = |robust z-score| of the lightly smoothed, bias-flattened intensity against the brain's
own median and MAD (scaled to a standard deviation). The slow bias field of the coil is divided
out with a wide smoothing (as a crude N4 would), so that a bright or dark corner of the brain is
not taken for a lesion. All smoothing is normalised convolution inside the brain mask, so the
dark background does not leak in and light up the brain's rim. The volume score is a high
percentile of the map, so a lesion larger than the percentile's tail raises it. No training, no
atlas: it is what "look for odd intensities" gives. It finds strongly hyper- or hypo-intense
lesions, and it also flags normal dark/bright tissue (CSF, vessels) and misses lesions whose
intensity is that of another normal tissue (common on T1).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from SimpleSliceNetLib.preprocess import foreground_mask
from SimpleSliceNetLib.volume_io import Volume

_MAD_TO_SD = 1.4826  # MAD of a normal distribution times this is its standard deviation


@dataclass
class BaselineConfig:
    """Parameters of the intensity baseline."""

    sigma_mm: float = 1.0
    bias_sigma_mm: float = 15.0
    volume_percentile: float = 99.9
    # |z| at which a voxel is called anomalous: about 3 robust standard deviations.
    threshold: float = 3.0
    # Same background rule as the detector's preprocessing, so both score the same brain.
    background_fraction: float = 0.02


@dataclass
class BaselineResult:
    """Same fields as the detector's result that evaluation uses."""

    heatmap: np.ndarray
    brain_mask: np.ndarray
    volume_score: float
    threshold: float
    timings: dict = field(default_factory=dict)


class IntensityBaseline:
    """Scorer: ``IntensityBaseline()(volume, mask)`` -> :class:`BaselineResult`."""

    def __init__(self, config: BaselineConfig | None = None) -> None:
        self.config = config or BaselineConfig()

    @property
    def info(self) -> dict:
        return {"id": "intensity-baseline", "version": "1", "method": "robust intensity z-score", **vars(self.config)}

    def __call__(self, volume: Volume, mask: np.ndarray | None = None) -> BaselineResult:
        return self.detect(volume, mask)

    def detect(self, volume: Volume, mask: np.ndarray | None = None) -> BaselineResult:
        start = time.perf_counter()
        data = np.asarray(volume.array, dtype=np.float32)
        if mask is not None:
            brain = np.asarray(mask) > 0
        else:
            brain = foreground_mask(data, self.config.background_fraction)
        heatmap = np.zeros(data.shape, dtype=np.float32)
        if not brain.any():
            return BaselineResult(heatmap, brain, 0.0, self.config.threshold, {"total_s": time.perf_counter() - start})
        # Work in the brain's bounding box: smoothing with zero padding makes this exact, and ~3x cheaper.
        box = ndimage.find_objects(brain.astype(np.uint8))[0]
        inside, crop = brain[box], data[box]
        smoothed = _masked_smooth(crop, inside, self.config.sigma_mm / volume.spacing)[inside]
        bias = _masked_smooth(crop, inside, self.config.bias_sigma_mm / volume.spacing, coarse=True)[inside]
        # Flatten only where that is meaningful (positive intensities, as MRI magnitudes are).
        values = smoothed / bias if bias.min() > 0 else smoothed
        median = float(np.median(values))
        spread = _MAD_TO_SD * float(np.median(np.abs(values - median)))
        tiny = 1e-5 * max(abs(median), 1e-12)  # below this, differences are float rounding, not tissue
        if spread <= tiny:
            # More than half the brain has one value: fall back to the SD; a constant brain scores 0.
            spread = float(values.std())
        if spread > tiny:
            heatmap[box][inside] = np.abs(values - median) / spread
        score = float(np.percentile(heatmap[box][inside], self.config.volume_percentile))
        return BaselineResult(heatmap, brain, score, self.config.threshold, {"total_s": time.perf_counter() - start})


def _masked_smooth(data: np.ndarray, brain: np.ndarray, sigma: np.ndarray, coarse: bool = False) -> np.ndarray:
    """Gaussian smoothing of ``data`` inside ``brain`` only (normalised convolution, zero padding).

    ``coarse``: for wide kernels, smooth a subsampled grid (about three samples per sigma) and
    interpolate back, which is far cheaper and indistinguishable for a slowly varying field.
    """
    step = np.maximum(np.floor(sigma / 3.0), 1).astype(int) if coarse else np.ones(3, dtype=int)
    grid = tuple(slice(None, None, int(k)) for k in step)
    weight = ndimage.gaussian_filter(brain[grid].astype(np.float32), sigma / step, mode="constant")
    value = ndimage.gaussian_filter(np.where(brain, data, 0.0)[grid].astype(np.float32), sigma / step, mode="constant")
    smooth = value / np.maximum(weight, 1e-6)
    if coarse and np.any(step > 1):
        smooth = ndimage.zoom(smooth, np.array(data.shape) / np.array(smooth.shape), order=1, grid_mode=False)
    return smooth
