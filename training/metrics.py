"""Anomaly-detection metrics for 3D heatmaps (numpy only).

Everything is built on one threshold curve (:class:`Curve`): for every distinct score threshold
``t`` (a voxel is called anomalous when ``score >= t``) the cumulative true and false positives.
From it come voxel AUROC, AUPRC (average precision, as scikit-learn defines it), the best Dice
over thresholds (which, for binary voxel labels, is also the F1-optimal threshold where the
sensitivity and specificity are reported) and AUPRO up to a false-positive rate limit.

Two ways to build a curve:

- :func:`binary_curve` is **exact**: it sorts the scores (``argsort``), so ties are handled
  exactly (AUROC counts a tie as one half, like the Mann-Whitney statistic and scikit-learn).
  About a second for 10^7 voxels. Used for per-case metrics.
- :class:`PooledCurve` accumulates many volumes in **bins** of the float32 score: the bin is the
  top 20 bits of an order-preserving key of the float's bit pattern, i.e. 11 significant bits
  (relative resolution about 5e-4) over the whole float range, with no range to guess in advance.
  Memory stays bounded (at most 2^20 bins) however many volumes are added. Scores within one bin
  count as tied; the reported thresholds are exact bin edges (every voxel of the bin is ``>=``
  the edge and every voxel of lower bins is ``<`` it). Used for pooled (set-level) metrics.

Undefined metrics (no lesion voxels, no healthy voxels, no voxels) are NaN, never an exception,
and :func:`summarize` says why in ``notes``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

NAN = float("nan")
_BIN_SHIFT = 12  # keep the top 32 - 12 = 20 bits of the key: 1 sign + 8 exponent + 11 mantissa bits
_SIGN = np.uint32(0x80000000)


@dataclass
class Curve:
    """Cumulative counts at distinct thresholds, in decreasing threshold order.

    ``tp[i]``/``fp[i]``: lesion/healthy voxels with ``score >= thresholds[i]``. ``pro[i]``: the mean
    over lesion regions of the fraction of the region at or above the threshold (None when the
    regions were not given).
    """

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    n_pos: float
    n_neg: float
    pro: np.ndarray | None = None

    def roc(self) -> tuple[np.ndarray, np.ndarray]:
        """(FPR, TPR) starting at (0, 0); NaN-filled when a class is empty."""
        fpr = np.concatenate([[0.0], self.fp / self.n_neg]) if self.n_neg else _nan_like(self.fp)
        tpr = np.concatenate([[0.0], self.tp / self.n_pos]) if self.n_pos else _nan_like(self.tp)
        return fpr, tpr

    def pr(self) -> tuple[np.ndarray, np.ndarray]:
        """(recall, precision) at each threshold, highest threshold first."""
        if not self.n_pos:
            return _nan_like(self.tp)[1:], _nan_like(self.tp)[1:]
        return self.tp / self.n_pos, self.tp / np.maximum(self.tp + self.fp, 1e-300)

    def auroc(self) -> float:
        if not (self.n_pos and self.n_neg):
            return NAN
        fpr, tpr = self.roc()
        return _trapezoid(fpr, tpr)

    def average_precision(self) -> float:
        """Sum over thresholds of (recall step) x precision, as scikit-learn's average_precision_score."""
        if not self.n_pos:
            return NAN
        recall, precision = self.pr()
        return float(np.sum(np.diff(recall, prepend=0.0) * precision))

    def best_dice(self) -> tuple[float, float, float, float]:
        """(max Dice, its threshold, sensitivity, specificity) at the threshold maximising Dice (= F1)."""
        if not self.n_pos or len(self.thresholds) == 0:
            return NAN, NAN, NAN, NAN
        dice = 2.0 * self.tp / (self.tp + self.fp + self.n_pos)
        i = int(np.argmax(dice))
        specificity = 1.0 - self.fp[i] / self.n_neg if self.n_neg else NAN
        return float(dice[i]), float(self.thresholds[i]), float(self.tp[i] / self.n_pos), float(specificity)

    def aupro(self, fpr_limit: float = 0.3) -> float:
        """Area under the per-region-overlap curve for FPR in [0, fpr_limit], divided by fpr_limit."""
        if self.pro is None or not (self.n_pos and self.n_neg):
            return NAN
        fpr = np.concatenate([[0.0], self.fp / self.n_neg])
        pro = np.concatenate([[0.0], self.pro])
        end = int(np.searchsorted(fpr, fpr_limit, side="right"))
        if end < len(fpr):
            # Close the area exactly at the limit by linear interpolation, as the MVTec AD code does.
            pro_at_limit = np.interp(fpr_limit, fpr[end - 1 : end + 1], pro[end - 1 : end + 1])
            fpr = np.concatenate([fpr[:end], [fpr_limit]])
            pro = np.concatenate([pro[:end], [pro_at_limit]])
        return _trapezoid(fpr, pro) / fpr_limit

    def dice_at(self, threshold: float) -> tuple[float, float, float]:
        """(Dice, sensitivity, specificity) when calling ``score >= threshold`` anomalous (bin
        resolution for pooled curves)."""
        # Thresholds decrease: the voxels >= threshold are the prefix up to the last threshold >= it.
        count = int(np.searchsorted(-self.thresholds, -threshold, side="right"))
        tp = float(self.tp[count - 1]) if count else 0.0
        fp = float(self.fp[count - 1]) if count else 0.0
        dice = 2.0 * tp / (tp + fp + self.n_pos) if (tp + fp + self.n_pos) else NAN
        sensitivity = tp / self.n_pos if self.n_pos else NAN
        specificity = 1.0 - fp / self.n_neg if self.n_neg else NAN
        return dice, sensitivity, specificity


