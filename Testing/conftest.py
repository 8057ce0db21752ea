"""Shared fixtures: brain-like phantoms on any grid, a small synthetic case set and a tiny trained model.

The tiny model is trained once per test session through the real ``simpleslicenet train`` command
(a subprocess) on a few generated healthy volumes, on a coarse model grid so it takes seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "SimpleSliceNetLib.cli"]

# The tiny model's grid: 16x16 feature cells of 12 mm per slice, 16 slabs of 9 mm.
TINY_SHAPE = "128,128,48"
TINY_SPACING = "1.5,1.5,3"
TINY_EPOCHS = 6
TRAIN_SEEDS = (1, 2, 3, 4, 5)
TRAIN_TEMPLATES = ("mni152_nilearn", "mni152_pgbm")


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``simpleslicenet ARGS`` in a fresh interpreter; never inside the repository."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([*CLI, *args], cwd=cwd or Path.home(), env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def rotation(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    """3x3 rotation about ``axis`` (Rodrigues)."""
    a = np.asarray(axis, dtype=float)
    a /= np.linalg.norm(a)
    cross = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = np.deg2rad(degrees)
    return np.eye(3) + np.sin(t) * cross + (1 - np.cos(t)) * cross @ cross


def grid_affine(shape, spacing, directions=None, centre_ras=(0.0, 0.0, 10.0)) -> np.ndarray:
    """Affine of a grid of ``shape`` with ``spacing`` along ``directions`` (columns), centred on ``centre_ras``."""
    affine = np.eye(4)
    directions = np.eye(3) if directions is None else np.asarray(directions, dtype=float)
    affine[:3, :3] = directions @ np.diag(spacing)
    affine[:3, 3] = np.asarray(centre_ras, dtype=float) - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return affine


def world_coordinates(shape, affine) -> np.ndarray:
    """RAS millimetres of every voxel centre: array (X, Y, Z, 3)."""
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    return index @ affine[:3, :3].T + affine[:3, 3]


BRAIN_CENTRE = np.array([0.0, -5.0, 12.0])
BRAIN_AXES = np.array([62.0, 78.0, 55.0])


def phantom(shape, affine, blobs: list[tuple[tuple[float, float, float], float]] = ()) -> np.ndarray:
    """A brain-like T1 phantom defined in world space, sampled on any grid.

    An ellipsoid "brain" (zero outside, as after skull stripping) with smooth texture; each blob
    (RAS centre, amplitude) adds a Gaussian of 5 mm sigma. The same world content on any grid.
    """
    ras = world_coordinates(shape, affine)
    rel = (ras - BRAIN_CENTRE) / BRAIN_AXES
    inside = (rel**2).sum(-1) <= 1.0
    x, y, z = ras[..., 0], ras[..., 1], ras[..., 2]
    image = 400.0 + 80.0 * np.sin(x / 9.0) * np.cos(y / 11.0) + 60.0 * np.cos(z / 7.0 + x / 23.0)
    for centre, amplitude in blobs:
        d2 = ((ras - np.asarray(centre)) ** 2).sum(-1)
        image += amplitude * np.exp(-d2 / (2 * 5.0**2))
    return np.where(inside, image, 0.0).astype(np.float32)


@pytest.fixture(scope="session")
def make_phantom():
    """Factory: ``make_phantom(shape, affine, blobs=...)`` -> float32 array (see :func:`phantom`)."""
    return phantom


@dataclass
class SynthSet:
    root: Path
    manifest: Path
    train: list[Path]
    val_healthy: Path
    val_lesion: Path
    val_mask: Path
    test_lesion: Path  # a glioma on an LPS, anisotropic grid from a template used in training
    test_mask: Path
    extra: dict = field(default_factory=dict)


@pytest.fixture(scope="session")
def synth_set(tmp_path_factory) -> SynthSet:
    """Eight generated cases (anisotropic 1x1x3 mm grid) and a cases.json manifest."""
    from SimpleSliceNetLib.volume_io import save_volume
    from SimpleSliceNetTraining.synth import make_case

    root = tmp_path_factory.mktemp("synth")
    entries = []

    def write(split, case_id, family, seed, orientation, template):
        volume, mask = make_case(family, seed, "aniso_3mm", orientation, template=template)
        (root / split).mkdir(exist_ok=True)
        image = root / split / f"{case_id}.nii.gz"
        save_volume(image, volume.array, volume.affine)
        mask_path = None
        if mask is not None:
            mask_path = root / split / f"{case_id}_mask.nii.gz"
            save_volume(mask_path, mask, volume.affine)
        entries.append({"id": case_id, "split": split, "image": f"{split}/{image.name}",
                        "mask": f"{split}/{mask_path.name}" if mask_path else None,
                        "label": "healthy" if mask is None else "lesion"})
        return image, mask_path

    train = [write("train", f"healthy_{s}", "healthy", s, "RAS", TRAIN_TEMPLATES[s % 2])[0] for s in TRAIN_SEEDS]
    val_healthy, _ = write("val", "val_healthy", "healthy", 41, "RAS", "mni152_nilearn")
    val_lesion, val_mask = write("val", "val_glioma", "glioma", 32, "LPS", "mni152_nilearn")
    test_lesion, test_mask = write("test", "test_glioma", "glioma", 31, "LPS", "mni152_nilearn")
    manifest = root / "cases.json"
    manifest.write_text(json.dumps({"format": "simpleslicenet-cases", "version": 1, "cases": entries}, indent=1))
    return SynthSet(root, manifest, train, val_healthy, val_lesion, val_mask, test_lesion, test_mask)


@dataclass
class TinyModel:
    json: Path
    output_dir: Path
    name: str
    train_args: list[str]
    result: subprocess.CompletedProcess
    events: list[dict]


@pytest.fixture(scope="session")
def tiny_model(synth_set, tmp_path_factory) -> TinyModel:
    """A tiny SimpleSliceNet model trained by ``simpleslicenet train`` (subprocess) on the synthetic set."""
    out = tmp_path_factory.mktemp("tiny_model")
    name = "tiny"
    args = ["--progress", "json", "train", "--train", str(synth_set.manifest), "--val", str(synth_set.manifest),
            "--name", name, "--output-dir", str(out), "--shape", TINY_SHAPE, "--spacing", TINY_SPACING,
            "--epochs", str(TINY_EPOCHS), "--blocks", "2", "--lr", "2e-3", "--device", "cpu",
            # 3x3 neighbourhoods: with 5 training volumes the default 1-cell features on the aligned grid
            # found the planted glioma with voxel AUROC 0.73 only (0.8+ with either change alone).
            "--neighbourhood", "3"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    events = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    return TinyModel(out / f"{name}.json", out, name, args, result, events)


# --- one mixed `detect` call shared by the CLI and end-to-end tests -------------------------------


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), str(path))
    return path


def bad_inputs(folder: Path, good_array: np.ndarray) -> dict[str, Path]:
    """Every kind of unusable input, keyed by what is wrong with it."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    bad = {"missing": folder / "missing.nii.gz"}
    bad["2d"] = write_nifti(folder / "slice2d.nii.gz", rng.uniform(0, 100, (64, 64)).astype(np.float32))
    bad["4d"] = write_nifti(folder / "series4d.nii.gz", rng.uniform(0, 100, (32, 32, 32, 3)).astype(np.float32))
    nan = good_array.copy()
    nan[100, 100, 30] = np.nan
    bad["nan"] = write_nifti(folder / "with_nan.nii.gz", nan)
    bad["constant"] = write_nifti(folder / "constant.nii.gz", np.full((80, 80, 60), 300.0, np.float32),
                                   np.diag([2.0, 2.0, 2.0, 1.0]))
    bad["tiny"] = write_nifti(folder / "tiny.nii.gz", rng.uniform(0, 100, (4, 4, 4)).astype(np.float32))
    bad["coarse_spacing"] = write_nifti(folder / "spacing100.nii.gz", good_array, np.diag([1.0, 1.0, 100.0, 1.0]))
    bad["fine_spacing"] = write_nifti(folder / "spacing0001.nii.gz", good_array, np.diag([0.001, 0.001, 0.001, 1.0]))
    truncated = write_nifti(folder / "truncated.nii.gz", good_array)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    bad["truncated_gzip"] = truncated
    return bad


