"""Several detectors scored on the same volume, each on its own and as the mean of their heatmaps.

``evaluate --model A B ...`` compares models in one run (each volume read once); with ``--ensemble``
it also scores their combination: the mean over models of heatmap / the model's own threshold, so
each model's calibrated cut counts the same and the combination's threshold is 1. This measures
whether models trained alike but with different seeds cancel each other's noise before anyone
builds such an ensemble into a model file.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from SimpleSliceNetLib.detector import DetectionResult, Detector, volume_score
from SimpleSliceNetLib.volume_io import Volume


class DetectorSet:
    """Runs each detector at most once per volume: ``member(i)`` and ``mean`` are scorers sharing the runs."""

    def __init__(self, detectors: Sequence[Detector]) -> None:
        if not detectors:
            raise ValueError("a detector set needs at least one detector")
        self.detectors = list(detectors)
        self._volume: Volume | None = None  # the volume the cached results belong to (held, so never reused)
        self._mask: np.ndarray | None = None
        self._results: dict[int, DetectionResult] = {}

    def result(self, index: int, volume: Volume, mask: np.ndarray | None) -> DetectionResult:
        if volume is not self._volume or mask is not self._mask:
            self._volume, self._mask, self._results = volume, mask, {}
        if index not in self._results:
            self._results[index] = self.detectors[index].detect(volume, mask)
        return self._results[index]

    def member(self, index: int):
        """Scorer of detector ``index`` alone."""
        return lambda volume, mask: self.result(index, volume, mask)

    def mean(self, volume: Volume, mask: np.ndarray | None) -> DetectionResult:
        """Scorer of the mean of every detector's heatmap / its threshold (threshold 1); the volume score is
        its maximum in the union of the detectors' brain masks, the coverage the smallest of theirs."""
        results = [self.result(i, volume, mask) for i in range(len(self.detectors))]
        heatmap = np.zeros(volume.array.shape, dtype=np.float32)
        brain = np.zeros(volume.array.shape, dtype=bool)
        for result in results:
            heatmap += result.heatmap / np.float32(result.threshold)
            brain |= result.brain_mask
        heatmap /= np.float32(len(results))
        return DetectionResult(heatmap, brain, volume_score(heatmap, brain), 1.0,
                               min(result.coverage for result in results))
