"""How a method's raw anomaly values become the calibrated heatmap (stored in every model file).

Kept free of torch so the command line can describe model options without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ScoringConfig:
    """How likelihoods become the heatmap, and the calibrated threshold on it."""

    smoothing_mm: float = 4.0
    # heatmap = (negative log-likelihood per dim - offset) / scale, set from healthy volumes at
    # training time so that 0 is typical healthy tissue and ``threshold`` the calibrated cut.
    offset: float = 0.0
    scale: float = 1.0
    threshold: float = 1.0
    calibration: dict = field(default_factory=dict)
