"""evaluate() end to end on small generated volumes, the intensity baseline and the plots."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from SimpleSliceNetLib.progress import Progress
from SimpleSliceNetLib.volume_io import Volume, save_volume
from SimpleSliceNetTraining.baseline import IntensityBaseline
from SimpleSliceNetTraining.datasets import Case
from SimpleSliceNetTraining.evaluate import _safe, evaluate, markdown_table
from SimpleSliceNetTraining.plots import plot_training_curves

SHAPE = (36, 40, 32)
AFFINE = np.diag([1.2, 1.0, 1.5, 1.0])


@dataclass
class Result:
    heatmap: np.ndarray
    brain_mask: np.ndarray
    volume_score: float
    threshold: float


def _brain(shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    centre = (np.array(shape) - 1) / 2
    return (((grid - centre) / (np.array(shape) * 0.42)) ** 2).sum(-1) < 1


def _blob(centre: tuple[int, int, int], radius: float, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return ((grid - np.array(centre)) ** 2).sum(-1) < radius**2


def _write_cases(
    root: Path, n_lesion: int = 3, n_healthy: int = 2, broken: bool = True, shape: tuple[int, int, int] = SHAPE
) -> list[Case]:
    rng = np.random.default_rng(0)
    brain = _brain(shape)
    cases = []
    for i in range(n_lesion + n_healthy):
        image = np.where(brain, 100.0 + rng.normal(0, 4, shape), 0.0).astype(np.float32)
        mask_path = None
        family = None
        if i < n_lesion:
            lesion = _blob((14 + 2 * i, 20, 12 + 3 * i), 3.5 + i, shape) & brain
            image[lesion] = 200.0 + rng.normal(0, 4, int(lesion.sum()))
            mask_path = save_volume(root / f"case{i}_seg.nii.gz", lesion.astype(np.uint8), AFFINE)
            family = "big" if i % 2 else "small"
        image_path = save_volume(root / f"case{i}.nii.gz", image, AFFINE)
        label = "lesion" if i < n_lesion else "healthy"
        cases.append(Case(f"case{i}", image_path, mask_path, label, "test", {"family": family or "healthy"}))
    if broken:
        bad = root / "broken.nii.gz"
        bad.write_bytes(b"\x1f\x8b\x08 not really gzip")
        cases.append(Case("broken", bad, None, "healthy", "test", {}))
    return cases


def perfect_scorer(volume: Volume, mask: np.ndarray | None) -> Result:
    """Knows that lesions are the bright voxels: a perfect voxel, slice and volume detector here."""
    brain = volume.array > 0
    heatmap = (volume.array > 150).astype(np.float32)
    return Result(heatmap, brain, float(heatmap.max()), 0.5)


def random_scorer(volume: Volume, mask: np.ndarray | None) -> Result:
    rng = np.random.default_rng(int(volume.array.sum()) % 1000)
    brain = volume.array > 0
    return Result(rng.random(volume.array.shape).astype(np.float32), brain, float(rng.random()), 0.5)


def test_evaluate_end_to_end(tmp_path: Path) -> None:
    cases = _write_cases(tmp_path / "data")
    out = tmp_path / "out"
    scorers = {"perfect": perfect_scorer, "intensity baseline": IntensityBaseline(), "random": random_scorer}
    report = evaluate(cases, scorers, out, Progress("evaluate", "none"), save_maps=True, source="test set")

    for name in ("metrics.json", "metrics.md", "cases.csv", "roc.png", "pr.png"):
        assert (out / name).stat().st_size > 0
    assert not list(out.glob(".*.part*")), "temporary files left behind"
    assert (out / "maps" / "intensity_baseline" / "case0_heatmap.nii.gz").exists()

    saved = json.loads((out / "metrics.json").read_text())
    assert saved["methods"].keys() == scorers.keys()
    assert saved["cases_total"] == 6 and saved["cases_scored"] == 5
    assert [f["case"] for f in saved["failed"]] == ["broken"]
    perfect = saved["methods"]["perfect"]["summary"]
    assert perfect["lesion_cases"] == 3 and perfect["healthy_cases"] == 2
    for key in ("voxel_auroc_mean", "auprc_mean", "slice_auroc", "volume_auroc"):
        assert perfect[key] == 1.0, key
    assert perfect["pooled"]["auroc"] == 1.0 and perfect["pooled"]["max_dice"] == 1.0
    assert perfect["pooled"]["dice_threshold"] == 1.0
    assert perfect["pooled"]["sensitivity"] == 1.0 and perfect["pooled"]["specificity"] == 1.0
    assert perfect["at_method_threshold"]["dice"] == 1.0
    assert perfect["at_method_threshold"]["healthy_voxel_fpr"] == 0.0
    assert perfect["healthy_voxel_fpr_at_pooled_threshold"] == 0.0

    # A bright blob is exactly what the intensity baseline is good at; random scores are at chance.
    baseline = saved["methods"]["intensity baseline"]["summary"]
    assert baseline["voxel_auroc_mean"] > 0.95 and baseline["volume_auroc"] == 1.0
    chance = saved["methods"]["random"]["summary"]
    assert abs(chance["voxel_auroc_mean"] - 0.5) < 0.05 and chance["pooled"]["max_dice"] < 0.2

    rows = saved["methods"]["perfect"]["cases"]
    assert [r["case"] for r in rows] == [f"case{i}" for i in range(5)]
    assert rows[0]["label"] == "lesion" and rows[0]["voxel_auroc"] == 1.0 and rows[0]["dice_threshold"] == 1.0
    assert rows[4]["label"] == "healthy" and rows[4]["fpr_at_threshold"] == 0.0 and "voxel_auroc" not in rows[4]
    assert set(saved["methods"]["perfect"]["families"]) == {"big", "small"}
    assert saved["methods"]["perfect"]["families"]["small"]["lesion_cases"] == 2
    assert saved["methods"]["perfect"]["families"]["small"]["volume_auroc"] == 1.0

    with open(out / "cases.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 15 and {r["method"] for r in table} == set(scorers)

    markdown = (out / "metrics.md").read_text()
    assert markdown.startswith("# Evaluation of test set") and markdown_table(report) in markdown
    lines = markdown.splitlines()
    assert any(line.startswith("| perfect | 3/2 | 1.000 | 1.000 | 1.000 |") for line in lines)
    assert any(line.startswith("| intensity baseline |") for line in lines)
    assert any(line.startswith("| big | perfect | 1 |") for line in lines)


def test_evaluate_degenerate_sets(tmp_path: Path) -> None:
    healthy_only = _write_cases(tmp_path / "healthy", n_lesion=0, n_healthy=2, broken=False)
    report = evaluate(healthy_only, {"perfect": perfect_scorer}, tmp_path / "o1", Progress("evaluate", "none"))
    summary = report["methods"]["perfect"]["summary"]
    assert summary["voxel_auroc_mean"] is None and summary["volume_auroc"] is None
    assert summary["pooled"]["max_dice"] is None and summary["pooled"]["notes"]
    assert "| perfect | 0/2 | - | - | - |" in (tmp_path / "o1" / "metrics.md").read_text()
    json.loads((tmp_path / "o1" / "metrics.json").read_text())  # strict JSON: no NaN

    lesion_only = _write_cases(tmp_path / "lesion", n_lesion=2, n_healthy=0, broken=False)
    report = evaluate(lesion_only, {"perfect": perfect_scorer}, tmp_path / "o2", Progress("evaluate", "none"))
    summary = report["methods"]["perfect"]["summary"]
    assert summary["voxel_auroc_mean"] == 1.0 and summary["volume_auroc"] is None
    assert summary["at_method_threshold"]["healthy_voxel_fpr"] is None


def test_lesion_outside_brain_mask_counts_as_missed(tmp_path: Path) -> None:
    cases = _write_cases(tmp_path / "data", n_lesion=1, n_healthy=0, broken=False)

    def blind_scorer(volume: Volume, mask: np.ndarray | None) -> Result:
        result = perfect_scorer(volume, mask)
        result.brain_mask = result.brain_mask & (volume.array < 150)  # the lesion is not "brain" to it
        result.heatmap[~result.brain_mask] = 0.0
        return result

    report = evaluate(cases, {"blind": blind_scorer}, tmp_path / "out", Progress("evaluate", "none"))
    row = report["methods"]["blind"]["cases"][0]
    # The lesion voxels are still scored (as 0): every score is 0, so the detector is at chance.
    assert row["lesion_voxels"] > 0 and row["voxel_auroc"] == 0.5
    assert math.isclose(row["max_dice"], 2 * row["lesion_voxels"] / (row["voxels"] + row["lesion_voxels"]))


def test_intensity_baseline_finds_bright_and_dark_blobs() -> None:
    rng = np.random.default_rng(1)
    brain = _brain()
    image = np.where(brain, 100.0 + rng.normal(0, 4, SHAPE), 0.0).astype(np.float32)
    bright, dark = _blob((12, 20, 16), 4) & brain, _blob((24, 20, 16), 4) & brain
    image[bright] += 60
    image[dark] -= 60
    result = IntensityBaseline()(Volume(image, AFFINE))
    assert result.heatmap.shape == SHAPE and result.heatmap.dtype == np.float32
    np.testing.assert_array_equal(result.brain_mask, brain)
    assert result.heatmap[~brain].max() == 0.0
    assert result.heatmap[bright | dark].min() > result.threshold
    # The rim of the brain is not lit up by the dark background (normalised convolution).
    rim = brain & ~np.pad(brain, 1)[2:, 1:-1, 1:-1]
    assert np.percentile(result.heatmap[rim], 50) < 2.0
    plain = np.where(brain, 100.0 + rng.normal(0, 4, SHAPE), 0).astype(np.float32)
    healthy = IntensityBaseline()(Volume(plain, AFFINE))
    assert result.volume_score > 2 * healthy.volume_score


def test_intensity_baseline_constant_and_empty_volumes() -> None:
    constant = IntensityBaseline()(Volume(np.full(SHAPE, 5.0, dtype=np.float32), AFFINE))
    assert np.isfinite(constant.heatmap).all() and constant.volume_score == 0.0
    empty = IntensityBaseline()(Volume(np.zeros(SHAPE, dtype=np.float32), AFFINE))
    assert not empty.brain_mask.any() and empty.volume_score == 0.0


def test_plot_training_curves(tmp_path: Path) -> None:
    history = [
        {"elapsed_s": 10.0 * i, "epoch": i, "loss": 1.0 / (i + 1), "val_auroc": None if i == 0 else 0.7 + 0.05 * i}
        for i in range(5)
    ]
    path = plot_training_curves(history, tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Without validation the AUROC axis is simply absent.
    plot_training_curves([{"elapsed_s": 1.0, "epoch": 0, "loss": 2.0}], tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_progress_events_for_failures(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cases = _write_cases(tmp_path / "data", n_lesion=1, n_healthy=0, broken=True)
    evaluate(cases, {"perfect": perfect_scorer}, tmp_path / "out", Progress("evaluate", "json"))
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    errors = [e for e in events if e["event"] == "error"]
    assert len(errors) == 1 and errors[0]["input"].endswith("broken.nii.gz")
    assert events[-1]["event"] == "progress" and events[-1]["fraction"] == 1.0


@pytest.mark.slow
def test_cli_evaluate_with_a_tiny_trained_model(tmp_path: Path) -> None:
    """The real command line: train a tiny model on generated healthy volumes, then evaluate (~45 s)."""
    import subprocess
    import sys

    # Big enough for the model's minimum brain volume (50 mL).
    cases = _write_cases(tmp_path / "data", n_lesion=2, n_healthy=4, broken=True, shape=(48, 48, 40))
    entries = [
        {
            "id": case.id,
            "split": "train" if case.id in ("case4", "case5") else "test",
            "image": case.image.name,
            "mask": case.mask.name if case.mask else None,
            "label": case.label,
            "family": case.meta.get("family"),
        }
        for case in cases
    ]
    manifest = tmp_path / "data" / "cases.json"
    manifest.write_text(json.dumps({"format": "simpleslicenet-cases", "version": 1, "cases": entries}))
    command = [sys.executable, "-m", "SimpleSliceNetLib.cli", "--progress", "none"]
    subprocess.run(
        [*command, "train", "--train", str(manifest), "--name", "tiny", "--output-dir", str(tmp_path / "model"),
         "--epochs", "1", "--encoder-weights", "none", "--shape", "32,32,24", "--blocks", "2", "--device", "cpu"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    out = tmp_path / "eval"
    done = subprocess.run(
        [*command[:-2], "evaluate", "--data", str(manifest), "--model", str(tmp_path / "model" / "tiny.json"),
         "--output-dir", str(out), "--device", "cpu", "--progress", "json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr  # the broken case fails, the others are scored
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e["event"] for e in events if e["event"] in ("start", "error", "output", "done")] == [
        "start", "error", "output", "done"
    ]  # fmt: skip
    assert events[-1]["ok"] == 4 and events[-1]["failed"] == 1
    saved = json.loads((out / "metrics.json").read_text())
    assert list(saved["methods"]) == ["SimpleSliceNet", "intensity baseline"]
    assert saved["methods"]["SimpleSliceNet"]["info"]["id"] == "tiny"
    assert saved["methods"]["SimpleSliceNet"]["summary"]["lesion_cases"] == 2
    assert "| SimpleSliceNet |" in done.stderr and "| intensity baseline |" in done.stderr


def test_scorer_with_maps_off_the_input_grid_is_a_bug(tmp_path: Path) -> None:
    cases = _write_cases(tmp_path / "data", n_lesion=1, n_healthy=0, broken=False)

    def cropping_scorer(volume: Volume, mask: np.ndarray | None) -> Result:
        result = perfect_scorer(volume, mask)
        return Result(result.heatmap[1:], result.brain_mask[1:], 1.0, 0.5)

    with pytest.raises(ValueError, match="input grid"):
        evaluate(cases, {"cropping": cropping_scorer}, tmp_path / "out", Progress("evaluate", "none"))


def test_evaluate_compares_models_and_their_mean(tiny_model, synth_set, tmp_path: Path) -> None:
    """Two models side by side on the same cases and, with --ensemble, the mean of their heatmaps / thresholds."""
    from conftest import run_cli

    from SimpleSliceNetLib.volume_io import load_volume

    bundled = "simpleslicenet-t1-synth"
    out = tmp_path / "eval"
    done = run_cli("--progress", "none", "evaluate", "--data", str(synth_set.manifest), "--split", "val",
                   "--model", str(tiny_model.json), bundled, "--ensemble", "--save-maps", "--no-baseline",
                   "--output-dir", str(out), "--device", "cpu")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    methods = json.loads((out / "metrics.json").read_text())["methods"]
    labels = list(methods)
    assert len(labels) == 3 and labels[0].startswith("tiny ") and labels[1].startswith(f"{bundled} ")
    assert labels[2] == "mean of 2 models"
    assert [m["id"] for m in methods[labels[2]]["info"]["members"]] == ["tiny", bundled]
    thresholds = []
    for label in labels[:2]:
        info = methods[label]["info"]
        thresholds.append(json.loads(Path(info["path"]).read_text())["config"]["scoring"]["threshold"])
    for case in ("val_healthy", "val_glioma"):
        maps = [load_volume(out / "maps" / _safe(label) / f"{case}_heatmap.nii.gz") for label in labels]
        expected = (maps[0].array / thresholds[0] + maps[1].array / thresholds[1]) / 2
        np.testing.assert_allclose(maps[2].array, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(maps[2].affine, maps[0].affine)
        record = next(c for c in methods[labels[2]]["cases"] if c["case"] == case)
        brain = (maps[0].array != 0) | (maps[1].array != 0)  # the maps are 0 outside the brain
        assert record["volume_score"] == pytest.approx(float(expected[brain].max()), rel=1e-5)
    lesion = {label: next(c for c in methods[label]["cases"] if c["case"] == "val_glioma") for label in labels}
    assert all(0.5 < record["voxel_auroc"] <= 1 for record in lesion.values())

    alone = run_cli("evaluate", "--data", str(synth_set.manifest), "--split", "val", "--model", bundled,
                    "--ensemble", "--output-dir", str(tmp_path / "alone"))  # fmt: skip
    assert alone.returncode != 0 and "--ensemble needs at least two models" in alone.stderr
    assert "Traceback" not in alone.stderr and not (tmp_path / "alone").exists()


def test_detector_set_runs_each_detector_once_per_volume(tiny_model, synth_set) -> None:
    from SimpleSliceNetLib.detector import Detector
    from SimpleSliceNetLib.volume_io import load_volume
    from SimpleSliceNetTraining.ensemble import DetectorSet

    detectors = [Detector.load(tiny_model.json, device="cpu") for _ in range(2)]
    calls = []
    for index, detector in enumerate(detectors):
        detect = detector.detect
        detector.detect = lambda volume, mask, detect=detect, index=index: calls.append(index) or detect(volume, mask)
    runs = DetectorSet(detectors)
    volume = load_volume(synth_set.val_lesion)
    first = runs.member(0)(volume, None)
    mean = runs.mean(volume, None)
    assert calls == [0, 1] and runs.member(1)(volume, None) is runs.result(1, volume, None)
    # Same model twice: the mean of heatmap / threshold is each one's heatmap / threshold.
    np.testing.assert_allclose(mean.heatmap, first.heatmap / first.threshold, rtol=1e-6)
    assert mean.threshold == 1.0 and mean.volume_score == pytest.approx(first.volume_score / first.threshold)
    runs.mean(load_volume(synth_set.val_lesion), None)  # another volume object: both run again
    assert calls == [0, 1, 0, 1]
