"""``simpleslicenet evaluate``: score a labelled set with the detector and an intensity baseline.

For every case, every scorer maps ``(Volume, brain mask or None)`` to a result with ``heatmap``,
``brain_mask`` and ``volume_score`` (and optionally its own calibrated ``threshold``). Metrics:

- per case (exact, see :mod:`.metrics`), on the scorer's brain mask joined with the lesion mask
  (lesion voxels outside the brain mask still count, as misses): voxel AUROC, AUPRC, max Dice
  with its threshold, sensitivity/specificity there, AUPRO (FPR <= 0.3), slice AUROC;
- pooled over the lesion cases (binned, one threshold for the whole set): the same voxel metrics;
  the best single threshold gives "max Dice (pooled)";
- at the method's own threshold: Dice over lesion cases and the false-positive rate on healthy
  cases' brain voxels;
- slice AUROC over the slices (with brain) of every case with voxel truth, healthy ones included:
  a slice's score is its max heatmap value in the brain, its label whether it holds lesion;
- volume AUROC from the volume scores, lesion vs healthy cases, when both are present.

Outputs in ``--output-dir``: ``metrics.json``, ``metrics.md``, ``cases.csv``, ``roc.png``, ``pr.png``
(and ``maps/<method>/<case>_heatmap.nii.gz`` with ``--save-maps``), all written atomically.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from SimpleSliceNetLib.errors import UserError
from SimpleSliceNetLib.progress import Progress
from SimpleSliceNetLib.volume_io import Volume, atomic_path, load_volume, save_volume

from . import metrics as M

if TYPE_CHECKING:
    from SimpleSliceNetLib.detector import Detector

FPR_LIMIT = 0.3
FORMAT = "simpleslicenet-evaluation"
FORMAT_VERSION = 1
CSV_COLUMNS = (
    "case", "method", "family", "label", "voxel_auroc", "auprc", "max_dice", "dice_threshold", "sensitivity",
    "specificity", "aupro", "slice_auroc", "volume_score", "dice_at_threshold", "fpr_at_threshold", "seconds",
)  # fmt: skip


class ScoreResult(Protocol):
    heatmap: np.ndarray
    brain_mask: np.ndarray
    volume_score: float


Scorer = Callable[[Volume, "np.ndarray | None"], ScoreResult]


@dataclass
class _Truth:
    """What is known about one case: its volume label and, when known, its voxel lesion mask."""

    is_lesion: bool | None
    lesion: np.ndarray | None
    family: str | None
    notes: list[str] = field(default_factory=list)


@dataclass
class _Group:
    """Pooled state of one method over a group of cases (the whole set or one lesion family)."""

    lesion_voxels: M.PooledCurve = field(default_factory=M.PooledCurve)
    healthy_voxels: M.PooledCurve = field(default_factory=M.PooledCurve)
    # Per case: (slice scores, slice labels, is a lesion case) and (volume score, is a lesion case).
    slices: list[tuple[np.ndarray, np.ndarray, bool]] = field(default_factory=list)
    volumes: list[tuple[float, bool]] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)


@dataclass
class _Method:
    overall: _Group = field(default_factory=_Group)
    families: dict[str, _Group] = field(default_factory=dict)
    thresholds: set[float] = field(default_factory=set)
    seconds: list[float] = field(default_factory=list)


def evaluate(
    cases: Sequence[Any],
    scorers: Mapping[str, Scorer],
    output_dir: str | Path,
    progress: Progress,
    *,
    save_maps: bool = False,
    method_info: Mapping[str, dict] | None = None,
    source: str | None = None,
) -> dict:
    """Score ``cases`` (``SimpleSliceNetTraining.datasets.Case``-like) with every scorer; write the report.

    Cases whose volume or mask cannot be read, or that a scorer rejects with a user error, are
    reported (``"failed"`` in the result and an ``error`` event) and left out of every method, so
    all methods are compared on the same cases. Returns the ``metrics.json`` content.
    """
    output_dir = Path(output_dir)
    methods = {name: _Method() for name in scorers}
    failed: list[dict] = []
    for case in progress.iterate(cases, total=len(cases), desc="evaluate"):
        try:
            volume = load_volume(case.image)
            truth = _truth(case, volume)
            results, seconds = {}, {}
            for name, scorer in scorers.items():
                start = time.perf_counter()
                results[name] = scorer(volume, None)
                seconds[name] = time.perf_counter() - start
        except (UserError, OSError) as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            failed.append({"case": str(case.id), "image": str(case.image), "message": message})
            progress.emit("error", input=str(case.image), message=message)
            if progress.mode != "json":
                progress.line(f"error: skipped case {case.id}: {message}")
            continue
        for name, result in results.items():
            if np.shape(result.heatmap) != volume.array.shape or np.shape(result.brain_mask) != volume.array.shape:
                raise ValueError(f"scorer '{name}' returned maps of shape {np.shape(result.heatmap)} for {case.image} "
                                 f"of shape {volume.array.shape}; maps must be on the input grid")
            _add_case(methods[name], case, volume, truth, result, seconds[name])
            if save_maps:
                save_volume(
                    output_dir / "maps" / _safe(name) / f"{_safe(str(case.id))}_heatmap.nii.gz",
                    np.asarray(result.heatmap, dtype=np.float32),
                    volume.affine,
                )
    report = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": source,
        "fpr_limit": FPR_LIMIT,
        "cases_total": len(cases),
        "cases_scored": len(cases) - len(failed),
        "failed": failed,
        "definitions": _DEFINITIONS,
        "methods": {
            name: {
                "info": dict((method_info or {}).get(name, {})),
                "summary": _summary(state.overall, state),
                "families": {family: _summary(group, state) for family, group in sorted(state.families.items())},
                "cases": state.overall.records,
            }
            for name, state in methods.items()
        },
    }
    report = M.nan_to_none(report)
    report["files"] = _write_outputs(report, methods, output_dir)
    return report


def _truth(case: Any, volume: Volume) -> _Truth:
    meta = case.meta if isinstance(getattr(case, "meta", None), dict) else {}
    family = meta.get("family")
    notes = []
    lesion = None
    if case.mask is not None:
        from .datasets import load_mask

        lesion = np.asarray(load_mask(case, volume), dtype=bool)
    label = case.label
    if lesion is not None:
        has_lesion = bool(lesion.any())
        if label == "healthy" and has_lesion:
            notes.append("labelled healthy but its mask has lesion voxels: treated as a lesion case")
        if label == "lesion" and not has_lesion:
            notes.append("labelled lesion but its mask is empty: treated as healthy")
        return _Truth(has_lesion, lesion, family if has_lesion else None, notes)
    if label == "healthy":
        return _Truth(False, np.zeros(volume.array.shape, dtype=bool), None, notes)
    if label == "lesion":
        return _Truth(True, None, family, ["lesion case without a mask: counts for volume AUROC only"])
    return _Truth(None, None, family, ["no label and no mask: volume score only"])


def _add_case(state: _Method, case: Any, volume: Volume, truth: _Truth, result: ScoreResult, seconds: float) -> None:
    heatmap = np.asarray(result.heatmap, dtype=np.float32)
    brain = np.asarray(result.brain_mask, dtype=bool)
    threshold = getattr(result, "threshold", None)
    threshold = None if threshold is None else float(threshold)
    if threshold is not None:
        state.thresholds.add(threshold)
    state.seconds.append(seconds)
    record: dict[str, Any] = {
        "case": str(case.id),
        "family": truth.family,
        "label": {True: "lesion", False: "healthy", None: None}[truth.is_lesion],
        "volume_score": float(result.volume_score),
        "seconds": round(seconds, 3),
        "notes": list(truth.notes),
    }
    groups = [state.overall]
    if truth.family is not None and truth.is_lesion:
        # Family groups hold lesion cases only; their summaries borrow the healthy cases of the whole set.
        groups.append(state.families.setdefault(str(truth.family), _Group()))
    if truth.lesion is not None:
        lesion = truth.lesion
        region = brain | lesion
        scores, labels = heatmap[region], lesion[region]
        axis = M.slice_axis(volume.affine)
        slice_scores, slice_labels = M.slice_scores(heatmap, lesion, region, axis)
        if truth.is_lesion:
            weights, n_regions = M.region_weights(lesion, region, normalise=False)
            case_metrics = M.summarize(M.binary_curve(scores, labels, weights / max(n_regions, 1)), FPR_LIMIT)
            record.update(_voxel_fields(case_metrics))
            record["slice_auroc"] = M.roc_auc(slice_scores, slice_labels)
            record["notes"] += case_metrics.notes
            if threshold is not None:
                record["dice_at_threshold"] = _dice(scores >= threshold, labels)
            for group in groups:
                group.lesion_voxels.add(scores, labels, weights, n_regions)
        else:
            if threshold is not None:
                record["fpr_at_threshold"] = float(np.count_nonzero(scores >= threshold) / max(scores.size, 1))
            state.overall.healthy_voxels.add(scores, labels)
        for group in groups:
            group.slices.append((slice_scores, slice_labels, bool(truth.is_lesion)))
    for group in groups:
        if truth.is_lesion is not None:
            group.volumes.append((float(result.volume_score), truth.is_lesion))
        group.records.append(record)


def _summary(group: _Group, state: _Method) -> dict:
    """Set-level metrics of ``group``; a family group borrows the healthy cases of the whole set."""
    overall = state.overall
    slices, volumes = list(group.slices), list(group.volumes)
    if group is not overall:
        slices += [block for block in overall.slices if not block[2]]
        volumes += [pair for pair in overall.volumes if not pair[1]]
    lesion_records = [r for r in group.records if r["label"] == "lesion" and "voxel_auroc" in r]
    pooled_curve = group.lesion_voxels.curve()
    pooled = M.summarize(pooled_curve, FPR_LIMIT)
    healthy_curve = overall.healthy_voxels.curve()
    summary: dict[str, Any] = {
        "cases": len(group.records),
        "lesion_cases": sum(1 for r in group.records if r["label"] == "lesion"),
        "lesion_cases_with_mask": len(lesion_records),
        "healthy_cases": sum(1 for r in group.records if r["label"] == "healthy"),
        "voxel_auroc_mean": _mean(r["voxel_auroc"] for r in lesion_records),
        "voxel_auroc_std": _std(r["voxel_auroc"] for r in lesion_records),
        "auprc_mean": _mean(r["auprc"] for r in lesion_records),
        "aupro_mean": _mean(r["aupro"] for r in lesion_records),
        "max_dice_case_mean": _mean(r["max_dice"] for r in lesion_records),
        "pooled": pooled.to_dict(),
        "healthy_voxel_fpr_at_pooled_threshold": _healthy_fpr(healthy_curve, pooled.dice_threshold),
        "slice_auroc": _pooled_auc([b[0] for b in slices], [b[1] for b in slices]),
        "slices": int(sum(len(b[0]) for b in slices)),
        "volume_auroc": _pooled_auc([np.array([p[0] for p in volumes])], [np.array([p[1] for p in volumes])]),
        "seconds_per_case": _mean(state.seconds) if group is overall else None,
    }
    if len(state.thresholds) == 1:
        threshold = next(iter(state.thresholds))
        dice, sensitivity, specificity = pooled_curve.dice_at(threshold) if pooled_curve.n_pos else (M.NAN,) * 3
        summary["at_method_threshold"] = {
            "threshold": threshold,
            "dice": dice,
            "sensitivity": sensitivity,
            "specificity": specificity,
            "healthy_voxel_fpr": _healthy_fpr(healthy_curve, threshold),
        }
    return summary


def _voxel_fields(values: M.VoxelMetrics) -> dict:
    return {
        "voxel_auroc": values.auroc,
        "auprc": values.auprc,
        "max_dice": values.max_dice,
        "dice_threshold": values.dice_threshold,
        "sensitivity": values.sensitivity,
        "specificity": values.specificity,
        "aupro": values.aupro,
        "voxels": values.n_voxels,
        "lesion_voxels": values.n_positive,
    }


def _dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    total = np.count_nonzero(predicted) + np.count_nonzero(truth)
    return 2.0 * np.count_nonzero(predicted & truth) / total if total else M.NAN


def _healthy_fpr(curve: M.Curve, threshold: float) -> float:
    if not curve.n_neg or math.isnan(threshold):
        return M.NAN
    return 1.0 - curve.dice_at(threshold)[2]


def _pooled_auc(scores: list[np.ndarray], labels: list[np.ndarray]) -> float:
    if not scores or not sum(len(block) for block in scores):
        return M.NAN
    return M.roc_auc(np.concatenate(scores), np.concatenate(labels))


def _mean(values) -> float:
    array = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    return float(array.mean()) if array.size else M.NAN


def _std(values) -> float:
    array = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    return float(array.std()) if array.size else M.NAN


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


_DEFINITIONS = {
    "voxel_auroc_mean": "mean over lesion cases of the voxel AUROC inside brain mask + lesion (exact)",
    "auprc_mean": "mean over lesion cases of the average precision (exact)",
    "pooled": "all lesion cases' voxels together, binned to 11 significant bits; max_dice is the best "
    "single threshold for the set (dice_threshold), sensitivity/specificity are at that threshold (F1 = Dice)",
    "aupro": "area under the per-region overlap curve for FPR <= fpr_limit, divided by fpr_limit",
    "slice_auroc": "over every slice with brain of every case with voxel truth: slice score = max heatmap in "
    "the brain, label = slice holds lesion",
    "volume_auroc": "volume scores of lesion vs healthy cases (null when one group is missing)",
    "at_method_threshold": "Dice/sensitivity/specificity over lesion cases and voxel FPR on healthy cases at "
    "the method's own calibrated threshold",
    "null": "undefined (e.g. no lesion voxels or no healthy cases); see the notes",
}

# Main table: (header, getter of a summary, format).
_COLUMNS: tuple[tuple[str, Callable[[dict], Any], str], ...] = (
    ("Cases (lesion/healthy)", lambda s: f"{s['lesion_cases']}/{s['healthy_cases']}", "s"),
    ("Voxel AUROC (mean)", lambda s: s["voxel_auroc_mean"], ".3f"),
    ("AUPRC (mean)", lambda s: s["auprc_mean"], ".3f"),
    ("Max Dice (pooled)", lambda s: s["pooled"]["max_dice"], ".3f"),
    ("Dice threshold", lambda s: s["pooled"]["dice_threshold"], ".4g"),
    ("Sensitivity", lambda s: s["pooled"]["sensitivity"], ".3f"),
    ("Specificity", lambda s: s["pooled"]["specificity"], ".4f"),
    ("AUPRO@0.3 (pooled)", lambda s: s["pooled"]["aupro"], ".3f"),
    ("Slice AUROC", lambda s: s["slice_auroc"], ".3f"),
    ("Volume AUROC", lambda s: s["volume_auroc"], ".3f"),
    ("Dice at own threshold", lambda s: s.get("at_method_threshold", {}).get("dice"), ".3f"),
    ("s/case", lambda s: s["seconds_per_case"], ".2f"),
)
_FAMILY_COLUMNS = (
    ("Lesion cases", lambda s: s["lesion_cases"], "d"),
    ("Voxel AUROC (mean)", lambda s: s["voxel_auroc_mean"], ".3f"),
    ("AUPRC (mean)", lambda s: s["auprc_mean"], ".3f"),
    ("Max Dice (pooled)", lambda s: s["pooled"]["max_dice"], ".3f"),
    ("Slice AUROC", lambda s: s["slice_auroc"], ".3f"),
    ("Volume AUROC vs healthy", lambda s: s["volume_auroc"], ".3f"),
)


def markdown_table(report: dict) -> str:
    """The main Markdown table (rows = methods) and, when cases have families, a per-family table."""
    methods = report["methods"]
    rows = [[name, *format_cells(method["summary"], _COLUMNS)] for name, method in methods.items()]
    lines = table_lines(["Method", *(c[0] for c in _COLUMNS)], rows)
    rows = [
        [family, name, *format_cells(summary, _FAMILY_COLUMNS)]
        for name, method in methods.items()
        for family, summary in method["families"].items()
    ]
    if rows:
        rows.sort(key=lambda row: (row[0], list(methods).index(row[1])))
        lines += ["", *table_lines(["Family", "Method", *(c[0] for c in _FAMILY_COLUMNS)], rows)]
    return "\n".join(lines)


def format_cells(summary: dict, columns) -> list[str]:
    """One table row: each ``(header, getter, format)`` column applied to ``summary``; "-" when undefined."""
    cells = []
    for _, get, fmt in columns:
        value = get(summary)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            cells.append("-")
        else:
            cells.append(format(value, fmt))
    return cells


def table_lines(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table (first column left-aligned, the others right-aligned)."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _write_outputs(report: dict, methods: dict[str, _Method], output_dir: Path) -> dict[str, str]:
    files = {name: str(output_dir / name) for name in ("metrics.json", "metrics.md", "cases.csv", "roc.png", "pr.png")}
    from .plots import plot_pr, plot_roc

    curves = {name: state.overall.lesion_voxels.curve() for name, state in methods.items()}
    plot_roc(curves, files["roc.png"])
    plot_pr(curves, files["pr.png"])
    with atomic_path(files["cases.csv"]) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for name, method in report["methods"].items():
            for record in method["cases"]:
                writer.writerow({**record, "method": name})
    title = f"# Evaluation of {report['source']}\n\n" if report["source"] else "# Evaluation\n\n"
    failed = f"\n\n{len(report['failed'])} case(s) failed; see metrics.json.\n" if report["failed"] else "\n"
    with atomic_path(files["metrics.md"]) as tmp:
        tmp.write_text(title + markdown_table(report) + failed)
    with atomic_path(files["metrics.json"]) as tmp:
        tmp.write_text(json.dumps({**report, "files": files}, indent=2, allow_nan=False) + "\n")
    return files


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``simpleslicenet evaluate``."""
    parser = subparsers.add_parser(
        "evaluate",
        help="score a labelled data set with a model and an intensity baseline",
        description="Voxel, slice and volume metrics of a model (and an intensity baseline) on a labelled set: "
        "metrics.json, metrics.md, cases.csv, roc.png and pr.png in --output-dir.",
    )
    parser.add_argument("--data", required=True, help="cases.json manifest, BraTS/IXI folder or folder of volumes")
    parser.add_argument("--split", default="test",
                        help="split to evaluate (default: test; BraTS: the cases after the first 251; all: every case)")
    parser.add_argument("--model", nargs="+", default=[None], metavar="MODEL",
                        help="model name or .json/.safetensors path (default: bundled); several models are "
                        "scored side by side on the same cases, each a row named by its id and version")
    parser.add_argument("--ensemble", action="store_true",
                        help="with several models: also score the mean of their heatmaps, each divided by its "
                        "model's threshold (so the combination's threshold is 1; its s/case is the averaging only)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--output-dir", default="evaluation", type=Path, help="where to write the report")
    parser.add_argument("--no-baseline", action="store_true", help="do not score the intensity baseline")
    parser.add_argument("--save-maps", action="store_true", help="also write every heatmap under maps/")
    from .datasets import add_dataset_arguments

    add_dataset_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def _method_label(detector: Detector, several: bool) -> str:
    """A model's row in the table: its method, or with several models its id and version."""
    if several:
        return f"{detector.model.id} {detector.model.version}"
    return {"simpleslicenet": "SimpleSliceNet", "u2ad": "U2AD"}.get(detector.model.method, detector.model.method)


