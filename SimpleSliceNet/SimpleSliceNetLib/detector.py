"""Detection engine: a loaded model turns a volume (array + affine) into a heatmap on its grid."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .devices import choose_device, encoder_autocast
from .errors import ModelFileError
from .model_file import ModelFile, resolve_model
from .preprocess import preprocess
from .slicenet import SliceNetConfig, SliceNetModel
from .volume_io import Volume


@dataclass
class DetectionResult:
    heatmap: np.ndarray  # float32 on the input grid; 0 outside the brain; higher = more anomalous
    brain_mask: np.ndarray  # bool on the input grid
    volume_score: float
    threshold: float
    coverage: float  # fraction of the brain inside the model's field of view
    timings: dict = field(default_factory=dict)
    extra_maps: dict = field(default_factory=dict)  # method-specific maps on the input grid
    slab_scores: list = field(default_factory=list)  # max score per slab along the slice axis (U2AD)


def volume_score(heatmap: np.ndarray, brain: np.ndarray) -> float:
    """A scan's score: the heatmap's maximum in the brain (0 without brain)."""
    # A reduction with where= reads both arrays in memory order (indexing with the mask does not).
    return float(np.max(heatmap, where=brain, initial=-np.inf)) if brain.any() else 0.0


def build_model(model: ModelFile) -> torch.nn.Module:
    """The network described by ``model`` (a SliceNetModel or a U2ADModel) with its weights loaded (strictly)."""
    if model.method not in ("simpleslicenet", "u2ad"):
        raise ModelFileError(f"{model.path}: method {model.method!r} is not available in this version")
    try:
        if model.method == "u2ad":
            from .u2ad import U2ADConfig, U2ADModel

            net = U2ADModel(U2ADConfig.from_dict(model.config))
        else:
            net = SliceNetModel(SliceNetConfig.from_dict(model.config), encoder_weights="none")
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{model.path}: invalid configuration ({exc})") from exc
    load_weights(net, model)
    return net.eval()


def load_weights(net: torch.nn.Module, model: ModelFile, recomputed: tuple[str, ...] = ()) -> None:
    """Load ``model``'s weights into ``net``: every tensor must match, except the ``recomputed`` ones, which
    are left out (the caller computes them again, e.g. for another slab layout)."""
    state = model.load_weights()
    if isinstance(net, SliceNetModel):
        state = net.without_untapped_stages(state)
    state = {key: value for key, value in state.items() if key not in recomputed}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if set(missing) - set(recomputed) or unexpected:
        raise ModelFileError(
            f"{model.weights_path}: weights do not match the configuration "
            f"({len(missing)} missing, {len(unexpected)} unexpected tensors)"
        )


def prepare_for_inference(net: SliceNetModel, device: str, autocast: torch.dtype | None) -> None:
    """Make a loaded SimpleSliceNet faster for detection with the same outputs (it can no longer train).

    The flow is evaluated through a ``GridFlow`` (the same likelihoods to float rounding). In fp32 only:
    BatchNorm folded into the convolutions (folded into bf16/fp16 weights and biases, the BatchNorm
    shift loses enough precision to move the heatmap more than reduced precision itself does) and, on
    the CPU, the encoder's backbone frozen (TorchScript) for the model grid's slice size.
    """
    net.specialise_flow()
    if autocast is not None:
        return
    net.encoder.fold_batchnorm()
    if device == "cpu":
        net.encoder.freeze(*net.config.preprocess.shape[:2])


class Detector:
    """Load a model once, then ``detect`` any number of volumes."""

    def __init__(self, model: ModelFile, device: str = "auto") -> None:
        started = time.perf_counter()
        self.model = model
        self.device = choose_device(device)
        self.net = build_model(model).to(self.device.name)
        # The precision the model was calibrated in, on every device: a finding must not depend on it.
        self.autocast = encoder_autocast(self.net.config.scoring.encoder_precision)
        if isinstance(self.net, SliceNetModel):
            prepare_for_inference(self.net, self.device.name, self.autocast)
        self.load_seconds = time.perf_counter() - started

    @classmethod
    def load(cls, model_ref: str | Path | None = None, device: str = "auto") -> Detector:
        return cls(resolve_model(model_ref), device)

    @property
    def info(self) -> dict:
        return {"id": self.model.id, "version": self.model.version, "method": self.model.method,
                "modality": self.model.modality, "path": str(self.model.path)}

    @property
    def threshold(self) -> float:
        return float(self.net.config.scoring.threshold)

    def detect(self, volume: Volume, mask: np.ndarray | None = None, name: str = "input") -> DetectionResult:
        timings = {}
        clock = time.perf_counter()

        def lap(key: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[key] = round(now - clock, 3)
            clock = now

        cfg = self.net.config
        pre = preprocess(volume, cfg.preprocess, mask=mask, name=name)
        lap("preprocess_s")
        extra_maps, slabs = {}, []
        if isinstance(self.net, SliceNetModel):
            features = self.net.features(pre.image, self.autocast)
            lap("encode_s")
            nll = self.net.nll_grid(features)
            lap("flow_s")
            heatmap = self.net.input_heatmap(nll, pre.mapping, pre.input_brain,
                                             self.net.guide_for(pre, volume.array))
            lap("map_s")
        else:
            from .u2ad import analyse

            maps = analyse(self.net, pre, self.autocast, lap=lap)
            heatmap, slabs = maps.heatmap, maps.slab_scores
            extra_maps = {"uncertainty": maps.uncertainty, "aleatoric": maps.aleatoric}
        return DetectionResult(heatmap, pre.input_brain, volume_score(heatmap, pre.input_brain), self.threshold,
                               pre.coverage, timings, extra_maps, slabs)

