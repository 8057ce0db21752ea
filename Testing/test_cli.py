"""The `simpleslicenet` command as users and the Slicer module run it: real subprocesses.

One ``detect`` call mixes good inputs (NIfTI and NRRD; LPS, oblique, anisotropic) with every kind of
bad input: each bad one gets a one-line error naming it and leaves no output, the good ones are
processed all the same, and the exit code says something failed.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
from conftest import run_cli
from scipy import ndimage

from SimpleSliceNetLib.volume_io import load_volume, volume_stem

OUTPUTS = ("heatmap.nii.gz", "mask.nii.gz", "brainmask.nii.gz", "report.json", "overlay.png")


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def test_detect_exit_code_and_progress_json(detect_run):
    result = detect_run.result
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    events = detect_run.events
    assert all(isinstance(e, dict) and e["task"] == "detect" for e in events)
    assert events[0] == {"event": "start", "task": "detect", "total": len(detect_run.inputs)}
    assert events[-1]["event"] == "done"
    assert (events[-1]["ok"], events[-1]["failed"]) == (3, len(detect_run.bad) + 1)
    fractions = [e["fraction"] for e in events if e["event"] == "progress"]
    assert fractions == sorted(fractions) and fractions[0] >= 0.0 and fractions[-1] == 1.0
    outputs = [e for e in events if e["event"] == "output"]
    assert [e["input"] for e in outputs] == [str(p) for p in detect_run.good.values()]
    for event in outputs:
        stem = volume_stem(event["input"])
        assert set(event["files"]) == {"heatmap", "mask", "brainmask", "report", "overlay"}
        assert all(Path(f).name.startswith(stem + "_") and Path(f).exists() for f in event["files"].values())
        assert isinstance(event["volume_score"], float) and isinstance(event["lesions"], int)


def test_each_bad_input_gets_one_line_naming_it_and_no_output(detect_run):
    errors = [e for e in detect_run.events if e["event"] == "error"]
    expected = [*detect_run.bad.values(), detect_run.duplicate]
    assert sorted(e["input"] for e in errors) == sorted(str(p) for p in expected)
    lines = _error_lines(detect_run.result.stderr)
    assert len(lines) == len(expected)
    for path in expected:
        matching = [line for line in lines if str(path) in line]
        assert len(matching) == 1, (path, lines)
        event = next(e for e in errors if e["input"] == str(path))
        assert "\n" not in event["message"] and str(path) in event["message"]
    # Each message says what is wrong.
    by_kind = {kind: next(line for line in lines if str(path) in line) for kind, path in detect_run.bad.items()}
    for kind, words in {"missing": ["not found"], "2d": ["2D"], "4d": ["4D", "3 volumes"], "nan": ["NaN"],
                        "constant": ["constant"], "tiny": ["too small"], "coarse_spacing": ["spacing"],
                        "fine_spacing": ["spacing"], "truncated_gzip": ["complete"]}.items():
        for word in words:
            assert word in by_kind[kind], by_kind[kind]
    assert "same file name stem" in next(line for line in lines if str(detect_run.duplicate) in line)


def test_no_partial_outputs(detect_run):
    names = sorted(p.name for p in detect_run.out.iterdir())
    expected = sorted(f"{volume_stem(p)}_{suffix}" for p in detect_run.good.values() for suffix in OUTPUTS)
    assert names == expected  # nothing for the bad inputs, no scratch folders or temporary files left


@pytest.mark.parametrize("kind", ["lps_nifti", "nrrd", "oblique"])
def test_outputs_share_the_input_grid(detect_run, kind):
    source = load_volume(detect_run.good[kind])
    stem = volume_stem(detect_run.good[kind])
    out = detect_run.out
    heat_image = nib.load(str(out / f"{stem}_heatmap.nii.gz"))
    assert heat_image.get_data_dtype() == np.float32
    for name, dtype in (("heatmap", np.float32), ("mask", np.uint8), ("brainmask", np.uint8)):
        image = nib.load(str(out / f"{stem}_{name}.nii.gz"))
        assert image.shape == source.array.shape, name
        assert image.get_data_dtype() == dtype, name
        np.testing.assert_allclose(image.affine, source.affine, atol=1e-4)
    heat = np.asarray(heat_image.dataobj)
    mask = np.asarray(nib.load(str(out / f"{stem}_mask.nii.gz")).dataobj)
    brain = np.asarray(nib.load(str(out / f"{stem}_brainmask.nii.gz")).dataobj).astype(bool)
    # The brain is the non-background part of the input (all of it inside the model's field of view here).
    assert not np.any(brain & (source.array <= 0))
    assert brain.sum() > 0.97 * (source.array > 0).sum()
    assert set(np.unique(mask)) <= {0, 1}
    assert not np.any(mask.astype(bool) & ~brain)
    assert np.isfinite(heat).all() and np.all(heat[~brain] == 0)
    assert heat[brain].std() > 0

    report = json.loads((out / f"{stem}_report.json").read_text())
    assert report["input"] == str(detect_run.good[kind])
    assert report["shape"] == list(source.array.shape)
    np.testing.assert_allclose(report["affine"], source.affine, atol=1e-5)
    assert report["volume_score"] == pytest.approx(float(heat[brain].max()), abs=1e-4)
    model_threshold = json.loads(detect_run.model_json.read_text())["config"]["scoring"]["threshold"]
    assert report["threshold"] == pytest.approx(model_threshold)  # the model's calibrated threshold
    assert report["abnormal"] == (report["volume_score"] >= report["threshold"])
    assert report["model"]["id"] == "tiny" and report["model"]["version"]
    assert {"load_s", "preprocess_s", "encode_s", "flow_s", "map_s"} <= set(report["timings"])
    assert report["field_of_view_coverage"] > 0.9
    lesions = report["lesions"]
    assert report["lesion_count"] == len(lesions)
    _, components = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    assert components == len(lesions)
    assert sum(les["voxels"] for les in lesions) == int(mask.sum())
    for lesion in lesions:
        assert {"volume_ml", "centroid_ras", "max_score", "voxels"} <= set(lesion)
        assert lesion["max_score"] >= report["threshold"] and len(lesion["centroid_ras"]) == 3
    scores = [les["max_score"] for les in lesions]
    assert scores == sorted(scores, reverse=True)

    overlay = out / f"{stem}_overlay.png"
    assert overlay.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    picture = matplotlib.image.imread(str(overlay))
    assert picture.shape[1] > 2 * picture.shape[0]  # three views side by side
    assert picture[..., :3].std() > 0.05  # not blank


def test_nifti_and_nrrd_of_the_same_volume_give_the_same_heatmap(detect_run):
    a = load_volume(detect_run.out / "lps_glioma_heatmap.nii.gz")
    b = load_volume(detect_run.out / "glioma_nrrd_heatmap.nii.gz")
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
    np.testing.assert_allclose(a.array, b.array, atol=1e-4)


def test_import_list_and_threshold(detect_run, tiny_model, tmp_path):
    """`models --import`, `models --json`, then `detect --model ID --threshold T` sets the mask to heat >= T."""
    source = detect_run.good["lps_nifti"]
    heat = load_volume(detect_run.out / "lps_glioma_heatmap.nii.gz").array
    brain = load_volume(detect_run.out / "lps_glioma_brainmask.nii.gz").array > 0
    default_mask = load_volume(detect_run.out / "lps_glioma_mask.nii.gz").array > 0
    threshold = float(np.quantile(heat[brain], 0.6))
    # The model is found by id in the user folder after `models --import`.
    env = {"SIMPLESLICENET_HOME": str(tmp_path / "home")}
    imported = run_cli("models", "--import", str(tiny_model.json), "--json", env=env)
    assert imported.returncode == 0, imported.stderr
    target = tmp_path / "home" / "models"
    assert json.loads(imported.stdout)["imported"] == str(target / "tiny.json")
    assert sorted(p.name for p in target.iterdir()) == ["tiny.json", "tiny.safetensors"]
    listed = run_cli("models", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    user = [m for m in json.loads(listed.stdout) if m["source"] == "user"]
    assert [m["id"] for m in user] == ["tiny"]
    assert user[0]["method"] == "simpleslicenet" and user[0]["path"] == str(target / "tiny.json")
    stored = json.loads(tiny_model.json.read_text())["config"]["scoring"]["threshold"]
    assert user[0]["threshold"] == pytest.approx(stored)
    result = run_cli("--progress", "none", "detect", str(source), "--output-dir", str(tmp_path / "out"),
                     "--model", "tiny", "--threshold", str(threshold), "--min-lesion-ml", "0", "--no-overlay",
                     "--device", "cpu", env=env)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"lps_glioma_{s}" for s in OUTPUTS if s != "overlay.png")
    mask = load_volume(tmp_path / "out" / "lps_glioma_mask.nii.gz").array > 0
    np.testing.assert_array_equal(mask, (heat >= np.float32(threshold)) & brain)
    assert 0.3 < mask.sum() / brain.sum() < 0.5
    assert mask.sum() != default_mask.sum()
    report = json.loads((tmp_path / "out" / "lps_glioma_report.json").read_text())
    assert report["threshold"] == pytest.approx(threshold)
    np.testing.assert_allclose(load_volume(tmp_path / "out" / "lps_glioma_heatmap.nii.gz").array, heat, atol=1e-5)


def _broken_model_copy(tiny_model, folder: Path, damage: str) -> Path:
    folder.mkdir()
    for suffix in (".json", ".safetensors"):
        shutil.copy(tiny_model.json.with_suffix(suffix), folder)
    path = folder / tiny_model.json.name
    if damage == "checksum":
        weights = path.with_suffix(".safetensors")
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        meta = json.loads(path.read_text())
        meta["format_version"] = 99
        path.write_text(json.dumps(meta))
    return path


@pytest.mark.parametrize("damage, words", [("checksum", ["SHA-256", "tiny.safetensors"]),
                                           ("format_version", ["format version", "tiny.json"])])
def test_damaged_model_is_refused_with_one_line(detect_run, tiny_model, tmp_path, damage, words):
    model = _broken_model_copy(tiny_model, tmp_path / "model", damage)
    out = tmp_path / "out"
    result = run_cli("--progress", "json", "detect", str(detect_run.good["oblique"]), "--output-dir", str(out),
                     "--model", str(model), "--device", "cpu")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = _error_lines(result.stderr)
    assert len(lines) == 1
    for word in words:
        assert word in lines[0]
    assert str(tmp_path / "model") in lines[0]
    errors = [json.loads(line) for line in result.stdout.splitlines() if '"error"' in line]
    assert len(errors) == 1 and errors[0]["event"] == "error"
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("mode", ["none", "bar"])  # with a bar, each message must still start its own line
def test_text_file_named_nii_gz_does_not_stop_the_other_inputs(detect_run, tiny_model, tmp_path, mode):
    text = tmp_path / "notes.nii.gz"
    text.write_text("not an image\n")
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"garbage" * 50))
    out = tmp_path / "out"
    result = run_cli("--progress", mode, "detect", str(text), str(garbage), str(detect_run.good["oblique"]),
                     "--output-dir", str(out), "--model", str(tiny_model.json), "--device", "cpu", "--no-overlay")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = _error_lines(result.stderr)
    assert len(lines) == 2 and str(text) in lines[0] and str(garbage) in lines[1]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"oblique_{s}" for s in OUTPUTS if s != "overlay.png")
    assert f"outputs in {out.resolve()}" in result.stderr
    assert any(line.startswith(f"{detect_run.good['oblique']}: score ") for line in result.stderr.splitlines())
    # Nothing good among the inputs: no claim that outputs are anywhere.
    alone = run_cli("--progress", "none", "detect", str(text), "--output-dir", str(tmp_path / "none"), "--model",
                    str(tiny_model.json), "--device", "cpu")
    assert alone.returncode == 1 and len(_error_lines(alone.stderr)) == 1 and "outputs in" not in alone.stderr


def test_usage_error_is_one_line(tmp_path):
    result = run_cli("detect", "a.nii.gz", "b.nii.gz", "--output-dir", str(tmp_path / "out"), "--mask", "m.nii.gz")
    assert result.returncode == 1
    assert _error_lines(result.stderr) and "--mask" in _error_lines(result.stderr)[0]


def test_building_the_command_line_does_not_load_torch():
    # Slicer calls `models --json` and `--help`-like commands often; loading torch and timm took seconds.
    code = "import sys; from SimpleSliceNetLib.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
