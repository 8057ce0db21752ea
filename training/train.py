"""`simpleslicenet train`: healthy volumes in, a SimpleSliceNet model file out.

Features of the frozen encoder are computed once per volume and kept in memory (the encoder
does not change during training, so recomputing them every epoch, as the public code does,
only costs time). Each epoch then fits the flow with maximum likelihood plus the Semi-Push-Pull
loss (or the public code's triplet variant) on Gaussian-noise synthetic anomalies. Under
``torchrun`` the volumes are sharded over the processes and the flow trained with DDP
(``distributed.py``); rank 0 alone validates and writes.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from SimpleSliceNetLib.errors import UserError
from SimpleSliceNetLib.progress import Progress
from SimpleSliceNetLib.scoring import ENCODER_PRECISIONS
from SimpleSliceNetLib.volume_io import atomic_path

from .distributed import Context
from .grid_options import SLICENET_GRID, add_grid_arguments, grid_config, parse_numbers


@dataclass
class TrainConfig:
    epochs: int = 20
    lr: float = 1e-3
    # "constant" (the paper's Adam) or "cosine": decayed per epoch towards 0 at the last epoch, which damps
    # the epoch-to-epoch swings of validation AUROC late in training.
    lr_schedule: str = "constant"
    # Std of the feature noise that makes synthetic anomalies: in units of the healthy per-channel
    # std ("standardised": features are standardised) or of the encoder's raw features ("raw": the
    # paper's N(0, 0.08^2) is raw).
    noise_sigma: float = 0.3
    noise_space: str = "standardised"
    # Std of Gaussian noise added to the healthy vectors themselves (standardised units; 0 = none): each
    # position has one vector per training subject, and the jitter keeps the flow from fitting those
    # few points tighter than a new subject's vector falls (default since 2026-12-07; README, Training options).
    real_noise_sigma: float = 0.1
    # "spp": focal ML + BGAD's Semi-Push-Pull (the paper); "triplet": the public code's later variant.
    loss: str = "spp"
    triplet_margin: float = 1.0
    # "keep": the flow fits every slab vector; "mask": only vectors whose footprint holds brain.
    background: str = "keep"
    spp_beta: float = 0.05
    spp_tau: float = 0.1
    spp_normalizer: float = 10.0
    focal_gamma: float = 2.0
    sub_batch: int = 4096
    seed: int = 0
    calibration_fpr: float = 0.001
    time_budget_min: float | None = None
    # Standardise the NLL per slab position with statistics of the training volumes: after every epoch
    # when validating (the epoch is chosen on the heatmap detection computes), else after the last.
    position_norm: bool = True
    # Which epoch's weights the model file keeps: "best" validation AUROC (the last without validation)
    # or "last". A few validation volumes rank close epochs by noise.
    keep: str = "best"
    # Placements of each training volume's model grid: 1 = the placement rule's only; K > 1 adds K - 1
    # jittered ones (JITTER_*) and each epoch fits one of the K per volume, drawn at random.
    augment: int = 1


LR_SCHEDULES = ("constant", "cosine")
# Prior weight, in volumes, of the whole brain's NLL statistics in each position's (see _position_statistics).
POSITION_PRIOR_VOLUMES = 5.0
# Placement jitter of --augment: about the size of the placement's own error between subjects (the
# registration-free alignment leaves anatomy a few mm and degrees apart).
JITTER_SHIFT_MM = 4.0
JITTER_DEGREES = 4.0
JITTER_SCALE = 0.04


def epoch_learning_rate(config: TrainConfig, epoch: int) -> float:
    """The learning rate of ``epoch`` (0-based): a function of the epoch only, so resuming needs no state."""
    if config.lr_schedule == "cosine" and config.epochs > 1:
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / config.epochs))
    return config.lr


@dataclass
class Bits:
    """A bool volume kept at one bit a voxel."""

    packed: np.ndarray
    shape: tuple[int, ...]

    @classmethod
    def of(cls, mask: np.ndarray) -> Bits:
        return cls(np.packbits(mask, axis=None), mask.shape)

    def array(self) -> np.ndarray:
        return np.unpackbits(self.packed, count=int(np.prod(self.shape))).reshape(self.shape).view(bool)

    def any(self) -> bool:
        return bool(self.packed.any())


@dataclass
class VolumeItem:
    """What training keeps of one volume: its slab features and, for validation, what its maps need.

    Validation may hold hundreds of volumes (BraTS: 251), so the input-grid masks are kept at one bit
    a voxel and, with ``slim``, the model-grid image and brain are dropped once encoded (a 240x240x155
    lesion case: about 43 MB -> 10 MB).
    """

    id: str
    features: object  # torch.Tensor (h, w, scored slabs, C), standardised later
    label: str | None = None
    lesion_bits: Bits | None = None  # on the input grid
    pre: object = None  # Preprocessed, for mapping heatmaps back (slim: only its mapping)
    brain_bits: Bits | None = None  # the input-grid brain voxels the model grid covers
    keep: object = None  # torch.Tensor of the flat indices into ``trained`` of the vectors the flow fits (None: all)
    cells: object = None  # torch.Tensor (h, w, scored slabs), bool: the slab vectors whose footprint holds brain
    variant: int = 0  # which placement of its volume (training augmentation; 0 = the placement rule's)
    variants: int = 1  # placements of its volume in all
    guide: object = None  # Guide (guided_filter.py) of a validation volume, for models that refine their maps
    fit: object = None  # torch.Tensor (h, w, trained slabs, C) when the flow fits only some scored slabs (set in train)

    @classmethod
    def of(cls, id: str, features, label: str | None, lesion: np.ndarray | None, pre, keep=None,
           slim: bool = False, cells=None, variant: int = 0, variants: int = 1, guide=None) -> VolumeItem:
        brain = None if pre is None else Bits.of(pre.input_brain)
        if slim and pre is not None:
            pre = replace(pre, image=None, brain=None, input_brain=None)
        return cls(id, features, label, None if lesion is None else Bits.of(lesion), pre, brain, keep, cells,
                   variant, variants, guide)

    @property
    def trained(self):
        """The slab vectors the flow fits: ``fit``, or all of ``features`` when every scored slab is trained."""
        return self.features if self.fit is None else self.fit

    @property
    def lesion(self) -> np.ndarray | None:
        return None if self.lesion_bits is None else self.lesion_bits.array()

    @property
    def input_brain(self) -> np.ndarray | None:
        return None if self.brain_bits is None else self.brain_bits.array()

    @property
    def has_lesion(self) -> bool:
        return self.lesion_bits is not None and self.lesion_bits.any()


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


def triplet_loss(logp_real, logp_fake, config: TrainConfig):
    """The public code's later variant: maximum likelihood plus a triplet margin loss on log-likelihoods.

    As in ``MRI_CNF_SimpleNet_3D_triplet_loss``: ML = mean -log sigmoid(log p) of the real features
    (not focal-weighted); the anchor is the vector of the sub-batch's real log-likelihoods, the
    positive a random permutation of it, the negative the log-likelihoods of the same features with
    noise, and ``torch.nn.TripletMarginLoss(margin, p=2)`` compares them. Its inputs are 1-D, so
    torch treats each as ONE vector: the distances are L2 norms over the sub-batch,
    max(0, |a - p| - |a - n| + margin). Used from the first epoch, as there. Empty sets add nothing.
    """
    import torch
    import torch.nn.functional as F

    loss = -F.logsigmoid(logp_real).sum() / max(logp_real.numel(), 1)  # 0, still in the graph, when empty
    parts = {"ml": loss.item()}
    if logp_real.numel() and logp_real.numel() == logp_fake.numel():
        positive = logp_real[torch.randperm(logp_real.numel(), device=logp_real.device)]
        term = F.triplet_margin_loss(logp_real, positive, logp_fake, margin=config.triplet_margin, p=2)
        loss = loss + term
        parts["triplet"] = term.item()
    return loss, parts


def training_pair(real, noise, real_noise: float = 0.0):
    """The healthy vectors the flow fits (jittered by ``real_noise``) and their synthetic anomalies (plus
    ``noise``). Without jitter no random number is drawn for it, so such runs repeat to the bit."""
    import torch

    if real_noise > 0:
        real = real + real_noise * torch.randn_like(real)
    return real, real + noise * torch.randn_like(real)


def flow_loss(logp_real, logp_fake, config: TrainConfig, epoch: int):
    """The configured training loss (``config.loss``) of one sub-batch; epoch 0 of SPP is ML only."""
    if config.loss == "triplet":
        return triplet_loss(logp_real, logp_fake, config)
    return semi_push_pull_loss(logp_real, logp_fake, config, with_spp=epoch > 0)


def _extract(net, cases, progress: Progress, desc: str, span: tuple[float, float], keep_maps: bool,
             brain_only: bool = False, variants: int = 1, seed: int = 0):
    """Preprocess and encode every case in the model's encoder precision (the features detection will
    compute); with ``brain_only`` note which vectors touch the brain.

    ``variants`` > 1 encodes each case that many times: as placed by the rule, then on jittered grids
    (``placement_jitter``, seeded by ``seed`` and the case id, so a run can be repeated).
    """
    import zlib

    import torch

    from SimpleSliceNetLib.devices import encoder_autocast
    from SimpleSliceNetLib.errors import VolumeError
    from SimpleSliceNetLib.preprocess import placement_jitter, preprocess
    from SimpleSliceNetLib.volume_io import load_volume

    from .datasets import load_mask

    cast = encoder_autocast(net.config.scoring.encoder_precision)
    config = net.config.preprocess
    items = []
    for case in progress.iterate(cases, len(cases), desc, *span):
        rng = np.random.default_rng([seed, zlib.crc32(case.id.encode())])
        placements = []
        try:
            volume = load_volume(case.image)
            lesion = load_mask(case, volume) if (keep_maps and case.mask is not None) else None
            for variant in range(variants):
                offset = None if variant == 0 else placement_jitter(config, rng, JITTER_SHIFT_MM, JITTER_DEGREES,
                                                                    JITTER_SCALE)
                placements.append((variant, preprocess(volume, config, name=str(case.image), grid_offset=offset)))
        except VolumeError as exc:
            progress.info(f"skipped: {exc}")
            continue
        for variant, pre in placements:
            cells = net.slab_brain(pre.brain)
            keep = torch.nonzero(cells[:, :, :: net.config.fit_step].flatten())[:, 0] if brain_only else None
            items.append(VolumeItem.of(case.id, net.features(pre.image, cast).cpu(), case.label, lesion,
                                       pre if keep_maps else None, keep, slim=True, cells=cells,
                                       variant=variant, variants=variants,
                                       # float16 halves the input-grid image (18 MB for 240x240x155)
                                       guide=net.guide_for(pre, volume.array, np.float16) if keep_maps else None))
    return items


def _heatmap(net, item: VolumeItem) -> np.ndarray:
    """The model's current heatmap of a validation item on its input grid."""
    return net.input_heatmap(net.nll_grid(item.features.to(net.feature_mean.device)), item.pre.mapping,
                             item.input_brain, item.guide)


