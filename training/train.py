"""`simpleslicenet train`: healthy volumes in, a SimpleSliceNet model file out.

Features of the frozen encoder are computed once per volume and kept in memory (the encoder
does not change during training, so recomputing them every epoch, as the public code does,
only costs time). Each epoch then fits the flow with maximum likelihood plus the Semi-Push-Pull
loss on Gaussian-noise synthetic anomalies.
"""

from __future__ import annotations

import argparse
import csv
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


@dataclass
class TrainConfig:
    epochs: int = 20
    lr: float = 1e-3
    # Std of the feature noise that makes synthetic anomalies, in units of the healthy
    # per-channel std (features are standardised).
    noise_sigma: float = 0.3
    spp_beta: float = 0.05
    spp_tau: float = 0.1
    spp_normalizer: float = 10.0
    focal_gamma: float = 2.0
    sub_batch: int = 4096
    seed: int = 0
    calibration_fpr: float = 0.001
    time_budget_min: float | None = None


@dataclass
class VolumeItem:
    """What training keeps of one volume: its slab features and, for validation, its maps."""

    id: str
    features: object  # torch.Tensor (h, w, slabs, C), standardised later
    label: str | None = None
    lesion: np.ndarray | None = None  # bool on the input grid
    pre: object = None  # Preprocessed, for mapping heatmaps back


@dataclass
class History:
    rows: list[dict] = field(default_factory=list)

    def add(self, **row) -> dict:
        self.rows.append(row)
        return row


def semi_push_pull_loss(logp_real, logp_fake, config: TrainConfig, with_spp: bool):
    """Maximum likelihood (focal-weighted) plus BGAD's Semi-Push-Pull terms.

    ``logp_*`` are log-likelihoods per dimension. The boundaries come from the real batch:
    b_n = beta-quantile of logp/normalizer, b_a = b_n - tau. Empty sets add nothing (the
    public code produces NaN there).
    """
    import torch
    import torch.nn.functional as F

    nll = -F.logsigmoid(logp_real)
    weight = (1.0 - torch.sigmoid(logp_real)).detach() ** config.focal_gamma
    loss = (weight * nll).sum() / weight.sum().clamp_min(1e-8)
    parts = {"ml": loss.item()}
    if with_spp:
        real = logp_real / config.spp_normalizer
        fake = logp_fake / config.spp_normalizer
        b_n = torch.quantile(real.detach(), config.spp_beta)
        b_a = b_n - config.spp_tau
        low = real[real < b_n]
        high = fake[fake > b_a]
        l_n = (b_n - low).mean() if low.numel() else real.new_zeros(())
        l_a = (high - b_a).mean() if high.numel() else real.new_zeros(())
        loss = loss + l_n + l_a
        parts.update(pull=l_n.item(), push=l_a.item())
    return loss, parts


def _extract(net, cases, progress: Progress, desc: str, span: tuple[float, float], keep_maps: bool):
    """Preprocess and encode every case once."""
    from SimpleSliceNetLib.devices import autocast_dtype
    from SimpleSliceNetLib.errors import VolumeError
    from SimpleSliceNetLib.preprocess import preprocess
    from SimpleSliceNetLib.volume_io import load_volume

    from .datasets import load_mask

    cast = autocast_dtype(net.feature_mean.device.type)
    items = []
    for case in progress.iterate(cases, len(cases), desc, *span):
        try:
            volume = load_volume(case.image)
            pre = preprocess(volume, net.config.preprocess, name=str(case.image))
            lesion = load_mask(case, volume) if (keep_maps and case.mask is not None) else None
        except VolumeError as exc:
            progress.info(f"skipped: {exc}")
            continue
        items.append(
            VolumeItem(case.id, net.features(pre.image, cast).cpu(), case.label, lesion, pre if keep_maps else None)
        )
    return items


