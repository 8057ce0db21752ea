"""The U2AD method: a ViT masked autoencoder on 2D slices with Monte-Carlo uncertainty maps.

Each slice of the model grid is cut into patches; only patches that touch the region of interest
(the brain mask, or a given ROI) are ever masked or reconstructed, the rest are ignored. The
encoder sees the visible ROI patches, the decoder fills in the masked ones. At detection K masks
are drawn so that every ROI patch is hidden in about ``mask_ratio * K`` of them; over the
reconstructions in which a voxel was hidden:

- aleatoric map (AU) = |mean reconstruction - input|, which is also the anomaly evidence;
- epistemic map (EU) = variance of the reconstructions.

Training (``SimpleSliceNetTraining.train_u2ad``) uses the same maps to guide masking: patches
with high EU are masked more often, patches in the top-error components are kept visible so that
candidate anomalies are never reconstruction targets. Helpers for both live here.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from .preprocess import SLICE_AXES, Preprocessed
from .slicenet import gaussian_smooth
from .u2ad_config import U2ADConfig

AXIS_NAMES = ("R", "A", "S")  # RAS axis letters, for the per-slab scores


# --- patches and masks --------------------------------------------------------------------------


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, H, W) -> (B, N, patch*patch), patches in row-major order."""
    b, h, w = images.shape
    x = images.reshape(b, h // patch, patch, w // patch, patch)
    return x.permute(0, 1, 3, 2, 4).reshape(b, (h // patch) * (w // patch), patch * patch)


def unpatchify(tokens: torch.Tensor, patch: int, shape: tuple[int, int]) -> torch.Tensor:
    """(B, N, patch*patch) -> (B, H, W), the inverse of :func:`patchify`."""
    b = tokens.shape[0]
    gh, gw = shape[0] // patch, shape[1] // patch
    x = tokens.reshape(b, gh, gw, patch, patch).permute(0, 1, 3, 2, 4)
    return x.reshape(b, shape[0], shape[1])


def roi_patches(roi: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, H, W) bool -> (B, N) bool: patches with at least one ROI pixel."""
    return patchify(roi.float(), patch).amax(-1) > 0


def _keep_one_visible(masked: torch.Tensor, roi: torch.Tensor) -> torch.Tensor:
    """Unmask the first ROI patch of any slice whose ROI would be entirely masked (the encoder needs one)."""
    empty = ~(roi & ~masked).any(1) & roi.any(1)
    if empty.any():
        first = roi.float().argmax(1)
        masked = masked.clone()
        masked[empty.nonzero()[:, 0], first[empty]] = False
    return masked


def guided_masks(
    roi: torch.Tensor,
    ratio: float,
    generator: torch.Generator | None = None,
    eu: torch.Tensor | None = None,
    eu_strength: float = 1.0,
    excluded: torch.Tensor | None = None,
) -> torch.Tensor:
    """Training masks (B, N) bool: ``ratio`` of the eligible ROI patches of each slice, drawn without replacement.

    Eligible = ROI patches not ``excluded`` (the EU+AU phase keeps the top-error patches out).
    With ``eu`` (patch epistemic uncertainty), a patch's chance to be drawn is proportional to
    ``1 + eu_strength * eu / mean ROI eu`` of its slice (EU-guided phase); otherwise uniform.
    Weighted sampling without replacement via keys u^(1/w) (Efraimidis-Spirakis).
    """
    eligible = roi if excluded is None else roi & ~excluded
    u = torch.rand(roi.shape, generator=generator, device=roi.device).clamp_min(1e-12)
    if eu is None:
        keys = u
    else:
        roi_f = roi.float()
        mean = (eu * roi_f).sum(1, keepdim=True) / roi_f.sum(1, keepdim=True).clamp_min(1)
        weight = 1.0 + eu_strength * eu / mean.clamp_min(1e-12)
        keys = u ** (1.0 / weight)
    keys = torch.where(eligible, keys, torch.full_like(keys, -1.0))
    count = eligible.sum(1)
    take = torch.minimum(torch.round(ratio * count.float()).long(), roi.sum(1) - 1)
    rank = torch.argsort(torch.argsort(keys, dim=1, descending=True), dim=1)
    masked = (rank < take[:, None]) & eligible
    return _keep_one_visible(masked, roi)


def monte_carlo_masks(roi: torch.Tensor, samples: int, ratio: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """K complementary masks (K, B, N) bool: every ROI patch is visible in ``round((1 - ratio) * K)`` of them.

    Each ROI patch gets a random phase in [0, 1); in mask k it is visible when
    ``(phase + k / K) mod 1 < 1 - ratio``. Unlike K independent draws, no patch is left
    unreconstructed, so the maps have no holes even for K = 4.
    """
    keys = torch.rand(roi.shape, generator=generator, device=roi.device)
    keys = torch.where(roi, keys, torch.full_like(keys, 2.0))
    rank = torch.argsort(torch.argsort(keys, dim=1), dim=1).float()
    phase = rank / roi.sum(1, keepdim=True).clamp_min(1).float()
    shift = torch.arange(samples, device=roi.device).float()[:, None, None] / samples
    visible = torch.remainder(phase[None] + shift, 1.0) < (1.0 - ratio)
    masked = roi[None] & ~visible
    return torch.stack([_keep_one_visible(m, roi) for m in masked])


def _pack(tokens: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather the kept tokens of each row to the front: (B, L, D), their indices (B, L), valid (B, L)."""
    count = keep.sum(1)
    length = max(int(count.max()), 1)
    index = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :length]
    packed = torch.gather(tokens, 1, index[..., None].expand(-1, -1, tokens.shape[-1]))
    valid = torch.arange(length, device=tokens.device)[None] < count[:, None]
    return packed, index, valid


def _scatter(values: torch.Tensor, index: torch.Tensor, valid: torch.Tensor,
             n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`_pack`: (B, N, D) with zeros where nothing was kept, and the hit mask (B, N)."""
    b, _, d = values.shape
    out = values.new_zeros(b, n, d).scatter(1, index[..., None].expand(-1, -1, d), values * valid[..., None])
    hit = torch.zeros(b, n, dtype=torch.bool, device=values.device).scatter(1, index, valid)
    return out, hit


def _padding_bias(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask (B, 1, 1, L): padded keys get -inf (works for fused and plain attention)."""
    bias = torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, float("-inf"))
    return bias[:, None, None, :]


# --- the network --------------------------------------------------------------------------------


class U2ADModel(nn.Module):
    """ViT masked autoencoder over the ROI patches of single-channel slices."""

    def __init__(self, config: U2ADConfig) -> None:
        super().__init__()
        self.config = config
        p = config.patch
        rows, cols, _ = config.preprocess.shape
        self.grid = (rows // p, cols // p)
        n = self.grid[0] * self.grid[1]
        self.patch_embed = nn.Linear(p * p, config.encoder_dim)
        self.pos = nn.Parameter(torch.zeros(1, n, config.encoder_dim))
        self.encoder = nn.ModuleList(Block(config.encoder_dim, config.encoder_heads, qkv_bias=True)
                                     for _ in range(config.encoder_depth))
        self.encoder_norm = nn.LayerNorm(config.encoder_dim)
        self.decoder_embed = nn.Linear(config.encoder_dim, config.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.decoder_dim))
        self.decoder_pos = nn.Parameter(torch.zeros(1, n, config.decoder_dim))
        self.decoder = nn.ModuleList(Block(config.decoder_dim, config.decoder_heads, qkv_bias=True)
                                     for _ in range(config.decoder_depth))
        self.decoder_norm = nn.LayerNorm(config.decoder_dim)
        self.head = nn.Linear(config.decoder_dim, p * p)
        for param in (self.pos, self.mask_token, self.decoder_pos):
            nn.init.trunc_normal_(param, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.pos.device

    @property
    def dim(self) -> int:
        """Encoder token width (reported by the benchmark like SimpleSliceNet's feature size)."""
        return self.config.encoder_dim

    def forward(self, images: torch.Tensor, roi: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """Reconstruct the ROI patches of ``images`` (B, H, W) given patch masks ``roi``, ``masked`` (B, N).

        Returns patch predictions (B, N, patch*patch); zeros outside the ROI.
        """
        n = roi.shape[1]
        tokens = self.patch_embed(patchify(images, self.config.patch)) + self.pos
        x, index, valid = _pack(tokens, roi & ~masked)
        bias = _padding_bias(valid, x.dtype)
        for block in self.encoder:
            x = block(x, attn_mask=bias)
        encoded, hit = _scatter(self.decoder_embed(self.encoder_norm(x)), index, valid, n)
        full = torch.where(hit[..., None], encoded, self.mask_token.to(encoded.dtype)) + self.decoder_pos
        y, index, valid = _pack(full, roi)
        bias = _padding_bias(valid, y.dtype)
        for block in self.decoder:
            y = block(y, attn_mask=bias)
        out, _ = _scatter(self.head(self.decoder_norm(y)), index, valid, n)
        return out

    def reconstruct(self, images: torch.Tensor, roi: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """Reconstructed images (B, H, W): predictions in the masked patches, the input elsewhere."""
        shape = tuple(images.shape[1:])
        pred = unpatchify(self.forward(images, roi, masked), self.config.patch, shape)
        return torch.where(masked_pixels(masked, self.config.patch, shape), pred.to(images.dtype), images)


# --- losses -------------------------------------------------------------------------------------


def sobel(images: torch.Tensor) -> torch.Tensor:
    """Horizontal and vertical Sobel gradients of (B, H, W): (B, 2, H, W)."""
    kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], device=images.device) / 4.0
    kernel = torch.stack([kx, kx.T])[:, None].to(images.dtype)
    return F.conv2d(images[:, None], kernel, padding=1)


def reconstruction_loss(recon: torch.Tensor, images: torch.Tensor, region: torch.Tensor,
                        l1_weight: float = 10.0, edge_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """L1 (x ``l1_weight``) plus edge loss (L1 of Sobel gradients) over ``region`` pixels (the masked patches)."""
    region = region.to(recon.dtype)
    denom = region.sum().clamp_min(1.0)
    l1 = ((recon - images).abs() * region).sum() / denom
    edge = ((sobel(recon) - sobel(images)).abs() * region[:, None]).sum() / (2.0 * denom)
    loss = l1_weight * l1 + edge_weight * edge
    return loss, {"l1": float(l1.detach()), "edge": float(edge.detach())}


def masked_pixels(masked: torch.Tensor, patch: int, shape: tuple[int, int]) -> torch.Tensor:
    """(B, N) patch mask -> (B, H, W) pixel mask."""
    return unpatchify(masked[..., None].expand(-1, -1, patch * patch).float(), patch, shape) > 0


# --- Monte-Carlo uncertainty --------------------------------------------------------------------


def uncertainty_maps(recons: torch.Tensor, hidden: torch.Tensor, images: torch.Tensor,
                     roi_pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """EU and AU (B, H, W) from K reconstructions (K, B, H, W) and where each one hid the input (K, B, H, W).

    Only reconstructions that had to predict a pixel count for it. EU = their variance, AU =
    |their mean - input|; both 0 outside ``roi_pixels`` and where no reconstruction hid the pixel.
    """
    weight = hidden.to(recons.dtype)
    count = weight.sum(0)
    mean = (recons * weight).sum(0) / count.clamp_min(1.0)
    var = (((recons - mean[None]) ** 2) * weight).sum(0) / count.clamp_min(1.0)
    seen = (count > 0) & roi_pixels
    eu = torch.where(seen, var, torch.zeros_like(var))
    au = torch.where(seen, (mean - images).abs(), torch.zeros_like(mean))
    return eu, au


def slice_uncertainty(net: U2ADModel, images: torch.Tensor, roi_pixels: torch.Tensor,
                      masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """EU and AU maps (B, H, W) of a batch of slices reconstructed under each of ``masks`` (K, B, N), in one pass."""
    cfg = net.config
    k, b = masks.shape[:2]
    shape = tuple(images.shape[1:])
    flat = masks.reshape(k * b, -1)
    roi = roi_patches(roi_pixels, cfg.patch)
    recons = net.reconstruct(images.repeat(k, 1, 1), roi.repeat(k, 1), flat).float().reshape(k, b, *shape)
    hidden = masked_pixels(flat, cfg.patch, shape).reshape(k, b, *shape)
    return uncertainty_maps(recons, hidden, images.float(), roi_pixels)


def volume_uncertainty(net: U2ADModel, image: np.ndarray, roi: np.ndarray, samples: int | None = None,
                       autocast: torch.dtype | None = None, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """EU and AU on the model grid (X, Y, Z) for an image in [0, 1] and its ROI; slices along the last axis.

    Slices with fewer than ``min_roi_patches`` ROI patches are left at 0. The masks come from a
    CPU generator seeded with ``seed`` (default: the model's), so results do not depend on the device.
    """
    cfg = net.config
    samples = samples or cfg.samples
    generator = torch.Generator().manual_seed(cfg.seed if seed is None else seed)
    slices = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))
    rois = torch.from_numpy(np.ascontiguousarray(roi.transpose(2, 0, 1)))
    roi_tokens = roi_patches(rois, cfg.patch)
    todo = torch.nonzero(roi_tokens.sum(1) >= cfg.min_roi_patches)[:, 0]
    eu = torch.zeros_like(slices)
    au = torch.zeros_like(slices)
    per_batch = max(1, cfg.batch_slices // samples)
    context = torch.autocast(net.device.type, dtype=autocast) if autocast is not None else nullcontext()
    with torch.inference_mode(), context:
        for start in range(0, len(todo), per_batch):
            pick = todo[start : start + per_batch]
            masks = monte_carlo_masks(roi_tokens[pick], samples, cfg.mask_ratio, generator).to(net.device)
            e, a = slice_uncertainty(net, slices[pick].to(net.device), rois[pick].to(net.device), masks)
            eu[pick], au[pick] = e.float().cpu(), a.float().cpu()
    return eu.numpy().transpose(1, 2, 0), au.numpy().transpose(1, 2, 0)


# --- maps and scores ----------------------------------------------------------------------------


@dataclass
class U2ADMaps:
    """Detection outputs on the input grid."""

    heatmap: np.ndarray  # calibrated anomaly map, 0 outside the ROI
    uncertainty: np.ndarray | None  # epistemic (EU)
    aleatoric: np.ndarray | None  # aleatoric (AU)
    slab_scores: list[dict]


def score_map(config: U2ADConfig, au: np.ndarray) -> np.ndarray:
    """Smoothed, calibrated anomaly map on the model grid from the AU map."""
    sigma = [config.scoring.smoothing_mm / s for s in config.preprocess.spacing]
    smooth = gaussian_smooth(torch.from_numpy(np.ascontiguousarray(au))[None, None], sigma)[0, 0].numpy()
    return ((smooth - config.scoring.offset) / config.scoring.scale).astype(np.float32)


def slab_scores(heat: np.ndarray, roi: np.ndarray, pre: Preprocessed, config: U2ADConfig) -> list[dict]:
    """Max anomaly score per slab of ``slab_mm`` along the slice axis (U2AD's segment level).

    Positions are RAS millimetres along the slice axis (e.g. axis "S" for axial slices).
    """
    spacing = config.preprocess.spacing[2]
    step = max(1, int(round(config.slab_mm / spacing)))
    axis = int(np.argmax(np.abs(SLICE_AXES[config.preprocess.slice_axis][2])))
    affine = pre.mapping.model_affine
    per_slice = np.where(roi, heat, -np.inf).max(axis=(0, 1))
    out = []
    for first in range(0, heat.shape[2], step):
        chunk = per_slice[first : first + step]
        if not np.isfinite(chunk).any():
            continue
        ends = [affine[axis, 3] + affine[axis, 2] * k for k in (first, first + len(chunk) - 1)]
        lo, hi = min(ends) - spacing / 2, max(ends) + spacing / 2
        out.append({"slab": len(out) + 1, "axis": AXIS_NAMES[axis], "from_mm": round(float(lo), 1),
                    "to_mm": round(float(hi), 1), "score": round(float(chunk[np.isfinite(chunk)].max()), 5)})
    return out


def analyse(net: U2ADModel, pre: Preprocessed, autocast: torch.dtype | None = None, extras: bool = True,
            lap=None) -> U2ADMaps:
    """Monte-Carlo reconstruction of a preprocessed volume; maps resampled onto the input grid.

    ``extras`` False skips the EU/AU resampling and the slab scores (training's validation needs
    only the heatmap). ``lap(name)``, when given, is called after each stage for timings.
    """
    lap = lap or (lambda _name: None)
    eu, au = volume_uncertainty(net, pre.image, pre.brain, autocast=autocast)
    lap("reconstruct_s")
    heat = score_map(net.config, au)
    if not extras:
        heatmap = pre.mapping.to_input(heat, where=pre.input_brain)
        lap("map_s")
        return U2ADMaps(heatmap, None, None, [])
    heatmap, uncertainty, aleatoric = pre.mapping.to_input([heat, eu, au], where=pre.input_brain)
    uncertainty, aleatoric = np.clip(uncertainty, 0.0, None), np.clip(aleatoric, 0.0, None)
    slabs = slab_scores(heat, pre.brain, pre, net.config)
    lap("map_s")
    return U2ADMaps(heatmap, uncertainty, aleatoric, slabs)