def validate(net, items: list[VolumeItem], heatmap=_heatmap) -> dict:
    from .metrics import case_voxel_metrics

    aurocs, auprcs, dices = [], [], []
    for item in items:
        if not item.has_lesion:
            continue
        m = case_voxel_metrics(heatmap(net, item), item.lesion, item.input_brain)
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


def dice_threshold(net, items: list[VolumeItem], heatmap=_heatmap) -> float:
    """The heatmap threshold with the best Dice over all ``items``' brain voxels pooled."""
    from .metrics import PooledCurve

    pooled = PooledCurve()
    for item in items:
        brain = item.input_brain
        pooled.add(heatmap(net, item)[brain], item.lesion[brain])
    _dice, threshold, _sens, _spec = pooled.curve().best_dice()
    return float(threshold)


def calibrate(net, items: list[VolumeItem], fpr: float, heatmap=_heatmap) -> dict:
    """Heatmap offset/scale so healthy tissue sits near 0 and the ``1 - fpr`` quantile at 1.

    ``heatmap(net, item)`` gives a volume's map (any method whose net has ``config.scoring``).
    """
    scoring = net.config.scoring
    scoring.offset, scoring.scale = 0.0, 1.0
    values = np.concatenate([heatmap(net, item)[item.input_brain] for item in items])
    median = float(np.median(values))
    cut = float(np.quantile(values, 1.0 - fpr))
    scoring.offset = median
    scoring.scale = max(cut - median, 1e-6)
    scoring.threshold = 1.0
    scoring.calibration = {"voxel_fpr": fpr, "healthy_volumes": len(items), "healthy_voxels": int(values.size)}
    return scoring.calibration


