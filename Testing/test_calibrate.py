"""`simpleslicenet calibrate` (subprocesses on the session's tiny model): the trained weights are kept to the
bit, the scoring is computed again as train computes it, scoring options change, and bad requests are
one-line errors that write nothing."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

from SimpleSliceNetLib.model_file import read_model_file, resolve_model

RECOMPUTED = {"nll_mean", "nll_std"}


def _calibrate(tiny_model, synth_set, out, name: str, *extra: str):
    return run_cli("calibrate", "--model", str(tiny_model.json), "--stats", str(synth_set.manifest),
                   "--val", str(synth_set.manifest), "--name", name, "--output-dir", str(out), *extra)


@pytest.fixture(scope="module")
def tiling(tiny_model, synth_set, tmp_path_factory):
    """The tiny model (scored every slice, as train's default) calibrated to score its trained slabs only."""
    out = tmp_path_factory.mktemp("calibrated")
    done = _calibrate(tiny_model, synth_set, out, "tiling", "--score-stride", "3", "--model-version", "2.0.0")
    assert done.returncode == 0, done.stderr[-2000:]
    return out / "tiling.json", done


def test_calibration_keeps_the_trained_weights_and_scores_the_slabs_asked_for(tiny_model, tiling):
    path, done = tiling
    assert f"model written: {path}" in done.stderr
    trained = load_file(tiny_model.json.with_suffix(".safetensors"))
    calibrated = load_file(path.with_suffix(".safetensors"))
    assert set(trained) == set(calibrated)
    kept = set(trained) - RECOMPUTED
    assert any(k.startswith("flow.") for k in kept) and "feature_mean" in kept
    assert all(torch.equal(trained[k], calibrated[k]) for k in kept)
    assert trained["nll_mean"].shape == (16, 16, 46) and calibrated["nll_mean"].shape == (16, 16, 16)
    model = read_model_file(path)  # checksum and format validated
    assert (model.version, model.config["score_stride"], model.config["slab_stride"]) == ("2.0.0", 3, None)
    source = read_model_file(tiny_model.json)
    assert model.training["calibrated"]["from"].startswith(f"{source.id} {source.version} ({source.sha256[:12]})")
    assert model.training["calibrated"]["stats_volumes"] == 5
    assert model.training["epochs_run"] == source.training["epochs_run"]  # the training record is carried over
    assert model.config["scoring"]["calibration"]["healthy_volumes"] == 1


def test_calibrating_back_gives_what_training_computed(tiny_model, synth_set, tiling, tmp_path):
    """From the tiling model, the training volumes' statistics and train's default score stride: the
    statistics, scale and threshold that train itself stored."""
    done = run_cli("calibrate", "--model", str(tiling[0]), "--stats", str(synth_set.manifest), "--val",
                   str(synth_set.manifest), "--name", "back", "--output-dir", str(tmp_path), "--score-stride", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    back, trained = load_file(tmp_path / "back.safetensors"), load_file(tiny_model.json.with_suffix(".safetensors"))
    for key in RECOMPUTED:
        torch.testing.assert_close(back[key], trained[key], rtol=1e-4, atol=1e-5)
    ours = read_model_file(tmp_path / "back.json").config["scoring"]
    theirs = read_model_file(tiny_model.json).config["scoring"]
    for key in ("offset", "scale", "threshold"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-3, abs=1e-3), key


def test_a_calibrated_model_detects(tiling, synth_set, tmp_path):
    done = run_cli("detect", str(synth_set.test_lesion), "--model", str(tiling[0]), "--output-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "test_glioma_report.json").read_text())
    assert report["model"]["version"] == "2.0.0" and report["threshold"] == pytest.approx(
        read_model_file(tiling[0]).config["scoring"]["threshold"], rel=1e-4)


@pytest.mark.parametrize("extra, message", [
    (["--score-stride", "2"], "a score stride of 2 slices does not divide the slab stride of 3 slices"),
    (["--smoothing-mm", "-1"], "--smoothing-mm -1: give a sigma of 0 mm (no smoothing) or more"),
])
def test_bad_scoring_options_are_one_line_errors(tiny_model, synth_set, tmp_path, extra, message):
    done = _calibrate(tiny_model, synth_set, tmp_path, "bad", *extra)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert message in done.stderr.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


def test_the_model_given_is_never_overwritten_and_statistics_need_volumes(tiny_model, synth_set):
    before = tiny_model.json.read_bytes(), tiny_model.json.with_suffix(".safetensors").read_bytes()
    done = _calibrate(tiny_model, synth_set, tiny_model.output_dir, tiny_model.name, "--score-stride", "3")
    assert done.returncode == 1 and "is the model being calibrated; give another --name or --output-dir" in done.stderr
    assert (tiny_model.json.read_bytes(), tiny_model.json.with_suffix(".safetensors").read_bytes()) == before
    done = run_cli("calibrate", "--model", str(tiny_model.json), "--val", str(synth_set.manifest), "--name", "x",
                   "--output-dir", str(tiny_model.output_dir))
    assert done.returncode == 1 and "give --stats with healthy volumes" in done.stderr
    assert not (tiny_model.output_dir / "x.json").exists()


def test_the_encoder_precision_calibrated_in_is_the_one_detection_uses_on_every_device(tiny_model, synth_set,
                                                                                      tmp_path):
    from SimpleSliceNetLib.detector import Detector

    done = _calibrate(tiny_model, synth_set, tmp_path, "bf16", "--encoder-precision", "bf16")
    assert done.returncode == 0, done.stderr[-2000:]
    trained, bf16 = load_file(tiny_model.json.with_suffix(".safetensors")), load_file(tmp_path / "bf16.safetensors")
    assert all(torch.equal(trained[k], bf16[k]) for k in set(trained) - RECOMPUTED)
    assert not torch.equal(trained["nll_mean"], bf16["nll_mean"])  # computed on bf16 features
    assert read_model_file(tmp_path / "bf16.json").config["scoring"]["encoder_precision"] == "bf16"
    assert Detector.load(tmp_path / "bf16.json", "cpu").autocast is torch.bfloat16
    # Files written before the setting (the bundled default model) were calibrated on fp32 features.
    assert "encoder_precision" not in resolve_model(None).config["scoring"]
    assert Detector.load(None, "cpu").autocast is None and Detector.load(tiny_model.json, "cpu").autocast is None
    done = run_cli("detect", str(synth_set.test_lesion), "--model", str(tmp_path / "bf16.json"), "--output-dir",
                   str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr[-2000:]
    done = _calibrate(tiny_model, synth_set, tmp_path, "bad", "--encoder-precision", "fp16")
    assert done.returncode != 0 and "invalid choice: 'fp16'" in done.stderr and not (tmp_path / "bad.json").exists()
