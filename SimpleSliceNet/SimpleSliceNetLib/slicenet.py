"""The SimpleSliceNet method: slice features -> slab vectors -> flow likelihood -> anomaly map."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .encoder import EncoderConfig, SliceEncoder, build_backbone, without_untapped_weights
from .flow import FlowConfig, GridFlow, build_flow, log_likelihood, positional_codes, positional_encoding
from .guided_filter import Guide, refine
from .preprocess import GridMapping, PreprocessConfig, Preprocessed
from .scoring import ScoringConfig

AGGREGATIONS = ("mean", "max")


@dataclass
class SliceNetConfig:
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    # Consecutive slices aggregated into one slab vector (permutation-invariant aggregation).
    group: int = 3
    # Slices per encoder call. Only speed depends on it (outputs are identical): on a 2-core CPU the
    # default encoder took 0.39 s per volume in batches of 8 slices of 192x192, 0.54 s in 16 and about
    # 0.7 s in 48 (activations that fit in cache); the paper's wide_resnet50_2 7.1 s, 7.4 s and 8.0 s (32).
    batch_slices: int = 8
    # The heatmap is computed on the model grid coarsened by this factor: it is smooth anyway.
    map_factor: int = 2
    # Slices between the starts of the slabs the flow trains on; None = ``group`` (non-overlapping
    # slabs, the paper's). Smaller values make slabs overlap.
    slab_stride: int | None = None
    # Slices between the starts of the slabs detection scores; None = the slab stride. A divisor of it
    # scores slabs in between the ones the flow trains on (every ``fit_step``-th scored slab), coded at
    # their fractional position: a lesion is scored by the slab centred on it, not only by the nearest
    # trained one, and the map's slice-to-slice noise averages out. 1 = a slab centred on every slice.
    score_stride: int | None = None
    # How the slices of a slab are combined: "mean" (the paper's) or "max" (per channel).
    aggregation: str = "mean"
    # Standardise each slab position's NLL with healthy training statistics (the weights then hold
    # ``nll_mean`` and ``nll_std``). Places where healthy brains vary (edges, ventricles) score high
    # in every subject; this evens the heatmap's scale across the brain.
    position_norm: bool = False

    @property
    def stride(self) -> int:
        """Slices between the starts of the slabs the flow trains on."""
        return self.group if self.slab_stride is None else self.slab_stride

    @property
    def scored_stride(self) -> int:
        """Slices between the starts of the slabs detection scores."""
        return self.stride if self.score_stride is None else self.score_stride

    @property
    def fit_step(self) -> int:
        """The flow trains on every ``fit_step``-th scored slab."""
        return self.stride // self.scored_stride

    def slabs(self, slices: int) -> int:
        """Number of scored slabs along a stack of ``slices``."""
        return (slices - self.group) // self.scored_stride + 1

    @classmethod
    def from_dict(cls, data: dict) -> SliceNetConfig:
        stride = data.get("slab_stride")  # absent in files written before slabs could overlap
        return cls(
            preprocess=PreprocessConfig(**data["preprocess"]),
            encoder=EncoderConfig(**data["encoder"]),
            flow=FlowConfig(**data["flow"]),
            scoring=ScoringConfig(**data["scoring"]),
            group=int(data["group"]),
            batch_slices=int(data.get("batch_slices", cls.batch_slices)),
            map_factor=int(data.get("map_factor", 2)),
            slab_stride=None if stride is None else int(stride),
            score_stride=None if data.get("score_stride") is None else int(data["score_stride"]),  # from 1.4.0
            aggregation=str(data.get("aggregation", "mean")),
            position_norm=bool(data.get("position_norm", False)),  # absent before version 1.2.0 models
        )


def slab_layout_error(slices: int, group: int, stride: int, score_stride: int | None = None) -> str | None:
    """Why ``slices`` do not split into slabs of ``group`` slices starting every ``stride`` (scored every
    ``score_stride``), or None."""
    if not 1 <= stride <= group <= slices or (slices - group) % stride:
        return (f"{slices} slices do not split into groups of {group} slices starting every {stride} "
                "(need 1 <= stride <= group <= slices and stride dividing slices - group)")
    if score_stride is not None and not (1 <= score_stride <= stride and stride % score_stride == 0):
        return f"a score stride of {score_stride} slices does not divide the slab stride of {stride} slices"
    return None


class SliceNetModel(nn.Module):
    """Encoder + per-channel feature standardisation + conditional flow.

    ``flow_seed``: the flow's initial weights come from this seed alone (``build_flow``).
    """

    def __init__(self, config: SliceNetConfig, encoder_weights: str = "none", flow_seed: int | None = None) -> None:
        super().__init__()
        shape = config.preprocess.shape
        error = slab_layout_error(shape[2], config.group, config.stride, config.score_stride)
        if error:
            raise ValueError(error)
        if config.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, not {config.aggregation!r}")
        self.config = config
        self.encoder = SliceEncoder(config.encoder, build_backbone(config.encoder, encoder_weights))
        dim = self.encoder.out_dim
        # Standardising features with healthy statistics makes the noise scale of the anomaly
        # synthesis mean the same thing for every backbone.
        self.register_buffer("feature_mean", torch.zeros(dim))
        self.register_buffer("feature_std", torch.ones(dim))
        self.flow = build_flow(dim, config.flow, flow_seed)
        h, w = (s // self.encoder.reduction for s in shape[:2])
        code = positional_encoding(h, w, config.slabs(shape[2]), config.flow.pos_dim, config.flow.pos_depth,
                                   config.fit_step)
        self.register_buffer("position", code, persistent=False)
        self.grid_flow: GridFlow | None = None  # set by specialise_flow for detection
        if config.position_norm:
            self._position_buffers()

    def _position_buffers(self) -> None:
        shape = self.position.shape[:3]
        device = self.feature_mean.device
        self.register_buffer("nll_mean", torch.zeros(shape, device=device))
        self.register_buffer("nll_std", torch.ones(shape, device=device))

    def set_position_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Turn on per-position NLL standardisation with these (h, w, slabs) statistics."""
        if not self.config.position_norm:
            self.config.position_norm = True
            self._position_buffers()
        self.nll_mean.copy_(mean)
        self.nll_std.copy_(std.clamp_min(1e-6))

    def without_untapped_stages(self, state: dict) -> dict:
        """``state`` without weights of backbone stages the encoder no longer builds (``without_untapped_weights``)."""
        return without_untapped_weights(self.encoder.backbone, state, "encoder.backbone.")

    @property
    def dim(self) -> int:
        return self.encoder.out_dim

    def features(self, image: np.ndarray, autocast: torch.dtype | None = None) -> torch.Tensor:
        """Model-grid image (X, Y, Z) in [0, 1] -> standardised slab vectors (h, w, slabs, C)."""
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
        slabs = self.aggregate(torch.cat(outs))  # (slabs, C, h, w)
        slabs = slabs.permute(2, 3, 0, 1)  # (h, w, slabs, C)
        return ((slabs - self.feature_mean) / self.feature_std).clone()

    def aggregate(self, per_slice: torch.Tensor, how: str | None = None) -> torch.Tensor:
        """(Z, ...) per-slice values -> (scored slabs, ...): slab j combines slices j*s .. j*s + group - 1
        (s = ``scored_stride``)."""
        windows = per_slice.unfold(0, self.config.group, self.config.scored_stride)  # (slabs, ..., group)
        return windows.amax(-1) if (how or self.config.aggregation) == "max" else windows.mean(-1)

    def slab_brain(self, brain: np.ndarray) -> torch.Tensor:
        """Model-grid brain mask (X, Y, Z) -> bool (h, w, slabs): slab vectors whose footprint holds brain.

        The footprint of a vector is the ``reduction`` x ``reduction`` pixels of its feature cell in the
        slab's slices. Vectors that straddle the brain's edge count as brain: detection scores them.
        """
        h, w = self.position.shape[:2]
        r = self.encoder.reduction
        slices = torch.from_numpy(np.ascontiguousarray(brain.transpose(2, 0, 1)))[:, None].float()
        cells = F.max_pool2d(slices, r, ceil_mode=True)[:, 0, :h, :w]  # (Z, h, w)
        return self.aggregate(cells, how="max").permute(1, 2, 0) > 0

    def log_likelihood(self, vectors: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return log_likelihood(self.flow, vectors, position)

    def specialise_flow(self) -> bool:
        """Evaluate the flow through a ``GridFlow`` from now on (detection only: the flow must not train
        any more). Returns False and keeps the FrEIA flow where its blocks are not the ones it supports."""
        if not GridFlow.supports(self.flow):
            return False
        h, w, d = self.position.shape[:3]
        cfg = self.config.flow
        codes = positional_codes(h, w, d, cfg.pos_dim, cfg.pos_depth, self.config.fit_step)
        self.grid_flow = GridFlow(self.flow, codes, (h, w, d))
        return True

    def nll_grid(self, features: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Negative log-likelihood per dimension for every slab vector: (h, w, slabs).

        Chunks of 4096 vectors keep the flow's activations in cache: 0.18 s against 0.21 s per volume
        in one chunk on a 2-core CPU, with the same values."""
        if self.grid_flow is not None:
            return self.grid_flow(features, chunk)
        flat = features.reshape(-1, features.shape[-1])
        pos = self.position.reshape(-1, self.position.shape[-1])
        with torch.inference_mode():
            out = [-self.log_likelihood(flat[i : i + chunk], pos[i : i + chunk]) for i in range(0, len(flat), chunk)]
        return torch.cat(out).view(features.shape[:3])

    def input_heatmap(self, nll: torch.Tensor, mapping: GridMapping, input_brain: np.ndarray,
                      guide: Guide | None = None) -> np.ndarray:
        """The calibrated heatmap on ``mapping``'s input grid at ``input_brain`` voxels, 0 elsewhere.

        With ``guide`` and a model that refines (``scoring.guide_radius_mm`` > 0) the map follows the
        image's edges (guided_filter.py).
        """
        coarse = self.score_map(nll)
        mapping = mapping.coarse(self.config.map_factor)
        if guide is None or not self.refines:
            return mapping.to_input(coarse, where=input_brain)
        return refine(coarse, guide, mapping, input_brain, self.guide_radius(), self.config.scoring.guide_eps)

    @property
    def refines(self) -> bool:
        return self.config.scoring.guide_radius_mm > 0

    def guide_for(self, pre: Preprocessed, array: np.ndarray, dtype: type = np.float32) -> Guide | None:
        """The guide ``input_heatmap`` refines ``pre``'s map by (``array``: its input volume), or None."""
        if not self.refines:
            return None
        return Guide.of(pre.image, pre.brain, self.config.map_factor, array, pre.stats["intensity_range"],
                        pre.input_brain, dtype)

    def guide_radius(self) -> tuple[int, int, int]:
        """The guided filter's window half-width in map voxels per axis: the fewest that reach the radius."""
        cfg = self.config
        # (the small tolerance keeps 4 mm on a 2 mm map at 2 voxels despite rounding)
        return tuple(max(1, math.ceil(cfg.scoring.guide_radius_mm / (s * cfg.map_factor) - 1e-6))
                     for s in cfg.preprocess.spacing)

    def score_map(self, nll: torch.Tensor) -> np.ndarray:
        """Upsampled, smoothed, calibrated heatmap on the map grid (model grid / ``map_factor``)."""
        cfg = self.config
        if cfg.position_norm:
            nll = (nll - self.nll_mean) / self.nll_std
        shape = [n // cfg.map_factor for n in cfg.preprocess.shape]
        if cfg.scored_stride == cfg.group:
            # Slabs tile the slices: trilinear resizing puts every slab value at its slab's centre.
            up = F.interpolate(nll[None, None].float(), size=shape, mode="trilinear", align_corners=False)
        else:
            up = self._overlapping_slabs_to_map(nll.float(), shape)[None, None]
        sigma = [cfg.scoring.smoothing_mm / (s * cfg.map_factor) for s in cfg.preprocess.spacing]
        smooth = gaussian_smooth(up, sigma)[0, 0].cpu().numpy()
        return ((smooth - cfg.scoring.offset) / cfg.scoring.scale).astype(np.float32)

    def _overlapping_slabs_to_map(self, nll: torch.Tensor, shape: list[int]) -> torch.Tensor:
        """(h, w, slabs) -> map grid ``shape``: bilinear in-plane, linear between slab centres along the slices.

        Slab j is centred on model slice j*s + (group-1)/2 (s = ``scored_stride``) and map slice c on model slice
        f*c + (f-1)/2 (f = map_factor); beyond the first and last slab centres the value is held, as
        trilinear resizing does for tiling slabs.
        """
        cfg, f = self.config, self.config.map_factor
        plane = F.interpolate(nll.permute(2, 0, 1)[None], size=shape[:2], mode="bilinear", align_corners=False)[0]
        n = plane.shape[0]
        centre = (f * torch.arange(shape[2], dtype=torch.float32, device=nll.device) + (f - 1) / 2.0)
        u = ((centre - (cfg.group - 1) / 2.0) / cfg.scored_stride).clamp(0, n - 1)
        lo = u.floor().long()
        hi = (lo + 1).clamp(max=n - 1)
        t = (u - lo).view(-1, 1, 1)
        return (plane[lo] * (1 - t) + plane[hi] * t).permute(1, 2, 0)


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