def set_threshold(net, healthy: list[VolumeItem], val_items: list[VolumeItem], fpr: float, heatmap=_heatmap) -> None:
    """Calibrate the heatmap's scale on ``healthy`` volumes, then choose the stored threshold.

    With annotated validation lesions the threshold is where they are segmented best (pooled Dice);
    the FPR quantile (1.0 on the heatmap's scale) is stricter than most users want. Without them it is
    that quantile.
    """
    calibrate(net, healthy, fpr, heatmap=heatmap)
    lesion_items = [item for item in val_items if item.has_lesion]
    calibration = net.config.scoring.calibration
    if lesion_items:
        net.config.scoring.threshold = dice_threshold(net, lesion_items, heatmap=heatmap)
        calibration["threshold_rule"] = "max pooled Dice on validation lesion volumes"
    else:
        calibration["threshold_rule"] = f"voxel FPR {fpr:g} on healthy volumes"


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


def _with_new_fields(saved: dict, current: dict, fresh: dict) -> dict:
    """``saved`` (a checkpoint's model configuration) with the fields added since, nested ones included
    (e.g. ``scoring.encoder_precision``), set to their defaults from ``fresh``."""
    out = dict(saved)
    for key, value in current.items():
        if key not in out:
            out[key] = fresh.get(key)
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _with_new_fields(out[key], value, fresh.get(key) or {})
    return out