def run(args: argparse.Namespace, progress: Progress) -> int:
    """CLI entry: load the cases and the model(s), evaluate, print the table; 1 if any case failed."""
    from SimpleSliceNetLib.detector import Detector

    from .baseline import IntensityBaseline
    from .datasets import load_cases, split_rule
    from .ensemble import DetectorSet

    if args.ensemble and len(args.model) < 2:
        raise UserError("--ensemble needs at least two models after --model")
    cases = load_cases(args.data, split=args.split, contrast=args.contrast, rule=split_rule(args))
    if not cases:
        raise UserError(f"{args.data}: no cases in split '{args.split}'; check --data and --split")
    progress.emit("start", total=len(cases))
    detectors = [Detector.load(model, device=args.device) for model in args.model]
    if detectors[0].device.note:
        progress.info(detectors[0].device.note)
    runs = DetectorSet(detectors)
    scorers: dict[str, Scorer] = {}
    info: dict[str, dict] = {}
    for index, detector in enumerate(detectors):
        label = _method_label(detector, several=len(detectors) > 1)
        if label in scorers:
            label = f"{label} ({index + 1})"
        scorers[label] = runs.member(index)
        info[label] = dict(detector.info)
    if args.ensemble:
        label = f"mean of {len(detectors)} models"
        scorers[label] = runs.mean
        info[label] = {"members": [dict(detector.info) for detector in detectors]}
    if not args.no_baseline:
        baseline = IntensityBaseline()
        scorers["intensity baseline"] = baseline
        info["intensity baseline"] = baseline.info
    report = evaluate(
        cases, scorers, args.output_dir, progress, save_maps=args.save_maps, method_info=info, source=str(args.data)
    )
    print(markdown_table(report), file=sys.stderr, flush=True)
    progress.emit("output", input=str(args.data), files=report["files"], failed=len(report["failed"]))
    failed = len(report["failed"])
    progress.emit("done", ok=report["cases_scored"], failed=failed, elapsed_s=round(progress.elapsed, 2))
    if progress.mode != "json":
        print(f"report in {Path(args.output_dir).resolve()}", file=sys.stderr)
    return 1 if failed else 0
