"""U2AD end to end: train with the project's command, then detect a planted lesion; and a non-brain volume."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import grid_affine, run_cli, world_coordinates

from SimpleSliceNetLib.volume_io import Volume, load_volume, save_volume

pytestmark = pytest.mark.slow


def test_train_then_detect_finds_the_planted_lesion(synth_set, tmp_path):
    from SimpleSliceNetTraining.metrics import case_voxel_metrics

    out = tmp_path / "model"
    # Guidance phases all run: random masks (epochs 1-2), EU-guided (3), EU+AU (4-6, from au_start = half).
    result = run_cli("--progress", "json", "train", "--method", "u2ad", "--train", str(synth_set.manifest),
                     "--val", str(synth_set.manifest), "--name", "u2ad-tiny", "--output-dir", str(out),
                     "--shape", "64,64,32", "--spacing", "3,3,5", "--patch", "4", "--encoder-dim", "64",
                     "--encoder-depth", "2", "--decoder-dim", "32", "--decoder-depth", "1", "--epochs", "6",
                     "--mc-every", "2", "--lr", "2e-3", "--batch-slices", "16", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    events = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    rows = [e for e in events if e["event"] == "metric"]
    assert [r["phase"] for r in rows] == ["random", "random", "eu", "eu+au", "eu+au", "eu+au"]
    assert "mc_eu" in rows[2] and "mc_au" in rows[4]  # Monte-Carlo passes before epochs 3 and 5
    meta = json.loads((out / "u2ad-tiny.json").read_text())
    scoring = meta["config"]["scoring"]
    # Calibrated on the healthy validation volume; the stored threshold is the validation lesion's best-Dice
    # cut, the same rule as SimpleSliceNet's.
    assert meta["method"] == "u2ad" and scoring["calibration"]["healthy_volumes"] == 1
    assert scoring["calibration"]["threshold_rule"] == "max pooled Dice on validation lesion volumes"
    assert np.isfinite(scoring["threshold"]) and scoring["threshold"] != 1.0

    detected = tmp_path / "detect"
    result = run_cli("detect", str(synth_set.test_lesion), "--model", str(out / "u2ad-tiny.json"),
                     "--output-dir", str(detected), "--device", "cpu", "--no-overlay")
    assert result.returncode == 0, result.stderr[-3000:]
    stem = "test_glioma"
    volume = load_volume(synth_set.test_lesion)
    maps = {key: load_volume(detected / f"{stem}_{key}.nii.gz") for key in ("heatmap", "uncertainty", "aleatoric")}
    for item in maps.values():
        assert item.array.shape == volume.array.shape and np.allclose(item.affine, volume.affine)
    report = json.loads((detected / f"{stem}_report.json").read_text())
    assert report["model"]["method"] == "u2ad" and report["slab_scores"]
    assert all("mean_uncertainty" in lesion for lesion in report["lesions"])
    lesion = load_volume(synth_set.test_mask).array > 0
    brain = load_volume(detected / f"{stem}_brainmask.nii.gz").array > 0
    auroc = case_voxel_metrics(maps["heatmap"].array, lesion, brain).auroc
    assert auroc > 0.8, auroc  # chance is 0.5


def _cylinder(seed: int, focus: bool) -> tuple[Volume, np.ndarray, np.ndarray]:
    """A textured cylinder along S (radius 15 mm, 80 mm long), zero outside; optionally a bright focus."""
    rng = np.random.default_rng(seed)
    shape = (48, 64, 64)
    affine = grid_affine(shape, (1.5, 1.5, 1.5), centre_ras=(0.0, 0.0, 0.0))
    ras = world_coordinates(shape, affine)
    r, a, s = ras[..., 0], ras[..., 1], ras[..., 2]
    inside = (r**2 + a**2 <= 15.0**2) & (np.abs(s) <= 40.0)
    phase = rng.uniform(0, 2 * np.pi)
    image = 300 + 60 * np.sin(s / 6.0 + phase) + 40 * np.cos(a / 5.0) + rng.normal(0, 8, shape)
    centre = np.array([4.0, -3.0, 12.0])
    d2 = ((ras - centre) ** 2).sum(-1)
    if focus:
        image += 300 * np.exp(-d2 / (2 * 4.0**2))
    return Volume(np.where(inside, image, 0).astype(np.float32), affine), inside, d2 <= 4.0**2


def test_non_brain_sagittal_cylinder_with_a_focus(tmp_path):
    """Slice axis and ROI are not brain-specific: sagittal slices of a cylinder, ROI = the cylinder mask."""
    from SimpleSliceNetLib.detector import Detector
    from SimpleSliceNetLib.model_file import read_model_file
    from SimpleSliceNetLib.preprocess import PreprocessConfig
    from SimpleSliceNetLib.progress import Progress
    from SimpleSliceNetLib.u2ad import U2ADConfig, U2ADModel
    from SimpleSliceNetTraining.datasets import Case
    from SimpleSliceNetTraining.metrics import case_voxel_metrics
    from SimpleSliceNetTraining.train_u2ad import U2ADTrainConfig, train_u2ad

    cases = []
    for seed in range(4):
        volume, _, _ = _cylinder(seed, focus=False)
        path = tmp_path / f"cyl_{seed}.nii.gz"
        save_volume(path, volume.array, volume.affine)
        cases.append(Case(f"cyl_{seed}", path, None, None, "train"))
    config = U2ADConfig(preprocess=PreprocessConfig(shape=(48, 48, 24), spacing=(2.0, 2.0, 1.5),
                                                    slice_axis="sagittal", min_brain_ml=10.0),
                        patch=4, encoder_depth=2, encoder_dim=64, encoder_heads=4, decoder_depth=1, decoder_dim=32)
    train_config = U2ADTrainConfig(epochs=12, lr=2e-3, batch_slices=16, mc_every=4)
    path = train_u2ad(cases, tmp_path / "cyl.json", U2ADModel(config), train_config, progress=Progress("t", "none"))

    detector = Detector(read_model_file(path), "cpu")
    volume, roi, focus = _cylinder(99, focus=True)
    result = detector.detect(volume, mask=roi)
    assert np.array_equal(result.brain_mask, roi)
    assert (result.heatmap[~roi] == 0).all()
    auroc = case_voxel_metrics(result.heatmap, focus, roi).auroc
    assert auroc > 0.85, auroc  # chance is 0.5
    assert all(slab["axis"] == "R" for slab in result.slab_scores)