class DetectRun:
    """The outcome of one mixed ``detect`` call."""

    def __init__(self, root: Path, good: dict[str, Path], bad: dict[str, Path], duplicate: Path, tiny_model):
        self.root, self.good, self.bad, self.duplicate = root, good, bad, duplicate
        self.out = root / "out"
        self.model_json = tiny_model.json
        inputs = [bad["missing"], bad["2d"], good["lps_nifti"], bad["4d"], bad["nan"], good["nrrd"], bad["constant"],
                  bad["tiny"], duplicate, bad["coarse_spacing"], good["oblique"], bad["fine_spacing"],
                  bad["truncated_gzip"]]
        self.inputs = inputs
        self.result = run_cli("--progress", "json", "detect", *map(str, inputs), "--output-dir", str(self.out),
                              "--model", str(tiny_model.json), "--device", "cpu")
        self.events = [json.loads(line) for line in self.result.stdout.splitlines()]


@pytest.fixture(scope="session")
def detect_run(synth_set, tiny_model, tmp_path_factory) -> DetectRun:
    """One `detect --progress json` call on three good inputs mixed with every kind of bad one."""
    from SimpleSliceNetLib.volume_io import load_volume, save_volume

    root = tmp_path_factory.mktemp("cli_detect")
    (root / "in").mkdir()
    shutil.copy(synth_set.test_lesion, root / "in" / "lps_glioma.nii.gz")
    glioma = load_volume(synth_set.test_lesion)
    save_volume(root / "in" / "glioma_nrrd.nrrd", glioma.array, glioma.affine)
    # The healthy validation brain placed obliquely in the world (same voxels, rotated anisotropic grid).
    healthy = load_volume(synth_set.val_healthy)
    oblique = healthy.affine.copy()
    oblique[:3, :3] = rotation((0.2, 0.9, -0.4), 11.0) @ oblique[:3, :3]
    save_volume(root / "in" / "oblique.nii.gz", healthy.array, oblique)
    good = {"lps_nifti": root / "in" / "lps_glioma.nii.gz", "nrrd": root / "in" / "glioma_nrrd.nrrd",
            "oblique": root / "in" / "oblique.nii.gz"}
    (root / "again").mkdir()
    duplicate = shutil.copy(synth_set.val_healthy, root / "again" / "lps_glioma.nii.gz")  # same stem as a good one
    return DetectRun(root, good, bad_inputs(root / "bad", healthy.array), Path(duplicate), tiny_model)


