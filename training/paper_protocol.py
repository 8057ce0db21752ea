"""``simpleslicenet paper-table``: the paper's protocol on the user's IXI and BraTS2021 copies, in one command.

Zhang & Mohsenzadeh (arXiv 2408.15958): train on healthy IXI volumes, validate on the first 251
BraTS2021 cases (sorted by id), test on the remaining ones. The steps are the ordinary commands,
run in this process with the arguments ``--dry-run`` prints:

1. ``prepare`` (only with ``--prepare``): skull-strip and register IXI onto MNI152;
2. ``train`` on IXI (split train), choosing the epoch and threshold on the BraTS val split;
3. ``evaluate`` on the BraTS test split;
4. the table: ``paper_table.md`` / ``paper_table.json`` from the evaluation's ``metrics.json``.

Each finished step leaves ``steps/<step>.json`` with its arguments; a rerun with the same
arguments skips it (an interrupted training resumes from its checkpoint); changed arguments redo
the step and those after it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from SimpleSliceNetLib.errors import UserError
from SimpleSliceNetLib.progress import Progress
from SimpleSliceNetLib.volume_io import atomic_path

from .datasets import BRATS_VAL_CASES, MANIFEST_NAME
from .evaluate import format_cells, table_lines

FORMAT = "simpleslicenet-paper-table"
# Contrasts that both IXI and BraTS have.
CONTRASTS = ("t1", "t2")
PAPER = "Zhang & Mohsenzadeh, Efficient Slice Anomaly Detection Network for 3D Brain MRI Volume, arXiv 2408.15958"
# The paper's metrics (DESIGN.md section 3), as evaluate's summary holds them: (header, getter, format).
COLUMNS = (
    ("Voxel AUROC (mean +- sd)", lambda s: _pm(s["voxel_auroc_mean"], s["voxel_auroc_std"]), "s"),
    ("AUPRC (mean)", lambda s: s["auprc_mean"], ".3f"),
    ("Max Dice", lambda s: s["pooled"]["max_dice"], ".3f"),
    ("Sensitivity", lambda s: s["pooled"]["sensitivity"], ".3f"),
    ("Specificity", lambda s: s["pooled"]["specificity"], ".4f"),
    ("Slice AUROC", lambda s: s["slice_auroc"], ".3f"),
    ("AUPRO@0.3 (mean)", lambda s: s["aupro_mean"], ".3f"),
    ("Test cases (with mask)", lambda s: f"{s['lesion_cases']} ({s['lesion_cases_with_mask']})", "s"),
)
# Summary keys copied into paper_table.json, per method.
JSON_KEYS = ("voxel_auroc_mean", "voxel_auroc_std", "auprc_mean", "aupro_mean", "slice_auroc", "lesion_cases",
             "lesion_cases_with_mask")


@dataclass
class Step:
    """One command of the protocol: its ``simpleslicenet`` arguments and the files that show it finished."""

    name: str
    argv: list[str]
    outputs: list[Path] = field(default_factory=list)


def _pm(mean: float | None, std: float | None) -> str | None:
    return None if mean is None else f"{mean:.3f} +- {std:.3f}" if std is not None else f"{mean:.3f}"


def plan(args: argparse.Namespace) -> list[Step]:
    """The protocol's steps for the command-line options ``args`` (paths made absolute)."""
    out = args.output_dir.resolve()
    ixi, brats = str(Path(args.ixi).expanduser().resolve()), str(Path(args.brats).expanduser().resolve())
    split = ["--contrast", args.contrast, "--brats-val-cases", str(args.brats_val_cases), "--device", args.device]
    steps = []
    train_source = ixi
    if args.prepare:
        prepared = out / "ixi_prepared"
        steps.append(Step("prepare", ["prepare", "--data", ixi, "--output-dir", str(prepared), "--skull-strip",
                                      args.prepare, "--template", args.template, *split],
                          [prepared / MANIFEST_NAME]))
        train_source = str(prepared / MANIFEST_NAME)
    model = out / "model" / f"{args.name}.json"
    train = ["train", "--train", train_source, "--train-split", "train", "--val", brats, "--val-split", "val",
             "--name", args.name, "--output-dir", str(model.parent), "--seed", str(args.seed), *split]
    for option, value in (("--epochs", args.epochs), ("--preset", args.preset),
                          ("--encoder-weights", args.encoder_weights)):
        if value is not None:
            train += [option, str(value)]
    steps.append(Step("train", train + shlex.split(args.train_args), [model]))
    evaluation = out / "evaluation"
    steps.append(Step("evaluate", ["evaluate", "--data", brats, "--split", "test", "--model", str(model),
                                   "--output-dir", str(evaluation), *split], [evaluation / "metrics.json"]))
    return steps


