"""A simple intensity baseline scored beside the detector: how unusual is each voxel's intensity
compared with the rest of the same brain?

Score = |robust z-score| of the lightly smoothed intensity against the brain's own median and
MAD (scaled to a standard deviation). Smoothing uses normalised convolution inside the brain
mask, so the dark background does not leak in and light up the brain's rim. The volume score is
a high percentile of the map, so a lesion larger than the percentile's tail raises it. No
training, no atlas: it is what "look for odd intensities" gives, and it finds strongly hyper- or
hypo-intense lesions well while also flagging normal dark/bright tissue (CSF, vessels).
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
        sigma = self.config.sigma_mm / volume.spacing
        weight = ndimage.gaussian_filter(brain.astype(np.float32), sigma)
        smoothed = ndimage.gaussian_filter(np.where(brain, data, 0.0).astype(np.float32), sigma)
        values = smoothed[brain] / np.maximum(weight[brain], 1e-6)
        median = float(np.median(values))
        spread = _MAD_TO_SD * float(np.median(np.abs(values - median)))
        if spread <= 1e-12:
            # A (nearly) constant brain: fall back to the plain SD so the scale stays finite.
            spread = max(float(values.std()), 1e-12)
        heatmap[brain] = np.abs(values - median) / spread
        score = float(np.percentile(heatmap[brain], self.config.volume_percentile))
        return BaselineResult(heatmap, brain, score, self.config.threshold, {"total_s": time.perf_counter() - start})
