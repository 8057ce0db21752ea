"""``simpleslicenet prepare``: skull-strip and register raw head scans (IXI-like) onto a brain template.

What the models expect (the paper's input; see README "Real datasets"): a skull-stripped brain
(0 outside), resampled to 1 mm and roughly aligned with an MNI-like template. BraTS already is
(SRI24, 1 mm, stripped); IXI is not. Per case:

1. **Skull stripping** (``--skull-strip``):
   ``deepbet`` runs the deepbet network (Fisch et al. 2024; weights ship in its PyPI package, so
   it works offline; about 1 s per scan on a GPU, 1-3 min on 2 CPU cores) on the scan in its own
   space; ``template`` registers the whole head to the template *with* skull and keeps the
   template's brain mask: an approximation (the mask is the template's brain, not the subject's,
   so sulcal CSF at the edge and individual shape differences are off by a few millimetres);
   ``none`` takes the input as already stripped (non-zero voxels = brain).
2. **Registration** (SimpleITK): centre-of-mass start, then rigid and (``--transform affine``, the
   default, as FSL FLIRT's 12 degrees of freedom in the paper) affine alignment by Mattes mutual
   information (works across contrasts: T2 and PD scans onto the T1 template), three resolutions.
3. **Resampling** onto the template's 1 mm RAS grid (cropped to the brain with a margin):
   linear for the image, nearest neighbour for masks; the image is set to 0 outside the brain.
   Intensities are left as they are (detection normalises each volume itself).

Writes ``images/<id>.nii.gz``, ``brainmasks/<id>.nii.gz``, ``lesions/<id>.nii.gz`` (when the case
has a lesion mask), ``info/<id>.json`` (what was done, the registration's final metric) and a
``cases.json`` manifest that ``train``/``evaluate`` read; cases already done are skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from SimpleSliceNetLib.errors import UserError, VolumeError
from SimpleSliceNetLib.progress import Progress
from SimpleSliceNetLib.volume_io import Volume, atomic_path, load_volume, save_volume

from .datasets import MANIFEST_FORMAT, MANIFEST_NAME, Case

SKULL_STRIP = ("deepbet", "template", "none")
TRANSFORMS = ("rigid", "affine")
EXTRA_HINT = "pip install 'simpleslicenet[prepare]'"
INFO_FORMAT = "simpleslicenet-prepared-case"
# Output template -> (template of training/templates.py, file of the same template with skull, or None).
TARGETS = {"mni152": ("mni152_pgbm", "mni_icbm152_t1.nii.gz"), "sri24": ("sri24", None)}


@dataclass
class PrepareConfig:
    skull_strip: str = "deepbet"
    template: str = "mni152"
    transform: str = "affine"
    # Registration: shrink factors and Gaussian sigmas (mm) per resolution, iterations per level.
    shrink: tuple[int, ...] = (4, 2, 1)
    smooth_mm: tuple[float, ...] = (4.0, 2.0, 0.0)
    iterations: int = 100
    step_mm: float = 2.0  # first step of the optimiser (parameters scaled to millimetres of shift)
    sampling: float = 0.05  # share of fixed-image voxels sampled by the metric
    seed: int = 0
    device: str = "auto"  # deepbet only


@dataclass
class Target:
    """The output space: the template (for registration), its brain mask and the output grid."""

    name: str
    fixed: Volume  # what the subject is registered to (head or stripped brain)
    brain: np.ndarray  # on the output grid
    grid: Volume  # the output grid (its array is the stripped template)


def _import(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        raise UserError(f"simpleslicenet prepare needs the Python package {module}: {EXTRA_HINT}") from exc


def load_target(config: PrepareConfig) -> Target:
    """The registration target of ``config`` (the stripped template, or the head for ``template`` stripping)."""
    from .templates import load_template, template_folder

    if config.template not in TARGETS:
        raise UserError(f"unknown --template '{config.template}'; choose one of {', '.join(TARGETS)}")
    name, head_file = TARGETS[config.template]
    template = load_template(name)
    grid = Volume(template.t1, template.affine)
    fixed = grid
    if config.skull_strip == "template":
        if head_file is None:
            raise UserError(f"--template {config.template} has no image with skull to register a head to; "
                            "use --skull-strip deepbet, or --template mni152")
        fixed = load_volume(template_folder(name) / head_file)
    return Target(config.template, fixed, template.brain, grid)


# --- SimpleITK <-> (array, RAS affine) ---------------------------------------------------------------


def to_sitk(volume: Volume):
    """A SimpleITK image (LPS physical space) of a volume given as an (i, j, k) array and RAS affine."""
    sitk = _import("SimpleITK")
    lps = np.diag([-1.0, -1.0, 1.0]) @ volume.affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    direction = lps / spacing
    if np.abs(direction.T @ direction - np.eye(3)).max() > 1e-4:
        raise UserError("the scan's voxel axes are not orthogonal (sheared affine); resample it to an orthogonal grid")
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(volume.array, dtype=np.float32).transpose(2, 1, 0)))
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection([float(v) for v in direction.ravel()])
    image.SetOrigin([float(v) for v in np.diag([-1.0, -1.0, 1.0]) @ volume.affine[:3, 3]])
    return image


def from_sitk(image) -> np.ndarray:
    """The (i, j, k) array of a SimpleITK image (the inverse of :func:`to_sitk`'s array layout)."""
    sitk = _import("SimpleITK")
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


# --- the steps ---------------------------------------------------------------------------------------


def strip_deepbet(volume: Volume, device: str) -> np.ndarray:
    """deepbet's brain mask of ``volume`` on its own grid (its public Python API, weights from its package)."""
    import nibabel as nib

    deepbet = _import("deepbet")
    extractor = deepbet.BrainExtraction(no_gpu=device == "cpu")
    _brain, mask, _tiv = extractor.run(nib.Nifti1Image(np.asarray(volume.array, dtype=np.float32), volume.affine))
    return np.asarray(mask.dataobj) > 0


def register(fixed: Volume, moving: Volume, config: PrepareConfig):
    """The SimpleITK transform mapping ``fixed`` (template) points to ``moving`` (subject) points, and the metric."""
    sitk = _import("SimpleITK")
    fixed_image, moving_image = to_sitk(fixed), to_sitk(moving)
    transform = sitk.CenteredTransformInitializer(
        fixed_image, moving_image, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    stages = [sitk.Euler3DTransform(transform)]
    if config.transform == "affine":
        stages.append(sitk.AffineTransform(3))
    metric = float("nan")
    for stage in stages:
        if isinstance(stage, sitk.AffineTransform):
            # Start the affine stage from the rigid result.
            rigid = transform
            stage.SetMatrix(rigid.GetMatrix())
            stage.SetTranslation(rigid.GetTranslation())
            stage.SetCenter(rigid.GetCenter())
        method = sitk.ImageRegistrationMethod()
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        method.SetMetricSamplingStrategy(method.RANDOM)
        # SimpleITK takes seed 0 as "from the wall clock" (a different sample, and result, every run):
        # shifted by one, every seed, 0 included, is a fixed one.
        method.SetMetricSamplingPercentage(config.sampling, config.seed + 1)
        method.SetInterpolator(sitk.sitkLinear)
        # Regular-step descent: plain gradient descent with an estimated learning rate walked away from
        # the optimum on stripped brains (large uniform background) in our tests.
        method.SetOptimizerAsRegularStepGradientDescent(learningRate=config.step_mm, minStep=1e-3,
                                                        numberOfIterations=config.iterations, relaxationFactor=0.5)
        method.SetOptimizerScalesFromPhysicalShift()
        method.SetShrinkFactorsPerLevel(list(config.shrink))
        method.SetSmoothingSigmasPerLevel(list(config.smooth_mm))
        method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        method.SetInitialTransform(stage, inPlace=True)
        method.Execute(fixed_image, moving_image)
        metric = float(method.GetMetricValue())
        transform = stage
    return transform, metric


def resample(volume: Volume, transform, grid: Volume, nearest: bool = False) -> np.ndarray:
    """``volume`` sampled on ``grid`` through ``transform`` (grid points -> volume points); 0 outside."""
    sitk = _import("SimpleITK")
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    out = sitk.Resample(to_sitk(volume), to_sitk(grid), transform, interpolator, 0.0, sitk.sitkFloat32)
    return from_sitk(out)


def prepare_case(case: Case, target: Target, config: PrepareConfig, output_dir: Path) -> dict[str, Any]:
    """Strip, register and resample one case; write its files and return its manifest entry."""
    volume = load_volume(case.image)
    if config.skull_strip == "deepbet":
        native_brain = strip_deepbet(volume, config.device)
    else:
        # "template": the whole head is registered; "none": the input is the stripped brain.
        native_brain = volume.array != 0 if config.skull_strip == "none" else None
    moving = volume if native_brain is None else Volume(np.where(native_brain, volume.array, 0.0), volume.affine)
    if native_brain is not None and not native_brain.any():
        raise UserError(f"{case.image}: no brain voxels found (all zero after skull stripping)")
    transform, metric = register(target.fixed, moving, config)
    image = resample(moving, transform, target.grid)
    if native_brain is None:
        brain = target.brain.copy()
    else:
        brain = resample(Volume(native_brain.astype(np.float32), volume.affine), transform, target.grid, True) > 0.5
    image = np.where(brain, image, 0.0).astype(np.float32)
    affine = target.grid.affine
    files = {"image": f"images/{case.id}.nii.gz", "brain_mask": f"brainmasks/{case.id}.nii.gz"}
    save_volume(output_dir / files["image"], image, affine)
    save_volume(output_dir / files["brain_mask"], brain.astype(np.uint8), affine)
    if case.mask is not None:
        lesion = resample(load_volume(case.mask), transform, target.grid, nearest=True) > 0
        files["mask"] = f"lesions/{case.id}.nii.gz"
        save_volume(output_dir / files["mask"], lesion.astype(np.uint8), affine)
    matrix = np.array(transform.GetMatrix()).reshape(3, 3) if hasattr(transform, "GetMatrix") else np.eye(3)
    entry = {
        "id": case.id,
        "image": files["image"],
        "mask": files.get("mask"),
        "label": case.label,
        "split": case.split,
        "contrast": case.meta.get("contrast", "t1"),
        "brain_mask": files["brain_mask"],
        "source": str(case.image),
        "preparation": {
            **_settings(config),
            "mattes_mi": metric,
            # Scale of the template-to-subject transform: far from 1 flags a failed registration.
            "scale": float(abs(np.linalg.det(matrix)) ** (1 / 3)),
        },
    }
    with atomic_path(output_dir / "info" / f"{case.id}.json") as tmp:
        tmp.write_text(json.dumps({"format": INFO_FORMAT, **entry}, indent=1) + "\n")
    return entry


def _settings(config: PrepareConfig) -> dict[str, Any]:
    """What decides a prepared case's result (a case done with other settings is done again)."""
    return {k: v for k, v in asdict(config).items() if k != "device"}


def prepare(cases: list[Case], config: PrepareConfig, output_dir: Path, progress: Progress) -> Path:
    """Prepare every case not done yet (its ``info/<id>.json`` is the proof); write and return the manifest."""
    for option, value, choices in (("--skull-strip", config.skull_strip, SKULL_STRIP),
                                   ("--transform", config.transform, TRANSFORMS)):
        if value not in choices:
            raise UserError(f"unknown {option} '{value}'; choose one of {', '.join(choices)}")
    if len(config.shrink) != len(config.smooth_mm):
        raise ValueError("PrepareConfig.shrink and smooth_mm need one value per resolution level")
    _import("SimpleITK")
    if config.skull_strip == "deepbet":
        _import("deepbet")
    target = load_target(config)
    settings = json.loads(json.dumps(_settings(config)))  # as read back from info/<id>.json
    entries, failed = [], 0
    for case in progress.iterate(cases, len(cases), "preparing"):
        info = output_dir / "info" / f"{case.id}.json"
        if info.is_file():
            entry = json.loads(info.read_text())
            entry.pop("format", None)
            done_with = {k: v for k, v in entry.get("preparation", {}).items() if k in settings}
            if done_with == settings:
                entries.append(entry)
                continue
        try:
            entries.append(prepare_case(case, target, config, output_dir))
        except (UserError, VolumeError) as exc:
            failed += 1
            progress.emit("error", input=str(case.image), message=str(exc))
            progress.line(f"error: skipped case {case.id}: {exc}")
    if not entries:
        raise UserError(f"{output_dir}: no case could be prepared; see the errors above")
    manifest = output_dir / MANIFEST_NAME
    with atomic_path(manifest) as tmp:
        tmp.write_text(json.dumps({"format": MANIFEST_FORMAT, "version": 1, "template": config.template,
                                   "failed": failed, "cases": entries}, indent=1) + "\n")
    return manifest


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``simpleslicenet prepare``."""
    parser = subparsers.add_parser(
        "prepare",
        help="skull-strip and register raw head scans (IXI) onto a brain template",
        description="Skull-strip (deepbet, or the registered template's brain mask) and register (SimpleITK, "
        "mutual information) scans onto a 1 mm brain template; writes images/, brainmasks/ and a cases.json "
        f"manifest for train/evaluate. Needs the optional extra: {EXTRA_HINT}.",
    )
    parser.add_argument("--data", required=True, help="IXI folder, BraTS folder, folder of volumes or cases.json")
    parser.add_argument("--output-dir", required=True, type=Path, help="where to write the prepared set")
    parser.add_argument("--split", default="all", help="split of --data to prepare (default: all)")
    parser.add_argument("--skull-strip", default="deepbet", choices=SKULL_STRIP,
                        help="deepbet (network, default), template (the registered template's brain mask: an "
                        "approximation) or none (the input is already stripped)")
    parser.add_argument("--template", default="mni152", choices=tuple(TARGETS),
                        help="output space: mni152 (MNI152 2009, as the paper; default) or sri24 (BraTS's space)")
    parser.add_argument("--transform", default="affine", choices=TRANSFORMS, help="registration (default affine)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="for deepbet")
    from .datasets import add_dataset_arguments

    add_dataset_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace, progress: Progress) -> int:
    """CLI entry: prepare the cases of ``--data``; 1 if any case failed."""
    from .datasets import load_cases, split_rule

    cases = load_cases(args.data, split=args.split, contrast=args.contrast, rule=split_rule(args))
    device = args.device
    if args.skull_strip == "deepbet":
        from SimpleSliceNetLib.devices import choose_device

        choice = choose_device(args.device)
        device = choice.name
        if choice.note:
            progress.info(choice.note)
    config = PrepareConfig(skull_strip=args.skull_strip, template=args.template, transform=args.transform,
                           device=device)
    progress.emit("start", total=len(cases))
    manifest = prepare(cases, config, args.output_dir, progress)
    failed = json.loads(manifest.read_text())["failed"]
    progress.emit("output", files={"manifest": str(manifest)}, failed=failed)
    progress.emit("done", ok=len(cases) - failed, failed=failed, elapsed_s=round(progress.elapsed, 1))
    if progress.mode != "json":
        print(f"prepared set: {manifest}", file=sys.stderr)
    return 1 if failed else 0
