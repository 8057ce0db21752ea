"""``simpleslicenet paper-table`` on a fake IXI folder and a fake BraTS2021 folder in the real file naming."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import grid_affine, phantom, run_cli

from SimpleSliceNetLib.cli import build_parser
from SimpleSliceNetLib.progress import Progress
from SimpleSliceNetLib.volume_io import save_volume
from SimpleSliceNetTraining import paper_protocol

SHAPE = (64, 80, 60)
SPACING = (2.0, 2.0, 2.0)


def _fake_datasets(root: Path) -> tuple[Path, Path]:
    """Three healthy IXI T2 volumes and four BraTS2021 cases (t1, t2, seg) with a bright blob each."""
    affine = grid_affine(SHAPE, SPACING)
    ixi, brats = root / "IXI-T2", root / "BraTS2021"
    for i in range(3):
        shifted = grid_affine(SHAPE, SPACING, centre_ras=(2.0 * i, -3.0 * i, 10.0 + i))
        save_volume(ixi / f"IXI{10 + i:03d}-Guys-{1000 + i:04d}-T2.nii.gz", phantom(SHAPE, shifted), shifted)
    for number in (4, 1, 3, 2):  # written out of order: the split sorts by id
        case = f"BraTS2021_{number:05d}"
        centre = (15.0 - 8 * number, -10.0 + 5 * number, 15.0)
        image = phantom(SHAPE, affine, [(centre, 700.0)])
        lesion = image > phantom(SHAPE, affine) + 350.0
        for token in ("t1", "t2"):
            save_volume(brats / case / f"{case}_{token}.nii.gz", image, affine)
        save_volume(brats / case / f"{case}_seg.nii.gz", lesion.astype(np.uint8) * 2, affine)
    return ixi, brats


def _args(*argv: str):
    return build_parser().parse_args(["paper-table", *argv])


def test_plan_and_resume_states(tmp_path, capsys):
    argv = ["--ixi", str(tmp_path / "ixi"), "--brats", str(tmp_path / "brats"), "--output-dir", str(tmp_path / "out"),
            "--contrast", "t2", "--prepare", "template", "--preset", "paper", "--encoder-weights", "timm"]
    args = _args(*argv, "--dry-run")
    assert paper_protocol.run(args, Progress("paper-table", "none")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines[:3]] == [["[run]", "simpleslicenet"]] * 3
    prepare, train, evaluate = (line.split(" ", 2)[2] for line in lines[:3])
    assert prepare.startswith("prepare --data") and "--skull-strip template" in prepare
    assert f"--train {tmp_path / 'out' / 'ixi_prepared' / 'cases.json'} --train-split train" in train
    assert "--val-split val" in train and "--preset paper --encoder-weights timm" in train and "--contrast t2" in train
    assert "--split test" in evaluate and "--brats-val-cases 251" in evaluate and "--contrast t2" in evaluate

    # A finished prepare step is skipped; an interrupted train resumes; what follows a rerun step runs again.
    steps = paper_protocol.plan(args)
    out = (tmp_path / "out").resolve()
    steps[0].outputs[0].parent.mkdir(parents=True)
    steps[0].outputs[0].write_text("{}")
    paper_protocol._write_stamp(out, steps[0], done=True)
    paper_protocol._write_stamp(out, steps[1], done=False)
    paper_protocol._write_stamp(out, steps[2], done=True)
    paper_protocol.run(args, Progress("paper-table", "none"))
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[:3]] == ["[done]", "[resume]", "[run]"]
    # Other options change the step's arguments: it runs again, and so does every later step.
    paper_protocol.run(_args(*argv, "--template", "sri24", "--dry-run"), Progress("paper-table", "none"))
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[:3]] == ["[run]"] * 3


def test_paper_table_end_to_end_on_fake_ixi_and_brats(tmp_path):
    """prepare-free protocol with a tiny 1-epoch model: train on IXI, val on 2 BraTS cases, test on 2 (~1 min)."""
    ixi, brats = _fake_datasets(tmp_path)
    out = tmp_path / "protocol"
    argv = ["--progress", "none", "paper-table", "--ixi", str(ixi), "--brats", str(brats), "--output-dir", str(out),
            "--contrast", "t2", "--brats-val-cases", "2", "--epochs", "1", "--encoder-weights", "none",
            "--device", "cpu", "--train-args", "--shape 32,32,24 --blocks 2"]
    done = run_cli(*argv)
    assert done.returncode == 0, done.stderr[-3000:]

    model = json.loads((out / "model" / "paper-t2.json").read_text())
    assert model["training"]["train_volumes"] == 3 and model["training"]["val_volumes"] == 2
    assert model["modality"] == "T2"  # train's --contrast t2 sets it
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    cases = [record["case"] for record in metrics["methods"]["SimpleSliceNet"]["cases"]]
    assert cases == ["BraTS2021_00003", "BraTS2021_00004"]  # the cases after the first 2 by id
    table = json.loads((out / "paper_table.json").read_text())
    assert list(table["methods"]) == ["SimpleSliceNet", "intensity baseline"]
    for row in table["methods"].values():
        assert 0.0 <= row["voxel_auroc_mean"] <= 1.0 and 0.0 <= row["max_dice"] <= 1.0
        assert row["lesion_cases_with_mask"] == 2
    # The baseline finds the bright blobs: the table holds real numbers, not placeholders.
    assert table["methods"]["intensity baseline"]["voxel_auroc_mean"] > 0.9
    markdown = (out / "paper_table.md").read_text()
    assert "| Method | Voxel AUROC (mean +- sd) | AUPRC (mean) | Max Dice |" in markdown
    assert "| SimpleSliceNet |" in markdown and "the first 2 cases by id" in markdown

    # A rerun skips every finished step and writes the table again.
    stamp = (out / "model" / "paper-t2.safetensors").stat().st_mtime_ns
    (out / "paper_table.md").unlink()
    again = run_cli(*[a if a != "none" else "bar" for a in argv[:2]], *argv[2:])
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("done before, skipped") == 2
    assert (out / "model" / "paper-t2.safetensors").stat().st_mtime_ns == stamp
    assert (out / "paper_table.md").read_text() == markdown


@pytest.mark.parametrize("contrast", ["flair", "pd"])
def test_paper_table_contrasts_are_those_both_datasets_have(contrast, capsys):
    with pytest.raises(SystemExit):
        _args("--ixi", "a", "--brats", "b", "--output-dir", "c", "--contrast", contrast)
    assert "invalid choice" in capsys.readouterr().err