def _stamp(out: Path, step: Step) -> Path:
    return out / "steps" / f"{step.name}.json"


def _state(out: Path, step: Step) -> str:
    """"done" (same arguments, outputs present), "resume" (same arguments, interrupted) or "run"."""
    stamp = _stamp(out, step)
    if not stamp.is_file():
        return "run"
    saved = json.loads(stamp.read_text())
    if saved.get("argv") != step.argv:
        return "run"
    if saved.get("done") and all(path.is_file() for path in step.outputs):
        return "done"
    return "resume"


def _write_stamp(out: Path, step: Step, done: bool) -> None:
    with atomic_path(_stamp(out, step)) as tmp:
        tmp.write_text(json.dumps({"argv": step.argv, "done": done}, indent=1) + "\n")


def _run_step(step: Step, resume: bool, mode: str) -> int:
    """Run one ``simpleslicenet`` command in this process, as the CLI would."""
    from SimpleSliceNetLib.cli import build_parser

    argv = step.argv + (["--resume"] if resume else [])
    try:
        args = build_parser().parse_args(["--progress", mode, *argv])
    except SystemExit as exc:
        raise UserError(f"step {step.name}: simpleslicenet {shlex.join(argv)} was rejected (see above)") from exc
    return int(args.func(args, Progress(args.command, mode)) or 0)


