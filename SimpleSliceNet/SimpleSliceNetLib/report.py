"""Per-volume outputs besides the maps: the JSON report and the overlay picture."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .lesions import Lesion


def build_report(
    input_path: str,
    result,
    lesions: list[Lesion],
    threshold: float,
    model_info: dict,
    device: str,
    affine: np.ndarray,
    timings: dict,
) -> dict:
    return {
        "input": str(input_path),
        "volume_score": round(float(result.volume_score), 5),
        "threshold": float(threshold),
        "abnormal": bool(result.volume_score >= threshold),
        "lesion_count": len(lesions),
        "lesion_volume_ml": round(sum(les.volume_ml for les in lesions), 3),
        "lesions": [les.to_dict() for les in lesions],
        "brain_volume_ml": round(float(result.brain_mask.sum()) * abs(float(np.linalg.det(affine[:3, :3]))) / 1000, 1),
        "field_of_view_coverage": round(float(result.coverage), 4),
        "model": model_info,
        "device": device,
        "shape": list(result.heatmap.shape),
        "affine": np.round(affine, 6).tolist(),
        "timings": timings,
    }


def render_overlay(
    path: str | Path,
    image: np.ndarray,
    heatmap: np.ndarray,
    mask: np.ndarray,
    affine: np.ndarray,
    threshold: float,
    focus_ras: list[float] | None,
    title: str,
) -> None:
    """Axial, coronal and sagittal slices through ``focus_ras`` (or the hottest voxel).

    Arrays are reoriented to the closest RAS axes for display, shown in radiological
    convention (patient right on the left), with the heatmap above half the threshold and the
    mask's outline.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel.orientations as nio

    ornt = nio.io_orientation(affine)
    to_ras = nio.inv_ornt_aff(ornt, image.shape)
    img, heat, msk = (nio.apply_orientation(a, ornt) for a in (image, heatmap, mask.astype(np.uint8)))
    spacing = np.linalg.norm(affine[:3, :3], axis=0)[np.argsort(ornt[:, 0])]
    if focus_ras is not None:
        index = np.linalg.inv(affine @ to_ras) @ np.append(focus_ras, 1.0)
        centre = np.clip(np.round(index[:3]).astype(int), 0, np.array(img.shape) - 1)
    else:
        centre = np.array(np.unravel_index(int(np.argmax(heat)), heat.shape))
    lo, hi = np.percentile(img[img > 0], [1, 99.5]) if (img > 0).any() else (0.0, 1.0)
    views = [
        ("axial", img[:, :, centre[2]], heat[:, :, centre[2]], msk[:, :, centre[2]], spacing[1] / spacing[0]),
        ("coronal", img[:, centre[1], :], heat[:, centre[1], :], msk[:, centre[1], :], spacing[2] / spacing[0]),
        ("sagittal", img[centre[0], :, :], heat[centre[0], :, :], msk[centre[0], :, :], spacing[2] / spacing[1]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4), facecolor="black")
    vmax = max(2.0 * threshold, 1e-6)
    for ax, (label, base, hot, outline, aspect) in zip(axes, views, strict=True):
        flip = label != "sagittal"  # radiological: patient right on the screen's left
        show = (lambda a, f=flip: a[::-1].T if f else a.T)  # noqa: E731
        ax.imshow(show(base), cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=aspect)
        ax.imshow(np.ma.masked_less(show(hot), 0.5 * threshold), cmap="inferno", vmin=0, vmax=vmax,
                  alpha=0.6, origin="lower", aspect=aspect)
        if outline.any():
            ax.contour(show(outline), levels=[0.5], colors="cyan", linewidths=0.8, origin="lower")
        ax.set_title(label, color="white", fontsize=10)
        ax.axis("off")
        if flip:
            ax.text(0.02, 0.02, "R", color="white", transform=ax.transAxes)
    fig.suptitle(title, color="white", fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path), dpi=90, facecolor="black", format="png")
    plt.close(fig)
