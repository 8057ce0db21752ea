"""The SimpleSliceNet method: slice features -> slab vectors -> flow likelihood -> anomaly map."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .encoder import EncoderConfig, SliceEncoder, build_backbone
from .flow import FlowConfig, build_flow, log_likelihood, positional_encoding
from .preprocess import PreprocessConfig


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


@dataclass
class SliceNetConfig:
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    # Consecutive slices averaged into one slab vector (permutation-invariant aggregation).
    group: int = 3
    batch_slices: int = 48
    # The heatmap is computed on the model grid coarsened by this factor: it is smooth anyway.
    map_factor: int = 2

    @classmethod
    def from_dict(cls, data: dict) -> SliceNetConfig:
        return cls(
            preprocess=PreprocessConfig(**data["preprocess"]),
            encoder=EncoderConfig(**data["encoder"]),
            flow=FlowConfig(**data["flow"]),
            scoring=ScoringConfig(**data["scoring"]),
            group=int(data["group"]),
            batch_slices=int(data.get("batch_slices", 48)),
            map_factor=int(data.get("map_factor", 2)),
        )


class SliceNetModel(nn.Module):
    """Encoder + per-channel feature standardisation + conditional flow."""

    def __init__(self, config: SliceNetConfig, encoder_weights: str = "none") -> None:
        super().__init__()
        shape = config.preprocess.shape
        if shape[2] % config.group:
            raise ValueError(f"{shape[2]} slices do not split into groups of {config.group}")
        self.config = config
        self.encoder = SliceEncoder(config.encoder, build_backbone(config.encoder, encoder_weights))
        dim = self.encoder.out_dim
        # Standardising features with healthy statistics makes the noise scale of the anomaly
        # synthesis mean the same thing for every backbone.
        self.register_buffer("feature_mean", torch.zeros(dim))
        self.register_buffer("feature_std", torch.ones(dim))
        self.flow = build_flow(dim, config.flow)
        h, w = (s // self.encoder.reduction for s in shape[:2])
        code = positional_encoding(h, w, shape[2] // config.group, config.flow.pos_dim, config.flow.pos_depth)
        self.register_buffer("position", code, persistent=False)

    @property
    def dim(self) -> int:
        return self.encoder.out_dim

    def features(self, image: np.ndarray, autocast: torch.dtype | None = None) -> torch.Tensor:
        """Model-grid image (X, Y, Z) in [0, 1] -> standardised slab vectors (h, w, Z/group, C)."""
        device = self.feature_mean.device
        # The encoder is frozen: its BatchNorm layers must use their ImageNet running statistics
        # even while the flow trains (train mode would use, and overwrite, per-batch statistics).
        self.encoder.eval()
        slices = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[:, None]
        outs = []
        context = torch.autocast(device.type, dtype=autocast) if autocast is not None else nullcontext()
        with torch.inference_mode(), context:
            for start in range(0, slices.shape[0], self.config.batch_slices):
                outs.append(self.encoder(slices[start : start + self.config.batch_slices].to(device)).float())
        feats = torch.cat(outs)  # (Z, C, h, w)
        z, c, h, w = feats.shape
        slabs = feats.view(z // self.config.group, self.config.group, c, h, w).mean(dim=1)
        slabs = slabs.permute(2, 3, 0, 1)  # (h, w, slabs, C)
        return ((slabs - self.feature_mean) / self.feature_std).clone()

    def log_likelihood(self, vectors: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return log_likelihood(self.flow, vectors, position)

    def nll_grid(self, features: torch.Tensor, chunk: int = 32768) -> torch.Tensor:
        """Negative log-likelihood per dimension for every slab vector: (h, w, slabs)."""
        flat = features.reshape(-1, features.shape[-1])
        pos = self.position.reshape(-1, self.position.shape[-1])
        with torch.inference_mode():
            out = [-self.log_likelihood(flat[i : i + chunk], pos[i : i + chunk]) for i in range(0, len(flat), chunk)]
        return torch.cat(out).view(features.shape[:3])

    def score_map(self, nll: torch.Tensor) -> np.ndarray:
        """Upsampled, smoothed, calibrated heatmap on the map grid (model grid / ``map_factor``)."""
        cfg = self.config
        shape = [n // cfg.map_factor for n in cfg.preprocess.shape]
        up = F.interpolate(nll[None, None].float(), size=shape, mode="trilinear", align_corners=False)
        sigma = [cfg.scoring.smoothing_mm / (s * cfg.map_factor) for s in cfg.preprocess.spacing]
        smooth = gaussian_smooth(up, sigma)[0, 0].cpu().numpy()
        return ((smooth - cfg.scoring.offset) / cfg.scoring.scale).astype(np.float32)


def gaussian_smooth(volume: torch.Tensor, sigma: list[float]) -> torch.Tensor:
    """Separable Gaussian filter of a (1, 1, X, Y, Z) tensor, sigma in voxels per axis."""
    out = volume
    for axis, s in enumerate(sigma):
        if s <= 0:
            continue
        radius = max(1, int(math.ceil(3 * s)))
        x = torch.arange(-radius, radius + 1, dtype=out.dtype, device=out.device)
        kernel = torch.exp(-0.5 * (x / s) ** 2)
        kernel = kernel / kernel.sum()
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = -1
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        with torch.inference_mode():
            out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.view(shape))
    return out
