"""`simpleslicenet ablation`: the variant plan, the dry run, a tiny real run (train + evaluate through the
real commands) that writes one table row per variant, resuming, and the variants' options against train's."""

from __future__ import annotations

import argparse
import json
import re
import shlex

import pytest
from conftest import run_cli

from SimpleSliceNetLib.cli import build_parser, main
from SimpleSliceNetLib.errors import UserError
from SimpleSliceNetTraining import ablation, train

ALL_VARIANTS = ["default", "loss-triplet", "sigma-0p1", "sigma-0p6", "group-1", "group-6", "stride-1",
                "aggregation-max", "edc", "background-mask"]
TINY_TRAIN = "--shape 64,64,24 --spacing 3,3,6 --blocks 2"


@pytest.fixture
def encoder_file(tmp_path):
    path = tmp_path / "edc.safetensors"
    path.write_bytes(b"placeholder: only named in commands")
    return path


def test_dry_run_lists_every_selected_variant_and_writes_nothing(tmp_path, encoder_file):
    out = tmp_path / "abl"
    result = run_cli("ablation", "--data", str(tmp_path / "cases.json"), "--output-dir", str(out), "--dry-run",
                     "--encoder-file", str(encoder_file), "--epochs", "7")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert [line.split(":")[0][2:] for line in lines if line.startswith("# ")] == [
        "default", "loss-triplet", "sigma-0p1", "sigma-0p6", "group-1", "group-6", "stride-1", "aggregation-max",
        "edc", "background-mask"]
    trains = [shlex.split(line)[1:] for line in lines if line.startswith("simpleslicenet train ")]
    evaluates = [shlex.split(line)[1:] for line in lines if line.startswith("simpleslicenet evaluate ")]
    assert len(trains) == len(evaluates) == len(ALL_VARIANTS)
    for name, train_args, evaluate in zip(ALL_VARIANTS, trains, evaluates, strict=True):
        assert train_args[train_args.index("--name") + 1] == name
        assert train_args[train_args.index("--epochs") + 1] == "7"
        assert evaluate[evaluate.index("--model") + 1] == str(out / "models" / f"{name}.json")
        assert evaluate[evaluate.index("--split") + 1] == "test"
    assert trains[-2][trains[-2].index("--encoder") + 1] == str(encoder_file)
    assert all("--encoder" not in args for args in trains[:-2] + trains[-1:])
    assert not out.exists()


def test_switch_selection_and_errors(tmp_path, encoder_file):
    names = [v.name for v in ablation.plan_variants(["sigma", "background"], None, [])]
    assert names == ["default", "sigma-0p1", "sigma-0p6", "background-mask"]
    # Groups must divide the model's slices: 5 divides 40, 96 needs 6.
    assert [v.name for v in ablation.plan_variants(["aggregation"], None, ["--shape", "64,64,40"])][1:3] == \
        ["group-1", "group-5"]
    with pytest.raises(UserError, match="--encoder-file"):
        ablation.plan_variants(["edc"], None, [])
    with pytest.raises(UserError, match="unknown switch 'noise'"):
        ablation.plan_variants(["noise"], None, [])


def test_unknown_variant_is_a_clear_error(tmp_path, capsys):
    code = main(["--progress", "none", "ablation", "--data", str(tmp_path / "c.json"), "--output-dir",
                 str(tmp_path / "o"), "--switches", "sigma", "--variants", "default,sigma-9"])
    assert code == 1
    assert "--variants: unknown sigma-9" in capsys.readouterr().err


def test_a_grid_some_variant_cannot_tile_is_refused_before_anything_trains(tmp_path, capsys):
    out = tmp_path / "o"
    code = main(["--progress", "none", "ablation", "--data", str(tmp_path / "c.json"), "--output-dir", str(out),
                 "--switches", "aggregation", "--train-options", "--shape 64,64,64"])
    assert code == 1
    err = capsys.readouterr().err
    assert "variant default: 64 slices do not split into groups of 3" in err and "e.g. 72 or 96" in err
    assert not out.exists()
    # 72 slices suit every variant (group 6 is the coarse one there).
    variants = ablation.plan_variants(["aggregation"], None, ["--shape=64,64,72"])
    ablation.check_slab_layouts(variants, ["--shape=64,64,72"])
    assert "group-6" in [v.name for v in variants]


