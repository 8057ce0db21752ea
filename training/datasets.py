"""Finding cases (image, optional lesion mask, label) in the folder layouts people actually have.

Layouts, detected in this order:

- a ``cases.json`` manifest (``simpleslicenet-cases``, as written by ``simpleslicenet synth``),
  given directly or as the folder holding it;
- BraTS: ``BraTS2021_NNNNN/BraTS2021_NNNNN_{t1,t1ce,t2,flair,seg}.nii.gz`` case folders (also the
  2023 naming ``BraTS-GLI-NNNNN-NNN/BraTS-GLI-NNNNN-NNN-{t1n,t1c,t2w,t2f,seg}.nii.gz``); seg > 0 is
  the mask and every case is a lesion case;
- IXI: ``IXI*-T1.nii.gz`` / ``IXI*-T2.nii.gz`` / ``IXI*-PD.nii.gz`` files (healthy);
- a plain folder of NIfTI/NRRD volumes, with masks beside them (``<stem>_mask``, ``<stem>_seg``,
  ``<stem>_label``) or in a ``masks/`` subfolder under the image's stem.

Only the manifest carries splits; the other layouts are returned whole with ``split`` None.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from SimpleSliceNetLib.errors import UserError
from SimpleSliceNetLib.volume_io import Volume, is_volume_path, load_volume, volume_stem

MANIFEST_NAME = "cases.json"
MANIFEST_FORMAT = "simpleslicenet-cases"
MASK_SUFFIXES = ("_mask", "_seg", "_label")
CONTRASTS = ("t1", "t1ce", "t2", "flair", "pd")
SPLITS = ("train", "val", "test")
_BRATS_DIR = re.compile(r"^BraTS(20\d\d_\d+|-[A-Z]+-\d+-\d+)$")
# BraTS 2021 file tokens, and the 2023 ones for the same contrasts.
_BRATS_TOKENS = {"t1": ("t1", "t1n"), "t1ce": ("t1ce", "t1c"), "t2": ("t2", "t2w"), "flair": ("flair", "t2f")}
_IXI_FILE = re.compile(r"^(IXI\d+-.+)-(T1|T2|PD)\.nii(\.gz)?$")
_LAYOUTS_LOOKED_FOR = (
    "a cases.json manifest, BraTS case folders (BraTS2021_NNNNN/BraTS2021_NNNNN_t1.nii.gz, ..._seg.nii.gz), "
    "IXI files (IXI*-T1.nii.gz, IXI*-T2.nii.gz) or NIfTI/NRRD volumes (.nii, .nii.gz, .nrrd, .nhdr)"
)


@dataclass
class Case:
    """One volume to score or train on; ``mask`` marks the abnormal voxels when known."""

    id: str
    image: Path
    mask: Path | None
    label: str | None  # "healthy", "lesion" or None (unknown)
    split: str | None
    meta: dict[str, Any] = field(default_factory=dict)


def load_cases(
    source: str | Path, split: str | None = None, contrast: str = "t1", assume_healthy: bool = False
) -> list[Case]:
    """The cases found at ``source`` (a manifest, a folder in one of the layouts above, or one volume file).

    ``split`` keeps one split of a manifest (layouts without splits are returned whole).
    ``contrast`` picks the image in BraTS and IXI folders and filters manifests.
    ``assume_healthy`` labels mask-less volumes of a plain folder "healthy" instead of unknown.
    Sorted by id. Raises :class:`UserError` when nothing usable is found.
    """
    path = Path(source).expanduser()
    contrast = contrast.lower()
    if contrast not in CONTRASTS:
        raise UserError(f"unknown contrast '{contrast}'; choose one of {', '.join(CONTRASTS)}")
    if split is not None and split not in SPLITS:
        raise UserError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    if not path.exists():
        raise UserError(f"{path}: not found; give a cases.json manifest or a folder of volumes")
    if path.is_file():
        if path.suffix.lower() == ".json":
            cases = _from_manifest(path, split, contrast)
        elif is_volume_path(path):
            cases = [_plain_case(path, _find_mask(path), assume_healthy)]
        elif path.suffix.lower() == ".txt":
            cases = _from_list(path, assume_healthy)
        else:
            raise UserError(f"{path}: not a cases.json manifest, a .txt list of volumes or a NIfTI/NRRD volume")
    elif (path / MANIFEST_NAME).is_file():
        cases = _from_manifest(path / MANIFEST_NAME, split, contrast)
    elif brats_dirs := _brats_case_dirs(path):
        cases = [_brats_case(folder, contrast) for folder in brats_dirs]
    elif ixi_files := _ixi_files(path):
        cases = _ixi_cases(path, ixi_files, contrast)
    else:
        cases = _plain_folder(path, assume_healthy)
    if not cases:
        raise UserError(f"{path}: no usable cases found; looked for {_LAYOUTS_LOOKED_FOR}")
    _check_unique_ids(path, cases)
    return sorted(cases, key=lambda case: case.id)


def load_mask(case: Case, reference: Volume) -> np.ndarray:
    """The case's mask as booleans (label > 0), checked to lie on ``reference``'s grid (the image's)."""
    if case.mask is None:
        raise UserError(f"{case.id}: no mask is known for this case")
    mask = load_volume(case.mask)
    if mask.array.shape != reference.array.shape:
        raise UserError(
            f"{case.mask}: mask grid {list(mask.array.shape)} differs from the image grid "
            f"{list(reference.array.shape)}; resample the mask onto the image first"
        )
    difference = float(np.abs(mask.affine[:3] - reference.affine[:3]).max())
    if difference > 1e-3:
        raise UserError(
            f"{case.mask}: mask and image have the same shape but different positions or spacing "
            f"(affines differ by up to {difference:.3g} mm); resample the mask onto the image first"
        )
    return mask.array > 0


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------


def _from_list(path: Path, assume_healthy: bool) -> list[Case]:
    """A text file naming one volume per line (relative to the file; blank lines and # comments skipped)."""
    cases = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        image = (path.parent / entry).expanduser()
        if not image.is_file() or not is_volume_path(image):
            raise UserError(f"{path}, line {number}: {entry} is not a NIfTI/NRRD volume file")
        cases.append(_plain_case(image, _find_mask(image), assume_healthy))
    return cases


def _from_manifest(path: Path, split: str | None, contrast: str) -> list[Case]:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot be read as JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{path}: not a SimpleSliceNet case list (expected \"format\": \"{MANIFEST_FORMAT}\")")
    if manifest.get("version") != 1:
        raise UserError(f"{path}: case list version {manifest.get('version')!r} is not supported (expected 1)")
    entries = manifest.get("cases")
    if not isinstance(entries, list):
        raise UserError(f"{path}: \"cases\" must be a list")
    root = path.parent
    cases = []
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("id") or not entry.get("image"):
            raise UserError(f"{path}: case number {number} needs at least \"id\" and \"image\"")
        if split is not None and entry.get("split") != split:
            continue
        if entry.get("contrast", contrast).lower() != contrast:
            continue
        image = root / entry["image"]
        mask = root / entry["mask"] if entry.get("mask") else None
        for file in (image, mask):
            if file is not None and not file.is_file():
                raise UserError(f"{path}: case '{entry['id']}' refers to {file}, which does not exist")
        meta = {k: v for k, v in entry.items() if k not in ("id", "image", "mask", "label", "split")}
        meta["layout"] = "manifest"
        cases.append(Case(str(entry["id"]), image, mask, entry.get("label"), entry.get("split"), meta))
    if not cases and entries:
        found = sorted({(str(e.get("split")), str(e.get("contrast", "t1"))) for e in entries if isinstance(e, dict)})
        raise UserError(
            f"{path}: no cases with split {split or 'any'} and contrast {contrast}; "
            f"present (split, contrast): {', '.join(f'({s}, {c})' for s, c in found)}"
        )
    return cases


def _brats_case_dirs(path: Path) -> list[Path]:
    # The folder may itself be one BraTS case, or hold many.
    if _BRATS_DIR.match(path.name):
        return [path]
    return sorted(d for d in path.iterdir() if d.is_dir() and _BRATS_DIR.match(d.name))


def _brats_file(folder: Path, token: str) -> Path | None:
    for sep in ("_", "-"):
        for suffix in (".nii.gz", ".nii"):
            candidate = folder / f"{folder.name}{sep}{token}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _brats_case(folder: Path, contrast: str) -> Case:
    if contrast not in _BRATS_TOKENS:
        raise UserError(f"BraTS has no '{contrast}' images; choose one of {', '.join(_BRATS_TOKENS)}")
    image = next((f for t in _BRATS_TOKENS[contrast] if (f := _brats_file(folder, t))), None)
    if image is None:
        raise UserError(f"{folder}: no {contrast} image ({folder.name}_{contrast}.nii.gz) in this BraTS case")
    # BraTS validation/test releases have no seg: the case still holds a tumour, its extent is unknown.
    seg = _brats_file(folder, "seg")
    return Case(folder.name, image, seg, "lesion", None, {"layout": "brats", "contrast": contrast})


def _ixi_files(path: Path) -> list[Path]:
    # IXI tarballs unpack flat; people often keep IXI-T1/ and IXI-T2/ side by side, so look one level down too.
    files = [f for f in path.iterdir() if f.is_file() and _IXI_FILE.match(f.name)]
    for sub in path.iterdir():
        if sub.is_dir():
            files += [f for f in sub.iterdir() if f.is_file() and _IXI_FILE.match(f.name)]
    return sorted(files)


def _ixi_cases(path: Path, files: list[Path], contrast: str) -> list[Case]:
    wanted = contrast.upper()
    cases = []
    for file in files:
        subject, file_contrast = _IXI_FILE.match(file.name).groups()[:2]
        if file_contrast == wanted:
            cases.append(Case(subject, file, None, "healthy", None, {"layout": "ixi", "contrast": contrast}))
    if not cases:
        present = sorted({_IXI_FILE.match(f.name).group(2) for f in files})
        raise UserError(f"{path}: IXI folder has no {wanted} images (found {', '.join(present)})")
    return cases


def _is_mask_name(path: Path) -> bool:
    return volume_stem(path).lower().endswith(MASK_SUFFIXES)


def _find_mask(image: Path) -> Path | None:
    stem = volume_stem(image)
    siblings = [image.parent / f"{stem}{tag}" for tag in MASK_SUFFIXES] + [image.parent / "masks" / stem]
    for base in siblings:
        for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr"):
            candidate = base.with_name(base.name + suffix)
            if candidate.is_file():
                return candidate
    return None


def _plain_case(image: Path, mask: Path | None, assume_healthy: bool) -> Case:
    # A mask file means the case has an annotated abnormality; without one the label is unknown.
    label = "lesion" if mask is not None else ("healthy" if assume_healthy else None)
    return Case(volume_stem(image), image, mask, label, None, {"layout": "folder"})


def _plain_folder(path: Path, assume_healthy: bool) -> list[Case]:
    images = sorted(f for f in path.iterdir() if f.is_file() and is_volume_path(f) and not _is_mask_name(f))
    return [_plain_case(image, _find_mask(image), assume_healthy) for image in images]


def _check_unique_ids(path: Path, cases: list[Case]) -> None:
    seen: dict[str, Path] = {}
    for case in cases:
        if case.id in seen:
            raise UserError(
                f"{path}: two cases are named '{case.id}' ({seen[case.id].name} and {case.image.name}); "
                "rename one of them"
            )
        seen[case.id] = case.image
