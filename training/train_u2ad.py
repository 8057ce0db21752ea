"""`simpleslicenet train --method u2ad`: a U2AD masked autoencoder from volumes that need not be curated.

Same-dataset mode: every volume of the training split is used whatever its label, since U2AD is
meant to learn from a clinical set that contains unlabelled abnormal volumes. Slices of all
volumes are preprocessed once and kept in memory; each epoch reconstructs every slice once.

Every ``mc_every`` epochs a Monte-Carlo pass (K complementary masks per slice) yields patch
epistemic (EU) and aleatoric (AU) uncertainty, which guide masking from then on:

- ``eu`` phase: patches are drawn for masking with probability growing with their EU;
- ``eu+au`` phase (from ``au_start`` of the epochs): in addition, the top ``au_exclude``
  fraction of each volume's ROI patches by reconstruction error are kept visible, so candidate
  anomalies are never reconstruction targets and are not learned.

``--guidance none|eu|eu+au`` switches the phases for the ablation. Checkpoints, validation,
calibration and history reuse the SimpleSliceNet training code (``train.py``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from SimpleSliceNetLib.errors import UserError
from SimpleSliceNetLib.progress import Progress

from .grid_options import grid_config
from .train import (
    History,
    TrainingLog,
    VolumeItem,
    _load_checkpoint,
    _save_checkpoint,
    set_threshold,
    validate,
    write_trained_model,
)

GUIDANCE = ("none", "eu", "eu+au")


@dataclass
class U2ADTrainConfig:
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    batch_slices: int = 32
    l1_weight: float = 10.0
    edge_weight: float = 1.0
    guidance: str = "eu+au"
    mc_every: int = 4  # Monte-Carlo uncertainty (and validation) every N epochs
    mc_samples: int = 4
    eu_strength: float = 1.0
    au_start: float = 0.5  # fraction of the epochs after which the EU+AU phase starts
    au_exclude: float = 0.1  # fraction of each volume's ROI patches kept visible in the EU+AU phase
    seed: int = 0
    calibration_fpr: float = 0.001
    time_budget_min: float | None = None

    def __post_init__(self) -> None:
        if self.guidance not in GUIDANCE:
            raise UserError(f"--guidance must be one of {', '.join(GUIDANCE)}, not {self.guidance!r}")


@dataclass
class SliceSet:
    """Every usable training slice, with the guidance state of the last Monte-Carlo pass."""

    images: object  # torch (S, H, W) float in [0, 1]
    roi: object  # torch (S, H, W) bool
    tokens: object  # torch (S, N) bool: ROI patches
    volume: np.ndarray  # (S,) index of the source volume
    eu: object = None  # torch (S, N) patch EU, or None before the first pass
    excluded: object = None  # torch (S, N) bool: top-error patches kept visible


def phase(epoch: int, config: U2ADTrainConfig, have_uncertainty: bool) -> str:
    """Masking of ``epoch`` (0-based): "random", "eu" or "eu+au"."""
    if config.guidance == "none" or not have_uncertainty:
        return "random"
    if config.guidance == "eu+au" and epoch >= int(round(config.au_start * config.epochs)):
        return "eu+au"
    return "eu"


def top_error_patches(au: object, tokens: object, volume: np.ndarray, fraction: float) -> object:
    """(S, N) bool: per volume, the ROI patches whose mean AU is in the top ``fraction`` (the candidate anomalies)."""
    import torch

    excluded = torch.zeros_like(tokens)
    for v in np.unique(volume):
        rows = torch.from_numpy(volume == v)
        values = au[rows][tokens[rows]]
        if values.numel() == 0 or fraction <= 0:
            continue
        cut = torch.quantile(values.float(), 1.0 - fraction)
        excluded[rows] = (au[rows] >= cut) & tokens[rows]
    return excluded


def uncertainty_pass(net, slices: SliceSet, samples: int, seed: int, batch: int) -> tuple[object, object]:
    """Patch-mean EU and AU (S, N) of every training slice from ``samples`` complementary masks."""
    import torch

    from SimpleSliceNetLib.u2ad import monte_carlo_masks, patchify, slice_uncertainty

    cfg = net.config
    generator = torch.Generator().manual_seed(seed)
    eus, aus = [], []
    net.eval()
    per_batch = max(1, batch // samples)
    with torch.inference_mode():
        for start in range(0, len(slices.tokens), per_batch):
            part = slice(start, start + per_batch)
            masks = monte_carlo_masks(slices.tokens[part], samples, cfg.mask_ratio, generator)
            eu, au = slice_uncertainty(net, slices.images[part], slices.roi[part], masks)
            eus.append(patchify(eu, cfg.patch).mean(-1))
            aus.append(patchify(au, cfg.patch).mean(-1))
    net.train()
    return torch.cat(eus), torch.cat(aus)


def _prepare(cases: list, config, progress: Progress, desc: str, span: tuple[float, float],
             keep_maps: bool) -> list[VolumeItem]:
    """Preprocess every case once (U2AD has no frozen features: ``features`` stays None)."""
    from SimpleSliceNetLib.errors import VolumeError
    from SimpleSliceNetLib.preprocess import preprocess
    from SimpleSliceNetLib.volume_io import load_volume

    from .datasets import load_mask

    items = []
    for case in progress.iterate(cases, len(cases), desc, *span):
        try:
            volume = load_volume(case.image)
            pre = preprocess(volume, config, name=str(case.image))
            lesion = load_mask(case, volume) if (keep_maps and case.mask is not None) else None
        except VolumeError as exc:
            progress.info(f"skipped: {exc}")
            continue
        items.append(VolumeItem.of(case.id, None, case.label, lesion, pre))
    return items


def slice_set(items: list[VolumeItem], min_roi_patches: int, patch: int) -> SliceSet:
    """The slices (along the model grid's slice axis) with at least ``min_roi_patches`` ROI patches."""
    import torch

    from SimpleSliceNetLib.u2ad import roi_patches

    images, rois, owners = [], [], []
    for index, item in enumerate(items):
        image = torch.from_numpy(np.ascontiguousarray(item.pre.image.transpose(2, 0, 1)))
        roi = torch.from_numpy(np.ascontiguousarray(item.pre.brain.transpose(2, 0, 1)))
        keep = roi_patches(roi, patch).sum(1) >= min_roi_patches
        images.append(image[keep])
        rois.append(roi[keep])
        owners.append(np.full(int(keep.sum()), index))
    images, rois = torch.cat(images), torch.cat(rois)
    return SliceSet(images, rois, roi_patches(rois, patch), np.concatenate(owners))


def _heatmap(net, item: VolumeItem) -> np.ndarray:
    """The model's current heatmap of a validation item on its input grid (as ``detect`` computes it)."""
    from SimpleSliceNetLib.devices import encoder_autocast
    from SimpleSliceNetLib.u2ad import analyse

    net.eval()
    heat = analyse(net, item.pre, encoder_autocast(net.config.scoring.encoder_precision), extras=False).heatmap
    net.train()
    return heat


def _learning_rate(config: U2ADTrainConfig, step: int, total: int, per_epoch: int) -> float:
    """Linear warm-up then cosine decay; a function of the step only, so resuming needs no scheduler state."""
    warmup = max(1, int(config.warmup_epochs * per_epoch))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    return 0.5 * config.lr * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def train_u2ad(
    train_cases: list,
    output: Path,
    net,
    config: U2ADTrainConfig,
    val_cases: list | None = None,
    progress: Progress | None = None,
    resume: bool = False,
    summary: dict | None = None,
) -> Path:
    """Fit ``net`` (a ``U2ADModel``) on ``train_cases`` (labels ignored) and write the model file to ``output``."""
    import torch

    from SimpleSliceNetLib.u2ad import guided_masks, masked_pixels, reconstruction_loss

    progress = progress or Progress("train", "none")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    cfg = net.config
    started = time.perf_counter()
    train_items = _prepare(train_cases, cfg.preprocess, progress, "preparing training volumes", (0.0, 0.1), False)
    if not train_items:
        raise UserError("no usable training volume; check the training data")
    slices = slice_set(train_items, cfg.min_roi_patches, cfg.patch)
    del train_items
    val_items = _prepare(val_cases or [], cfg.preprocess, progress, "preparing validation volumes", (0.1, 0.05), True)
    scored_val = any(item.has_lesion for item in val_items)

    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    meta = {"model_config": cfg.to_dict(), "train_config": asdict(config)}
    history, first_epoch = History(), 0
    if resume:
        last, history = _load_checkpoint(output, net, optimizer, meta)
        first_epoch = last + 1
        progress.info(f"resuming after epoch {last}")
    per_epoch = math.ceil(len(slices.tokens) / config.batch_slices)
    total_steps = per_epoch * config.epochs
    log = TrainingLog(output, progress, history)
    best_state, best_auroc = None, -math.inf
    epoch_seconds = 0.0
    net.train()
    for epoch in range(first_epoch, config.epochs):
        elapsed_min = (time.perf_counter() - started) / 60.0
        if config.time_budget_min is not None and epoch > first_epoch and \
                elapsed_min + epoch_seconds / 60.0 > config.time_budget_min:
            progress.info(f"time budget of {config.time_budget_min:g} min reached after {epoch} epochs")
            break
        epoch_start = time.perf_counter()
        # Uncertainty is measured every mc_every epochs (and again after a resume, as it is not checkpointed).
        mc_row = {}
        if config.guidance != "none" and epoch >= config.mc_every and \
                (epoch % config.mc_every == 0 or slices.eu is None):
            eu, au = uncertainty_pass(net, slices, config.mc_samples, config.seed + epoch, config.batch_slices * 2)
            slices.eu = eu
            slices.excluded = top_error_patches(au, slices.tokens, slices.volume, config.au_exclude)
            roi = slices.tokens
            mc_row = {"mc_eu": float(eu[roi].mean()), "mc_au": float(au[roi].mean())}
        current = phase(epoch, config, slices.eu is not None)
        losses, l1s, edges = [], [], []
        order = rng.permutation(len(slices.tokens))
        span = 0.8 / max(config.epochs - first_epoch, 1)
        batches = [order[i : i + config.batch_slices] for i in range(0, len(order), config.batch_slices)]
        for number, pick in enumerate(progress.iterate(batches, len(batches), f"epoch {epoch + 1}/{config.epochs}",
                                                       0.15 + span * (epoch - first_epoch), span)):
            pick = torch.from_numpy(pick)
            images, roi, tokens = slices.images[pick], slices.roi[pick], slices.tokens[pick]
            masked = guided_masks(
                tokens, cfg.mask_ratio, generator,
                eu=slices.eu[pick] if current != "random" else None, eu_strength=config.eu_strength,
                excluded=slices.excluded[pick] if current == "eu+au" else None,
            )
            device = net.device
            images, roi, tokens, masked = (t.to(device) for t in (images, roi, tokens, masked))
            recon = net.reconstruct(images, tokens, masked)
            region = masked_pixels(masked, cfg.patch, tuple(images.shape[1:])) & roi
            loss, parts = reconstruction_loss(recon, images, region, config.l1_weight, config.edge_weight)
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(config, epoch * per_epoch + number, total_steps, per_epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())
            l1s.append(parts["l1"])
            edges.append(parts["edge"])
        last_epoch = epoch == config.epochs - 1
        metrics = {}
        if scored_val and (last_epoch or (epoch + 1) % config.mc_every == 0):
            metrics = validate(net, val_items, heatmap=_heatmap)
        epoch_seconds = time.perf_counter() - epoch_start
        log.epoch(step=(epoch + 1) * per_epoch, epoch=epoch + 1, phase=current, loss=float(np.mean(losses)),
                  l1=float(np.mean(l1s)), edge=float(np.mean(edges)), elapsed_s=round(time.perf_counter() - started, 2),
                  epoch_s=round(epoch_seconds, 2), **mc_row, **metrics)
        if metrics.get("val_auroc", -math.inf) > best_auroc:
            best_auroc = metrics["val_auroc"]
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        _save_checkpoint(output, net, optimizer, epoch, history, meta)

    log.close()
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    calibration_items = [item for item in val_items if item.label == "healthy"]
    if not calibration_items:
        progress.info("no healthy validation volumes: calibrating the threshold on training volumes "
                      "(optimistic, and shifted by any lesions among them)")
        calibration_items = _prepare(train_cases[: min(8, len(train_cases))], cfg.preprocess, progress,
                                     "calibrating", (0.95, 0.04), True)
    set_threshold(net, calibration_items, val_items, config.calibration_fpr, heatmap=_heatmap)
    path = write_trained_model(output, net, "u2ad", cfg.to_dict(), history, config, started, summary,
                               {"train_volumes": len(np.unique(slices.volume)), "train_slices": len(slices.tokens),
                                "val_volumes": len(val_items)})
    return path


# --- command line (options added to `simpleslicenet train`) -------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> dict:
    """Add the U2AD options of ``simpleslicenet train`` (used with ``--method u2ad``); returns their defaults."""
    from SimpleSliceNetLib.u2ad_config import U2ADConfig

    g = p.add_argument_group("U2AD (--method u2ad)")
    actions = []

    def add(*names: str, **options) -> None:
        actions.append(g.add_argument(*names, **options))

    add("--guidance", default=U2ADTrainConfig.guidance, choices=GUIDANCE,
        help="uncertainty-guided masking phases: none (random masks), eu, eu+au (default)")
    add("--mc-every", type=int, default=U2ADTrainConfig.mc_every,
        help="Monte-Carlo uncertainty (and validation) every N epochs")
    add("--mc-samples", type=int, default=U2ADTrainConfig.mc_samples, help="masks per slice (K)")
    add("--au-start", type=float, default=U2ADTrainConfig.au_start,
        help="fraction of the epochs after which the EU+AU phase starts")
    add("--au-exclude", type=float, default=U2ADTrainConfig.au_exclude,
        help="fraction of top-error ROI patches per volume kept out of masking in the EU+AU phase")
    add("--eu-strength", type=float, default=U2ADTrainConfig.eu_strength,
        help="how much more often uncertain patches are masked (0 = uniform)")
    add("--batch-slices", type=int, default=U2ADTrainConfig.batch_slices)
    add("--patch", type=int, default=U2ADConfig.patch)
    add("--encoder-depth", type=int, default=U2ADConfig.encoder_depth)
    add("--encoder-dim", type=int, default=U2ADConfig.encoder_dim)
    add("--decoder-depth", type=int, default=U2ADConfig.decoder_depth)
    add("--decoder-dim", type=int, default=U2ADConfig.decoder_dim)
    add("--mask-ratio", type=float, default=U2ADConfig.mask_ratio)
    add("--samples", type=int, default=U2ADConfig.samples, help="masks per slice at detection (K)")
    return {action.dest: action.default for action in actions}


def run(args: argparse.Namespace, progress: Progress) -> int:
    """``simpleslicenet train --method u2ad``."""
    from SimpleSliceNetLib.devices import choose_device
    from SimpleSliceNetLib.resources import user_models_dir
    from SimpleSliceNetLib.u2ad import U2ADConfig, U2ADModel

    from .datasets import load_cases, load_sources, split_rule

    data = {"contrast": args.contrast, "rule": split_rule(args)}
    train_cases = load_sources(args.train, split=args.train_split, **data)
    abnormal = sum(case.label == "lesion" for case in train_cases)
    if abnormal:
        progress.info(f"same-dataset mode: {abnormal} of {len(train_cases)} training volumes are labelled lesion; "
                      "labels are not used")
    val_cases = load_cases(args.val, split=args.val_split, **data) if args.val else []
    try:
        config = U2ADConfig(
            preprocess=grid_config(args, U2ADConfig().preprocess),
            patch=args.patch, encoder_depth=args.encoder_depth, encoder_dim=args.encoder_dim,
            decoder_depth=args.decoder_depth, decoder_dim=args.decoder_dim, mask_ratio=args.mask_ratio,
            samples=args.samples, seed=args.seed,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    device = choose_device(args.device)
    if device.note:
        progress.info(device.note)
    net = U2ADModel(config).to(device.name)
    output = (Path(args.output_dir) if args.output_dir else user_models_dir()) / f"{args.name}.json"
    train_config = U2ADTrainConfig(
        epochs=args.epochs, lr=args.lr, batch_slices=args.batch_slices, guidance=args.guidance,
        mc_every=args.mc_every, mc_samples=args.mc_samples, eu_strength=args.eu_strength, au_start=args.au_start,
        au_exclude=args.au_exclude, seed=args.seed, calibration_fpr=args.calibration_fpr,
        time_budget_min=args.time_budget_min,
    )
    summary = {
        "name": args.name,
        "modality": args.modality,
        "description": args.description,
        "version": args.model_version,
        "train_source": ", ".join(args.train),
        "val_source": str(args.val) if args.val else None,
        "train_lesion_volumes": abnormal,
        "command": "simpleslicenet " + " ".join(sys.argv[1:]),
    }
    progress.emit("start", total=args.epochs)
    path = train_u2ad(train_cases, output, net, train_config, val_cases, progress, args.resume, summary)
    progress.emit("output", files={"model": str(path)})
    progress.emit("done", ok=1, failed=0, elapsed_s=round(progress.elapsed, 1))
    print(f"model written: {path}", file=sys.stderr)
    return 0
