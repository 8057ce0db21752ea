"""``simpleslicenet ablation``: what each switch of the recipe contributes, on one data set, in one table.

Every variant is the default recipe with one change (loss, noise sigma, slice aggregation, EDC
encoder, background masking). Each is trained by the ``train`` command and scored on the test split
by the ``evaluate`` command (both run in this process through ``SimpleSliceNetLib.cli.main``), so the
table measures exactly what users get. Models go to ``DIR/models/``, evaluations to ``DIR/eval/``;
``DIR/ablation.md`` and ``DIR/ablation.json`` are rewritten after every variant. A variant whose
model and evaluation exist is not rerun; an interrupted training resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from SimpleSliceNetLib.errors import UserError
from SimpleSliceNetLib.progress import Progress
from SimpleSliceNetLib.volume_io import atomic_path

FORMAT = "simpleslicenet-ablation"
FORMAT_VERSION = 1
SWITCHES = ("loss", "sigma", "aggregation", "edc", "background")
BASELINE = "default"
DEFAULT_EPOCHS = 12


@dataclass
class Variant:
    """One row: the default recipe plus ``args`` (train options), or nothing for the baseline."""

    name: str
    switch: str
    change: str
    args: list[str] = field(default_factory=list)


def _option(args: list[str], name: str) -> str | None:
    """The value the last ``name VALUE`` or ``name=VALUE`` in ``args`` gives (None if absent)."""
    value = None
    for index, arg in enumerate(args):
        if arg == name and index + 1 < len(args):
            value = args[index + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def _slices_in(base_args: list[str]) -> int:
    """Slices of the model grid the base options give (``--shape R,C,S``; default 96)."""
    shape = _option(base_args, "--shape")
    try:
        return int(shape.split(",")[2]) if shape else 96
    except (IndexError, ValueError) as exc:
        raise UserError(f"--train-options: --shape expects rows,columns,slices, got {shape!r}") from exc


def check_slab_layouts(variants: list[Variant], base_args: list[str]) -> None:
    """Refuse, before anything trains, a grid whose slice count some variant's slabs cannot tile."""
    from SimpleSliceNetLib.slicenet import slab_layout_error

    from .train import OPTION_DEFAULTS

    slices = _slices_in(base_args)
    for variant in variants:
        args = [*base_args, *variant.args]
        group = int(_option(args, "--group") or OPTION_DEFAULTS["group"])
        score = _option(args, "--score-stride") or OPTION_DEFAULTS["score_stride"]
        error = slab_layout_error(slices, group, int(_option(args, "--slab-stride") or group),
                                  None if score is None else int(score))
        if error:
            raise UserError(f"variant {variant.name}: {error}; give --train-options a --shape whose slice count "
                            f"suits every variant (e.g. 72 or 96), or leave the variant out with --variants")


def plan_variants(switches: list[str], encoder_file: str | None, base_args: list[str]) -> list[Variant]:
    """The default recipe, then each selected switch's changes (from train's defaults), as train argument lists."""
    from .train import BACKGROUNDS, LOSSES, OPTION_DEFAULTS

    defaults = OPTION_DEFAULTS
    variants = [Variant(BASELINE, "-", "none (default recipe)")]
    for switch in switches:
        if switch == "loss":
            for loss in (v for v in LOSSES if v != defaults["loss"]):
                variants.append(Variant(f"loss-{loss}", switch, f"--loss {loss} (default {defaults['loss']})",
                                        ["--loss", loss]))
        elif switch == "sigma":
            for sigma in ("0.1", "0.6"):
                variants.append(Variant(f"sigma-{sigma.replace('.', 'p')}", switch,
                                        f"--noise-sigma {sigma} (default {defaults['noise_sigma']:g})",
                                        ["--noise-sigma", sigma]))
        elif switch == "aggregation":
            group = defaults["group"]
            # Groups must divide the slice count (96 by default, which 5 does not).
            slices = _slices_in(base_args)
            coarse = next((g for g in (5, 6, 4, 2) if slices % g == 0), 1)
            for other in (1, coarse):
                variants.append(Variant(f"group-{other}", switch, f"--group {other} (default {group})",
                                        ["--group", str(other)]))
            variants.append(Variant("stride-1", switch,
                                    f"--slab-stride 1: trains on overlapping groups of {group} too (default: "
                                    "stride = group, scored every slice)",
                                    ["--slab-stride", "1"]))
            variants.append(Variant("aggregation-max", switch, f"--aggregation max (default {defaults['aggregation']})",
                                    ["--aggregation", "max"]))
        elif switch == "edc":
            if not encoder_file:
                raise UserError("--switches includes edc: give --encoder-file FILE.safetensors (made by "
                                "`simpleslicenet finetune-encoder`), or leave edc out of --switches")
            variants.append(Variant("edc", switch, f"--encoder {Path(encoder_file).name} (default ImageNet)",
                                    ["--encoder", str(encoder_file)]))
        elif switch == "background":
            for background in (v for v in BACKGROUNDS if v != defaults["background"]):
                variants.append(Variant(f"background-{background}", switch,
                                        f"--background {background} (default {defaults['background']})",
                                        ["--background", background]))
        else:
            raise UserError(f"unknown switch {switch!r} in --switches; choose from {', '.join(SWITCHES)}")
    return variants


