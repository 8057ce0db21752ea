"""The configuration of a U2AD model (network sizes, masking, scoring), stored in its model file.

Kept free of torch so the command line can offer U2AD's options without loading it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .preprocess import PreprocessConfig
from .scoring import ScoringConfig


def _default_grid() -> PreprocessConfig:
    # 128x128 slices of 1.5 mm (19 cm field of view), 64 slices of 2.4 mm: small enough for
    # K = 4 reconstructions of every slice in seconds on a laptop CPU.
    return PreprocessConfig(shape=(128, 128, 64), spacing=(1.5, 1.5, 2.4))


@dataclass
class U2ADConfig:
    """Network sizes, masking and scoring of a U2AD model (stored in the model file)."""

    preprocess: PreprocessConfig = field(default_factory=_default_grid)
    patch: int = 8
    encoder_depth: int = 4
    encoder_dim: int = 128
    encoder_heads: int = 4
    decoder_depth: int = 2
    decoder_dim: int = 64
    decoder_heads: int = 4
    mask_ratio: float = 0.75
    samples: int = 4  # K masks per slice at detection
    min_roi_patches: int = 4  # slices with fewer ROI patches are not analysed
    batch_slices: int = 64
    seed: int = 0  # masks at detection are drawn from this seed: results are reproducible
    slab_mm: float = 10.0  # thickness of the slabs of the per-slab (segment-level) scores
    scoring: ScoringConfig = field(default_factory=lambda: ScoringConfig(smoothing_mm=3.0))

    def __post_init__(self) -> None:
        rows, cols, _ = self.preprocess.shape
        if rows % self.patch or cols % self.patch:
            raise ValueError(f"slice size {rows}x{cols} does not divide into {self.patch}-pixel patches")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), not {self.mask_ratio}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> U2ADConfig:
        values = dict(data)
        values["preprocess"] = PreprocessConfig(**data["preprocess"])
        values["scoring"] = ScoringConfig(**data["scoring"])
        return cls(**values)
