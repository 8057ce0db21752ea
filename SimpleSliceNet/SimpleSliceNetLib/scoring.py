"""How a method's raw anomaly values become the calibrated heatmap (stored in every model file).

Kept free of torch so the command line can describe model options without loading it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Precisions of the encoder's features a model can be calibrated in (ScoringConfig.encoder_precision).
ENCODER_PRECISIONS = ("fp32", "bf16")


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
    # Precision of the encoder features offset, scale, threshold (and per-position statistics) were
    # computed on: detection computes its features so on every device ("fp32" or "bf16").
    encoder_precision: str = "fp32"

    def __post_init__(self) -> None:
        for error in (smoothing_error(self.smoothing_mm), guide_error(self.guide_radius_mm, self.guide_eps),
                      precision_error(self.encoder_precision)):
            if error:
                raise ValueError(error)


def smoothing_error(sigma_mm: float) -> str | None:
    """Why ``sigma_mm`` cannot be the heatmap's Gaussian sigma, or None."""
    if not math.isfinite(sigma_mm) or sigma_mm < 0:
        return f"smoothing-mm {sigma_mm:g}: give a sigma of 0 mm (no smoothing) or more"
    return None


def precision_error(precision: str) -> str | None:
    """Why ``precision`` cannot be a model's encoder precision, or None."""
    if precision not in ENCODER_PRECISIONS:
        return f"encoder precision {precision!r}: choose one of {', '.join(ENCODER_PRECISIONS)}"
    return None


def guide_error(radius_mm: float, eps: float = 1e-3) -> str | None:
    """Why ``radius_mm``/``eps`` cannot set the guided refinement, or None."""
    if not math.isfinite(radius_mm) or radius_mm < 0:
        return f"guide-radius-mm {radius_mm:g}: give a window half-width of 0 mm (no refinement) or more"
    if not math.isfinite(eps) or eps <= 0:
        return f"guide eps {eps:g}: must be a positive number"
    return None