@dataclass
class Plan:
    data: str
    output_dir: Path
    epochs: int
    seed: int
    device: str
    base_args: list[str]

    def model_json(self, variant: Variant) -> Path:
        return self.output_dir / "models" / f"{variant.name}.json"

    def metrics_json(self, variant: Variant) -> Path:
        return self.output_dir / "eval" / variant.name / "metrics.json"

    def recipe_args(self, variant: Variant) -> list[str]:
        """The train arguments that determine the model (all but the device)."""
        return ["train", "--train", self.data, "--val", self.data, "--name", variant.name,
                "--output-dir", str(self.output_dir / "models"), "--epochs", str(self.epochs),
                "--seed", str(self.seed), *self.base_args, *variant.args]

    def train_args(self, variant: Variant) -> list[str]:
        return [*self.recipe_args(variant), "--device", self.device]

    def evaluate_args(self, variant: Variant) -> list[str]:
        return ["evaluate", "--data", self.data, "--split", "test", "--model", str(self.model_json(variant)),
                "--output-dir", str(self.metrics_json(variant).parent), "--no-baseline", "--device", self.device]


def _row(variant: Variant, plan: Plan, seconds: float | None = None, error: str | None = None) -> dict:
    """The table row of a variant from its model file and evaluation (missing values stay None)."""
    row = {"variant": variant.name, "switch": variant.switch, "change": variant.change,
           "train_args": variant.args, "voxel_auroc": None, "auprc": None, "max_dice": None,
           "volume_auroc": None, "slice_auroc": None, "train_seconds": None, "selected_epoch": None,
           "wall_seconds": None, "error": error}
    if plan.model_json(variant).is_file():
        training = json.loads(plan.model_json(variant).read_text()).get("training", {})
        row["train_seconds"] = training.get("seconds")
        row["selected_epoch"] = training.get("selected_epoch")
    if plan.metrics_json(variant).is_file():
        methods = json.loads(plan.metrics_json(variant).read_text())["methods"]
        summary = next(iter(methods.values()))["summary"]
        row.update(voxel_auroc=summary.get("voxel_auroc_mean"), auprc=summary.get("auprc_mean"),
                   max_dice=(summary.get("pooled") or {}).get("max_dice"), volume_auroc=summary.get("volume_auroc"),
                   slice_auroc=summary.get("slice_auroc"))
    if seconds is not None:
        row["wall_seconds"] = round(seconds, 1)
    return row


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


def markdown(rows: list[dict], plan: Plan) -> str:
    base = next((r["voxel_auroc"] for r in rows if r["variant"] == BASELINE), None)
    lines = [
        f"# Ablation on {plan.data} (test split; {plan.epochs} epochs, seed {plan.seed})",
        "",
        "| Variant | Switch | Changed option | Voxel AUROC | vs default | AUPRC | Max Dice (pooled) | Volume AUROC "
        "| Train s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        delta = r["voxel_auroc"] - base if (base is not None and r["voxel_auroc"] is not None) else None
        lines.append(
            f"| {r['variant']} | {r['switch']} | {r['change']} | {_cell(r['voxel_auroc'], '.3f')} | "
            f"{_cell(delta, '+.3f')} | {_cell(r['auprc'], '.3f')} | {_cell(r['max_dice'], '.3f')} | "
            f"{_cell(r['volume_auroc'], '.3f')} | {_cell(r['train_seconds'], '.0f')} |"
        )
    failed = [r for r in rows if r.get("error")]
    lines += ["", *(f"- {r['variant']} failed: {r['error']}" for r in failed)] if failed else []
    if plan.base_args:
        lines += ["", f"Options added to every variant: `{shlex.join(plan.base_args)}`"]
    return "\n".join(lines) + "\n"


def _write_table(rows: list[dict], plan: Plan) -> tuple[Path, Path]:
    md, js = plan.output_dir / "ablation.md", plan.output_dir / "ablation.json"
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "data": plan.data, "epochs": plan.epochs,
                "seed": plan.seed, "base_args": plan.base_args, "rows": rows}
    with atomic_path(js) as tmp:
        tmp.write_text(json.dumps(document, indent=1, allow_nan=False) + "\n")
    with atomic_path(md) as tmp:
        tmp.write_text(markdown(rows, plan))
    return md, js