@dataclass
class VoxelMetrics:
    """Voxel-level metrics of one case or of a pooled set (NaN = undefined, see ``notes``)."""

    auroc: float
    auprc: float
    max_dice: float
    dice_threshold: float
    sensitivity: float
    specificity: float
    aupro: float
    n_voxels: int
    n_positive: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def binary_curve(scores: np.ndarray, labels: np.ndarray, pro_weights: np.ndarray | None = None) -> Curve:
    """Exact threshold curve of ``scores`` (any shape) against boolean ``labels`` (same shape).

    ``pro_weights`` (per voxel, zero on healthy voxels, summing to 1 over lesion voxels) turns on
    the per-region-overlap curve; see :func:`region_weights`.
    """
    scores = _finite_scores(scores)
    labels = np.asarray(labels, dtype=bool).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"scores and labels differ in size: {scores.size} vs {labels.size}")
    order = np.argsort(scores)[::-1]
    sorted_scores = scores[order]
    # The last index of each run of equal scores: where the curve takes a step.
    ends = np.append(np.flatnonzero(np.diff(sorted_scores)), scores.size - 1) if scores.size else np.zeros(0, int)
    tp = np.cumsum(labels[order], dtype=np.float64)[ends]
    fp = (ends + 1).astype(np.float64) - tp
    pro = None
    if pro_weights is not None:
        pro = np.cumsum(np.asarray(pro_weights, dtype=np.float64).ravel()[order])[ends]
    n_pos = float(np.count_nonzero(labels))
    return Curve(sorted_scores[ends].astype(np.float64), tp, fp, n_pos, float(scores.size) - n_pos, pro)


class PooledCurve:
    """Accumulates (scores, labels) of many volumes into one binned threshold curve (see module doc)."""

    def __init__(self) -> None:
        self._keys = np.zeros(0, dtype=np.uint32)
        self._pos = np.zeros(0)
        self._neg = np.zeros(0)
        self._pro = np.zeros(0)
        self._regions = 0
        self._with_regions = True

    def add(
        self, scores: np.ndarray, labels: np.ndarray, pro_weights: np.ndarray | None = None, n_regions: int = 0
    ) -> None:
        """Add one volume's voxels.

        ``pro_weights`` are the un-normalised ``1 / region size`` weights of :func:`region_weights`
        (``normalise=False``) and ``n_regions`` their region count: the pooled PRO averages over
        every region of the set, so the division happens once, in :meth:`curve`.
        """
        scores = _finite_scores(scores)
        labels = np.asarray(labels, dtype=bool).ravel()
        bins = _order_key(scores) >> _BIN_SHIFT
        size = 1 << (32 - _BIN_SHIFT)
        pos = np.bincount(bins, weights=labels, minlength=size)
        neg = np.bincount(bins, minlength=size) - pos
        if pro_weights is None:
            self._with_regions &= not labels.any()
            pro = np.zeros(size)
        else:
            pro = np.bincount(bins, weights=np.asarray(pro_weights, dtype=np.float64).ravel(), minlength=size)
        used = np.flatnonzero(pos + neg)
        keys = np.concatenate([self._keys, used.astype(np.uint32)])
        merged, inverse = np.unique(keys, return_inverse=True)
        self._pos = np.bincount(inverse, weights=np.concatenate([self._pos, pos[used]]), minlength=merged.size)
        self._neg = np.bincount(inverse, weights=np.concatenate([self._neg, neg[used]]), minlength=merged.size)
        self._pro = np.bincount(inverse, weights=np.concatenate([self._pro, pro[used]]), minlength=merged.size)
        self._keys = merged.astype(np.uint32)
        self._regions += n_regions

    @property
    def n_voxels(self) -> int:
        return int(self._pos.sum() + self._neg.sum())

    def curve(self) -> Curve:
        """The curve at bin edges, highest first. PRO is None if any lesion volume came without regions."""
        high_first = slice(None, None, -1)
        tp = np.cumsum(self._pos[high_first])
        fp = np.cumsum(self._neg[high_first])
        pro = None
        if self._with_regions and self._regions:
            pro = np.cumsum(self._pro[high_first]) / self._regions
        edges = _key_to_float(self._keys[high_first].astype(np.uint32) << _BIN_SHIFT)
        return Curve(edges, tp, fp, float(self._pos.sum()), float(self._neg.sum()), pro)


