"""``simpleslicenet finetune-encoder``: Encoder-Decoder Contrast (EDC) fine-tuning of the slice encoder.

EDC (Guo et al., IEEE TMI 2024; public code guojiajeremy/EDC) trains an ImageNet encoder together
with a feature decoder on healthy images: the decoder reconstructs the encoder's features at three
levels from its deepest (bottleneck) stage, and the loss is, per level, 1 - cosine similarity of the
whole flattened maps (one vector per image), summed over levels. As in the public code the
reconstruction targets are detached (stop-gradient), so the encoder learns only through the
bottleneck, its BatchNorm layers train with momentum 0.01, the optimiser is AdamW (encoder lr 5e-5,
decoder 5e-4, weight decay 1e-4) and gradients are clipped at norm 1.

Where this differs, and why: EDC's decoder mirrors a ResNet; ours is a generic residual decoder
(bilinear upsampling, ``--decoder-blocks`` residual blocks per level and a linear 1x1 head per level,
so features that can be negative, as in EfficientNet, can be reconstructed) that works on any timm
backbone. Slices are the detector's own model-grid slices (same intensity normalisation, grid and
slice axis), at the model's in-plane size rather than 256x256. Defaults are CPU-sized (batch 8,
200 steps); the paper's scale is ``--batch-size 32 --steps 4000``.

Slices come from (a) volumes (a folder, manifest or any layout ``datasets.load_cases`` reads; healthy
or unlabelled ones), (b) the synthetic generator (``synth``: healthy subjects made on the fly, seeded)
or (c) a 2D image folder laid out like Br35H (``no/`` healthy, ``yes/`` tumour: only ``no/`` is read).

Output: ``FILE.safetensors`` (the backbone's state dict with timm key names, loadable by
``train --encoder-weights FILE``) and the sidecar ``FILE.json`` (format, backbone, taps, source,
steps, seconds, the weights' SHA-256), which the encoder loader verifies when it is present.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from SimpleSliceNetLib.errors import UserError
from SimpleSliceNetLib.progress import Progress
from SimpleSliceNetLib.volume_io import atomic_path

from .grid_options import SLICENET_GRID, add_grid_arguments, grid_config, parse_numbers

FORMAT_VERSION = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Volume slices with less brain than this fraction of the slice carry almost no signal to learn from.
MIN_BRAIN_FRACTION = 0.05
# Entropy tag that keeps generated subjects apart from those of ``simpleslicenet synth`` (same seed).
_SYNTH_STREAM = 0xEDC


@dataclass
class FinetuneConfig:
    steps: int = 200
    batch_size: int = 8
    lr_encoder: float = 5e-5
    lr_decoder: float = 5e-4
    weight_decay: float = 1e-4
    clip: float = 1.0
    bn_momentum: float = 0.01
    decoder_blocks: int = 2
    seed: int = 0
    time_budget_min: float | None = None


@dataclass
class SliceSet:
    """Training slices (N, H, W) in [0, 1] (float16 to halve memory) and where they came from."""

    slices: np.ndarray
    source: dict = field(default_factory=dict)


# --- slice sources ------------------------------------------------------------------------------


def _cap(count: int, per_item: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of at most ``per_item`` of ``count`` items, chosen at random, in order."""
    if count <= per_item:
        return np.arange(count)
    return np.sort(rng.choice(count, per_item, replace=False))


def _model_grid_slices(pre, per_volume: int, rng: np.random.Generator) -> np.ndarray:
    """The brain-bearing slices of a preprocessed volume along the model's slice axis (last axis)."""
    slices = pre.image.transpose(2, 0, 1)
    brain = pre.brain.transpose(2, 0, 1).mean(axis=(1, 2))
    keep = np.flatnonzero(brain >= MIN_BRAIN_FRACTION)
    return slices[keep[_cap(len(keep), per_volume, rng)]].astype(np.float16)