def _check_same_options(plan: Plan, variant: Variant) -> None:
    """A variant found in DIR must have been trained with the options asked for now, or results would mix."""
    record = plan.model_json(variant).with_suffix(".ablation-args.json")
    wanted = plan.recipe_args(variant)
    if record.is_file() and json.loads(record.read_text()) != wanted:
        raise UserError(f"{record}: variant {variant.name} in {plan.output_dir} was made with other options; "
                        f"use another --output-dir or delete {plan.output_dir / 'models' / variant.name}.*")
    with atomic_path(record) as tmp:
        tmp.write_text(json.dumps(wanted) + "\n")


def run_variant(plan: Plan, variant: Variant, progress: Progress) -> dict:
    """Train (or resume) and evaluate one variant unless its results exist; returns its table row."""
    from SimpleSliceNetLib.cli import main

    _check_same_options(plan, variant)
    model, metrics = plan.model_json(variant), plan.metrics_json(variant)
    if model.is_file() and metrics.is_file():
        progress.info(f"[{variant.name}] model and evaluation exist: not rerun")
        return _row(variant, plan)
    started = time.perf_counter()
    child = ["--progress", progress.mode]
    if not model.is_file():
        train_args = plan.train_args(variant)
        if model.with_suffix(".checkpoint.json").is_file():
            train_args.append("--resume")
        progress.info(f"[{variant.name}] simpleslicenet {shlex.join(train_args)}")
        if main([*child, *train_args]) != 0 or not model.is_file():
            return _row(variant, plan, error="training failed (see the messages above)")
        # A new model makes any older evaluation of this variant stale.
        metrics.unlink(missing_ok=True)
    progress.info(f"[{variant.name}] simpleslicenet {shlex.join(plan.evaluate_args(variant))}")
    # evaluate exits 1 when some case failed but still writes its report.
    main([*child, *plan.evaluate_args(variant)])
    if not metrics.is_file():
        return _row(variant, plan, error="evaluation failed (see the messages above)")
    return _row(variant, plan, seconds=time.perf_counter() - started)


# --- command line -------------------------------------------------------------------------------


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "ablation",
        help="train and evaluate one variant per recipe switch; writes one table",
        description="Ablation of the main switches (loss, noise sigma, aggregation, EDC encoder, background "
                    "masking), each a change from the default recipe: trains DIR/models/VARIANT, evaluates it on "
                    "the test split and writes DIR/ablation.md and DIR/ablation.json. Resumable.",
    )
    p.add_argument("--data", required=True, help="cases.json with train, val and test splits (e.g. from synth)")
    p.add_argument("--output-dir", required=True, type=Path, help="folder for models, evaluations and the table")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help=f"epochs per variant (default {DEFAULT_EPOCHS})")
    p.add_argument("--switches", default=",".join(SWITCHES),
                   help=f"comma-separated switches to vary (default: all of {','.join(SWITCHES)})")
    p.add_argument("--variants", help="only these variants (comma-separated names; see --dry-run)")
    p.add_argument("--encoder-file", help="EDC encoder (.safetensors from finetune-encoder) for the edc switch")
    p.add_argument("--train-options", default="",
                   help="extra train options for every variant, one quoted string (e.g. \"--shape 128,128,48\")")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--dry-run", action="store_true", help="print the commands of the selected variants and stop")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, progress: Progress) -> int:
    if args.epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {args.epochs}")
    switches = [s.strip() for s in args.switches.split(",") if s.strip()]
    try:
        base_args = shlex.split(args.train_options)
    except ValueError as exc:
        raise UserError(f"--train-options: {exc}") from exc
    if args.encoder_file and not Path(args.encoder_file).is_file():
        raise UserError(f"--encoder-file {args.encoder_file}: not found; make one with simpleslicenet finetune-encoder")
    variants = plan_variants(switches, args.encoder_file, base_args)
    if args.variants:
        wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = sorted(set(wanted) - {v.name for v in variants})
        if unknown:
            raise UserError(f"--variants: unknown {', '.join(unknown)}; the selected switches give "
                            f"{', '.join(v.name for v in variants)}")
        variants = [v for v in variants if v.name in wanted]
    check_slab_layouts(variants, base_args)
    plan = Plan(str(args.data), Path(args.output_dir), args.epochs, args.seed, args.device, base_args)

    if args.dry_run:
        for variant in variants:
            print(f"# {variant.name}: {variant.change}")
            print("simpleslicenet " + shlex.join(plan.train_args(variant)))
            print("simpleslicenet " + shlex.join(plan.evaluate_args(variant)))
        return 0

    progress.emit("start", total=len(variants))
    rows: list[dict] = []
    for index, variant in enumerate(variants):
        progress.emit("progress", fraction=round(index / len(variants), 4), message=f"variant {variant.name}")
        rows.append(run_variant(plan, variant, progress))
        md, js = _write_table(rows, plan)
    progress.emit("output", files={"table": str(md), "json": str(js)})
    failed = sum(1 for row in rows if row["error"])
    progress.emit("done", ok=len(rows) - failed, failed=failed, elapsed_s=round(progress.elapsed, 1))
    if progress.mode != "json":
        print(md.read_text(), file=sys.stderr)
    return 1 if failed else 0