def write_table(metrics_path: Path, model_path: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """``paper_table.md`` and ``paper_table.json`` in the output folder, from the evaluation and the model file."""
    report = json.loads(metrics_path.read_text())
    training = json.loads(model_path.read_text()).get("training", {})
    methods = report["methods"]
    protocol = {
        "paper": PAPER,
        "contrast": args.contrast,
        "train": f"IXI {args.contrast.upper()}, {training.get('train_volumes', '?')} healthy volumes"
        + (f" (prepared: --skull-strip {args.prepare}, --template {args.template})" if args.prepare else ""),
        "validation": f"BraTS2021, the first {args.brats_val_cases} cases by id "
        f"({training.get('val_volumes', '?')} read): epoch selection and threshold",
        "test": f"BraTS2021, the cases after the first {args.brats_val_cases} by id ({report['cases_scored']} scored, "
        f"{len(report['failed'])} failed)",
        "selected_epoch": training.get("selected_epoch"),
        "epochs_run": training.get("epochs_run"),
        "model": str(model_path),
    }
    rows = [[name, *format_cells(method["summary"], COLUMNS)] for name, method in methods.items()]
    lines = [
        f"# SimpleSliceNet on BraTS2021 ({args.contrast.upper()}): the paper's protocol",
        "",
        *(f"- {key.replace('_', ' ')}: {value}" for key, value in protocol.items()),
        "",
        *table_lines(["Method", *(column[0] for column in COLUMNS)], rows),
        "",
        "Voxel AUROC and AUPRC: per test volume, inside the brain, then averaged; max Dice: best single threshold "
        "over all test voxels, with sensitivity/specificity there; slice AUROC: max score per axial slice; "
        "AUPRO: per-region overlap up to FPR 0.3. Published numbers are not recorded in this repository: "
        "compare with the paper's table.",
    ]
    table: dict[str, Any] = {
        "format": FORMAT,
        "format_version": 1,
        "protocol": protocol,
        "methods": {
            name: {
                **{key: method["summary"].get(key) for key in JSON_KEYS},
                "max_dice": method["summary"]["pooled"]["max_dice"],
                "sensitivity": method["summary"]["pooled"]["sensitivity"],
                "specificity": method["summary"]["pooled"]["specificity"],
                "dice_threshold": method["summary"]["pooled"]["dice_threshold"],
            }
            for name, method in methods.items()
        },
        "evaluation": str(metrics_path),
    }
    out = args.output_dir
    with atomic_path(out / "paper_table.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    with atomic_path(out / "paper_table.json") as tmp:
        tmp.write_text(json.dumps(table, indent=2) + "\n")
    return out / "paper_table.md", out / "paper_table.json"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``simpleslicenet paper-table``."""
    parser = subparsers.add_parser(
        "paper-table",
        help="the paper's protocol in one command: train on IXI, validate/test on BraTS2021, write the table",
        description=f"Train on healthy IXI volumes, pick the epoch and threshold on the first {BRATS_VAL_CASES} "
        "BraTS2021 cases (sorted by id), evaluate on the rest and write paper_table.md/.json in --output-dir. "
        "Runs prepare (optional), train and evaluate; finished steps are skipped on a rerun.",
    )
    parser.add_argument("--ixi", required=True, help="IXI folder (IXI*-T1.nii.gz ...) or a prepared cases.json")
    parser.add_argument("--brats", required=True, help="BraTS2021 folder of BraTS2021_NNNNN case folders")
    parser.add_argument("--output-dir", required=True, type=Path, help="where every step writes")
    parser.add_argument("--contrast", default="t1", choices=CONTRASTS, help="image used on both sides (default t1)")
    parser.add_argument("--brats-val-cases", type=int, default=BRATS_VAL_CASES, metavar="N",
                        help=f"BraTS cases (sorted by id) for validation; the rest test (default {BRATS_VAL_CASES})")
    parser.add_argument("--prepare", choices=("deepbet", "template", "none"),
                        help="run `simpleslicenet prepare --skull-strip X` on IXI first (default: IXI is used as "
                        "given, already skull-stripped and registered)")
    parser.add_argument("--template", default="mni152", choices=("mni152", "sri24"), help="for --prepare")
    parser.add_argument("--name", help="model name (default paper-<contrast>)")
    parser.add_argument("--epochs", type=int, help="training epochs (default: train's, or the preset's)")
    parser.add_argument("--preset", help="train --preset (paper: the published configuration)")
    parser.add_argument("--encoder-weights", help="train --encoder-weights (--preset paper needs timm or a file)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--train-args", default="", metavar="'OPTIONS'",
                        help="more train options, quoted as one string, e.g. '--time-budget-min 600'")
    parser.add_argument("--dry-run", action="store_true", help="print the steps and whether each is done; run none")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace, progress: Progress) -> int:
    """CLI entry: run the steps not done yet, then write the table; 1 if a step reported failed cases."""
    args.name = args.name or f"paper-{args.contrast}"
    out = args.output_dir.resolve()
    steps = plan(args)
    redo = False  # once a step (re)runs, the ones after it read new outputs and run again
    failures = 0
    for step in steps:
        state = "run" if redo else _state(out, step)
        command = f"simpleslicenet {shlex.join(step.argv)}"
        redo = redo or state != "done"
        if args.dry_run:
            print(f"[{state}] {command}")
            continue
        if state == "done":
            progress.info(f"step {step.name}: done before, skipped")
            continue
        progress.info(f"step {step.name}: {command}" + (" --resume" if state == "resume" else ""))
        _write_stamp(out, step, done=False)
        resume = state == "resume" and step.name == "train" and _has_checkpoint(step)
        code = _run_step(step, resume, progress.mode)
        missing = [str(path) for path in step.outputs if not path.is_file()]
        if missing:
            raise UserError(f"step {step.name} did not write {', '.join(missing)}; see its messages above")
        failures += code != 0
        _write_stamp(out, step, done=True)
    if args.dry_run:
        print(f"[always] write {out / 'paper_table.md'} and paper_table.json from the evaluation")
        return 0
    markdown, table = write_table(steps[-1].outputs[0], steps[-2].outputs[0], args)
    progress.emit("output", files={"table": str(markdown), "json": str(table)})
    if progress.mode != "json":
        print(markdown.read_text(), file=sys.stderr)
        print(f"table written: {markdown}", file=sys.stderr)
    return 1 if failures else 0


def _has_checkpoint(step: Step) -> bool:
    model = step.outputs[0]
    return model.with_suffix(".checkpoint.json").is_file() and model.with_suffix(".checkpoint.safetensors").is_file()
