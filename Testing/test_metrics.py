"""Metrics against scikit-learn, brute force and hand-made cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from SimpleSliceNetTraining import metrics as M


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("quantise", [False, True])
def test_auroc_and_ap_match_sklearn(seed: int, quantise: bool) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 3000))
    labels = rng.random(n) < rng.uniform(0.05, 0.6)
    labels[:2] = [True, False]
    scores = rng.normal(size=n) + labels * rng.uniform(0, 2)
    if quantise:  # many ties
        scores = np.round(scores * 3) / 3
    assert M.roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert M.average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def test_hand_made_examples() -> None:
    labels = np.array([0, 0, 0, 1, 1], dtype=bool)
    assert M.roc_auc(np.array([0.1, 0.2, 0.3, 0.8, 0.9]), labels) == 1.0
    assert M.roc_auc(np.array([0.9, 0.8, 0.7, 0.2, 0.1]), labels) == 0.0
    assert M.average_precision(np.array([0.1, 0.2, 0.3, 0.8, 0.9]), labels) == 1.0
    # All tied: AUROC one half, AP = prevalence.
    assert M.roc_auc(np.ones(5), labels) == 0.5
    assert M.average_precision(np.ones(5), labels) == pytest.approx(0.4)
    # One positive tied with one negative on top: pairs (pos, neg) = 6, wins 5 + half a tie... by hand:
    scores = np.array([0.5, 0.1, 0.2, 0.5, 0.9])
    # positive 0.5 beats 0.1, 0.2, ties 0.5 -> 2.5; positive 0.9 beats all 3 -> 3; total 5.5 / 6.
    assert M.roc_auc(scores, labels) == pytest.approx(5.5 / 6)


def _brute_force_best_dice(heatmap: np.ndarray, lesion: np.ndarray) -> tuple[float, float]:
    best = (-1.0, math.nan)
    for threshold in np.unique(heatmap):
        predicted = heatmap >= threshold
        dice = 2 * np.sum(predicted & lesion) / (predicted.sum() + lesion.sum())
        if dice > best[0]:
            best = (dice, float(threshold))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_max_dice_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lesion = np.zeros((6, 7, 5), dtype=bool)
    lesion[2:4, 3:6, 1:3] = True
    heatmap = rng.integers(0, 20, size=lesion.shape).astype(np.float32) + lesion * rng.integers(0, 15)
    values = M.case_voxel_metrics(heatmap, lesion)
    dice, threshold = _brute_force_best_dice(heatmap, lesion)
    assert values.max_dice == pytest.approx(dice)
    assert values.dice_threshold == threshold
    predicted = heatmap >= threshold
    assert values.sensitivity == pytest.approx(np.sum(predicted & lesion) / lesion.sum())
    assert values.specificity == pytest.approx(np.sum(~predicted & ~lesion) / np.sum(~lesion))


def test_region_restriction_and_perfect_map() -> None:
    lesion = np.zeros((8, 8, 8), dtype=bool)
    lesion[3:5, 3:5, 3:5] = True
    brain = np.zeros_like(lesion)
    brain[1:7, 1:7, 1:7] = True
    heatmap = lesion.astype(np.float32) * 2.0
    heatmap[0] = 5.0  # outside the brain: must not count
    values = M.case_voxel_metrics(heatmap, lesion, brain)
    assert (values.auroc, values.auprc, values.max_dice, values.aupro) == (1.0, 1.0, 1.0, 1.0)
    assert values.n_voxels == brain.sum() and values.n_positive == lesion.sum()
    assert values.dice_threshold == 2.0 and values.sensitivity == 1.0 and values.specificity == 1.0


def test_aupro_weights_regions_equally() -> None:
    # A big region found perfectly, a small one never found: voxel AUROC is high, PRO is about 1/2.
    lesion = np.zeros((20, 20, 20), dtype=bool)
    lesion[2:10, 2:10, 2:10] = True
    lesion[15, 15, 15] = True
    heatmap = np.zeros(lesion.shape, dtype=np.float32)
    heatmap[2:10, 2:10, 2:10] = 1.0
    values = M.case_voxel_metrics(heatmap, lesion)
    assert values.auroc > 0.99
    # PRO is 1/2 at FPR 0, then rises linearly to 1 at FPR 1 (the only other threshold): over [0, 0.3]
    # the mean of that line is 0.5 + 0.5 * 0.15 = 0.575.
    assert values.aupro == pytest.approx(0.575, abs=1e-9)
    weights, regions = M.region_weights(lesion, np.ones_like(lesion))
    assert regions == 2 and weights.sum() == pytest.approx(1.0)


def test_aupro_matches_brute_force_integration() -> None:
    rng = np.random.default_rng(3)
    lesion = np.zeros((12, 12, 12), dtype=bool)
    lesion[1:4, 1:4, 1:4] = True
    lesion[7:11, 6:9, 5:7] = True
    heatmap = np.round(rng.random(lesion.shape) + lesion * rng.random(lesion.shape), 1)
    limit = 0.3
    components = [lesion & (np.arange(12)[:, None, None] < 6), lesion & (np.arange(12)[:, None, None] >= 6)]
    points = [(0.0, 0.0)]
    for threshold in np.unique(heatmap)[::-1]:
        predicted = heatmap >= threshold
        fpr = np.sum(predicted & ~lesion) / np.sum(~lesion)
        pro = np.mean([np.sum(predicted & c) / c.sum() for c in components])
        points.append((fpr, pro))
    fpr, pro = np.array(points).T
    end = np.searchsorted(fpr, limit, side="right")
    x = np.append(fpr[:end], limit)
    y = np.append(pro[:end], np.interp(limit, fpr, pro))
    expected = np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / limit
    assert M.case_voxel_metrics(heatmap, lesion, fpr_limit=limit).aupro == pytest.approx(expected)


def test_pooled_curve_matches_exact_on_representable_scores() -> None:
    rng = np.random.default_rng(7)
    parts = []
    pooled = M.PooledCurve()
    for _ in range(4):
        n = int(rng.integers(100, 2000))
        labels = rng.random(n) < 0.2
        scores = np.round(rng.normal(size=n) + labels, 2)
        scores = np.round(scores * 64) / 64  # multiples of 1/64 fit in 11 significant bits
        pooled.add(scores, labels)
        parts.append((scores, labels))
    scores = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    exact = M.binary_curve(scores, labels)
    binned = pooled.curve()
    assert binned.auroc() == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert binned.average_precision() == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert binned.best_dice() == pytest.approx(exact.best_dice())
    # Bin edges equal the scores when those are representable, except that a negative score's bin edge is
    # the most negative float of its bin (every voxel of the bin is still >= the edge).
    positive = exact.thresholds >= 0
    np.testing.assert_array_equal(binned.thresholds[positive], exact.thresholds[positive])
    assert np.all(binned.thresholds <= exact.thresholds)
    np.testing.assert_allclose(binned.thresholds, exact.thresholds, rtol=1e-3)


def test_pooled_curve_close_on_continuous_scores_and_pro() -> None:
    rng = np.random.default_rng(11)
    pooled = M.PooledCurve()
    heatmaps, lesions = [], []
    for _ in range(3):
        lesion = np.zeros((16, 16, 16), dtype=bool)
        lesion[tuple(slice(int(a), int(a) + 4) for a in rng.integers(0, 12, 3))] = True
        heatmap = (rng.normal(size=lesion.shape) + 1.5 * lesion).astype(np.float32)
        weights, regions = M.region_weights(lesion, np.ones_like(lesion), normalise=False)
        pooled.add(heatmap.ravel(), lesion.ravel(), weights, regions)
        heatmaps.append(heatmap)
        lesions.append(lesion)
    stacked_heat, stacked_lesion = np.concatenate(heatmaps), np.concatenate(lesions)
    # Stacking along one axis keeps the three lesions apart, so region-wise PRO is the same set.
    exact = M.case_voxel_metrics(stacked_heat, stacked_lesion)
    binned = M.summarize(pooled.curve())
    assert binned.auroc == pytest.approx(exact.auroc, abs=1e-3)
    assert binned.auprc == pytest.approx(exact.auprc, abs=1e-3)
    assert binned.max_dice == pytest.approx(exact.max_dice, abs=1e-2)
    assert binned.aupro == pytest.approx(exact.aupro, abs=1e-2)
    assert abs(binned.dice_threshold - exact.dice_threshold) <= 1e-3 * max(1.0, abs(exact.dice_threshold))


def test_pooled_bins_order_negative_and_positive_scores() -> None:
    pooled = M.PooledCurve()
    scores = np.array([-1e6, -2.5, -0.0, 0.0, 1e-30, 3.0, 7e8])
    pooled.add(scores, np.array([0, 0, 0, 0, 1, 1, 1], dtype=bool))
    curve = pooled.curve()
    assert np.all(np.diff(curve.thresholds) < 0)
    assert curve.auroc() == 1.0
    assert curve.best_dice()[:2] == (1.0, pytest.approx(1e-30, rel=1e-3))


def test_dice_at_threshold() -> None:
    curve = M.binary_curve(np.array([0.1, 0.4, 0.6, 0.9]), np.array([0, 1, 0, 1], dtype=bool))
    assert curve.dice_at(0.5) == (pytest.approx(2 / 4), 0.5, 0.5)
    assert curve.dice_at(0.05) == (pytest.approx(4 / 6), 1.0, 0.0)
    assert curve.dice_at(5.0) == (0.0, 0.0, 1.0)


@pytest.mark.parametrize(
    ("labels", "note"),
    [(np.zeros(6, dtype=bool), "no lesion voxels"), (np.ones(6, dtype=bool), "no healthy voxels")],
)
def test_degenerate_inputs_give_nan_and_notes(labels: np.ndarray, note: str) -> None:
    values = M.summarize(M.binary_curve(np.arange(6.0), labels))
    assert math.isnan(values.auroc)
    assert math.isnan(values.aupro)
    assert any(note in text for text in values.notes)
    if labels.any():
        assert values.auprc == 1.0 and values.max_dice == 1.0 and math.isnan(values.specificity)
    else:
        assert math.isnan(values.auprc) and math.isnan(values.max_dice)


def test_empty_and_constant_inputs() -> None:
    empty = M.summarize(M.binary_curve(np.zeros(0), np.zeros(0, dtype=bool)))
    assert math.isnan(empty.auroc) and empty.n_voxels == 0 and empty.notes
    empty_pooled = M.summarize(M.PooledCurve().curve())
    assert math.isnan(empty_pooled.auroc) and math.isnan(empty_pooled.max_dice)
    constant = M.summarize(M.binary_curve(np.full(10, 3.0), np.arange(10) < 3))
    assert constant.auroc == 0.5 and any("constant" in text for text in constant.notes)
    with pytest.raises(ValueError, match="NaN"):
        M.roc_auc(np.array([0.0, np.nan]), np.array([True, False]))


def test_slice_scores_and_axis() -> None:
    heatmap = np.zeros((4, 5, 6), dtype=np.float32)
    lesion = np.zeros(heatmap.shape, dtype=bool)
    region = np.ones(heatmap.shape, dtype=bool)
    region[:, :, 0] = False  # slice without brain: left out
    lesion[1, 1, 2] = lesion[2, 2, 4] = True
    heatmap[..., 2] = 0.5
    heatmap[1, 1, 2] = 0.9
    heatmap[2, 2, 4] = 0.8
    heatmap[0, 0, 3] = 0.7
    scores, labels = M.slice_scores(heatmap, lesion, region, axis=2)
    np.testing.assert_allclose(scores, [0.0, 0.9, 0.7, 0.8, 0.0])
    np.testing.assert_array_equal(labels, [False, True, False, True, False])
    assert M.roc_auc(scores, labels) == 1.0
    # Axis closest to superior: a volume stored with slices along its first axis.
    affine = np.array([[0, 0, -1.0, 0], [0, 1.0, 0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]])
    assert M.slice_axis(affine) == 0
    assert M.slice_axis(np.diag([1.0, 1.0, 3.0, 1.0])) == 2


def test_volume_auroc_on_constructed_scores() -> None:
    healthy = [0.1, 0.2, 0.25, 0.3]
    lesion = [0.28, 0.5, 0.9]
    scores = np.array(healthy + lesion)
    labels = np.array([False] * 4 + [True] * 3)
    # 12 pairs; 0.28 loses to 0.3 only -> 11/12.
    assert M.roc_auc(scores, labels) == pytest.approx(11 / 12)


def test_large_volume_is_fast_enough() -> None:
    import time

    rng = np.random.default_rng(0)
    heatmap = rng.random((100, 100, 100), dtype=np.float32)
    lesion = heatmap > 0.999
    start = time.perf_counter()
    values = M.case_voxel_metrics(heatmap, lesion)
    assert time.perf_counter() - start < 5.0
    assert values.auroc == 1.0


def test_nan_to_none_makes_strict_json() -> None:
    import json

    value = M.nan_to_none({"a": math.nan, "b": [1.0, math.inf, np.float32(2.0)], "c": "x"})
    assert json.dumps(value, allow_nan=False) == '{"a": null, "b": [1.0, null, 2.0], "c": "x"}'


def test_brute_force_auroc_with_ties_small() -> None:
    scores = np.array([1, 2, 2, 3, 3, 3, 4], dtype=float)
    labels = np.array([0, 1, 0, 1, 0, 1, 1], dtype=bool)
    pairs = list(itertools.product(scores[labels], scores[~labels]))
    expected = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs])
    assert M.roc_auc(scores, labels) == pytest.approx(expected)