def volume_slices(source: str | Path, preprocess_config, split: str | None, max_slices: int,
                  rng: np.random.Generator, progress: Progress) -> SliceSet:
    """Slices of the healthy (or unlabelled) volumes at ``source`` (any layout ``load_cases`` reads)."""
    from SimpleSliceNetLib.errors import VolumeError
    from SimpleSliceNetLib.preprocess import preprocess
    from SimpleSliceNetLib.volume_io import load_volume

    from .datasets import load_cases

    cases = [c for c in load_cases(source, split=split) if c.label != "lesion"]
    if not cases:
        raise UserError(f"{source}: only lesion volumes found; EDC fine-tuning needs healthy volumes")
    per_volume = max(1, max_slices // len(cases))
    parts, skipped = [], 0
    for case in progress.iterate(cases, len(cases), "reading volumes", 0.0, 0.1):
        try:
            pre = preprocess(load_volume(case.image), preprocess_config, name=str(case.image))
        except VolumeError as exc:
            progress.info(f"skipped: {exc}")
            skipped += 1
            continue
        parts.append(_model_grid_slices(pre, per_volume, rng))
    if not parts:
        raise UserError(f"{source}: none of the {len(cases)} volumes could be used; see the messages above")
    slices = np.concatenate(parts)
    return SliceSet(slices, {"kind": "volumes", "path": str(source), "split": split, "volumes": len(parts),
                             "skipped": skipped, "slices": len(slices)})


def synth_slices(volumes: int, seed: int, templates: tuple[str, ...], preprocess_config, max_slices: int,
                 rng: np.random.Generator, progress: Progress) -> SliceSet:
    """Slices of ``volumes`` healthy subjects made by the synthetic generator (seeded, nothing written)."""
    from SimpleSliceNetLib.preprocess import preprocess

    from .synth import make_healthy_subject

    if volumes < 1:
        raise UserError(f"--synth-volumes must be at least 1, got {volumes}")
    per_volume = max(1, max_slices // volumes)
    parts = []
    for index in progress.iterate(range(volumes), volumes, "generating healthy volumes", 0.0, 0.1):
        subject_rng = np.random.default_rng([seed, _SYNTH_STREAM, index])
        volume, brain = make_healthy_subject(templates[index % len(templates)], subject_rng)
        pre = preprocess(volume, preprocess_config, mask=brain, name=f"synthetic subject {index}")
        parts.append(_model_grid_slices(pre, per_volume, rng))
    slices = np.concatenate(parts)
    return SliceSet(slices, {"kind": "synth", "seed": seed, "templates": list(templates), "volumes": volumes,
                             "slices": len(slices)})


def _br35h_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise UserError(f"{folder}: not found; give a Br35H-style folder (no/ and yes/ subfolders of 2D images)")
    healthy = folder / "no"
    if not healthy.is_dir():
        raise UserError(
            f"{folder}: not a Br35H-style folder: it has no 'no/' subfolder of healthy images "
            "(expected FOLDER/no/*.jpg|png; yes/ is ignored)"
        )
    images = sorted(p for p in healthy.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise UserError(f"{healthy}: no images ({', '.join(IMAGE_SUFFIXES)}); put the healthy 2D slices there")
    return images


def image_to_slice(path: Path, preprocess_config) -> np.ndarray:
    """A 2D image as a model-grid slice: grey, resized to the in-plane shape, oriented and normalised.

    Images are assumed in radiological display (anterior up, the patient's right on the left); the
    model's axial slice is indexed (right, anterior), hence the flips and transpose. Intensities are
    scaled like ``preprocess``: foreground clipped to its percentiles and mapped to 0..1, background 0.
    """
    from PIL import Image, UnidentifiedImageError

    from SimpleSliceNetLib.preprocess import foreground_mask

    rows, columns = preprocess_config.shape[:2]
    try:
        with Image.open(path) as image:
            grey = image.convert("L").resize((rows, columns), Image.Resampling.BILINEAR)
    except (OSError, UnidentifiedImageError) as exc:
        raise UserError(f"{path}: cannot be read as an image ({exc}); remove or replace it") from exc
    array = np.asarray(grey, dtype=np.float32)[::-1, ::-1].T
    foreground = foreground_mask(array[..., None], preprocess_config.background_fraction)[..., 0]
    if foreground.sum() < 16:
        raise UserError(f"{path}: the image is (almost) blank; remove it")
    lo, hi = np.percentile(array[foreground], preprocess_config.clip_percentiles)
    scaled = np.clip((array - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0)
    return np.where(foreground, scaled, 0.0).astype(np.float32)


def br35h_slices(folder: str | Path, preprocess_config, max_slices: int, rng: np.random.Generator,
                 progress: Progress) -> SliceSet:
    """The healthy images (``no/``) of a Br35H-style folder as model-grid slices; ``yes/`` is never read."""
    folder = Path(folder)
    images = _br35h_images(folder)
    images = [images[i] for i in _cap(len(images), max_slices, rng)]
    slices = np.stack([image_to_slice(path, preprocess_config).astype(np.float16)
                       for path in progress.iterate(images, len(images), "reading images", 0.0, 0.1)])
    return SliceSet(slices, {"kind": "br35h", "path": str(folder), "images": len(images), "slices": len(slices)})


def source_kind(source: str, kind: str) -> str:
    """``kind`` unless it is ``auto``: ``synth`` for the word synth, a folder with no/ or yes/ is Br35H."""
    if kind != "auto":
        return kind
    if source == "synth":
        return "synth"
    path = Path(source).expanduser()
    if path.is_dir() and ((path / "no").is_dir() or (path / "yes").is_dir()):
        return "br35h"
    return "volumes"


# --- the EDC model ------------------------------------------------------------------------------


def _edc_modules(backbone_channels: int, level_channels: list[int], blocks: int):
    """The feature decoder: from the bottleneck, one upsampling stage and linear head per level."""
    import torch.nn.functional as F
    from torch import nn

    class Residual(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
            )

        def forward(self, x):
            return F.relu(x + self.body(x))

    class Stage(nn.Module):
        def __init__(self, channels_in: int, width: int) -> None:
            super().__init__()
            self.enter = nn.Sequential(nn.Conv2d(channels_in, width, 1, bias=False), nn.BatchNorm2d(width),
                                       nn.ReLU(inplace=True))
            self.blocks = nn.Sequential(*[Residual(width) for _ in range(blocks)])

        def forward(self, x, size):
            return self.blocks(self.enter(F.interpolate(x, size=size, mode="bilinear", align_corners=False)))

    class FeatureDecoder(nn.Module):
        """Reconstructs the encoder's levels (shallow to deep) from its deepest stage."""

        def __init__(self) -> None:
            super().__init__()
            stages, heads = [], []
            channels_in = backbone_channels
            for channels in reversed(level_channels):
                width = int(min(max(channels, 32), 512))
                stages.append(Stage(channels_in, width))
                heads.append(nn.Conv2d(width, channels, 1))
                channels_in = width
            self.stages, self.heads = nn.ModuleList(stages), nn.ModuleList(heads)

        def forward(self, bottleneck, sizes):
            x, outs = bottleneck, []
            for stage, head, size in zip(self.stages, self.heads, reversed(sizes), strict=True):
                x = stage(x, size)
                outs.append(head(x))
            return outs[::-1]

    return FeatureDecoder()


def edc_loss(encoded: list, decoded: list):
    """Sum over levels of the batch mean of 1 - cosine(whole flattened decoded map, detached encoder map)."""
    import torch

    parts = [
        (1.0 - torch.cosine_similarity(d.flatten(1).float(), e.detach().flatten(1).float(), dim=1)).mean()
        for e, d in zip(encoded, decoded, strict=True)
    ]
    return sum(parts), [p.item() for p in parts]


def default_levels(n_stages: int) -> tuple[int, ...]:
    """EDC's three levels: the three stages before the deepest (layer1-3 of a ResNet)."""
    if n_stages < 4:
        raise UserError(f"the backbone has {n_stages} feature stages; EDC needs at least 4 (3 levels + bottleneck)")
    return tuple(range(n_stages - 4, n_stages - 1))


def finetune(slices: SliceSet, encoder_config, levels: tuple[int, ...] | None, start_weights: str,
             config: FinetuneConfig, device: str, progress: Progress):
    """Train encoder + decoder with the EDC loss; returns (backbone, summary). The backbone ends in eval mode."""
    import timm
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    from SimpleSliceNetLib.encoder import EncoderConfig, build_backbone

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    try:
        n_stages = len(timm.create_model(encoder_config.backbone, features_only=True).feature_info)
    except Exception as exc:  # timm raises several types for unknown names
        raise UserError(f"backbone {encoder_config.backbone!r} cannot be created with features_only: {exc}") from exc
    levels = tuple(levels) if levels else default_levels(n_stages)
    bottleneck = n_stages - 1
    if sorted(set(levels)) != list(levels) or levels[0] < 0 or levels[-1] >= bottleneck:
        raise UserError(f"--levels must be increasing stage indices below the bottleneck stage {bottleneck}, "
                        f"got {','.join(map(str, levels))}")
    if max(encoder_config.taps) > bottleneck:
        raise UserError(f"--taps {encoder_config.taps} exceed the backbone's {n_stages} stages")
    indices = (*levels, bottleneck)
    backbone = build_backbone(EncoderConfig(backbone=encoder_config.backbone, taps=indices), start_weights)
    channels = backbone.feature_info.channels()
    decoder = _edc_modules(channels[-1], channels[:-1], config.decoder_blocks)
    for module in backbone.modules():
        if isinstance(module, _BatchNorm):
            module.momentum = config.bn_momentum
    # channels_last is markedly faster for these convolutions on CPU.
    backbone.to(device, memory_format=torch.channels_last).train()
    decoder.to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(
        [{"params": backbone.parameters(), "lr": config.lr_encoder},
         {"params": decoder.parameters(), "lr": config.lr_decoder}],
        weight_decay=config.weight_decay,
    )
    mean = torch.tensor(encoder_config.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(encoder_config.std, device=device).view(1, 3, 1, 1)
    parameters = [*backbone.parameters(), *decoder.parameters()]

    order, position = rng.permutation(len(slices.slices)), 0
    reported: list[dict] = []
    recent: list[float] = []
    first_loss, steps_done, step_seconds, stopped = None, 0, 0.0, None
    report_every = max(1, config.steps // 10)
    started = time.perf_counter()
    for step in progress.iterate(range(config.steps), config.steps, "EDC fine-tuning", 0.1, 0.9):
        if config.time_budget_min is not None and step > 0 and \
                time.perf_counter() - started + step_seconds > 60.0 * config.time_budget_min:
            stopped = f"time budget of {config.time_budget_min:g} min reached after {step} steps"
            break
        step_start = time.perf_counter()
        if position + config.batch_size > len(order):
            order, position = rng.permutation(len(slices.slices)), 0
        pick = np.sort(order[position : position + config.batch_size])
        position += config.batch_size
        batch = torch.from_numpy(slices.slices[pick].astype(np.float32))[:, None].to(device)
        x = ((batch.expand(-1, 3, -1, -1) - mean) / std).contiguous(memory_format=torch.channels_last)
        maps = backbone(x)
        decoded = decoder(maps[-1], [m.shape[-2:] for m in maps[:-1]])
        loss, parts = edc_loss(maps[:-1], decoded)
        if not math.isfinite(loss.item()):
            raise UserError(f"the EDC loss became {loss.item()} at step {step + 1}; try smaller learning rates")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.clip > 0:
            torch.nn.utils.clip_grad_norm_(parameters, config.clip)
        optimizer.step()
        steps_done, step_seconds = step + 1, time.perf_counter() - step_start
        first_loss = loss.item() if first_loss is None else first_loss
        recent = [*recent[-9:], loss.item()]
        if steps_done % report_every == 0 or steps_done == config.steps:
            row = {"step": steps_done, "loss": round(loss.item(), 6), "levels": [round(p, 6) for p in parts],
                   "elapsed_s": round(time.perf_counter() - started, 2)}
            reported.append(row)
            progress.emit("metric", **row)
            if progress.mode == "bar":
                progress.info(f"step {steps_done}: loss {row['loss']:.4f} (levels "
                              f"{', '.join(f'{p:.4f}' for p in parts)})")
    if stopped:
        progress.info(stopped)
    backbone.eval()
    summary = {
        "levels": list(levels),
        "bottleneck": bottleneck,
        "steps": steps_done,
        "stopped": stopped,
        "seconds": round(time.perf_counter() - started, 1),
        "loss_first": first_loss,
        "loss_last_10": float(np.mean(recent)) if recent else None,
        "history": reported,
    }
    return backbone, summary


def write_encoder_file(out: Path, backbone, info: dict) -> tuple[Path, Path]:
    """``out`` (.safetensors, timm key names) then its sidecar ``out.with_suffix('.json')``, both atomically."""
    from safetensors.torch import save_file

    from SimpleSliceNetLib.encoder import ENCODER_FILE_FORMAT, sha256_file

    tensors = {key: value.detach().cpu().contiguous() for key, value in backbone.state_dict().items()}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata={"format": ENCODER_FILE_FORMAT, "backbone": info["backbone"]})
    sidecar = out.with_suffix(".json")
    document = {"format": ENCODER_FILE_FORMAT, "format_version": FORMAT_VERSION, **info,
                "weights": out.name, "sha256": sha256_file(out)}
    with atomic_path(sidecar) as tmp:
        tmp.write_text(json.dumps(document, indent=1) + "\n")
    return out, sidecar


# --- command line -------------------------------------------------------------------------------


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune-encoder",
        help="fine-tune the slice encoder with Encoder-Decoder Contrast (EDC) on healthy slices",
        description="Encoder-Decoder Contrast: train the encoder with a feature decoder (cosine loss over three "
                    "levels) on healthy 2D slices; writes FILE.safetensors (timm key names, for train "
                    "--encoder-weights FILE) and FILE.json.",
    )
    p.add_argument("source", metavar="SOURCE",
                   help="healthy volumes (folder, cases.json, IXI folder, .txt list), the word 'synth' "
                        "(generated healthy volumes), or a Br35H-style folder (no/ used, yes/ ignored)")
    p.add_argument("--out", required=True, help="output weights, FILE.safetensors (sidecar FILE.json beside it)")
    p.add_argument("--kind", default="auto", choices=["auto", "volumes", "synth", "br35h"],
                   help="what SOURCE is (default: guessed)")
    p.add_argument("--split", default="train", help="split of a cases.json manifest to use (default: train)")
    p.add_argument("--backbone", default="tf_efficientnet_lite0", help="timm model name (features_only)")
    p.add_argument("--taps", default="2,3", help="the detector's feature taps, recorded and checked (default 2,3)")
    p.add_argument("--levels", help="stages the decoder reconstructs (default: the three before the deepest)")
    p.add_argument("--encoder-weights", default="imagenet",
                   help="starting weights: imagenet (offline package), timm (download), none or a weights file")
    add_grid_arguments(p, "192,192,96 at 1,1,1.5 mm")
    defaults = FinetuneConfig()
    p.add_argument("--steps", type=int, default=defaults.steps, help="optimiser steps (EDC: 4000)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="slices per step (EDC: 32)")
    p.add_argument("--lr-encoder", type=float, default=defaults.lr_encoder)
    p.add_argument("--lr-decoder", type=float, default=defaults.lr_decoder)
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--decoder-blocks", type=int, default=defaults.decoder_blocks,
                   help="residual blocks per decoder level")
    p.add_argument("--max-slices", type=int, default=8000, help="at most this many training slices kept in memory")
    p.add_argument("--synth-volumes", type=int, default=8, help="with SOURCE synth: healthy volumes to generate")
    p.add_argument("--holdout-template", default="sri24",
                   help="with SOURCE synth: template never used (match the test set's; default sri24)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget-min", type=float, help="stop before a step would exceed this many minutes")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace, progress: Progress) -> int:
    from SimpleSliceNetLib.devices import choose_device
    from SimpleSliceNetLib.encoder import EncoderConfig, build_backbone

    from .synth import TEMPLATES

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: the encoder file must end in .safetensors")
    if args.steps < 1 or args.batch_size < 1 or args.max_slices < 1:
        raise UserError("--steps, --batch-size and --max-slices must be at least 1")
    preprocess_config = grid_config(args, SLICENET_GRID)
    encoder_config = EncoderConfig(backbone=args.backbone, taps=parse_numbers(args.taps, "taps", int))
    # Inputs are normalised with EncoderConfig's mean/std: what `train --encoder-weights FILE` uses.
    levels = parse_numbers(args.levels, "levels", int) if args.levels else None
    config = FinetuneConfig(steps=args.steps, batch_size=args.batch_size, lr_encoder=args.lr_encoder,
                            lr_decoder=args.lr_decoder, weight_decay=args.weight_decay,
                            decoder_blocks=args.decoder_blocks, seed=args.seed, time_budget_min=args.time_budget_min)
    progress.emit("start", total=args.steps)
    rng = np.random.default_rng(args.seed)
    kind = source_kind(args.source, args.kind)
    if kind == "synth":
        if args.holdout_template not in TEMPLATES:
            raise UserError(f"--holdout-template {args.holdout_template}: choose one of {', '.join(TEMPLATES)}")
        templates = tuple(t for t in TEMPLATES if t != args.holdout_template)
        slices = synth_slices(args.synth_volumes, args.seed, templates, preprocess_config, args.max_slices, rng,
                              progress)
    elif kind == "br35h":
        slices = br35h_slices(args.source, preprocess_config, args.max_slices, rng, progress)
    else:
        slices = volume_slices(args.source, preprocess_config, args.split, args.max_slices, rng, progress)
    progress.info(f"{len(slices.slices)} training slices from {slices.source['kind']} ({args.source})")
    device = choose_device(args.device)
    if device.note:
        progress.info(device.note)

    backbone, summary = finetune(slices, encoder_config, levels, args.encoder_weights, config, device.name, progress)
    info = {
        "backbone": args.backbone,
        "taps": list(encoder_config.taps),
        "mean": list(encoder_config.mean),
        "std": list(encoder_config.std),
        "start_weights": args.encoder_weights,
        "preprocess": json.loads(json.dumps(asdict(preprocess_config))),
        "source": slices.source,
        "finetune_config": asdict(config),
        "device": device.name,
        **summary,
        "command": "simpleslicenet " + " ".join(sys.argv[1:]),
    }
    weights, sidecar = write_encoder_file(out, backbone, info)
    # The file must load as the detector's backbone (its taps) through the loader train uses.
    build_backbone(encoder_config, str(weights))
    progress.emit("output", files={"encoder": str(weights), "sidecar": str(sidecar)})
    progress.emit("done", ok=1, failed=0, elapsed_s=round(progress.elapsed, 1))
    print(f"encoder written: {weights} ({summary['steps']} steps, loss {summary['loss_first']:.4f} -> "
          f"{summary['loss_last_10']:.4f}); use it with: simpleslicenet train --encoder-weights {weights} ...",
          file=sys.stderr)
    return 0

