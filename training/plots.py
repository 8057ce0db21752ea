"""PNG plots for evaluation (ROC, precision-recall) and training (loss and validation AUROC).

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas rather than pyplot, so
nothing touches a global figure registry or needs a display. Every file is written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from SimpleSliceNetLib.volume_io import atomic_path

from .metrics import Curve

_MAX_POINTS = 4000  # curves of 10^6 thresholds look the same with a few thousand points


def plot_roc(curves: Mapping[str, Curve], path: str | Path, title: str = "Voxel-level ROC (pooled)") -> Path:
    """ROC curves of several methods on one plot, with their AUROC in the legend."""
    figure, axes = _figure()
    for name, curve in curves.items():
        if not (curve.n_pos and curve.n_neg):
            continue  # undefined without both classes
        fpr, tpr = curve.roc()
        keep = _decimate(fpr, tpr)
        axes.plot(fpr[keep], tpr[keep], label=f"{name} (AUROC {curve.auroc():.3f})")
    axes.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1)
    _finish(axes, "False-positive rate", "True-positive rate", title)
    return _save(figure, path)


def plot_pr(
    curves: Mapping[str, Curve], path: str | Path, title: str = "Voxel-level precision-recall (pooled)"
) -> Path:
    """Precision-recall curves of several methods on one plot, with their AUPRC and the prevalence."""
    figure, axes = _figure()
    prevalence = math.nan
    for name, curve in curves.items():
        if not curve.n_pos:
            continue  # undefined without lesion voxels
        recall, precision = curve.pr()
        keep = _decimate(recall, precision)
        axes.plot(recall[keep], precision[keep], label=f"{name} (AUPRC {curve.average_precision():.3f})")
        prevalence = curve.n_pos / (curve.n_pos + curve.n_neg)
    if not math.isnan(prevalence):
        axes.axhline(prevalence, color="0.7", linestyle=":", linewidth=1, label=f"chance ({prevalence:.3f})")
    _finish(axes, "Recall", "Precision", title)
    return _save(figure, path)


def plot_training_curves(history: Sequence[Mapping], path: str | Path, title: str = "Training") -> Path:
    """Loss (left axis) and validation AUROC (right axis) against wall-clock time, like the paper's Fig. 5.

    Each entry has ``elapsed_s``, ``epoch``, ``loss`` and optionally ``val_auroc`` (None/NaN skipped).
    """
    figure, loss_axes = _figure(size=(7.0, 4.0))
    minutes = np.array([float(entry["elapsed_s"]) / 60.0 for entry in history])
    losses = np.array([_float(entry.get("loss")) for entry in history])
    loss_line = loss_axes.plot(minutes, losses, color="tab:blue", marker="o", markersize=3, label="training loss")
    loss_axes.set_xlabel("Wall-clock time (min)")
    loss_axes.set_ylabel("Loss", color="tab:blue")
    loss_axes.tick_params(axis="y", labelcolor="tab:blue")
    loss_axes.grid(True, alpha=0.3)
    lines = list(loss_line)
    aurocs = np.array([_float(entry.get("val_auroc")) for entry in history])
    if np.isfinite(aurocs).any():
        auroc_axes = loss_axes.twinx()
        valid = np.isfinite(aurocs)
        lines += auroc_axes.plot(
            minutes[valid], aurocs[valid], color="tab:red", marker="s", markersize=3, label="validation AUROC"
        )
        auroc_axes.set_ylabel("Validation voxel AUROC", color="tab:red")
        auroc_axes.tick_params(axis="y", labelcolor="tab:red")
        best = int(np.nanargmax(aurocs))
        auroc_axes.annotate(
            f"best {aurocs[best]:.3f} (epoch {history[best]['epoch']})",
            (minutes[best], aurocs[best]),
            textcoords="offset points",
            xytext=(0, -14),
            ha="center",
            fontsize=8,
            color="tab:red",
        )
    loss_axes.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize=8)
    loss_axes.set_title(title)
    return _save(figure, path)


def _figure(size: tuple[float, float] = (5.0, 5.0)):
    figure = Figure(figsize=size, dpi=120, layout="tight")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _finish(axes, xlabel: str, ylabel: str, title: str) -> None:
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="lower right" if xlabel.startswith("False") else "upper right", fontsize=8)


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path


def _decimate(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of at most ~2x``_MAX_POINTS`` points spread evenly along both coordinates, ends kept."""
    if len(x) <= _MAX_POINTS:
        return np.arange(len(x))
    grid = np.linspace(0.0, 1.0, _MAX_POINTS)
    # Both curves are monotone in one coordinate; sampling both keeps steep and flat stretches.
    along_x = np.searchsorted(x, grid) if np.all(np.diff(x) >= 0) else np.array([], dtype=int)
    along_y = np.searchsorted(y, grid) if np.all(np.diff(y) >= 0) else np.array([], dtype=int)
    index = np.concatenate([along_x, along_y, [0, len(x) - 1], np.linspace(0, len(x) - 1, _MAX_POINTS).astype(int)])
    return np.unique(np.clip(index, 0, len(x) - 1))


def _float(value: object) -> float:
    return math.nan if value is None else float(value)