def region_weights(lesion: np.ndarray, region: np.ndarray, normalise: bool = True) -> tuple[np.ndarray, int]:
    """Per-voxel PRO weights over ``lesion[region]`` and the number of lesion regions.

    Lesion regions are 26-connected components of ``lesion`` (sizes counted inside ``region``);
    each lesion voxel weighs ``1 / size of its region`` (divided by the number of regions when
    ``normalise``), so the cumulative weight above a threshold is the mean per-region overlap.
    """
    components, _ = ndimage.label(lesion, structure=np.ones((3, 3, 3), dtype=bool))
    inside = components[region]
    sizes = np.bincount(inside)
    sizes[0] = 0
    n_regions = int(np.count_nonzero(sizes))
    weights = np.zeros(inside.shape, dtype=np.float64)
    positive = inside > 0
    weights[positive] = 1.0 / sizes[inside[positive]]
    if normalise and n_regions:
        weights /= n_regions
    return weights, n_regions


def summarize(curve: Curve, fpr_limit: float = 0.3) -> VoxelMetrics:
    """All voxel metrics of one curve, with notes on what is undefined and why."""
    notes = []
    if curve.n_pos + curve.n_neg == 0:
        notes.append("no voxels to score")
    elif not curve.n_pos:
        notes.append("no lesion voxels: AUROC, AUPRC, Dice and AUPRO are undefined (NaN)")
    elif not curve.n_neg:
        notes.append("no healthy voxels: AUROC, specificity and AUPRO are undefined (NaN)")
    if len(curve.thresholds) == 1:
        notes.append("scores are constant: no threshold separates anything (AUROC 0.5)")
    dice, threshold, sensitivity, specificity = curve.best_dice()
    return VoxelMetrics(
        auroc=curve.auroc(),
        auprc=curve.average_precision(),
        max_dice=dice,
        dice_threshold=threshold,
        sensitivity=sensitivity,
        specificity=specificity,
        aupro=curve.aupro(fpr_limit),
        n_voxels=int(curve.n_pos + curve.n_neg),
        n_positive=int(curve.n_pos),
        notes=notes,
    )


def case_voxel_metrics(
    heatmap: np.ndarray, lesion: np.ndarray, region: np.ndarray | None = None, fpr_limit: float = 0.3
) -> VoxelMetrics:
    """Exact voxel metrics of one volume, restricted to ``region`` (e.g. the brain mask)."""
    region = np.ones(heatmap.shape, dtype=bool) if region is None else np.asarray(region, dtype=bool)
    lesion = np.asarray(lesion, dtype=bool)
    weights, _ = region_weights(lesion, region)
    return summarize(binary_curve(heatmap[region], lesion[region], weights), fpr_limit)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact AUROC (ties count one half); NaN when a class is empty."""
    return binary_curve(scores, labels).auroc()


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact average precision (scikit-learn's definition); NaN without positives."""
    return binary_curve(scores, labels).average_precision()


def slice_axis(affine: np.ndarray) -> int:
    """The voxel axis closest to the superior (RAS z) direction: the axial slice axis."""
    directions = np.asarray(affine, dtype=float)[:3, :3]
    return int(np.argmax(np.abs(directions[2]) / np.linalg.norm(directions, axis=0)))


def slice_scores(
    heatmap: np.ndarray, lesion: np.ndarray, region: np.ndarray, axis: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice (score, label) along ``axis`` for the slices that contain ``region`` voxels.

    Score = max heatmap inside the region; label = the slice contains a lesion voxel.
    """
    region = np.asarray(region, dtype=bool)
    others = tuple(a for a in range(3) if a != axis)
    masked = np.where(region, heatmap, -np.inf)
    scores = masked.max(axis=others)
    labels = np.asarray(lesion, dtype=bool).any(axis=others)
    keep = region.any(axis=others)
    return scores[keep].astype(np.float64), labels[keep]


def _finite_scores(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores).ravel()
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    return scores


def _order_key(scores: np.ndarray) -> np.ndarray:
    """uint32 keys ordered like the float32 values (sign flip trick); -0.0 is folded into +0.0."""
    bits = (scores.astype(np.float32) + np.float32(0.0)).view(np.uint32)
    return np.where(bits & _SIGN, ~bits, bits | _SIGN)


def _key_to_float(keys: np.ndarray) -> np.ndarray:
    bits = np.where(keys & _SIGN, keys & ~_SIGN, ~keys).astype(np.uint32)
    return bits.view(np.float32).astype(np.float64)


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def _nan_like(values: np.ndarray) -> np.ndarray:
    return np.full(len(values) + 1, NAN)


def nan_to_none(value: object) -> object:
    """Recursively replace NaN/inf floats by None so the result is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: nan_to_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [nan_to_none(item) for item in value]
    if isinstance(value, np.generic):
        return nan_to_none(value.item())
    return value
