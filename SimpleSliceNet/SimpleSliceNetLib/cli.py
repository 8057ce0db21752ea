"""The `simpleslicenet` command: detect, train, evaluate, synth, benchmark, models."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import __version__
from .errors import UserError
from .lesions import MIN_LESION_ML
from .progress import Progress
from .volume_io import volume_stem

OUTPUT_SUFFIXES = ("heatmap.nii.gz", "mask.nii.gz", "brainmask.nii.gz", "report.json", "overlay.png")
# Written when the model provides them (U2AD): epistemic and aleatoric uncertainty on the input grid.
EXTRA_MAPS = ("uncertainty", "aleatoric")


def _add_detect(subparsers) -> None:
    p = subparsers.add_parser("detect", help="find anomalies in volumes",
                              description="Detect anomalies in NIfTI/NRRD volumes; writes heatmap, mask, report "
                                          "and overlay per input.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="volumes (.nii, .nii.gz, .nrrd)")
    p.add_argument("--output-dir", required=True, help="folder for the outputs (created if missing)")
    p.add_argument("--model", help="model id or path to a model .json (default: the bundled model)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--threshold", type=float, help="heatmap threshold (default: the model's calibrated one)")
    p.add_argument("--mask", action="append", default=[], metavar="FILE",
                   help="brain mask on the input's grid (once per input, in order; default: non-zero voxels)")
    p.add_argument("--min-lesion-ml", type=float, default=MIN_LESION_ML,
                   help=f"drop findings smaller than this (mL; default {MIN_LESION_ML:g})")
    p.add_argument("--no-overlay", action="store_true", help="skip the overlay PNG")
    p.add_argument("--shard", metavar="I/N",
                   help="process only inputs I, I+N, I+2N, ... (1-based) of the sorted input list, so N processes "
                        "or machines given the same inputs cover each exactly once")
    p.set_defaults(func=run_detect)


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` (1 <= i <= n) -> (i, n); anything else is a UserError."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UserError(f"--shard expects I/N with whole numbers, e.g. 2/4; got {text!r}") from None
    if not 1 <= index <= count:
        raise UserError(f"--shard {text}: need 1 <= I <= N, e.g. --shard 1/4 ... --shard 4/4")
    return index, count


def run_detect(args: argparse.Namespace, progress: Progress) -> int:
    from .detector import Detector
    from .lesions import extract_lesions
    from .report import build_report, render_overlay
    from .volume_io import load_volume, save_volume

    if args.mask and len(args.mask) != len(args.inputs):
        raise UserError(f"--mask given {len(args.mask)} times for {len(args.inputs)} inputs; give one per input")
    # A stem already taken by an earlier input (in the order given) would overwrite its outputs; decided
    # over all inputs, so every shard refuses the same ones.
    taken: dict[str, str] = {}
    collides: dict[int, str] = {}  # input position -> the earlier input with its stem
    for position, input_path in enumerate(args.inputs):
        stem = volume_stem(input_path)
        if stem in taken:
            collides[position] = taken[stem]
        else:
            taken[stem] = input_path
    jobs = list(zip(range(len(args.inputs)), args.inputs, args.mask or [None] * len(args.inputs), strict=True))
    if args.shard:
        index, count = parse_shard(args.shard)
        jobs = sorted(jobs, key=lambda job: (job[1], job[0]))[index - 1 :: count]
    out_dir = Path(args.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder; choose another --output-dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    progress.emit("start", total=len(jobs))
    detector = Detector.load(args.model, args.device)
    if detector.device.note:
        progress.info(detector.device.note)
    threshold = detector.threshold if args.threshold is None else float(args.threshold)
    ok = failed = 0
    for position, input_path, mask_path in progress.iterate(jobs, len(jobs), "detecting"):
        stem = volume_stem(input_path)
        try:
            if position in collides:
                raise UserError(f"{input_path}: same file name stem '{stem}' as {collides[position]}; outputs would "
                                "collide")
            started = time.perf_counter()
            volume = load_volume(input_path)
            mask = load_volume(mask_path).array > 0 if mask_path else None
            load_s = time.perf_counter() - started
            result = detector.detect(volume, mask=mask, name=str(input_path))
            labels, lesions = extract_lesions(result.heatmap, volume.affine, threshold, result.brain_mask,
                                              args.min_lesion_ml)
            timings = {"load_s": round(load_s, 3), **result.timings}
            files = _write_outputs(out_dir, stem, input_path, volume, result, labels, lesions, threshold, detector,
                                   timings, overlay=not args.no_overlay, save_volume=save_volume,
                                   build_report=build_report, render_overlay=render_overlay)
        except UserError as exc:
            failed += 1
            progress.emit("error", input=str(input_path), message=str(exc))
            progress.line(f"error: {exc}")
            continue
        ok += 1
        progress.emit("output", input=str(input_path), files=files, volume_score=result.volume_score,
                      lesions=len(lesions))
        if progress.mode != "json":
            progress.line(f"{input_path}: score {result.volume_score:.3f} (threshold {threshold:.3f}), "
                          f"{len(lesions)} finding(s) -> {files['report']}")
    progress.emit("done", ok=ok, failed=failed, elapsed_s=round(progress.elapsed, 2))
    if progress.mode != "json" and ok:
        print(f"outputs in {out_dir.resolve()}", file=sys.stderr)
    return 0 if failed == 0 else 1


def _write_outputs(out_dir, stem, input_path, volume, result, labels, lesions, threshold, detector, timings, *,
                   overlay, save_volume, build_report, render_overlay) -> dict:
    """Write every output of one input into a scratch folder, then move them all into place."""
    import numpy as np

    scratch = Path(tempfile.mkdtemp(prefix=f".{stem}.", dir=out_dir))
    try:
        started = time.perf_counter()
        files = {}
        save_volume(scratch / f"{stem}_heatmap.nii.gz", result.heatmap.astype(np.float32), volume.affine)
        save_volume(scratch / f"{stem}_mask.nii.gz", (labels > 0).astype(np.uint8), volume.affine)
        save_volume(scratch / f"{stem}_brainmask.nii.gz", result.brain_mask.astype(np.uint8), volume.affine)
        extra = {key: result.extra_maps[key] for key in EXTRA_MAPS if result.extra_maps.get(key) is not None}
        for key, array in extra.items():
            save_volume(scratch / f"{stem}_{key}.nii.gz", array.astype(np.float32), volume.affine)
        if overlay:
            focus = lesions[0].centroid_ras if lesions else None
            render_overlay(scratch / f"{stem}_overlay.png", volume.array, result.heatmap, labels > 0, volume.affine,
                           threshold, focus, f"{stem}: score {result.volume_score:.2f}, {len(lesions)} finding(s)")
        timings["write_s"] = round(time.perf_counter() - started, 3)
        report = build_report(str(input_path), result, lesions, threshold, detector.info, detector.device.name,
                              volume.affine, timings)
        _add_method_details(report, result, labels, lesions, extra)
        (scratch / f"{stem}_report.json").write_text(json.dumps(report, indent=2) + "\n")
        for name in sorted(p.name for p in scratch.iterdir()):
            target = out_dir / name
            Path(scratch / name).replace(target)
            files[name[len(stem) + 1 :].split(".")[0]] = str(target)
        return files
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _add_method_details(report: dict, result, labels, lesions, extra: dict) -> None:
    """Per-lesion mean uncertainty and per-slab scores, for models that give them (U2AD)."""
    from .lesions import lesion_means

    means = lesion_means(extra.get("uncertainty"), labels, lesions)
    if means is not None:
        for entry, value in zip(report["lesions"], means, strict=True):
            entry["mean_uncertainty"] = value
    if result.slab_scores:
        report["slab_scores"] = result.slab_scores


def _add_models(subparsers) -> None:
    p = subparsers.add_parser("models", help="list bundled and user models, or import one")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--import", dest="import_path", metavar="MODEL_JSON",
                   help="validate a model (.json beside its .safetensors) and copy it into the user model folder")
    p.add_argument("--download", metavar="ID", help="download a model listed in the registry (needs internet)")
    p.add_argument("--registry", help="registry JSON to use with --download (default: the bundled one)")
    p.set_defaults(func=run_models)


def run_models(args: argparse.Namespace, progress: Progress) -> int:
    from .model_file import import_model, list_models
    from .resources import bundled_models_dir, user_models_dir

    if args.import_path:
        path = import_model(args.import_path)
        print(json.dumps({"imported": str(path)}) if args.json else f"imported: {path}")
        return 0
    if args.download:
        from .model_registry import download_model

        path = download_model(args.download, args.registry)
        print(json.dumps({"downloaded": str(path)}) if args.json else f"downloaded: {path}")
        return 0
    models = [m.summary() for m in list_models()]
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    print(f"bundled models: {bundled_models_dir()}\nuser models:    {user_models_dir()}")
    for m in models:
        print(f"  {m['id']:<32} {m['method']:<15} {m['modality']:<5} v{m['version']:<8} {m['source']}")
    if not models:
        print("  (none)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="simpleslicenet",
                                     description="Unsupervised anomaly detection in 3D brain MRI (SimpleSliceNet).")
    parser.add_argument("--version", action="version", version=f"simpleslicenet {__version__}")
    parser.add_argument("--progress", choices=["bar", "json", "none"], default="bar",
                        help="progress display: bars (terminal), JSON lines (for programs) or none")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_detect(subparsers)
    _add_models(subparsers)
    for module in _training_modules():
        module.add_parser(subparsers)
    return parser


def _training_modules() -> list:
    """Commands from the training package (absent from a detection-only install)."""
    import importlib

    found = []
    for name in ("train", "calibrate", "evaluate", "synth", "benchmark", "finetune_encoder", "ablation", "prepare",
                 "paper_protocol"):
        try:
            found.append(importlib.import_module(f"SimpleSliceNetTraining.{name}"))
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith("SimpleSliceNetTraining"):
                raise
    return found


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Accept --progress after the command too (the Slicer runner puts it last).
    if "--progress" in argv[1:]:
        i = argv.index("--progress")
        if i + 1 < len(argv):
            argv = [argv[i], argv[i + 1]] + argv[:i] + argv[i + 2 :]
    args = build_parser().parse_args(argv)
    progress = Progress(args.command, args.progress)
    try:
        return int(args.func(args, progress) or 0)
    except UserError as exc:
        progress.emit("error", message=str(exc))
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
