"""How a method's raw anomaly values become the calibrated heatmap (stored in every model file).

Kept free of torch so the command line can describe model options without loading it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class ScoringConfig:
    """How likelihoods become the heatmap, and the calibrated threshold on it."""

    smoothing_mm: float = 4.0
    # Image-guided refinement (guided_filter.py): window half-width in mm, 0 = none (files before 1.3.0).
    guide_radius_mm: float = 0.0
    guide_eps: float = 1e-3
    # heatmap = (negative log-likelihood per dim - offset) / scale, set from healthy volumes at
    # training time so that 0 is typical healthy tissue and ``threshold`` the calibrated cut.
    offset: float = 0.0
    scale: float = 1.0
    threshold: float = 1.0
    calibration: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for error in (smoothing_error(self.smoothing_mm), guide_error(self.guide_radius_mm, self.guide_eps)):
            if error:
                raise ValueError(error)


def smoothing_error(sigma_mm: float) -> str | None:
    """Why ``sigma_mm`` cannot be the heatmap's Gaussian sigma, or None."""
    if not math.isfinite(sigma_mm) or sigma_mm < 0:
        return f"smoothing-mm {sigma_mm:g}: give a sigma of 0 mm (no smoothing) or more"
    return None


def guide_error(radius_mm: float, eps: float = 1e-3) -> str | None:
    """Why ``radius_mm``/``eps`` cannot set the guided refinement, or None."""
    if not math.isfinite(radius_mm) or radius_mm < 0:
        return f"guide-radius-mm {radius_mm:g}: give a window half-width of 0 mm (no refinement) or more"
    if not math.isfinite(eps) or eps <= 0:
        return f"guide eps {eps:g}: must be a positive number"
    return None
