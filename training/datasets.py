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

Splits: a manifest names each case's split. BraTS follows the paper's protocol: case folders
sorted by id, the first :data:`BRATS_VAL_CASES` (251) are "val", the rest "test". IXI subjects are
all "train" unless a seeded hold-out fraction moves some to "val". Plain folders and lists carry no
split and are returned whole whatever split is asked for.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from SimpleSliceNetLib.errors import UserError
from SimpleSliceNetLib.volume_io import Volume, is_volume_path, load_volume, volume_stem

MANIFEST_NAME = "cases.json"
MANIFEST_FORMAT = "simpleslicenet-cases"
MASK_SUFFIXES = ("_mask", "_seg", "_label")
CONTRASTS = ("t1", "t1ce", "t2", "flair", "pd")
# The modality a model trained on each contrast records (what `models` and the Slicer module show).
MODALITY = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR", "pd": "PD"}
SPLITS = ("train", "val", "test")
ALL_SPLITS = "all"
# The paper's protocol: BraTS2021 sorted by case id, the first 251 cases validate, the remaining 1000 test.
BRATS_VAL_CASES = 251
IXI_CONTRASTS = ("t1", "t2", "pd")
SPLIT_RULES_HELP = (
    f"Splits of folders without a manifest: BraTS case folders sorted by id, the first --brats-val-cases "
    f"(default {BRATS_VAL_CASES}, the paper's) are 'val', the rest 'test'; IXI subjects are all 'train', "
    "except a seeded --holdout-fraction moved to 'val'; plain folders are used whole."
)
_BRATS_DIR = re.compile(r"^BraTS(20\d\d_\d+|-[A-Z]+-\d+-\d+)$")
# BraTS 2021 file tokens, and the 2023 ones for the same contrasts.
_BRATS_TOKENS = {"t1": ("t1", "t1n"), "t1ce": ("t1ce", "t1c"), "t2": ("t2", "t2w"), "flair": ("flair", "t2f")}
_IXI_FILE = re.compile(r"^(IXI\d+-.+)-(T1|T2|PD)\.nii(\.gz)?$")
_LAYOUTS_LOOKED_FOR = (
    "a cases.json manifest, BraTS case folders (BraTS2021_NNNNN/BraTS2021_NNNNN_t1.nii.gz, ..._seg.nii.gz), "
    "IXI files (IXI*-T1.nii.gz, IXI*-T2.nii.gz) or NIfTI/NRRD volumes (.nii, .nii.gz, .nrrd, .nhdr)"
)


@dataclass(frozen=True)
class SplitRule:
    """How BraTS and IXI folders (which carry no split of their own) are split."""

    brats_val_cases: int = BRATS_VAL_CASES
    holdout_fraction: float = 0.0  # share of IXI subjects held out as "val"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.brats_val_cases < 0:
            raise UserError(f"--brats-val-cases must be 0 or more, got {self.brats_val_cases}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise UserError(f"--holdout-fraction must be in [0, 1), got {self.holdout_fraction}")


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
    source: str | Path,
    split: str | None = None,
    contrast: str = "t1",
    assume_healthy: bool = False,
    rule: SplitRule | None = None,
) -> list[Case]:
    """The cases found at ``source`` (a manifest, a folder in one of the layouts above, or one volume file).

    ``split`` keeps one split ("all" or None: every case): a manifest's own, or the split ``rule``
    for BraTS and IXI folders (plain folders are returned whole).
    ``contrast`` picks the image in BraTS and IXI folders and filters manifests.
    ``assume_healthy`` labels mask-less volumes of a plain folder "healthy" instead of unknown.
    Sorted by id. Raises :class:`UserError` when nothing usable is found.
    """
    path = Path(source).expanduser()
    contrast = contrast.lower()
    rule = rule or SplitRule()
    if contrast not in CONTRASTS:
        raise UserError(f"unknown contrast '{contrast}'; choose one of {', '.join(CONTRASTS)}")
    split = None if split == ALL_SPLITS else split
    if split is not None and split not in SPLITS:
        raise UserError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)} or {ALL_SPLITS}")
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
        cases = _brats_cases(path, brats_dirs, split, contrast, rule)
    elif ixi_files := _ixi_files(path):
        cases = _ixi_cases(path, ixi_files, split, contrast, rule)
    else:
        cases = _plain_folder(path, assume_healthy)
    if not cases:
        raise UserError(f"{path}: no usable cases found; looked for {_LAYOUTS_LOOKED_FOR}")
    _check_unique_ids(path, cases)
    return sorted(cases, key=lambda case: case.id)


