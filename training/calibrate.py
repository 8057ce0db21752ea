"""`simpleslicenet calibrate`: set a trained SimpleSliceNet model's scoring again, its weights kept.

The encoder, the feature statistics and the flow stay exactly as trained. What a model derives from
healthy volumes after training is computed again: the per-slab-position NLL statistics (from
``--stats`` volumes, as ``train`` does from its training volumes) and the heatmap's scale and
threshold (from ``--val``, by train's ``set_threshold``). Scoring options may change on the way
(``--score-stride``, ``--smoothing-mm``, ``--guide-radius-mm``, ``--encoder-precision``): the way to
try them on a trained flow without training it again, or to calibrate a model on a site's own
healthy scans.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from dataclasses import replace
from pathlib import Path

from SimpleSliceNetLib.errors import UserError
from SimpleSliceNetLib.progress import Progress
from SimpleSliceNetLib.scoring import ENCODER_PRECISIONS

# The state a calibration computes; everything else in the weights is kept.
RECOMPUTED = ("nll_mean", "nll_std")


def calibrated_net(model, stats_cases: list, val_cases: list, progress: Progress, score_stride: int | None = None,
                   smoothing_mm: float | None = None, guide_radius_mm: float | None = None,
                   fpr: float = 1e-3, encoder_precision: str | None = None):
    """``model``'s (a ModelFile) SliceNetModel with the given scoring options, its position statistics from
    ``stats_cases`` (healthy) and its heatmap scale and threshold from ``val_cases``."""
    from SimpleSliceNetLib.detector import load_weights
    from SimpleSliceNetLib.slicenet import SliceNetConfig, SliceNetModel

    from .distributed import Context
    from .train import _extract, _position_statistics, set_threshold

    if model.method != "simpleslicenet":
        raise UserError(f"{model.path}: calibrate sets the scoring of simpleslicenet models, not {model.method}")
    config = SliceNetConfig.from_dict(model.config)
    given = {"smoothing_mm": smoothing_mm, "guide_radius_mm": guide_radius_mm, "encoder_precision": encoder_precision}
    scoring = replace(config.scoring, **{k: v for k, v in given.items() if v is not None})
    config = replace(config, scoring=scoring,
                     score_stride=config.score_stride if score_stride is None else score_stride)
    try:
        net = SliceNetModel(config, encoder_weights="none")
    except ValueError as exc:
        raise UserError(f"{model.path}: {exc}") from exc
    load_weights(net, model, RECOMPUTED)
    net.eval()
    healthy_val = [case for case in val_cases if case.label == "healthy"]
    if not healthy_val:
        raise UserError("--val: no healthy volumes to calibrate the heatmap's scale on")
    if config.position_norm:
        items = _extract(net, stats_cases, progress, "position statistics", (0.0, 0.6), keep_maps=False)
        if not items:
            raise UserError("--stats: no usable healthy volume for the position statistics")
        _position_statistics(net, items, Context())
    val_items = _extract(net, val_cases, progress, "calibrating", (0.6, 0.35), keep_maps=True)
    healthy = [item for item in val_items if item.label == "healthy"]
    if not healthy:
        raise UserError("--val: none of the healthy volumes could be read")
    set_threshold(net, healthy, val_items, fpr)
    return net


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="set a trained model's scoring again on healthy volumes (weights kept)",
        description="Compute a trained SimpleSliceNet model's per-position statistics, heatmap scale and threshold "
                    "again, optionally with other scoring options; the encoder and flow weights are kept. Writes "
                    "NAME.json + NAME.safetensors.",
    )
    p.add_argument("--model", required=True, help="the trained model: a name from `simpleslicenet models` or a .json")
    p.add_argument("--stats", nargs="+", metavar="SOURCE",
                   help="healthy volumes for the per-position statistics (their --stats-split); train uses its "
                        "training volumes, so give those to match it; required for models with position statistics")
    p.add_argument("--stats-split", default="train", help="split of --stats to use (default: train)")
    p.add_argument("--val", required=True,
                   help="validation volumes: healthy ones set the heatmap's scale, lesion ones with masks the "
                        "threshold")
    p.add_argument("--val-split", default="val", help="split of --val to use (default: val)")
    p.add_argument("--name", required=True, help="name of the calibrated model (file stem and id)")
    p.add_argument("--output-dir", help="where to write it (default: the user model folder)")
    p.add_argument("--model-version", help="version recorded in the new file (default: the model's)")
    p.add_argument("--score-stride", type=int, help="slices between scored slabs (see `train --score-stride`)")
    p.add_argument("--smoothing-mm", type=float, help="Gaussian sigma of the heatmap in mm")
    p.add_argument("--guide-radius-mm", type=float, help="guided refinement window half-width in mm (0 = off)")
    p.add_argument("--encoder-precision", choices=ENCODER_PRECISIONS,
                   help="precision of the encoder features to calibrate on, which detection then computes on every "
                        "device (default: the model's; e.g. fp32 for a flow trained with --encoder-precision bf16)")
    p.add_argument("--calibration-fpr", type=float, default=1e-3,
                   help="voxel false-positive rate on the healthy validation volumes that is 1 on the heatmap's scale")
    from .datasets import add_dataset_arguments

    add_dataset_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, progress: Progress) -> int:
    from SimpleSliceNetLib.model_file import resolve_model, write_model_file
    from SimpleSliceNetLib.resources import user_models_dir
    from SimpleSliceNetLib.scoring import guide_error, smoothing_error

    from .datasets import load_cases, load_sources, split_rule
    from .train import _config_dict

    for error in (smoothing_error(args.smoothing_mm) if args.smoothing_mm is not None else None,
                  guide_error(args.guide_radius_mm) if args.guide_radius_mm is not None else None):
        if error:
            raise UserError(f"--{error}")
    model = resolve_model(args.model)
    output = (Path(args.output_dir) if args.output_dir else user_models_dir()) / f"{args.name}.json"
    if output.resolve() == model.path.resolve():
        raise UserError(f"{output}: is the model being calibrated; give another --name or --output-dir (the model "
                        "you gave is left as it is)")
    data = {"contrast": args.contrast, "rule": split_rule(args)}
    stats_cases = []
    if args.stats:
        stats_cases = [c for c in load_sources(args.stats, split=args.stats_split, **data) if c.label != "lesion"]
        if not stats_cases:
            raise UserError(f"{', '.join(args.stats)}: no healthy volumes for the position statistics")
    elif model.config.get("position_norm"):
        raise UserError(f"{model.path}: standardises the NLL per slab position; give --stats with healthy volumes "
                        "for those statistics (to match train: its training volumes)")
    val_cases = load_cases(args.val, split=args.val_split, **data)
    progress.emit("start", total=1)
    net = calibrated_net(model, stats_cases, val_cases, progress, args.score_stride, args.smoothing_mm,
                         args.guide_radius_mm, args.calibration_fpr, args.encoder_precision)
    training = dict(model.training)
    training["calibrated"] = {
        "from": f"{model.id} {model.version} ({model.sha256[:12]})",
        "stats_source": ", ".join(args.stats) if args.stats else None,
        "stats_volumes": len(stats_cases) or None,
        "val_source": str(args.val),
        "command": "simpleslicenet " + " ".join(sys.argv[1:]),
        "date": _dt.date.today().isoformat(),
    }
    path = write_model_file(output, state_dict=net.state_dict(), method="simpleslicenet",
                            config=_config_dict(net.config), training=training, name=args.name,
                            modality=model.modality, description=model.description,
                            version=args.model_version or model.version)
    progress.emit("output", files={"model": str(path)})
    progress.emit("done", ok=1, failed=0, elapsed_s=round(progress.elapsed, 1))
    print(f"model written: {path} (threshold {net.config.scoring.threshold:.3f})", file=sys.stderr)
    return 0
