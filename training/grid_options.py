"""The model-grid options (--shape, --spacing, --slice-axis, --anchor, --align) shared by the training commands."""

from __future__ import annotations

import argparse

from SimpleSliceNetLib.errors import UserError
from SimpleSliceNetLib.preprocess import ALIGNS, ANCHORS, PreprocessConfig

# SimpleSliceNet's default model grid: the engine's, turned and scaled to each brain. With 1-cell features
# it lifted test-split voxel AUROC from 0.946 to 0.951 and volume AUROC from 0.847 to 0.896 (README).
SLICENET_GRID = PreprocessConfig(align="brain-axes")


def add_grid_arguments(p: argparse.ArgumentParser, defaults: str) -> None:
    """``defaults`` names the default grid(s) in the help, e.g. "192,192,96 at 1,1,1.5 mm"."""
    p.add_argument("--shape", help=f"model grid: in-plane rows, columns, slices (default {defaults})")
    p.add_argument("--spacing", help="model grid spacing in mm (see --shape for the default)")
    p.add_argument("--slice-axis", default="axial", choices=["axial", "coronal", "sagittal"])
    p.add_argument("--anchor", choices=ANCHORS,
                   help="where the grid sits on the brain: centre of its bounding box, or superior: its top at the "
                        "vertex, so a short inferior field of view does not shift the slices (default: the method's)")
    p.add_argument("--align", choices=ALIGNS,
                   help="brain-axes: turn the grid to the brain's long (front-back) axis and scale it to a reference "
                        "brain size, so anatomy lands at the same grid positions without registration (centre anchor "
                        "only; default: brain-axes for simpleslicenet, none for u2ad and --anchor superior)")


def grid_config(args: argparse.Namespace, default: PreprocessConfig) -> PreprocessConfig:
    """The model grid the options ask for, ``default`` where they are silent."""
    shape = parse_numbers(args.shape, "shape", int) if args.shape else default.shape
    spacing = parse_numbers(args.spacing, "spacing", float) if args.spacing else default.spacing
    if len(shape) != 3 or len(spacing) != 3:
        raise UserError("--shape and --spacing take three values each")
    if min(shape) < 1 or min(spacing) <= 0:
        raise UserError("--shape and --spacing must be positive")
    anchor = args.anchor or default.anchor
    align = args.align or (default.align if anchor == "centre" else "none")
    try:
        return PreprocessConfig(shape=shape, spacing=spacing, slice_axis=args.slice_axis, anchor=anchor, align=align)
    except ValueError as exc:  # the grid's own rules (e.g. which anchor an alignment works with)
        raise UserError(f"{exc}; change --align or --anchor") from exc


def parse_numbers(text: str, what: str, kind: type = float) -> tuple:
    """``"1,2,3"`` -> (1, 2, 3) of ``kind``, or a clear error naming the option."""
    try:
        return tuple(kind(v) for v in text.split(","))
    except ValueError as exc:
        raise UserError(f"--{what} expects comma-separated {'integers' if kind is int else 'numbers'}, "
                        f"got {text!r}") from exc
