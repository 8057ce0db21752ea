"""End to end: `simpleslicenet train` on generated healthy volumes (session fixture, a subprocess), then
`simpleslicenet detect` finds a planted lesion; checkpoint, `--resume`, history CSV and curves."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil

import matplotlib.image
import numpy as np
import pytest
import torch
from conftest import TINY_EPOCHS, run_cli
from safetensors.torch import load_file
from scipy.stats import rankdata

from SimpleSliceNetLib.volume_io import load_volume


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUROC with tied scores counted half."""
    ranks = rankdata(scores)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_auroc_helper():
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True])) == 0.75
    assert auroc(np.ones(4), np.array([True, False, True, False])) == 0.5


def _history(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_training_writes_model_history_curves_and_checkpoint(tiny_model):
    out, name = tiny_model.output_dir, tiny_model.name
    board = (".tb",) if importlib.util.find_spec("tensorboard") else ()  # TensorBoard scalars when installed
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{name}{s}" for s in (".json", ".safetensors", ".checkpoint.json", ".checkpoint.safetensors",
                               ".history.csv", ".curves.png", *board))
    rows = _history(out / f"{name}.history.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(1, TINY_EPOCHS + 1))
    for key in ("loss", "ml", "val_auroc", "val_auprc", "val_max_dice", "elapsed_s"):
        values = [float(r[key]) for r in rows]
        assert np.isfinite(values).all(), key
    # Optimizer steps so far: the same number every epoch (one sub-batch per training volume here).
    assert [int(r["step"]) for r in rows] == [5 * epoch for epoch in range(1, TINY_EPOCHS + 1)]
    # The loss parts: maximum likelihood only in the first epoch, then SPP's pull and push; they add up.
    assert rows[0]["pull"] == rows[0]["push"] == ""
    for row in rows[1:]:
        parts = float(row["ml"]) + float(row["pull"]) + float(row["push"])
        assert parts == pytest.approx(float(row["loss"]), rel=1e-4)
    elapsed = [float(r["elapsed_s"]) for r in rows]
    assert elapsed == sorted(elapsed)
    assert all(0.0 <= float(r["val_auroc"]) <= 1.0 for r in rows)

    # The JSON progress stream: one metric event per epoch with the same numbers, then the output.
    metrics = [e for e in tiny_model.events if e["event"] == "metric"]
    assert [e["epoch"] for e in metrics] == list(range(1, TINY_EPOCHS + 1))
    for event, row in zip(metrics, rows, strict=True):
        assert event["loss"] == pytest.approx(float(row["loss"]))
        assert event["val_auroc"] == pytest.approx(float(row["val_auroc"]))
    output = next(e for e in tiny_model.events if e["event"] == "output")
    assert output["files"]["model"] == str(tiny_model.json)
    assert tiny_model.events[-1]["event"] == "done"

    meta = json.loads(tiny_model.json.read_text())
    training = meta["training"]
    assert training["train_volumes"] == 5 and training["val_volumes"] == 2 and training["epochs_run"] == TINY_EPOCHS
    best = max(rows, key=lambda r: float(r["val_auroc"]))
    assert training["selected_epoch"] == int(best["epoch"])
    assert training["selected"]["epoch"] == training["selected_epoch"]
    assert training["selected"]["val_auroc"] == pytest.approx(float(best["val_auroc"]))
    # Heatmap scale calibrated on the healthy validation volume; with an annotated validation lesion the
    # default threshold is its best-Dice cut.
    scoring = meta["config"]["scoring"]
    assert scoring["scale"] > 0 and np.isfinite(scoring["offset"]) and np.isfinite(scoring["threshold"])
    assert scoring["calibration"]["healthy_volumes"] == 1
    assert "Dice" in scoring["calibration"]["threshold_rule"]
    assert meta["config"]["preprocess"]["shape"] == [128, 128, 48]
    # Per-position NLL statistics of the training volumes (after training), one per slab vector, not uniform.
    assert meta["config"]["position_norm"] is True and scoring["smoothing_mm"] == 6.0
    weights = load_file(str(tiny_model.json.with_suffix(".safetensors")))
    # 128/8, 128/8 and a slab scored on every slice of 48 (groups of 3: 46; the flow trains on 16)
    assert weights["nll_mean"].shape == weights["nll_std"].shape == (16, 16, 46)
    assert torch.isfinite(weights["nll_mean"]).all() and (weights["nll_std"] > 0).all()
    assert weights["nll_std"].max() > 1.2 * weights["nll_std"].min()

    checkpoint = json.loads((out / f"{name}.checkpoint.json").read_text())
    assert checkpoint["epoch"] == TINY_EPOCHS - 1
    assert [r["epoch"] for r in checkpoint["history"]] == list(range(1, TINY_EPOCHS + 1))
    tensors = load_file(str(out / f"{name}.checkpoint.safetensors"))
    assert any(k.startswith("model.flow.") for k in tensors) and any(k.startswith("optim.") for k in tensors)

    curves = matplotlib.image.imread(str(out / f"{name}.curves.png"))
    assert curves.ndim == 3 and curves.shape[0] > 100 and curves[..., :3].std() > 0.05


def test_encoder_weights_stay_the_imagenet_ones(tiny_model):
    """The encoder is frozen: the model file must hold the packaged ImageNet weights unchanged."""
    from SimpleSliceNetLib.encoder import EncoderConfig, build_backbone

    reference = build_backbone(EncoderConfig(), "imagenet").state_dict()
    saved = load_file(str(tiny_model.json.with_suffix(".safetensors")))
    changed = [k for k, v in reference.items() if not torch.equal(saved[f"encoder.backbone.{k}"], v)]
    assert changed == []


def test_detect_finds_the_planted_lesion(detect_run, synth_set):
    """`simpleslicenet detect` (the shared CLI run) on a glioma the model never saw, on an LPS anisotropic grid."""
    assert [e["input"] for e in detect_run.events if e["event"] == "output"][0] == str(detect_run.good["lps_nifti"])
    heat = load_volume(detect_run.out / "lps_glioma_heatmap.nii.gz").array
    brain = load_volume(detect_run.out / "lps_glioma_brainmask.nii.gz").array > 0
    lesion = load_volume(synth_set.test_mask).array > 0
    assert lesion[brain].sum() > 1000
    score = auroc(heat[brain], lesion[brain])
    assert score > 0.8, f"voxel AUROC {score:.3f}"
    assert heat[lesion & brain].mean() > heat[brain & ~lesion].mean() + 0.2


def test_stored_position_statistics_are_those_of_the_kept_flow(tiny_model, synth_set):
    """Recomputed from the training volumes with the model file's own flow, they match what it stores."""
    from SimpleSliceNetLib.detector import build_model
    from SimpleSliceNetLib.model_file import read_model_file
    from SimpleSliceNetLib.progress import Progress
    from SimpleSliceNetTraining import train
    from SimpleSliceNetTraining.datasets import load_cases
    from SimpleSliceNetTraining.distributed import Context

    net = build_model(read_model_file(tiny_model.json))
    stored = net.nll_mean.clone(), net.nll_std.clone()
    items = train._with_maps(net, load_cases(synth_set.manifest, split="train"), Progress("train", "none"))
    assert len(items) == 5
    train._position_statistics(net, items, Context())
    torch.testing.assert_close(net.nll_mean, stored[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(net.nll_std, stored[1], rtol=1e-4, atol=1e-5)


def test_position_statistics_from_volumes_the_flow_does_not_train_on(tiny_model, synth_set, tmp_path):
    """--position-stats: the stored statistics are those of the given volumes with the trained flow, not the
    training volumes'; the flow itself trains exactly as without the option."""
    from SimpleSliceNetLib.detector import build_model
    from SimpleSliceNetLib.model_file import read_model_file
    from SimpleSliceNetLib.progress import Progress
    from SimpleSliceNetTraining import train
    from SimpleSliceNetTraining.datasets import load_cases
    from SimpleSliceNetTraining.distributed import Context

    listing = tmp_path / "stats.txt"
    listing.write_text(f"{synth_set.val_healthy}\n{synth_set.train[0]}\n")
    base = ["--progress", "json", "train", "--train", str(synth_set.manifest), "--shape", "96,96,48", "--spacing",
            "2,2,3", "--epochs", "1", "--blocks", "2", "--device", "cpu", "--output-dir", str(tmp_path)]
    done = run_cli(*base, "--name", "with_stats", "--position-stats", str(listing))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "1 of the --position-stats volumes are training volumes too" in done.stdout
    model = read_model_file(tmp_path / "with_stats.json")
    assert model.training["position_stats_volumes"] == 2 and model.training["position_stats_source"] == str(listing)
    net = build_model(model)
    stored = net.nll_mean.clone(), net.nll_std.clone()
    for source, same in ((load_cases(listing, assume_healthy=True), True),
                         (load_cases(synth_set.manifest, split="train"), False)):
        items = train._with_maps(net, source, Progress("train", "none"))
        train._position_statistics(net, items, Context())
        assert torch.allclose(net.nll_mean, stored[0], rtol=1e-4, atol=1e-5) is same
        assert torch.allclose(net.nll_std, stored[1], rtol=1e-4, atol=1e-5) is same
    assert run_cli(*base, "--name", "plain").returncode == 0
    flow = {k: v for k, v in load_file(tmp_path / "with_stats.safetensors").items() if k.startswith("flow.")}
    plain = load_file(tmp_path / "plain.safetensors")
    assert flow and all(torch.equal(flow[k], plain[k]) for k in flow)
    assert not torch.equal(plain["nll_std"], load_file(tmp_path / "with_stats.safetensors")["nll_std"])


def test_scoring_every_slice_leaves_the_flows_training_as_it_was(synth_set, tmp_path):
    """--score-stride 1 (the default) against 3 (= the slab stride): the flow fits the same vectors at the
    same codes, so its weights are the same to the bit; detection scores three times the slabs, the
    trained ones as the tiling model does."""
    from SimpleSliceNetLib.detector import build_model, prepare_for_inference
    from SimpleSliceNetLib.model_file import read_model_file
    from SimpleSliceNetLib.preprocess import preprocess

    base = ["train", "--train", str(synth_set.manifest), "--shape", "96,96,48", "--spacing", "2,2,3",
            "--epochs", "1", "--blocks", "2", "--device", "cpu", "--output-dir", str(tmp_path)]
    for name, stride in (("every", "1"), ("tiling", "3")):
        done = run_cli(*base, "--name", name, "--score-stride", stride)
        assert done.returncode == 0, done.stderr[-2000:]
    every, tiling = (load_file(tmp_path / f"{name}.safetensors") for name in ("every", "tiling"))
    flow = [k for k in every if k.startswith("flow.") or k.startswith("feature_")]
    assert flow and all(torch.equal(every[k], tiling[k]) for k in flow)
    assert every["nll_mean"].shape == (12, 12, 46) and tiling["nll_mean"].shape == (12, 12, 16)
    nets = [build_model(read_model_file(tmp_path / f"{name}.json")) for name in ("every", "tiling")]
    assert [(n.config.score_stride, n.config.stride, n.config.fit_step) for n in nets] == [(1, 3, 3), (3, 3, 1)]
    for net in nets:
        prepare_for_inference(net, "cpu", None)  # detection's flow (GridFlow) and frozen encoder
    image = preprocess(load_volume(synth_set.train[0]), nets[0].config.preprocess).image
    features = nets[0].features(image)
    assert features.shape[2] == 46
    torch.testing.assert_close(features[:, :, ::3], nets[1].features(image), rtol=0, atol=0)
    # Detection scores the trained slabs as the tiling model does, and the slabs in between too.
    nll = nets[0].nll_grid(features)
    torch.testing.assert_close(nll[:, :, ::3], nets[1].nll_grid(features[:, :, ::3]), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(nll[:, :, 1::3], nll[:, :, ::3][:, :, :-1], rtol=1e-3, atol=1e-3)


def test_a_run_with_an_untrained_encoder_repeats_to_the_bit(synth_set, tmp_path):
    """--encoder-weights none: the encoder's random weights come from --seed as the flow's do (the same on
    every rank under torchrun), so the same command gives the same model."""
    base = ["train", "--train", str(synth_set.manifest), "--shape", "64,64,24", "--spacing", "3,3,6",
            "--epochs", "1", "--blocks", "2", "--device", "cpu", "--encoder-weights", "none",
            "--output-dir", str(tmp_path)]
    for name in ("first", "again"):
        done = run_cli(*base, "--name", name)
        assert done.returncode == 0, done.stderr[-2000:]
    first, again = (load_file(tmp_path / f"{name}.safetensors") for name in ("first", "again"))
    assert any(k.startswith("encoder.") for k in first) and any(k.startswith("flow.") for k in first)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_calibration_items_have_the_features_detection_sees(tiny_model, synth_set):
    from SimpleSliceNetLib.detector import build_model
    from SimpleSliceNetLib.devices import encoder_autocast
    from SimpleSliceNetLib.model_file import read_model_file
    from SimpleSliceNetLib.preprocess import preprocess
    from SimpleSliceNetLib.progress import Progress
    from SimpleSliceNetTraining import train
    from SimpleSliceNetTraining.datasets import load_cases

    net = build_model(read_model_file(tiny_model.json))
    case = load_cases(synth_set.manifest, split="train")[0]
    items = train._with_maps(net, [case], Progress("train", "none"))
    cast = encoder_autocast(net.config.scoring.encoder_precision)  # what training and detection use
    expected = net.features(preprocess(load_volume(case.image), net.config.preprocess).image, cast)
    torch.testing.assert_close(items[0].features, expected)


def test_resume_continues_from_the_checkpoint(tiny_model, tmp_path):
    out = tmp_path / "resumed"
    out.mkdir()
    name = tiny_model.name
    for suffix in (".checkpoint.json", ".checkpoint.safetensors"):
        shutil.copy(tiny_model.output_dir / f"{name}{suffix}", out)
    args = list(tiny_model.train_args)
    args[args.index("--output-dir") + 1] = str(out)
    args[args.index("--epochs") + 1] = str(TINY_EPOCHS + 1)
    result = run_cli(*args, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert any(e["event"] == "message" and f"resuming after epoch {TINY_EPOCHS - 1}" in e["message"] for e in events)
    assert [e["epoch"] for e in events if e["event"] == "metric"] == [TINY_EPOCHS + 1]  # only the new epoch ran
    old = _history(tiny_model.output_dir / f"{name}.history.csv")
    new = _history(out / f"{name}.history.csv")
    assert [int(r["epoch"]) for r in new] == list(range(1, TINY_EPOCHS + 2))
    for before, after in zip(old, new[:-1], strict=True):
        assert float(after["loss"]) == pytest.approx(float(before["loss"]))
        assert float(after["val_auroc"]) == pytest.approx(float(before["val_auroc"]))
    assert json.loads((out / f"{name}.checkpoint.json").read_text())["epoch"] == TINY_EPOCHS
    meta = json.loads((out / f"{name}.json").read_text())
    assert meta["training"]["epochs_run"] == TINY_EPOCHS + 1

    from SimpleSliceNetLib.detector import Detector

    Detector.load(str(out / f"{name}.json"), "cpu")  # the resumed model loads (checksum, strict weights)