def _load_checkpoint(output: Path, net, optimizer, meta: dict) -> tuple[int, History]:
    import torch
    from safetensors.torch import load_file

    weights, info = _checkpoint_paths(output)
    if not (weights.exists() and info.exists()):
        raise UserError(f"{info}: no checkpoint to resume from; run without --resume")
    saved = json.loads(info.read_text())
    saved_config = _with_new_fields(saved.get("model_config") or {}, meta["model_config"],
                                    _config_dict(type(net.config)()))
    if saved_config != meta["model_config"]:
        raise UserError(f"{info}: checkpoint was made with another model configuration; resume with the same options")
    tensors = load_file(str(weights))
    net.load_state_dict(net.without_untapped_stages({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}))
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
    context: Context | None = None,
    debug_dump: Path | None = None,
    stats_cases: list | None = None,
) -> Path | None:
    """Fit ``net``'s flow on ``train_cases`` (healthy) and write the model file to ``output``.

    ``stats_cases``: healthy volumes the flow does not train on, for the per-position NLL statistics
    alone (default: the training volumes, whose likelihoods the flow has fitted and so understates).

    Under ``torchrun`` (a ``context`` of several ranks) every rank encodes its shard of
    ``train_cases``, the feature statistics are pooled over all ranks, DDP averages the gradients and
    rank 0 alone validates, calibrates and writes; it returns the model path there and None elsewhere.
    ``debug_dump``: a folder where each rank saves its final flow weights (for tests).
    """
    import torch

    from SimpleSliceNetLib.flow import log_likelihood

    context = context or Context()
    progress = progress or Progress("train", "none")
    torch.manual_seed(config.seed + context.rank)
    rng = np.random.default_rng(config.seed + context.rank)
    val_cases = (val_cases or []) if context.is_writer else []
    started = time.perf_counter()
    train_items = _extract(net, context.shard(train_cases), progress, "encoding training volumes", (0.0, 0.2),
                           keep_maps=False, brain_only=config.background == "mask", variants=config.augment,
                           seed=config.seed)
    train_volumes, empty_ranks = context.all_reduce(
        torch.tensor([len(train_items) // config.augment, 0 if train_items else 1])).tolist()
    if empty_ranks:
        where = f" on {empty_ranks} of {context.world_size} ranks; use fewer processes or" if context.active else ";"
        raise UserError(f"no usable training volume{where} check the training data")
    val_items = _extract(net, val_cases, progress, "encoding validation volumes", (0.2, 0.03), keep_maps=True)
    stats_items = train_items
    if stats_cases and config.position_norm:
        stats_items = _extract(net, context.shard(stats_cases), progress, "encoding statistics volumes", (0.23, 0.02),
                               keep_maps=False)
        if not int(context.all_reduce(torch.tensor([len(stats_items)]))[0]):
            raise UserError("no usable volume for the position statistics; check --position-stats")

    step = net.config.fit_step  # the flow trains on every step-th scored slab (see SliceNetConfig.score_stride)
    _feature_statistics(net, train_items, context, step)
    mean, std = net.feature_mean.cpu(), net.feature_std.cpu()
    for item in train_items + val_items + (stats_items if stats_items is not train_items else []):
        item.features = (item.features - mean) / std
    if step > 1:
        for item in train_items:
            item.fit = item.features[:, :, ::step].contiguous()
    position = net.position[:, :, ::step].reshape(-1, net.position.shape[-1]).cpu()
    device = net.feature_mean.device
    # Noise in raw feature units is noise / std in the standardised units the flow sees.
    noise = config.noise_sigma if config.noise_space == "standardised" else config.noise_sigma / net.feature_std

    if config.position_norm:  # identity until the first statistics; the weights' layout is fixed from here on
        net.set_position_statistics(torch.zeros(net.position.shape[:3]), torch.ones(net.position.shape[:3]))
    # With validation, the statistics follow the flow every epoch, so the epoch is chosen on the heatmap
    # detection will compute (the statistics are part of the kept state).
    has_val = context.broadcast(bool(val_items))

    optimizer = torch.optim.Adam(net.flow.parameters(), lr=config.lr)
    meta = {"model_config": _config_dict(net.config), "train_config": asdict(config)}
    history, first_epoch = History(), 0
    if resume:
        last, history = _load_checkpoint(output, net, optimizer, meta)
        first_epoch = last + 1
        torch.manual_seed(last + 1 + context.rank)
        progress.info(f"resuming after epoch {last}")
    flow = net.flow
    if context.active:
        from torch.nn.parallel import DistributedDataParallel

        # Copies rank 0's flow (also FrEIA's fixed random permutations) to every rank, then averages gradients.
        flow = DistributedDataParallel(net.flow, device_ids=[device.index] if device.type == "cuda" else None)
    log = TrainingLog(output, progress, history, write=context.is_writer)
    step = int(history.rows[-1].get("step") or 0) if history.rows else 0
    best_state, best_auroc = None, -math.inf
    epoch_seconds = 0.0
    for epoch in range(first_epoch, config.epochs):
        elapsed_min = (time.perf_counter() - started) / 60.0
        over = config.time_budget_min is not None and epoch > first_epoch and \
            elapsed_min + epoch_seconds / 60.0 > config.time_budget_min
        if context.broadcast(over):
            progress.info(f"time budget of {config.time_budget_min:g} min reached after {epoch} epochs")
            break
        epoch_start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = epoch_learning_rate(config, epoch)
        net.flow.train()
        groups = _sub_batches(_epoch_placements(train_items, rng), config.sub_batch, rng, context)
        sums: dict[str, float] = {}
        span = 0.7 / max(config.epochs - first_epoch, 1)
        for group in progress.iterate(groups, len(groups), f"epoch {epoch + 1}/{config.epochs}",
                                      0.25 + span * (epoch - first_epoch), span):
            for item, pick in group:
                flat = pick if item.keep is None else item.keep[pick]
                real = item.trained.reshape(-1, net.dim)[flat].to(device)
                pos = position[flat].to(device)
                real, fake = training_pair(real, noise, config.real_noise_sigma)
                logp = log_likelihood(flow, torch.cat([real, fake]), torch.cat([pos, pos]))
                loss, parts = flow_loss(logp[: len(flat)], logp[len(flat) :], config, epoch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                for key, value in {"loss": loss.item(), **parts}.items():
                    sums[key] = sums.get(key, 0.0) + value
        # Mean loss (and parts) over the sub-batches of all ranks; every rank took the same number.
        totals = context.all_reduce(torch.tensor([*sums.values(), sum(len(g) for g in groups)], dtype=torch.float64))
        losses = {key: float(total / totals[-1]) for key, total in zip(sums, totals[:-1], strict=True)}
        net.flow.eval()
        if config.position_norm and has_val:
            _position_statistics(net, stats_items, context)
        metrics = validate(net, val_items) if val_items else {}  # only rank 0 holds validation items
        if config.keep == "best" and context.broadcast(metrics.get("val_auroc", -math.inf) > best_auroc):
            best_auroc = metrics.get("val_auroc", best_auroc)
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        epoch_seconds = time.perf_counter() - epoch_start
        log.epoch(step=step, epoch=epoch + 1, **losses, elapsed_s=round(time.perf_counter() - started, 2),
                  epoch_s=round(epoch_seconds, 2), **metrics)
        if context.is_writer:
            _save_checkpoint(output, net, optimizer, epoch, history, meta)
    log.close()

    if best_state is not None:
        net.load_state_dict(best_state)
    if debug_dump is not None:
        from safetensors.torch import save_file

        debug_dump.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in net.flow.state_dict().items()},
                  str(debug_dump / f"rank{context.rank}.safetensors"))
    if config.position_norm and not has_val:
        _position_statistics(net, stats_items, context)
    if not context.is_writer:
        return None
    healthy_val = [item for item in val_items if item.label == "healthy"]
    calibration_items = healthy_val
    if not calibration_items:
        progress.info("no healthy validation volumes: calibrating the threshold on training volumes (optimistic)")
        calibration_items = _with_maps(net, train_cases[: min(8, len(train_cases))], progress)
    set_threshold(net, calibration_items, val_items, config.calibration_fpr)
    counts = {"train_volumes": train_volumes, "val_volumes": len(val_items)}
    if context.active:
        counts["ranks"] = context.world_size
    return write_trained_model(output, net, "simpleslicenet", _config_dict(net.config), history, config, started,
                               summary, counts, keep=config.keep)


def _feature_statistics(net, items: list[VolumeItem], context: Context, step: int = 1) -> None:
    """Set ``net``'s per-channel feature mean and std from the training vectors of all ranks (every
    ``step``-th slab of each item's features: the ones the flow trains on).

    Two passes in float64 (sums, then squared deviations from the pooled mean), each summed over
    the ranks, so every rank standardises identically; no copy of all features is made.
    """
    import torch

    def vectors(item: VolumeItem):
        flat = item.features[:, :, ::step].reshape(-1, net.dim)
        return (flat if item.keep is None else flat[item.keep]).double()

    sums = torch.zeros(net.dim + 1, dtype=torch.float64)
    for item in items:
        v = vectors(item)
        sums[:-1] += v.sum(0)
        sums[-1] += len(v)
    context.all_reduce(sums)
    mean = sums[:-1] / sums[-1]
    squares = torch.zeros(net.dim, dtype=torch.float64)
    for item in items:
        squares += ((vectors(item) - mean) ** 2).sum(0)
    context.all_reduce(squares)
    net.feature_mean.copy_(mean.float())
    net.feature_std.copy_((squares / (sums[-1] - 1).clamp_min(1)).sqrt().float().clamp_min(1e-6))


def _position_statistics(net, items: list[VolumeItem], context: Context) -> None:
    """Set ``net``'s per-position NLL mean and std from the brain vectors of ``items`` (healthy) of all ranks.

    A position that few volumes cover (the brain's edge) borrows from the whole brain: its mean and
    variance are shrunk towards the pooled ones with the weight of POSITION_PRIOR_VOLUMES volumes.
    """
    import torch

    device = net.feature_mean.device
    sums = torch.zeros(3, *net.position.shape[:3], dtype=torch.float64)  # count, sum, sum of squares
    for item in items:
        nll = net.nll_grid(item.features.to(device)).double().cpu()
        cells = item.cells.double() / item.variants  # the placements of a volume count as one volume
        sums += torch.stack([cells, cells * nll, cells * nll * nll])
    context.all_reduce(sums)
    count, total, squares = sums
    n = count.clamp_min(1)
    mean = total / n
    var = ((squares - total * mean) / (count - 1).clamp_min(1)).clamp_min(0)
    pooled_mean = total.sum() / count.sum().clamp_min(1)
    k = POSITION_PRIOR_VOLUMES
    well_covered = count >= k
    pooled_var = var[well_covered].quantile(0.5) if well_covered.any() else var[count > 1].mean().nan_to_num(1.0)
    net.set_position_statistics(((count * mean + k * pooled_mean) / (count + k)).float(),
                                ((count * var + k * pooled_var) / (count + k)).sqrt().float())


def _epoch_placements(items: list[VolumeItem], rng: np.random.Generator) -> list[VolumeItem]:
    """One placement of each volume for this epoch (all items when volumes have one placement)."""
    if all(item.variants == 1 for item in items):
        return items
    chosen = {}
    for item in items:
        chosen.setdefault(item.id, []).append(item)
    return [group[int(rng.integers(len(group)))] for group in chosen.values()]


def _sub_batches(items: list[VolumeItem], size: int, rng: np.random.Generator, context: Context) -> list[list]:
    """One epoch's sub-batches, grouped by volume: lists of (item, vector indices), volumes shuffled.

    DDP averages the gradients of every optimizer step over the ranks, so all ranks must take the
    same number of steps: a rank with fewer sub-batches repeats some of its own (with fresh noise).
    """
    import torch

    groups = []
    for index in rng.permutation(len(items)):
        item = items[index]
        count = len(item.keep) if item.keep is not None else item.trained[..., 0].numel()
        perm = torch.from_numpy(rng.permutation(count))
        groups.append([(item, perm[start : start + size]) for start in range(0, count, size)])
    own = [entry for group in groups for entry in group]
    steps = int(context.all_reduce(torch.tensor([len(own)]), "max")[0])
    if steps > len(own):
        groups.append([own[i % len(own)] for i in range(steps - len(own))])
    return groups


class TrainingLog:
    """What training records after every epoch, for both methods.

    Each row goes into the history (kept in checkpoints) and the progress stream. The writer (rank 0
    under torchrun) also rewrites ``NAME.history.csv`` and ``NAME.curves.png`` atomically after every
    epoch and, when the ``tensorboard`` package is installed, adds the row's numbers as TensorBoard
    scalars in ``NAME.tb/`` (against the optimizer step).
    """

    def __init__(self, output: Path, progress: Progress, history: History, write: bool = True) -> None:
        self.output, self.progress, self.history, self.write = output, progress, history, write
        self.board = _tensorboard_writer(output.with_suffix(".tb"), progress) if write else None

    def epoch(self, **row) -> dict:
        self.history.add(**row)
        self.progress.emit("metric", **row)
        if self.progress.mode == "bar":
            self.progress.info("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in row.items()))
        if self.write:
            _write_history(self.output, self.history)
            if self.board is not None:
                for key, value in row.items():
                    if key not in ("step", "epoch") and isinstance(value, int | float):
                        self.board.add_scalar(key, value, global_step=row.get("step", row["epoch"]))
                self.board.flush()
        return row

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def _tensorboard_writer(folder: Path, progress: Progress):
    """A TensorBoard SummaryWriter on ``folder``, or None (said once) without the tensorboard package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        progress.info("tensorboard is not installed: no TensorBoard logs (pip install tensorboard to get them)")
        return None
    return SummaryWriter(log_dir=str(folder))


def write_trained_model(output: Path, net, method: str, model_config: dict, history: History, train_config,
                        started: float, summary: dict | None, counts: dict, keep: str = "best") -> Path:
    """Write the model file with its training summary, then the history CSV and curves; returns the JSON path."""
    from SimpleSliceNetLib.model_file import write_model_file

    summary = summary or {}
    selected = _selected_row(history, keep)
    training_summary = {
        **summary,
        **counts,
        "epochs_run": len(history.rows),
        "selected_epoch": selected.get("epoch"),
        "seconds": round(time.perf_counter() - started, 1),
        "train_config": asdict(train_config),
        "final": history.rows[-1] if history.rows else {},
        # The kept epoch's row: what the model file's weights scored (final may be a later, worse epoch).
        "selected": selected,
    }
    path = write_model_file(output, state_dict=net.state_dict(), method=method, config=model_config,
                            training=training_summary, name=summary.get("name", output.stem),
                            modality=summary.get("modality", "T1"), description=summary.get("description", ""),
                            version=summary.get("version", "1.0.0"))
    _write_history(output, history)
    return path


def _with_maps(net, cases, progress):
    # Feature statistics are set by now, so net.features() already standardises.
    return _extract(net, cases, progress, "calibrating", (0.95, 0.04), keep_maps=True)


def _selected_row(history: History, keep: str = "best") -> dict:
    """The history row of the epoch whose weights are kept: the last, or with ``keep="best"`` the best
    validation AUROC (the last when nothing was validated)."""
    scored = [row for row in history.rows if "val_auroc" in row]
    if not scored or keep == "last":
        return history.rows[-1] if history.rows else {}
    return max(scored, key=lambda row: row["val_auroc"])


def _config_dict(config) -> dict:
    return json.loads(json.dumps(asdict(config)))


def _write_history(output: Path, history: History) -> None:
    if not history.rows:
        return
    from .plots import plot_training_curves

    found = {key for row in history.rows for key in row}
    lead = [key for key in ("epoch", "step", "elapsed_s") if key in found]
    keys = lead + sorted(found - set(lead))
    with atomic_path(output.with_suffix(".history.csv")) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history.rows)
    plot_training_curves(history.rows, output.with_suffix(".curves.png"), title=f"Training {output.stem}")


# --- command line -------------------------------------------------------------------------------

LOSSES = ("spp", "triplet")
NOISE_SPACES = ("standardised", "raw")
BACKGROUNDS = ("keep", "mask")
KEEPS = ("best", "last")

# Defaults of the options a preset may set (None on the command line = not given).
OPTION_DEFAULTS = {
    "epochs": TrainConfig.epochs, "lr": TrainConfig.lr, "lr_schedule": TrainConfig.lr_schedule,
    "noise_sigma": TrainConfig.noise_sigma,
    "noise_space": TrainConfig.noise_space, "loss": TrainConfig.loss, "background": TrainConfig.background,
    "backbone": "tf_efficientnet_lite0", "taps": "2,3", "channels_per_tap": 64, "encoder_weights": "imagenet",
    "neighbourhood": 1, "group": 3, "aggregation": "mean", "slab_position": True, "blocks": 8,
    "position_norm": TrainConfig.position_norm, "smoothing_mm": 6.0, "guide_radius_mm": 4.0, "score_stride": 1,
    "encoder_precision": "fp32", "real_noise_sigma": TrainConfig.real_noise_sigma,
}
# The options only the simpleslicenet method reads (train_u2ad.add_arguments adds only u2ad's).
SIMPLESLICENET_OPTIONS = (
    *(key for key in OPTION_DEFAULTS if key not in ("epochs", "lr")), "triplet_margin", "keep", "slab_stride",
    "position_stats", "augment",
)
PRESETS = {
    # arXiv 2408.15958 and its public code (DESIGN.md section 3). The paper adds N(0, 0.08^2) to the raw
    # features; standardised features make that 0.08 / std per channel, which noise_space "raw" applies.
    # The public code's positional code is 2-D (no slab position). SPP beta/tau are TrainConfig's defaults.
    "paper": {
        "backbone": "wide_resnet50_2", "taps": "2,3", "channels_per_tap": 256, "neighbourhood": 3,
        "shape": "192,192,96", "spacing": "1,1,1", "align": "none", "blocks": 8, "noise_sigma": 0.08,
        "noise_space": "raw", "loss": "spp", "epochs": 30,
        "lr": 1e-3, "lr_schedule": "constant", "group": 3, "aggregation": "mean", "slab_position": False,
        "position_norm": False, "smoothing_mm": 4.0, "guide_radius_mm": 0.0, "score_stride": None,
        "real_noise_sigma": 0.0,
    },
}


def resolve_options(args: argparse.Namespace) -> None:
    """Fill the options not given on the command line from ``--preset``, then from the defaults."""
    preset = PRESETS[args.preset] if args.preset else {}
    if args.preset and args.method != "simpleslicenet":
        raise UserError(f"--preset {args.preset} configures the simpleslicenet method; drop it with --method u2ad")
    if args.preset == "paper" and args.encoder_weights is None:
        raise UserError("--preset paper uses wide_resnet50_2, whose ImageNet weights do not ship offline: add "
                        "--encoder-weights timm (downloads them; online only) or --encoder-weights FILE "
                        "(or --encoder-weights none for an untrained encoder, for timing only)")
    jitter_given = args.real_noise_sigma is not None
    for key in {**OPTION_DEFAULTS, **preset}:
        if getattr(args, key) is None:
            setattr(args, key, preset.get(key, OPTION_DEFAULTS.get(key)))
    from SimpleSliceNetLib.encoder import neighbourhood_error
    from SimpleSliceNetLib.scoring import guide_error, smoothing_error

    for error in (neighbourhood_error(args.neighbourhood), smoothing_error(args.smoothing_mm),
                  guide_error(args.guide_radius_mm)):
        if error:
            raise UserError(f"--{error}")
    if args.method == "simpleslicenet" and args.augment < 1:
        raise UserError(f"--augment {args.augment}: give 1 (no placement jitter) or more placements per volume")
    # In raw units (--noise-space raw) the two scales cannot be compared before the features are seen.
    jitter = args.real_noise_sigma
    if not math.isfinite(jitter) or jitter < 0 or \
            (jitter > 0 and jitter >= args.noise_sigma and args.noise_space == "standardised"):
        where = "" if jitter_given else " (the default)"
        raise UserError(f"--real-noise-sigma {jitter:g}{where}: give 0 (none) or more, below --noise-sigma "
                        f"({args.noise_sigma:g}), or healthy vectors look like the synthetic anomalies")
    if args.position_stats and not args.position_norm:
        raise UserError("--position-stats gives volumes for the per-position statistics, which --no-position-norm "
                        "(or --preset paper) turns off; drop one of them")
    if args.modality is None:
        from .datasets import MODALITY

        args.modality = MODALITY[args.contrast]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model on healthy volumes",
        description="Train a SimpleSliceNet model on healthy volumes; writes NAME.json + NAME.safetensors.",
    )
    p.add_argument("--train", required=True, nargs="+", metavar="SOURCE",
                   help="healthy volumes: folder, cases.json, IXI folder or a .txt list; several sources are "
                        "combined (case ids then start with each source's folder name)")
    p.add_argument("--val", help="validation volumes (lesion cases with masks, and healthy ones for calibration)")
    p.add_argument("--train-split", default="train", help="split of --train to use (default: train; all: every case)")
    p.add_argument("--val-split", default="val", help="split of --val to use (default: val; BraTS: the first 251)")
    p.add_argument("--name", required=True, help="model name (file stem and id)")
    p.add_argument("--output-dir", help="where to write the model (default: the user model folder)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="paper: the published configuration (wide_resnet50_2 layer2+layer3, 192x192x96 at 1 mm, "
                        "512-d, 8 blocks, raw-feature noise 0.08, SPP beta 0.05 tau 0.1, 30 epochs, Adam 1e-3, "
                        "groups of 3 slices, 2-D position code); needs --encoder-weights timm (online) or FILE. "
                        "Options given explicitly override the preset")
    p.add_argument("--epochs", type=int, help=f"(default {TrainConfig.epochs})")
    p.add_argument("--time-budget-min", type=float, help="stop after the epoch that would exceed this many minutes")
    p.add_argument("--lr", type=float, help=f"(default {TrainConfig.lr:g})")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES,
                   help=f"constant, or cosine decay over the epochs (default {TrainConfig.lr_schedule})")
    p.add_argument("--noise-sigma", type=float,
                   help=f"std of the feature noise that makes synthetic anomalies (default {TrainConfig.noise_sigma:g}"
                        ", in --noise-space units)")
    p.add_argument("--noise-space", choices=NOISE_SPACES,
                   help="units of --noise-sigma: standardised = the healthy per-channel std (default); raw = the "
                        "encoder's raw features, as in the paper (its 0.08 is raw)")
    p.add_argument("--real-noise-sigma", type=float,
                   help=f"std of noise added to the healthy training vectors, in standardised units (default "
                        f"{TrainConfig.real_noise_sigma:g}, --preset paper 0 = none; see README); must stay well "
                        "below --noise-sigma")
    p.add_argument("--loss", choices=LOSSES,
                   help="spp: focal ML + Semi-Push-Pull (default, the paper); triplet: ML + triplet margin loss on "
                        "real vs noisy log-likelihoods (the public code's later variant)")
    p.add_argument("--triplet-margin", type=float, default=TrainConfig.triplet_margin,
                   help="margin of --loss triplet (default %(default)g, as in the public code)")
    p.add_argument("--background", choices=BACKGROUNDS,
                   help="keep: the flow fits every slab vector (default); mask: only vectors whose cell holds brain "
                        "voxels of the preprocessed brain mask")
    p.add_argument("--keep", choices=KEEPS, default=TrainConfig.keep,
                   help="the epoch whose weights the model keeps: best validation AUROC (default; the last without "
                        "validation volumes) or last (simpleslicenet; u2ad keeps the best)")
    p.add_argument("--augment", type=int, default=TrainConfig.augment, metavar="K",
                   help=f"placements of each training volume's grid: the rule's and K - 1 jittered ones (up to "
                        f"{JITTER_SHIFT_MM:g} mm, {JITTER_DEGREES:g} degrees, {100 * JITTER_SCALE:g} %% size); each "
                        "epoch fits one per volume. Encodes K times the volumes (memory, time); default 1")
    p.add_argument("--encoder-precision", choices=ENCODER_PRECISIONS,
                   help="precision of the encoder features: fp32 (default) or bf16 (bfloat16 autocast, as CPU "
                        "training did until 2026-12-06 on CPUs with native bf16: the bundled flow's). The flow "
                        "trains on them, the statistics and threshold are computed on them and detection computes "
                        "them so on every device (calibrate --encoder-precision changes it later)")
    p.add_argument("--calibration-fpr", type=float, default=TrainConfig.calibration_fpr,
                   help="voxel false-positive rate on healthy validation volumes that sets the threshold")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbone", help="any timm model name with features_only (default tf_efficientnet_lite0)")
    p.add_argument("--taps", help="feature stages to tap (timm out_indices; default 2,3)")
    p.add_argument("--channels-per-tap", type=int, help="channels kept per tap (default 64)")
    p.add_argument("--neighbourhood", type=int,
                   help="side of the feature-cell neighbourhood each tap is averaged over (odd; default 1: every "
                        "cell's own features, sharper for lesions smaller than 3 cells; the paper's is 3)")
    p.add_argument("--encoder-weights", "--encoder", dest="encoder_weights",
                   help="imagenet (offline package; default), timm (download: online only), none, or a weights file "
                        "(safetensors with timm names, e.g. from simpleslicenet finetune-encoder)")
    add_grid_arguments(p, "192,192,96 at 1,1,1.5 mm; u2ad 128,128,64 at 1.5,1.5,2.4 mm")
    p.add_argument("--group", type=int, help="consecutive slices aggregated into one slab vector (default 3)")
    p.add_argument("--slab-stride", type=int,
                   help="slices from one slab's start to the next (default: --group, slabs do not overlap; smaller "
                        "values overlap them)")
    p.add_argument("--score-stride", type=int,
                   help="slices from one scored slab's start to the next at detection and validation (default 1: "
                        "a slab centred on every slice, slabs the flow did not train on coded in between; must "
                        "divide the slab stride; --preset paper: the slab stride). Training still fits the "
                        "slab-stride slabs, but holds the features of every scored slab (3x for groups of 3)")
    p.add_argument("--aggregation", choices=["mean", "max"], help="combine a slab's slices by mean (default) or max")
    p.add_argument("--slab-position", action=argparse.BooleanOptionalAction,
                   help="condition the flow on the slab's position along the slices too (default; the paper's code "
                        "encodes the in-plane position only: --no-slab-position)")
    p.add_argument("--blocks", type=int, help="flow blocks (default 8)")
    p.add_argument("--position-norm", action=argparse.BooleanOptionalAction,
                   help="after training, standardise the NLL of each slab position with its mean and std over the "
                        "training volumes (default; --no-position-norm: one scale for the whole grid, as in the "
                        "paper); simpleslicenet only")
    p.add_argument("--smoothing-mm", type=float,
                   help="Gaussian sigma of the heatmap in mm (default 6; the paper's 4); simpleslicenet only")
    p.add_argument("--guide-radius-mm", type=float,
                   help="half-width in mm of the windows in which the heatmap is refined along the image's edges "
                        "(guided filter; default 4, 0 = off as in the paper); simpleslicenet only")
    p.add_argument("--position-stats", nargs="+", metavar="SOURCE",
                   help="healthy volumes the flow does not train on, used only for the per-position statistics "
                        "(the --train-split of each source): new subjects vary more than the training volumes "
                        "the flow has fitted (default: the training volumes); simpleslicenet only")
    p.add_argument("--modality", help="the input contrast the model records (default: from --contrast, e.g. T1)")
    p.add_argument("--description", default="")
    p.add_argument("--model-version", default="1.0.0",
                   help="version recorded in the model file (bump it when you retrain a model you share)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint beside the output")
    p.add_argument("--method", default="simpleslicenet", choices=["simpleslicenet", "u2ad"])
    p.add_argument("--debug-dump-dir", type=Path, help=argparse.SUPPRESS)  # each rank's final flow (tests)
    from .datasets import add_dataset_arguments

    add_dataset_arguments(p)
    from . import train_u2ad  # imported here: it builds on this module

    u2ad_options = train_u2ad.add_arguments(p)
    # Each method's own options with their defaults, to tell an option given for the other method (a
    # forgotten --method u2ad) from one left alone.
    p.set_defaults(func=run, method_options={
        "simpleslicenet": {dest: p.get_default(dest) for dest in SIMPLESLICENET_OPTIONS}, "u2ad": u2ad_options})


def _check_method_options(args: argparse.Namespace) -> None:
    """Refuse options of the other method: they would be ignored without a word."""
    foreign = args.method_options["u2ad" if args.method == "simpleslicenet" else "simpleslicenet"]
    given = ["--" + dest.replace("_", "-") for dest, default in foreign.items() if getattr(args, dest) != default]
    if not given:
        return
    if args.method == "simpleslicenet":
        raise UserError(f"{', '.join(given)}: U2AD option(s); add --method u2ad, or drop them for SimpleSliceNet")
    raise UserError(f"{', '.join(given)}: SimpleSliceNet option(s) that --method u2ad does not use; drop them")


def run(args: argparse.Namespace, progress: Progress) -> int:
    from . import distributed

    _check_method_options(args)
    resolve_options(args)
    context = distributed.from_env()
    if args.method == "u2ad":
        if context.active:
            raise UserError("multi-process training (torchrun) is implemented for simpleslicenet; run u2ad training "
                            "as one process")
        from . import train_u2ad

        return train_u2ad.run(args, progress)
    if not context.is_writer:
        progress = Progress(progress.task, "none")  # rank 0 reports for the job
    import torch

    from SimpleSliceNetLib.devices import choose_device
    from SimpleSliceNetLib.encoder import EncoderConfig
    from SimpleSliceNetLib.flow import FlowConfig
    from SimpleSliceNetLib.resources import user_models_dir
    from SimpleSliceNetLib.scoring import ScoringConfig
    from SimpleSliceNetLib.slicenet import SliceNetConfig, SliceNetModel

    from .datasets import load_cases, load_sources, split_rule

    data = {"contrast": args.contrast, "rule": split_rule(args)}
    train_cases = [c for c in load_sources(args.train, split=args.train_split, **data) if c.label != "lesion"]
    if not train_cases:
        raise UserError(f"{', '.join(args.train)}: no healthy training volumes found")
    val_cases = load_cases(args.val, split=args.val_split, **data) if args.val else []
    stats_cases = [c for c in load_sources(args.position_stats, split=args.train_split, **data)
                   if c.label != "lesion"] if args.position_stats else []
    if args.position_stats and not stats_cases:
        raise UserError(f"{', '.join(args.position_stats)}: no healthy volumes for the position statistics")
    if stats_cases and (shared := {c.image.resolve() for c in stats_cases} & {c.image.resolve() for c in train_cases}):
        progress.info(f"{len(shared)} of the --position-stats volumes are training volumes too: the statistics "
                      "will understate how much new subjects vary")
    config = SliceNetConfig(
        preprocess=grid_config(args, SLICENET_GRID),
        encoder=EncoderConfig(backbone=args.backbone, taps=parse_numbers(args.taps, "taps", int),
                              channels_per_tap=args.channels_per_tap, neighbourhood=args.neighbourhood),
        flow=FlowConfig(blocks=args.blocks, pos_depth=args.slab_position),
        scoring=ScoringConfig(smoothing_mm=args.smoothing_mm, guide_radius_mm=args.guide_radius_mm,
                              encoder_precision=args.encoder_precision),
        group=args.group,
        slab_stride=args.slab_stride,
        score_stride=args.score_stride,
        aggregation=args.aggregation,
    )
    config.encoder.mean, config.encoder.std = _input_normalisation(args.backbone, args.encoder_weights,
                                                                   config.encoder.mean, config.encoder.std)
    device = choose_device(args.device)
    if device.note:
        progress.info(device.note)
    backend = distributed.init(context, device.name)
    if context.active:
        progress.info(f"distributed training: {context.world_size} processes ({backend}); training volumes sharded "
                      "by rank, rank 0 validates and writes")
    # The flow's initial weights come from --seed alone, so a run can be repeated, also after a change
    # to what the encoder builds; an untrained encoder (--encoder-weights none) from --seed too, the same
    # on every rank.
    torch.manual_seed(args.seed)
    try:
        net = SliceNetModel(config, encoder_weights=args.encoder_weights, flow_seed=args.seed).to(device.name)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    output_dir = Path(args.output_dir) if args.output_dir else user_models_dir()
    output = output_dir / f"{args.name}.json"
    train_config = TrainConfig(epochs=args.epochs, lr=args.lr, lr_schedule=args.lr_schedule,
                               noise_sigma=args.noise_sigma, noise_space=args.noise_space, loss=args.loss,
                               triplet_margin=args.triplet_margin, background=args.background, seed=args.seed,
                               calibration_fpr=args.calibration_fpr, time_budget_min=args.time_budget_min,
                               position_norm=args.position_norm, keep=args.keep, augment=args.augment,
                               real_noise_sigma=args.real_noise_sigma)
    summary = {
        "name": args.name,
        "modality": args.modality,
        "description": args.description,
        "version": args.model_version,
        "train_source": ", ".join(args.train),
        "val_source": str(args.val) if args.val else None,
        "position_stats_source": ", ".join(args.position_stats) if stats_cases else None,
        "position_stats_volumes": len(stats_cases) if stats_cases else None,
        "encoder_weights": args.encoder_weights,
        "preset": args.preset,
        "command": "simpleslicenet " + " ".join(sys.argv[1:]),
    }
    progress.emit("start", total=args.epochs)
    try:
        path = train(train_cases, output, net, train_config, val_cases, progress, args.resume, summary, context,
                     args.debug_dump_dir, stats_cases)
        context.barrier()  # the job ends when rank 0 has written the model
    finally:
        distributed.cleanup(context)
    if path is None:
        return 0
    progress.emit("output", files={"model": str(path)})
    progress.emit("done", ok=1, failed=0, elapsed_s=round(progress.elapsed, 1))
    print(f"model written: {path}", file=sys.stderr)
    return 0


def _input_normalisation(backbone: str, weights: str, mean: tuple, std: tuple) -> tuple[tuple, tuple]:
    """The image mean/std the backbone's weights expect: the offline package's, else timm's ImageNet ones.

    A fine-tuned encoder file keeps the normalisation of the ImageNet weights it started from.
    """
    from SimpleSliceNetLib.encoder import OFFLINE_WEIGHTS

    if weights == "imagenet" and backbone in OFFLINE_WEIGHTS:
        return OFFLINE_WEIGHTS[backbone].mean, OFFLINE_WEIGHTS[backbone].std
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(backbone)
    if cfg is None or not cfg.mean or len(cfg.mean) != 3:
        return mean, std
    return tuple(cfg.mean), tuple(cfg.std)