def _train_help() -> str:
    """What `simpleslicenet train --help` prints."""
    subparsers = argparse.ArgumentParser().add_subparsers()
    train.add_parser(subparsers)
    return subparsers.choices["train"].format_help()


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_variant_options_are_train_options(variant, encoder_file):
    """Every variant's arguments parse with the train command (skipped while train lacks the option)."""
    chosen = next(v for v in ablation.plan_variants(list(ablation.SWITCHES), str(encoder_file), [])
                  if v.name == variant)
    text = _train_help()
    missing = [a for a in chosen.args if a.startswith("--") and not re.search(rf"(?<![\w-]){a}(?![\w-])", text)]
    if missing:
        pytest.skip(f"train has no {', '.join(missing)} yet")
    plan = ablation.Plan("cases.json", encoder_file.parent, 3, 0, "cpu", [])
    args = build_parser().parse_args(plan.train_args(chosen))
    for option, value in zip(chosen.args[::2], chosen.args[1::2], strict=True):
        dest = {"--encoder": "encoder_weights"}.get(option, option[2:].replace("-", "_"))
        assert str(getattr(args, dest)) == value


def _manifest(tmp_path, synth_set):
    """Train on two healthy volumes, validate on a healthy and a glioma, test on a glioma and a healthy one."""
    entries = [
        {"id": "t1", "split": "train", "image": str(synth_set.train[0]), "label": "healthy"},
        {"id": "t2", "split": "train", "image": str(synth_set.train[1]), "label": "healthy"},
        {"id": "vh", "split": "val", "image": str(synth_set.val_healthy), "label": "healthy"},
        {"id": "vl", "split": "val", "image": str(synth_set.val_lesion), "mask": str(synth_set.val_mask),
         "label": "lesion"},
        {"id": "xl", "split": "test", "image": str(synth_set.test_lesion), "mask": str(synth_set.test_mask),
         "label": "lesion"},
        {"id": "xh", "split": "test", "image": str(synth_set.train[4]), "label": "healthy"},
    ]
    path = tmp_path / "cases.json"
    path.write_text(json.dumps({"format": "simpleslicenet-cases", "version": 1, "cases": entries}))
    return path


def test_tiny_ablation_writes_one_row_per_variant_and_resumes(tmp_path, synth_set, capsys):
    data, out = _manifest(tmp_path, synth_set), tmp_path / "abl"
    argv = ["--progress", "none", "ablation", "--data", str(data), "--output-dir", str(out), "--epochs", "1",
            "--switches", "sigma", "--variants", "default,sigma-0p6", "--device", "cpu",
            "--train-options", TINY_TRAIN]
    assert main(argv) == 0, capsys.readouterr().err[-3000:]
    table = json.loads((out / "ablation.json").read_text())
    assert table["format"] == "simpleslicenet-ablation" and table["epochs"] == 1
    rows = table["rows"]
    assert [r["variant"] for r in rows] == ["default", "sigma-0p6"]
    assert rows[1]["train_args"] == ["--noise-sigma", "0.6"] and rows[1]["switch"] == "sigma"
    for row in rows:
        assert row["error"] is None
        for key in ("voxel_auroc", "auprc", "max_dice", "volume_auroc"):
            assert 0.0 <= row[key] <= 1.0, (row["variant"], key, row[key])
        assert row["train_seconds"] > 0
    models = {r["variant"]: json.loads((out / "models" / f"{r['variant']}.json").read_text()) for r in rows}
    assert models["sigma-0p6"]["training"]["train_config"]["noise_sigma"] == 0.6
    assert models["default"]["config"]["preprocess"]["shape"] == [64, 64, 24]
    markdown = (out / "ablation.md").read_text()
    assert sum(line.startswith(("| default |", "| sigma-0p6 |")) for line in markdown.splitlines()) == 2
    assert "| sigma-0p6 | sigma | --noise-sigma 0.6" in markdown

    # Everything exists: a second run trains and evaluates nothing and gives the same table.
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "models").glob("*.safetensors")}
    capsys.readouterr()
    assert main(["--progress", "bar", *argv[2:]]) == 0
    assert capsys.readouterr().err.count("model and evaluation exist: not rerun") == 2
    assert {p.name: p.stat().st_mtime_ns for p in (out / "models").glob("*.safetensors")} == stamps
    assert [r["voxel_auroc"] for r in json.loads((out / "ablation.json").read_text())["rows"]] == \
        [r["voxel_auroc"] for r in rows]

    # Asking for other options in the same folder is refused instead of mixing results.
    assert main([*argv[:-1], TINY_TRAIN + " --lr 0.002"]) == 1
    assert "was made with other options" in capsys.readouterr().err