def load_sources(sources: list[str | Path], split: str | None = None, **options: Any) -> list[Case]:
    """The cases of several sources (each read by :func:`load_cases` with the same ``split`` and ``options``).

    With more than one source every id is prefixed with its source's name (``synth_extra/train_000_healthy``)
    so two sets with the same case names can be combined; a name two sources share gets their position too.
    """
    if len(sources) == 1:
        return load_cases(sources[0], split=split, **options)
    paths = [Path(source).expanduser() for source in sources]
    names = [path.parent.name if path.suffix.lower() == ".json" else path.stem if path.is_file() else path.name
             for path in paths]
    if len(set(names)) < len(names):
        names = [f"{number}-{name}" for number, name in enumerate(names, start=1)]
    cases = [replace(case, id=f"{name}/{case.id}")
             for path, name in zip(paths, names, strict=True) for case in load_cases(path, split=split, **options)]
    return sorted(cases, key=lambda case: case.id)


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every command reading BraTS/IXI folders shares: the contrast and the split rule."""
    group = parser.add_argument_group("data sets", SPLIT_RULES_HELP)
    group.add_argument("--contrast", default="t1", choices=CONTRASTS,
                       help="image to use in BraTS (t1, t1ce, t2, flair) and IXI (t1, t2, pd) folders and manifests")
    group.add_argument("--brats-val-cases", type=int, default=BRATS_VAL_CASES, metavar="N",
                       help=f"BraTS cases (sorted by id) in split val; the rest are test (default {BRATS_VAL_CASES})")
    group.add_argument("--holdout-fraction", type=float, default=0.0, metavar="F",
                       help="share of IXI subjects held out as the val split (default 0: all are train)")
    group.add_argument("--split-seed", type=int, default=0, help="seed of the IXI hold-out (default 0)")


def split_rule(args: argparse.Namespace) -> SplitRule:
    """The :class:`SplitRule` given on the command line (see :func:`add_dataset_arguments`)."""
    return SplitRule(args.brats_val_cases, args.holdout_fraction, args.split_seed)


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


def brats_splits(names: list[str], val_cases: int = BRATS_VAL_CASES) -> dict[str, str]:
    """The paper's BraTS split of case ids: sorted, the first ``val_cases`` are "val", the rest "test"."""
    return {name: ("val" if index < val_cases else "test") for index, name in enumerate(sorted(names))}


def _brats_cases(path: Path, folders: list[Path], split: str | None, contrast: str, rule: SplitRule) -> list[Case]:
    if contrast not in _BRATS_TOKENS:
        raise UserError(f"BraTS has no '{contrast}' images; choose one of {', '.join(_BRATS_TOKENS)}")
    if folders == [path]:
        # One case folder on its own: its place in the dataset, hence its split, is unknown.
        return [_brats_case(path, contrast, None)]
    splits = brats_splits([folder.name for folder in folders], rule.brats_val_cases)
    # The split comes from the folder names alone, so only the chosen cases' files are looked at.
    chosen = [folder for folder in folders if split is None or splits[folder.name] == split]
    if not chosen:
        counts = f"{sum(v == 'val' for v in splits.values())} val, {sum(v == 'test' for v in splits.values())} test"
        if split == "train":
            raise UserError(f"{path}: BraTS folders have no train split (only val: the first "
                            f"{rule.brats_val_cases} cases by id, and test: the rest); use split val, test or all")
        raise UserError(f"{path}: no BraTS case in split {split} ({len(folders)} cases: {counts}, the first "
                        f"{rule.brats_val_cases} by id being val); check --brats-val-cases or the split")
    return [_brats_case(folder, contrast, splits[folder.name]) for folder in chosen]


def _brats_case(folder: Path, contrast: str, split: str | None) -> Case:
    image = next((f for t in _BRATS_TOKENS[contrast] if (f := _brats_file(folder, t))), None)
    if image is None:
        raise UserError(f"{folder}: no {contrast} image ({folder.name}_{contrast}.nii.gz) in this BraTS case; "
                        "choose another --contrast or remove the case")
    # BraTS validation/test releases have no seg: the case still holds a tumour, its extent is unknown.
    seg = _brats_file(folder, "seg")
    return Case(folder.name, image, seg, "lesion", split, {"layout": "brats", "contrast": contrast})


def _ixi_files(path: Path) -> list[Path]:
    # IXI tarballs unpack flat; people often keep IXI-T1/ and IXI-T2/ side by side, so look one level down too.
    files = [f for f in path.iterdir() if f.is_file() and _IXI_FILE.match(f.name)]
    for sub in path.iterdir():
        if sub.is_dir():
            files += [f for f in sub.iterdir() if f.is_file() and _IXI_FILE.match(f.name)]
    return sorted(files)


def holdout_split(subject: str, rule: SplitRule) -> str:
    """"val" for a seeded ``rule.holdout_fraction`` of subjects, else "train".

    Decided per subject from a hash of (seed, subject), so a subject lands in the same split for
    every contrast and whatever other subjects are present.
    """
    digest = hashlib.sha256(f"{rule.seed}:{subject}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < rule.holdout_fraction else "train"


def _ixi_cases(path: Path, files: list[Path], split: str | None, contrast: str, rule: SplitRule) -> list[Case]:
    if contrast not in IXI_CONTRASTS:
        raise UserError(f"IXI has no '{contrast}' images (only {', '.join(IXI_CONTRASTS)}); choose another --contrast")
    wanted = contrast.upper()
    cases = []
    for file in files:
        subject, file_contrast = _IXI_FILE.match(file.name).groups()[:2]
        if file_contrast == wanted:
            meta = {"layout": "ixi", "contrast": contrast}
            cases.append(Case(subject, file, None, "healthy", holdout_split(subject, rule), meta))
    if not cases:
        present = sorted({_IXI_FILE.match(f.name).group(2) for f in files})
        raise UserError(f"{path}: IXI folder has no {wanted} images (found {', '.join(present)})")
    chosen = [case for case in cases if split is None or case.split == split]
    if not chosen:
        if split == "test":
            raise UserError(f"{path}: IXI subjects are all healthy and have no test split (train, and val with "
                            "--holdout-fraction); use split train, val or all")
        raise UserError(f"{path}: no IXI subject in split {split} (holdout fraction {rule.holdout_fraction:g} of "
                        f"{len(cases)} subjects); set --holdout-fraction above 0 for a val split")
    return chosen


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
