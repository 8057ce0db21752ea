"""Synthetic T1 brain MRI with known lesion masks: ``simpleslicenet synth --out DIR``.

A case is made in four steps, each with its own random stream derived from (seed, case index):

1. anatomy: a packaged template (``templates.py``) warped by a random affine and a smooth elastic
   field, on the template's 1 mm RAS grid;
2. lesion (lesion cases only, ``synth_lesions.py``), planted on that grid;
3. appearance: gamma/contrast change and a smooth multiplicative bias field;
4. acquisition: resampling through the affines onto the output grid (1 mm or anisotropic; RAS,
   LPS or oblique), Rician noise, background re-zeroed with the brain mask (as skull-stripping
   tools leave it), intensities scaled and rounded like scanner output.

By default the SRI24 template is held out for the test split (`holdout_template`); train and val use the other two.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from SimpleSliceNetLib.errors import UserError
from SimpleSliceNetLib.progress import Progress
from SimpleSliceNetLib.volume_io import Volume, atomic_path, save_volume

from .synth_lesions import LESION_FAMILIES, plant_lesion
from .templates import Template, load_template

MANIFEST_NAME = "cases.json"
MANIFEST_FORMAT = "simpleslicenet-cases"
FAMILIES = ("healthy",) + LESION_FAMILIES
TEMPLATES = ("mni152_nilearn", "mni152_pgbm", "sri24")
# name -> (shape, spacing in mm)
GRIDS: dict[str, tuple[tuple[int, int, int], tuple[float, float, float]]] = {
    "brats": ((240, 240, 155), (1.0, 1.0, 1.0)),
    "mni_nilearn": ((197, 233, 189), (1.0, 1.0, 1.0)),
    "mni_fsl": ((182, 218, 182), (1.0, 1.0, 1.0)),
    "aniso_3mm": ((200, 232, 60), (1.0, 1.0, 3.0)),
    "aniso_2p5mm": ((220, 256, 66), (0.9, 0.9, 2.5)),
}
ORIENTATIONS = ("RAS", "LPS", "oblique")


@dataclass
class SynthConfig:
    """How many cases of each kind to make, and the seed that fixes every one of them."""

    seed: int = 0
    n_train: int = 40
    n_val_healthy: int = 4
    n_val_lesion: int = 6
    n_test_healthy: int = 8
    n_test_lesion: int = 18
    # Parallel worker processes (0: one per core, at most 4). Does not change the output.
    workers: int = 0
    # Never used for train/val; half the test cases. SRI24 is the one brain unlike the other two
    # (both MNI152 2009 averages), so holding it out measures generalisation to unseen anatomy.
    holdout_template: str = "sri24"

    @property
    def train_templates(self) -> tuple[str, ...]:
        return tuple(t for t in TEMPLATES if t != self.holdout_template)

    @property
    def test_templates(self) -> tuple[str, ...]:
        """Test mixes the held-out template (half the cases) with the training templates."""
        first, second = self.train_templates
        return (self.holdout_template, first, self.holdout_template, second)

    @classmethod
    def small(cls, seed: int = 0) -> SynthConfig:
        """A tiny set (10 cases) for tests and quick trials."""
        return cls(seed=seed, n_train=3, n_val_healthy=1, n_val_lesion=1, n_test_healthy=2, n_test_lesion=3)


@dataclass(frozen=True)
class CaseSpec:
    """Everything that determines one synthetic case."""

    id: str
    split: str
    family: str
    template: str
    grid: str
    orientation: str
    suffix: str
    entropy: tuple[int, ...]


@dataclass
class Subject:
    """A deformed healthy brain on its template's 1 mm RAS grid (T1 with white matter ~ 1)."""

    volume: Volume
    brain: np.ndarray
    wm: np.ndarray | None
    template: str


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def _rotation(angles_deg: np.ndarray) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smooth_field(shape: tuple[int, ...], step: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth random field (unit std) made on a grid ``step`` times coarser, then linearly upsampled.

    The upsampling is a product of three small interpolation matrices (einsum): ~10x faster than
    ndimage.zoom at 1 mm, with the same result."""
    coarse_shape = tuple(max(int(np.ceil(n / step)) + 1, 2) for n in shape)
    coarse = ndi.gaussian_filter(rng.standard_normal(coarse_shape), 1.0, mode="reflect")
    coarse /= max(float(coarse.std()), 1e-6)
    weights = [_linear_weights(n, c) for n, c in zip(shape, coarse_shape, strict=True)]
    return np.einsum("ia,jb,kc,abc->ijk", *weights, coarse.astype(np.float32), optimize=True)


def _linear_weights(n: int, c: int) -> np.ndarray:
    """(n, c) matrix interpolating c coarse samples linearly onto n fine ones (cell-centred, like zoom)."""
    position = np.clip((np.arange(n) + 0.5) * c / n - 0.5, 0, c - 1)
    return np.clip(1.0 - np.abs(position[:, None] - np.arange(c)[None, :]), 0.0, None).astype(np.float32)


def make_anatomy(template: Template, rng: np.random.Generator, with_tissue: bool = True) -> Subject:
    """Warp ``template`` by a random affine (rotation <= 8 deg, scale +-8 %, shift <= 6 mm) and a
    smooth elastic field (a few mm). ``with_tissue`` also warps the white-matter map (for lesions)."""
    shape = template.t1.shape
    centre = (np.array(shape) - 1) / 2.0
    linear = _rotation(rng.uniform(-8.0, 8.0, 3)) @ np.diag(rng.uniform(0.92, 1.08, 3))
    shift = rng.uniform(-6.0, 6.0, 3)
    # Backward map (1 mm RAS voxels are millimetres): subject x samples template c + L^-1 (x - c - shift).
    inverse = np.linalg.inv(linear)
    axes = [np.arange(n, dtype=np.float32) - c - t for n, c, t in zip(shape, centre, shift, strict=True)]
    coords = np.empty((3,) + shape, dtype=np.float32)
    for row in range(3):
        coords[row] = (
            inverse[row, 0] * axes[0][:, None, None]
            + inverse[row, 1] * axes[1][None, :, None]
            + inverse[row, 2] * axes[2][None, None, :]
            + centre[row]
        )
        coords[row] += rng.uniform(2.0, 4.0) * _smooth_field(shape, 12, rng)
    t1 = ndi.map_coordinates(template.t1, coords, order=1, cval=0.0)
    brain = ndi.map_coordinates(template.brain.astype(np.float32), coords, order=1, cval=0.0) > 0.5
    wm = ndi.map_coordinates(template.wm, coords, order=1, cval=0.0) * brain if with_tissue else None
    t1 = np.clip(t1, 0.0, None) * brain
    return Subject(Volume(t1.astype(np.float32), template.affine.copy()), brain, wm, template.name)


def apply_appearance(
    volume: Volume, brain: np.ndarray, rng: np.random.Generator, wm: np.ndarray | None = None
) -> Volume:
    """Random grey/white contrast, sharpness, gamma and a smooth multiplicative bias field (+-10-25 %).

    Templates are averages of many brains (smooth, one contrast); varying sharpness and the
    grey/white ratio widens "healthy" beyond the two training templates, as scanners and
    sequences do, so an unseen brain is not flagged as a whole.
    """
    image = volume.array.astype(np.float32)
    if wm is not None:
        image = image * (1.0 + rng.uniform(-0.08, 0.12) * wm)
    blurred = ndi.gaussian_filter(image, 1.0)
    sharpness = rng.uniform(-1.0, 1.0)
    if sharpness < 0:
        image = ndi.gaussian_filter(image, -sharpness)
    else:
        image = np.clip(image + 0.8 * sharpness * (image - blurred), 0.0, None)
    image = np.power(image, rng.uniform(0.75, 1.3), dtype=np.float32)
    # Cubic polynomial in normalised coordinates: smooth over the head like a real coil bias.
    grids = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in image.shape]
    log_bias = np.zeros(image.shape, dtype=np.float32)
    strength = rng.uniform(0.08, 0.2)
    for p in range(4):
        for q in range(4 - p):
            for r in range(4 - p - q):
                if p + q + r == 0:
                    continue
                coef = np.float32(rng.normal(0.0, strength / (p + q + r)))
                log_bias += coef * (grids[0][:, None, None] ** p) * (grids[1][None, :, None] ** q) * grids[2] ** r
    image *= np.exp(log_bias)
    return Volume(image * brain, volume.affine.copy())


def add_rician_noise(image: np.ndarray, brain: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rician noise inside ``brain``, zero outside (as after skull stripping). ``image`` is in white-matter
    units (WM ~ 1), so sigma = 2-5 % of WM; not measured from the image, so a lesion leaves the noise
    of the rest of the brain unchanged."""
    sigma = rng.uniform(0.02, 0.05)
    values = image[brain]
    noise = rng.standard_normal((2, values.size)).astype(np.float32) * sigma
    out = np.zeros_like(image, dtype=np.float32)
    out[brain] = np.sqrt((values + noise[0]) ** 2 + noise[1] ** 2)
    return out


def make_grid(
    grid: str, orientation: str, subject: Subject, rng: np.random.Generator
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Affine and shape of an output grid centred on the subject's brain (a few mm off-centre)."""
    if grid not in GRIDS:
        raise UserError(f"unknown grid '{grid}'; choose one of {', '.join(GRIDS)}")
    if orientation not in ORIENTATIONS:
        raise UserError(f"unknown orientation '{orientation}'; choose one of {', '.join(ORIENTATIONS)}")
    shape, spacing = GRIDS[grid]
    if orientation == "RAS":
        directions = np.eye(3)
    elif orientation == "LPS":
        directions = np.diag([-1.0, -1.0, 1.0])
    else:
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        angle = np.deg2rad(rng.uniform(5.0, 15.0))
        cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        directions = np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross
    linear = directions @ np.diag(spacing)

    index = np.argwhere(subject.brain)
    work = subject.volume.affine
    lo, hi = work[:3, :3] @ index.min(axis=0) + work[:3, 3], work[:3, :3] @ index.max(axis=0) + work[:3, 3]
    lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    centre = (lo + hi) / 2.0 + rng.uniform(-3.0, 3.0, 3)
    # When the brain is taller than the field of view, keep the top and lose the lower brainstem.
    half_height = 0.5 * float(np.abs(linear[2]) @ (np.array(shape) - 1))
    centre[2] = max(centre[2], hi[2] + 2.0 - half_height)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = centre - linear @ ((np.array(shape) - 1) / 2.0)
    if orientation != "oblique" and spacing == (1.0, 1.0, 1.0):
        # Put the voxel lattice on the subject's so resampling is an exact copy (no blur).
        affine[:3, 3] = work[:3, 3] + np.round(affine[:3, 3] - work[:3, 3])
    return affine, shape


def resample_to_grid(
    volume: Volume, brain: np.ndarray, lesion: np.ndarray | None, affine: np.ndarray, shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Image (linear), brain and lesion masks on the output grid, through the two affines (world space)."""
    to_work = np.linalg.inv(volume.affine) @ affine
    # Only the output voxels that can see the brain are interpolated; the rest stay zero.
    index = np.argwhere(brain)
    corners = np.array([[a, b, c, 1.0] for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    lo_w, hi_w = index.min(axis=0) - 1, index.max(axis=0) + 1
    work_corners = lo_w + corners[:, :3] * (hi_w - lo_w)
    out_corners = (np.linalg.inv(to_work) @ np.c_[work_corners, np.ones(8)].T)[:3].T
    lo = np.clip(np.floor(out_corners.min(axis=0)).astype(int) - 1, 0, shape)
    hi = np.clip(np.ceil(out_corners.max(axis=0)).astype(int) + 2, 0, shape)
    sub = tuple(int(h - low) for low, h in zip(lo, hi, strict=True))
    image = np.zeros(shape, dtype=np.float32)
    brain_out = np.zeros(shape, dtype=bool)
    lesion_out = np.zeros(shape, dtype=bool) if lesion is not None else None
    if min(sub) <= 0:
        return image, brain_out, lesion_out
    axes = [np.arange(low, h, dtype=np.float32) for low, h in zip(lo, hi, strict=True)]
    coords = np.empty((3,) + sub, dtype=np.float32)
    for row in range(3):
        coords[row] = (
            to_work[row, 0] * axes[0][:, None, None]
            + to_work[row, 1] * axes[1][None, :, None]
            + to_work[row, 2] * axes[2][None, None, :]
            + to_work[row, 3]
        )
    box = tuple(slice(int(low), int(h)) for low, h in zip(lo, hi, strict=True))
    image[box] = ndi.map_coordinates(volume.array, coords, order=1, cval=0.0)
    # Lesions lie inside the brain, so brain + lesion in {0, 1, 2} carries both masks in one pass.
    labels = brain.astype(np.float32) + (lesion if lesion is not None else 0)
    sampled = ndi.map_coordinates(labels, coords, order=1, cval=0.0)
    brain_out[box] = sampled > 0.5
    if lesion_out is not None:
        lesion_out[box] = sampled > 1.5
    image *= brain_out
    return image, brain_out, lesion_out


def _streams(entropy: tuple[int, ...]) -> dict[str, np.random.Generator]:
    # Separate streams keep steps independent: the same seed gives the same anatomy on every grid,
    # and a lesion case differs from its healthy twin only by the lesion.
    names = ("anatomy", "lesion", "appearance", "grid", "noise", "scale")
    children = np.random.SeedSequence(list(entropy)).spawn(len(names))
    return {name: np.random.default_rng(child) for name, child in zip(names, children, strict=True)}


def render_case(spec: CaseSpec) -> tuple[Volume, np.ndarray | None, np.ndarray]:
    """Make the case ``spec`` describes: (image on its grid, uint8 lesion mask or None, brain mask)."""
    if spec.family not in FAMILIES:
        raise UserError(f"unknown family '{spec.family}'; choose one of {', '.join(FAMILIES)}")
    rngs = _streams(spec.entropy)
    subject = make_anatomy(load_template(spec.template), rngs["anatomy"])
    volume, lesion = subject.volume, None
    if spec.family != "healthy":
        volume, lesion = plant_lesion(volume, subject.brain, subject.wm, spec.family, rngs["lesion"])
    volume = apply_appearance(volume, subject.brain, rngs["appearance"], subject.wm)
    affine, shape = make_grid(spec.grid, spec.orientation, subject, rngs["grid"])
    image, brain, lesion_out = resample_to_grid(volume, subject.brain, lesion, affine, shape)
    image = add_rician_noise(image, brain, rngs["noise"])
    # Scanner-like units: white matter somewhere in 300-1200, integer-valued, never 0 inside the brain.
    image = np.round(image * rngs["scale"].uniform(300.0, 1200.0))
    image = np.where(brain, np.maximum(image, 1.0), 0.0).astype(np.float32)
    if lesion_out is not None and not lesion_out.any():
        raise RuntimeError(f"synthetic case {spec.id}: the lesion vanished on grid {spec.grid}")
    mask = lesion_out.astype(np.uint8) if lesion_out is not None else None
    return Volume(image, affine), mask, brain


def make_healthy_subject(template: Template | str, rng: np.random.Generator) -> tuple[Volume, np.ndarray]:
    """A healthy subject on the template's 1 mm RAS grid (anatomy, appearance, noise) and its brain mask."""
    if isinstance(template, str):
        template = load_template(template)
    subject = make_anatomy(template, rng)
    volume = apply_appearance(subject.volume, subject.brain, rng, subject.wm)
    return Volume(add_rician_noise(volume.array, subject.brain, rng), volume.affine), subject.brain


def make_case(
    family: str, seed: int, grid: str = "brats", orientation: str = "RAS", template: str = "mni152_nilearn"
) -> tuple[Volume, np.ndarray | None]:
    """One synthetic case, quickly (about 2-4 s): the image and its uint8 lesion mask (None if healthy).

    The same ``seed`` gives the same anatomy (and lesion) whatever ``grid`` and ``orientation``.
    """
    spec = CaseSpec(f"{family}_{seed}", "test", family, template, grid, orientation, ".nii.gz", (int(seed),))
    volume, mask, _ = render_case(spec)
    return volume, mask


# ---------------------------------------------------------------------------------------------
# The data set
# ---------------------------------------------------------------------------------------------


def plan_cases(config: SynthConfig) -> list[CaseSpec]:
    """The list of cases for ``config``: splits, families, templates, grids, orientations, formats."""
    groups = [
        ("train", "healthy", config.n_train),
        ("val", "healthy", config.n_val_healthy),
        ("val", "lesion", config.n_val_lesion),
        ("test", "healthy", config.n_test_healthy),
        ("test", "lesion", config.n_test_lesion),
    ]
    for _, _, count in groups:
        if count < 0:
            raise UserError("case counts must be zero or more")
    if config.holdout_template not in TEMPLATES:
        raise UserError(f"unknown template '{config.holdout_template}'; choose one of {', '.join(TEMPLATES)}")
    specs: list[CaseSpec] = []
    index = 0
    for split_no, split in enumerate(("train", "val", "test")):
        entries = []
        for group_split, label, count in groups:
            if group_split != split:
                continue
            for j in range(count):
                family = "healthy" if label == "healthy" else LESION_FAMILIES[j % len(LESION_FAMILIES)]
                if split == "test":
                    # Lesion cases step through templates per round of families so every family sees SRI24.
                    template = config.test_templates[(j if label == "healthy" else j // len(LESION_FAMILIES)) % 4]
                else:
                    template = config.train_templates[j % len(config.train_templates)]
                entries.append((family, template))
        # Balanced, shuffled grids/orientations/formats so no family is tied to one of them.
        n = len(entries)
        order = np.random.default_rng([config.seed, split_no])
        grid_names = list(GRIDS)
        grids = order.permutation([grid_names[i % len(grid_names)] for i in range(n)])
        orientations = order.permutation([ORIENTATIONS[i % len(ORIENTATIONS)] for i in range(n)])
        suffixes = order.permutation([".nrrd" if i % 5 == 4 else ".nii.gz" for i in range(n)])
        for k, (family, template) in enumerate(entries):
            specs.append(
                CaseSpec(
                    id=f"{split}_{k:03d}_{family}",
                    split=split,
                    family=family,
                    template=template,
                    grid=str(grids[k]),
                    orientation=str(orientations[k]),
                    suffix=str(suffixes[k]),
                    entropy=(int(config.seed), index),
                )
            )
            index += 1
    return specs


def _write_case(spec: CaseSpec, out_dir: Path) -> dict[str, Any]:
    volume, mask, _ = render_case(spec)
    image_rel = f"{spec.split}/{spec.id}{spec.suffix}"
    save_volume(out_dir / image_rel, volume.array, volume.affine)
    mask_rel = None
    if mask is not None:
        mask_rel = f"{spec.split}/{spec.id}_mask{spec.suffix}"
        save_volume(out_dir / mask_rel, mask, volume.affine)
    return {
        "id": spec.id,
        "split": spec.split,
        "image": image_rel,
        "mask": mask_rel,
        "label": "healthy" if spec.family == "healthy" else "lesion",
        "family": spec.family,
        "template": spec.template,
        "grid": list(volume.array.shape),
        "spacing": [round(float(s), 4) for s in volume.spacing],
        "orientation": spec.orientation,
        "contrast": "t1",
        # Of the voxel values, not the file bytes (compressors differ): another run or machine can
        # check that it made the same set.
        "image_sha256": voxel_sha256(volume.array),
        "mask_sha256": None if mask is None else voxel_sha256(mask),
    }


def voxel_sha256(array: np.ndarray) -> str:
    """SHA-256 of ``array``'s values as float32 in C order (whatever dtype or order it was read in)."""
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def _worker_count(config: SynthConfig, n_cases: int) -> int:
    wanted = config.workers if config.workers > 0 else min(os.cpu_count() or 1, 4)
    return max(1, min(wanted, n_cases))


def _written_by_synth(path: Path) -> bool:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT and "config" in manifest


def generate(out_dir: str | os.PathLike, config: SynthConfig, progress: Progress | None = None) -> Path:
    """Write the synthetic data set to ``out_dir``; return the path of its ``cases.json`` manifest.

    Volumes are written first and the manifest last, so a folder with a manifest is complete.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / MANIFEST_NAME
    if manifest_path.exists():
        if not _written_by_synth(manifest_path):
            raise UserError(f"{out_dir} holds a {MANIFEST_NAME} that synth did not write; choose another folder")
        # A stale manifest must not describe a half-rewritten folder if this run is interrupted.
        manifest_path.unlink()
    # Fail early, in this process, with a clear message if a template package is missing.
    specs = plan_cases(config)
    for name in sorted({spec.template for spec in specs}):
        load_template(name)
    progress = progress or Progress("synth", mode="none")
    workers = _worker_count(config, len(specs))
    if workers == 1:
        results = map(_write_case, specs, [out_dir] * len(specs))
        entries = list(progress.iterate(results, total=len(specs), desc="synth"))
    else:
        import multiprocessing
        import sys

        # fork starts fast and needs no importable __main__; but once torch is loaded its thread pools
        # make fork unsafe, so use spawn then.
        methods = multiprocessing.get_all_start_methods()
        method = "fork" if "fork" in methods and "torch" not in sys.modules else "spawn"
        context = multiprocessing.get_context(method)
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            results = pool.map(_write_case, specs, [out_dir] * len(specs))
            entries = list(progress.iterate(results, total=len(specs), desc="synth"))
    recorded = {f.name: getattr(config, f.name) for f in fields(config) if f.name != "workers"}
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "seed": config.seed,
        "config": recorded,
        "cases": entries,
    }
    with atomic_path(manifest_path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest_path


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``synth`` on the CLI's subparsers; ``args.func`` is :func:`run`."""
    parser = subparsers.add_parser(
        "synth",
        help="generate synthetic T1 brain MRI (healthy and with lesion masks) for demos and tests",
        description="Generate a synthetic data set: healthy training T1 volumes and validation/test volumes "
        "with glioma-like tumours, small white-matter lesions or large regions, each with a mask. "
        "Writes DIR/<split>/<case>.nii.gz (some .nrrd), masks beside them and DIR/cases.json.",
    )
    defaults = SynthConfig()
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default %(default)s)")
    for name, text in [
        ("n_train", "healthy training cases"),
        ("n_val_healthy", "healthy validation cases"),
        ("n_val_lesion", "validation cases with a lesion"),
        ("n_test_healthy", "healthy test cases"),
        ("n_test_lesion", "test cases with a lesion"),
    ]:
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=int, default=None, help=f"{text} (default {getattr(defaults, name)})")
    parser.add_argument("--small", action="store_true", help="a tiny set of 10 cases (explicit counts still apply)")
    parser.add_argument("--workers", type=int, default=0, help="parallel processes (default: one per core, at most 4)")
    parser.add_argument("--holdout-template", default=defaults.holdout_template, choices=TEMPLATES,
                        help="template kept out of train/val (default %(default)s)")
    parser.set_defaults(func=run)
    return parser


def config_from_args(args: argparse.Namespace) -> SynthConfig:
    config = SynthConfig.small(args.seed) if args.small else SynthConfig(seed=args.seed)
    for name in ("n_train", "n_val_healthy", "n_val_lesion", "n_test_healthy", "n_test_lesion"):
        value = getattr(args, name, None)
        if value is not None:
            if value < 0:
                raise UserError(f"--{name.replace('_', '-')} must be zero or more, got {value}")
            setattr(config, name, value)
    config.workers = max(int(getattr(args, "workers", 0) or 0), 0)
    config.holdout_template = getattr(args, "holdout_template", config.holdout_template)
    return config


def run(args: argparse.Namespace, progress: Progress) -> int:
    """CLI entry: generate the data set and report the manifest."""
    config = config_from_args(args)
    manifest = generate(args.out, config, progress)
    progress.emit("output", input=str(args.out), files={"manifest": str(manifest)})
    progress.info(f"wrote {manifest}")
    return 0


__all__ = [
    "CaseSpec",
    "FAMILIES",
    "GRIDS",
    "ORIENTATIONS",
    "SynthConfig",
    "Subject",
    "add_parser",
    "add_rician_noise",
    "apply_appearance",
    "generate",
    "make_anatomy",
    "make_case",
    "make_grid",
    "make_healthy_subject",
    "plan_cases",
    "plant_lesion",
    "render_case",
    "resample_to_grid",
    "run",
]