def _heatmap(net, item: VolumeItem) -> np.ndarray:
    """The model's current heatmap of a validation item on its input grid."""
    cfg = net.config
    coarse = net.score_map(net.nll_grid(item.features.to(net.feature_mean.device)))
    heat = item.pre.mapping.coarse(cfg.map_factor).to_input(coarse)
    heat[~item.pre.input_brain] = 0.0
    return heat


def validate(net, items: list[VolumeItem], heatmap=_heatmap) -> dict:
    from .metrics import case_voxel_metrics

    aurocs, auprcs, dices = [], [], []
    for item in items:
        if item.lesion is None or not item.lesion.any():
            continue
        m = case_voxel_metrics(heatmap(net, item), item.lesion, item.pre.input_brain)
        aurocs.append(m.auroc)
        auprcs.append(m.auprc)
        dices.append(m.max_dice)
    if not aurocs:
        return {}
    return {
        "val_auroc": float(np.nanmean(aurocs)),
        "val_auprc": float(np.nanmean(auprcs)),
        "val_max_dice": float(np.nanmean(dices)),
    }


def dice_threshold(net, items: list[VolumeItem]) -> float:
    """The heatmap threshold with the best Dice over all ``items``' brain voxels pooled."""
    from .metrics import PooledCurve

    pooled = PooledCurve()
    for item in items:
        pooled.add(_heatmap(net, item)[item.pre.input_brain], item.lesion[item.pre.input_brain])
    _dice, threshold, _sens, _spec = pooled.curve().best_dice()
    return float(threshold)


def calibrate(net, items: list[VolumeItem], fpr: float, heatmap=_heatmap) -> dict:
    """Heatmap offset/scale so healthy tissue sits near 0 and the ``1 - fpr`` quantile at 1.

    ``heatmap(net, item)`` gives a volume's map (any method whose net has ``config.scoring``).
    """
    scoring = net.config.scoring
    scoring.offset, scoring.scale = 0.0, 1.0
    values = np.concatenate([heatmap(net, item)[item.pre.input_brain] for item in items])
    median = float(np.median(values))
    cut = float(np.quantile(values, 1.0 - fpr))
    scoring.offset = median
    scoring.scale = max(cut - median, 1e-6)
    scoring.threshold = 1.0
    scoring.calibration = {"voxel_fpr": fpr, "healthy_volumes": len(items), "healthy_voxels": int(values.size)}
    return scoring.calibration


def _checkpoint_paths(output: Path) -> tuple[Path, Path]:
    return output.with_suffix(".checkpoint.safetensors"), output.with_suffix(".checkpoint.json")


def _save_checkpoint(output: Path, net, optimizer, epoch: int, history: History, meta: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    opt_state = optimizer.state_dict()
    for index, state in opt_state["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = value.detach().cpu().reshape(value.shape).contiguous()
    weights, info = _checkpoint_paths(output)
    with atomic_path(weights) as tmp:
        save_file(tensors, str(tmp))
    with atomic_path(info) as tmp:
        tmp.write_text(json.dumps({"epoch": epoch, "history": history.rows, **meta}, indent=1))


def _load_checkpoint(output: Path, net, optimizer, meta: dict) -> tuple[int, History]:
    import torch
    from safetensors.torch import load_file

    weights, info = _checkpoint_paths(output)
    if not (weights.exists() and info.exists()):
        raise UserError(f"{info}: no checkpoint to resume from; run without --resume")
    saved = json.loads(info.read_text())
    if saved.get("model_config") != meta["model_config"]:
        raise UserError(f"{info}: checkpoint was made with another model configuration; resume with the same options")
    tensors = load_file(str(weights))
    net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state = optimizer.state_dict()
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            opt_state["state"].setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(opt_state)
    torch.manual_seed(saved["epoch"] + 1)
    return int(saved["epoch"]), History(saved["history"])


def train(
    train_cases: list,
    output: Path,
    net,
    config: TrainConfig,
    val_cases: list | None = None,
    progress: Progress | None = None,
    resume: bool = False,
    summary: dict | None = None,
) -> Path:
    """Fit ``net``'s flow on ``train_cases`` (healthy) and write the model file to ``output``."""
    import torch

    progress = progress or Progress("train", "none")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    val_cases = val_cases or []
    started = time.perf_counter()
    train_items = _extract(net, train_cases, progress, "encoding training volumes", (0.0, 0.2), keep_maps=False)
    if not train_items:
        raise UserError("no usable training volume; check the training data")
    val_items = _extract(net, val_cases, progress, "encoding validation volumes", (0.2, 0.05), keep_maps=True)

    stacked = torch.cat([item.features.reshape(-1, net.dim) for item in train_items])
    net.feature_mean.copy_(stacked.mean(0))
    net.feature_std.copy_(stacked.std(0).clamp_min(1e-6))
    del stacked
    for item in train_items + val_items:
        item.features = (item.features - net.feature_mean) / net.feature_std
    position = net.position.reshape(-1, net.position.shape[-1])

    optimizer = torch.optim.Adam(net.flow.parameters(), lr=config.lr)
    meta = {"model_config": _config_dict(net.config), "train_config": asdict(config)}
    history, first_epoch = History(), 0
    if resume:
        last, history = _load_checkpoint(output, net, optimizer, meta)
        first_epoch = last + 1
        progress.info(f"resuming after epoch {last}")
    best_state, best_auroc = None, -math.inf
    epoch_seconds = 0.0
    for epoch in range(first_epoch, config.epochs):
        elapsed_min = (time.perf_counter() - started) / 60.0
        if config.time_budget_min is not None and epoch > first_epoch and \
                elapsed_min + epoch_seconds / 60.0 > config.time_budget_min:
            progress.info(f"time budget of {config.time_budget_min:g} min reached after {epoch} epochs")
            break
        epoch_start = time.perf_counter()
        net.flow.train()
        losses = []
        order = rng.permutation(len(train_items))
        span = 0.7 / max(config.epochs - first_epoch, 1)
        for index in progress.iterate(order, len(order), f"epoch {epoch + 1}/{config.epochs}",
                                      0.25 + span * (epoch - first_epoch), span):
            vectors = train_items[index].features.reshape(-1, net.dim)
            perm = torch.from_numpy(rng.permutation(len(vectors)))
            for start in range(0, len(perm), config.sub_batch):
                pick = perm[start : start + config.sub_batch]
                real, pos = vectors[pick], position[pick]
                fake = real + config.noise_sigma * torch.randn_like(real)
                logp = net.log_likelihood(torch.cat([real, fake]), torch.cat([pos, pos]))
                loss, _parts = semi_push_pull_loss(logp[: len(pick)], logp[len(pick) :], config, epoch > 0)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        net.flow.eval()
        metrics = validate(net, val_items) if val_items else {}
        epoch_seconds = time.perf_counter() - epoch_start
        row = history.add(epoch=epoch + 1, loss=float(np.mean(losses)),
                          elapsed_s=round(time.perf_counter() - started, 2), epoch_s=round(epoch_seconds, 2), **metrics)
        progress.emit("metric", **row)
        if progress.mode == "bar":
            progress.info("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if metrics.get("val_auroc", -math.inf) > best_auroc:
            best_auroc = metrics["val_auroc"]
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        _save_checkpoint(output, net, optimizer, epoch, history, meta)

    if best_state is not None:
        net.load_state_dict(best_state)
    healthy_val = [item for item in val_items if item.label == "healthy"]
    calibration_items = healthy_val
    if not calibration_items:
        progress.info("no healthy validation volumes: calibrating the threshold on training volumes (optimistic)")
        calibration_items = _with_maps(net, train_cases[: min(8, len(train_cases))], progress)
    calibrate(net, calibration_items, config.calibration_fpr)
    lesion_items = [item for item in val_items if item.lesion is not None and item.lesion.any()]
    if lesion_items:
        # With annotated validation lesions, the default cut is where they are segmented best; the
        # FPR quantile (1.0 on the heatmap's scale) is stricter than most users want.
        net.config.scoring.threshold = dice_threshold(net, lesion_items)
        net.config.scoring.calibration["threshold_rule"] = "max pooled Dice on validation lesion volumes"
    else:
        net.config.scoring.calibration["threshold_rule"] = f"voxel FPR {config.calibration_fpr:g} on healthy volumes"
    return write_trained_model(output, net, "simpleslicenet", _config_dict(net.config), history, config, started,
                               summary, {"train_volumes": len(train_items), "val_volumes": len(val_items)})


def write_trained_model(output: Path, net, method: str, model_config: dict, history: History, train_config,
                        started: float, summary: dict | None, counts: dict) -> Path:
    """Write the model file with its training summary, then the history CSV and curves; returns the JSON path."""
    from SimpleSliceNetLib.model_file import write_model_file

    summary = summary or {}
    training_summary = {
        **summary,
        **counts,
        "epochs_run": len(history.rows),
        "selected_epoch": _selected_epoch(history),
        "seconds": round(time.perf_counter() - started, 1),
        "train_config": asdict(train_config),
        "final": history.rows[-1] if history.rows else {},
    }
    path = write_model_file(output, state_dict=net.state_dict(), method=method, config=model_config,
                            training=training_summary, name=summary.get("name", output.stem),
                            modality=summary.get("modality", "T1"), description=summary.get("description", ""))
    _write_history(output, history)
    return path


def _with_maps(net, cases, progress):
    # Feature statistics are set by now, so net.features() already standardises.
    return _extract(net, cases, progress, "calibrating", (0.95, 0.04), keep_maps=True)


def _selected_epoch(history: History) -> int | None:
    scored = [row for row in history.rows if "val_auroc" in row]
    if not scored:
        return history.rows[-1]["epoch"] if history.rows else None
    return max(scored, key=lambda row: row["val_auroc"])["epoch"]


def _config_dict(config) -> dict:
    return json.loads(json.dumps(asdict(config)))


def _write_history(output: Path, history: History) -> None:
    if not history.rows:
        return
    from .plots import plot_training_curves

    keys = sorted({key for row in history.rows for key in row}, key=lambda k: (k != "epoch", k))
    with atomic_path(output.with_suffix(".history.csv")) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history.rows)
    plot_training_curves(history.rows, output.with_suffix(".curves.png"), title=f"Training {output.stem}")


# --- command line -------------------------------------------------------------------------------


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model on healthy volumes",
        description="Train a SimpleSliceNet model on healthy volumes; writes NAME.json + NAME.safetensors.",
    )
    p.add_argument("--train", required=True, help="healthy volumes: folder, cases.json, IXI folder or a .txt list")
    p.add_argument("--val", help="validation volumes (lesion cases with masks, and healthy ones for calibration)")
    p.add_argument("--train-split", default="train", help="split of --train to use (default: train; all: every case)")
    p.add_argument("--val-split", default="val", help="split of --val to use (default: val; BraTS: the first 251)")
    p.add_argument("--name", required=True, help="model name (file stem and id)")
    p.add_argument("--output-dir", help="where to write the model (default: the user model folder)")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--time-budget-min", type=float, help="stop after the epoch that would exceed this many minutes")
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--noise-sigma", type=float, default=TrainConfig.noise_sigma)
    p.add_argument("--calibration-fpr", type=float, default=TrainConfig.calibration_fpr,
                   help="voxel false-positive rate on healthy validation volumes that sets the threshold")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbone", default="tf_efficientnet_lite0", help="any timm model name with features_only")
    p.add_argument("--taps", default="2,3", help="feature stages to tap (timm out_indices)")
    p.add_argument("--channels-per-tap", type=int, default=64)
    p.add_argument("--encoder-weights", default="imagenet",
                   help="imagenet (offline package), timm (download: online only), none, or a weights file")
    p.add_argument("--shape", help="model grid: in-plane rows, columns, slices (default 192,192,96; u2ad 128,128,64)")
    p.add_argument("--spacing", help="model grid spacing in mm (default 1,1,1.5; u2ad 1.5,1.5,2.4)")
    p.add_argument("--slice-axis", default="axial", choices=["axial", "coronal", "sagittal"])
    p.add_argument("--group", type=int, default=3, help="consecutive slices averaged into one slab")
    p.add_argument("--blocks", type=int, default=8, help="flow blocks")
    p.add_argument("--modality", default="T1")
    p.add_argument("--description", default="")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint beside the output")
    p.add_argument("--method", default="simpleslicenet", choices=["simpleslicenet", "u2ad"])
    from .datasets import add_dataset_arguments

    add_dataset_arguments(p)
    from . import train_u2ad  # imported here: it builds on this module

    train_u2ad.add_arguments(p)
    p.set_defaults(func=run)


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError as exc:
        raise UserError(f"--{what} expects comma-separated integers, got {text!r}") from exc


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise UserError(f"--{what} expects comma-separated numbers, got {text!r}") from exc


def run(args: argparse.Namespace, progress: Progress) -> int:
    if args.method == "u2ad":
        from . import train_u2ad

        return train_u2ad.run(args, progress)
    from SimpleSliceNetLib.devices import choose_device
    from SimpleSliceNetLib.encoder import EncoderConfig
    from SimpleSliceNetLib.flow import FlowConfig
    from SimpleSliceNetLib.preprocess import PreprocessConfig
    from SimpleSliceNetLib.resources import user_models_dir
    from SimpleSliceNetLib.slicenet import SliceNetConfig, SliceNetModel

    from .datasets import load_cases, split_rule

    data = {"contrast": args.contrast, "rule": split_rule(args)}
    train_cases = [c for c in load_cases(args.train, split=args.train_split, **data) if c.label != "lesion"]
    if not train_cases:
        raise UserError(f"{args.train}: no healthy training volumes found")
    val_cases = load_cases(args.val, split=args.val_split, **data) if args.val else []
    shape, spacing = _ints(args.shape or "192,192,96", "shape"), _floats(args.spacing or "1,1,1.5", "spacing")
    if len(shape) != 3 or len(spacing) != 3:
        raise UserError("--shape and --spacing take three values each")
    config = SliceNetConfig(
        preprocess=PreprocessConfig(shape=shape, spacing=spacing, slice_axis=args.slice_axis),
        encoder=EncoderConfig(backbone=args.backbone, taps=_ints(args.taps, "taps"),
                              channels_per_tap=args.channels_per_tap),
        flow=FlowConfig(blocks=args.blocks),
        group=args.group,
    )
    if args.encoder_weights == "imagenet":
        from SimpleSliceNetLib.encoder import OFFLINE_WEIGHTS

        if args.backbone in OFFLINE_WEIGHTS:
            entry = OFFLINE_WEIGHTS[args.backbone]
            config.encoder.mean, config.encoder.std = entry.mean, entry.std
    device = choose_device(args.device)
    if device.note:
        progress.info(device.note)
    try:
        net = SliceNetModel(config, encoder_weights=args.encoder_weights).to(device.name)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    output_dir = Path(args.output_dir) if args.output_dir else user_models_dir()
    output = output_dir / f"{args.name}.json"
    train_config = TrainConfig(epochs=args.epochs, lr=args.lr, noise_sigma=args.noise_sigma, seed=args.seed,
                               calibration_fpr=args.calibration_fpr, time_budget_min=args.time_budget_min)
    summary = {
        "name": args.name,
        "modality": args.modality,
        "description": args.description,
        "train_source": str(args.train),
        "val_source": str(args.val) if args.val else None,
        "encoder_weights": args.encoder_weights,
        "command": "simpleslicenet " + " ".join(sys.argv[1:]),
    }
    progress.emit("start", total=args.epochs)
    path = train(train_cases, output, net, train_config, val_cases, progress, args.resume, summary)
    progress.emit("output", files={"model": str(path)})
    progress.emit("done", ok=1, failed=0, elapsed_s=round(progress.elapsed, 1))
    print(f"model written: {path}", file=sys.stderr)
    return 0
