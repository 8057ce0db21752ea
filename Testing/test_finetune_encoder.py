"""`simpleslicenet finetune-encoder` (EDC): slices from volumes, Br35H-style image folders and the
generator; the loss; the written encoder file loads into the detector's backbone and its sidecar is
verified by the loader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import grid_affine, phantom, run_cli
from PIL import Image

from SimpleSliceNetLib.cli import main
from SimpleSliceNetLib.encoder import EncoderConfig, build_backbone, sha256_file
from SimpleSliceNetLib.errors import UserError
from SimpleSliceNetLib.preprocess import PreprocessConfig
from SimpleSliceNetLib.progress import Progress
from SimpleSliceNetLib.volume_io import save_volume
from SimpleSliceNetTraining import finetune_encoder as fe

TINY = ["--shape", "64,64,16", "--spacing", "3,3,9", "--batch-size", "2", "--device", "cpu"]


def _events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def volume_run(tmp_path_factory):
    """A 3-step fine-tuning on two phantom volumes through the real CLI (subprocess)."""
    root = tmp_path_factory.mktemp("edc_volumes")
    (root / "vols").mkdir()
    shape, spacing = (64, 80, 48), (2.5, 2.5, 2.5)
    for index, shift in enumerate((0.0, 6.0)):
        affine = grid_affine(shape, spacing, centre_ras=(shift, 0.0, 10.0))
        save_volume(root / "vols" / f"healthy_{index}.nii.gz", phantom(shape, affine), affine)
    out = root / "enc.safetensors"
    result = run_cli("--progress", "json", "finetune-encoder", "--out", str(out), *TINY, "--steps", "3",
                     str(root / "vols"))
    return out, result


def test_volume_run_writes_a_fine_tuned_encoder_that_loads_into_the_detector_backbone(volume_run):
    out, result = volume_run
    assert result.returncode == 0, result.stderr[-3000:]
    events = _events(result.stdout)
    metrics = [e for e in events if e["event"] == "metric"]
    assert [e["step"] for e in metrics] == [1, 2, 3]
    # Three levels, each 1 - cosine in [0, 2].
    assert all(len(e["levels"]) == 3 and all(0.0 <= v <= 2.0 for v in e["levels"]) for e in metrics)
    assert next(e for e in events if e["event"] == "output")["files"]["encoder"] == str(out)

    info = json.loads(out.with_suffix(".json").read_text())
    assert info["format"] == "simpleslicenet-encoder" and info["format_version"] == 1
    assert info["backbone"] == "tf_efficientnet_lite0" and info["taps"] == [2, 3]
    assert info["levels"] == [1, 2, 3] and info["bottleneck"] == 4 and info["steps"] == 3
    assert info["source"]["kind"] == "volumes" and info["source"]["volumes"] == 2
    assert info["sha256"] == sha256_file(out) and info["seconds"] > 0
    assert info["preprocess"]["shape"] == [64, 64, 16]

    config = EncoderConfig(taps=(2, 3))
    tuned = build_backbone(config, str(out)).state_dict()
    start = build_backbone(config, "imagenet").state_dict()
    assert tuned.keys() == start.keys()
    floats = [k for k, v in start.items() if v.is_floating_point()]
    changed = [k for k in floats if not torch.equal(tuned[k], start[k])]
    # AdamW moves every parameter and the BatchNorm statistics follow the MRI slices; small steps only.
    assert len(changed) > 0.9 * len(floats)
    assert max((tuned[k] - start[k]).abs().max().item() for k in floats if k.endswith("weight")) < 0.05


def test_loader_verifies_the_sidecar(volume_run, tmp_path):
    out, result = volume_run
    assert result.returncode == 0, result.stderr[-3000:]
    weights, sidecar = tmp_path / "copy.safetensors", tmp_path / "copy.json"
    shutil.copy(out, weights)
    shutil.copy(out.with_suffix(".json"), sidecar)
    config = EncoderConfig(taps=(2, 3))
    build_backbone(config, str(weights))

    mismatch = "for backbone 'tf_efficientnet_lite0'.*not 'resnet18'; use --backbone tf_efficientnet_lite0"
    with pytest.raises(UserError, match=mismatch):
        build_backbone(EncoderConfig(backbone="resnet18", taps=(2, 3)), str(weights))

    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # inside the tensor data: still a readable safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="SHA-256 differs from the one in copy.json"):
        build_backbone(config, str(weights))
    sidecar.unlink()  # without its sidecar there is nothing to verify against
    build_backbone(config, str(weights))


def _brain_png(path: Path, seed: int, size=(150, 120)) -> None:
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[: size[1], : size[0]]
    inside = ((rows - size[1] / 2) / (size[1] * 0.4)) ** 2 + ((cols - size[0] / 2) / (size[0] * 0.35)) ** 2 <= 1
    image = np.where(inside, 90 + 60 * np.sin(cols / 7.0) * np.cos(rows / 5.0) + rng.normal(0, 5, inside.shape), 0)
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).convert("RGB").save(path)


def test_br35h_layout_uses_only_no(tmp_path, capsys):
    for folder in ("no", "yes"):
        (tmp_path / "br35h" / folder).mkdir(parents=True)
    for index in range(3):
        _brain_png(tmp_path / "br35h" / "no" / f"no{index}.png", index)
    # Tumour images that cannot even be decoded: reading one would fail the run.
    for index in range(4):
        (tmp_path / "br35h" / "yes" / f"y{index}.jpg").write_bytes(b"not an image")
    (tmp_path / "br35h" / "no" / "notes.txt").write_text("not an image suffix: ignored")
    out = tmp_path / "br.safetensors"
    code = main(["--progress", "none", "finetune-encoder", "--out", str(out), *TINY, "--steps", "2",
                 str(tmp_path / "br35h")])
    assert code == 0, capsys.readouterr().err[-2000:]
    source = json.loads(out.with_suffix(".json").read_text())["source"]
    assert source == {"kind": "br35h", "path": str(tmp_path / "br35h"), "images": 3, "slices": 3}


def test_image_slices_are_oriented_and_normalised_like_model_slices(tmp_path):
    # Radiological display: top = anterior, left = the patient's right. The model's axial slice is
    # indexed (x towards the right, y towards anterior), so the top-left corner lands at high x, high y.
    image = np.zeros((64, 64), np.uint8)
    image[8:56, 8:56] = 100
    image[10:14, 10:14] = 250
    Image.fromarray(image).save(tmp_path / "a.png")
    config = PreprocessConfig(shape=(32, 32, 8))
    s = fe.image_to_slice(tmp_path / "a.png", config)
    assert s.shape == (32, 32) and s.dtype == np.float32
    assert 0.0 <= s.min() and s.max() == 1.0 and s[0, 0] == 0.0
    x, y = np.unravel_index(np.argmax(s), s.shape)
    assert x >= 24 and y >= 24


def test_synthetic_source_is_seeded():
    config = PreprocessConfig(shape=(32, 32, 16), spacing=(6.0, 6.0, 9.0))
    make = [fe.synth_slices(1, 5, ("mni152_nilearn",), config, 100, np.random.default_rng(0), Progress("t", "none"))
            for _ in range(2)]
    assert make[0].source == {"kind": "synth", "seed": 5, "templates": ["mni152_nilearn"], "volumes": 1,
                              "slices": len(make[0].slices)}
    assert 5 <= len(make[0].slices) <= 16 and make[0].slices.shape[1:] == (32, 32)
    np.testing.assert_array_equal(make[0].slices, make[1].slices)
    assert make[0].slices.min() == 0.0 and make[0].slices.max() == 1.0


def test_edc_loss_is_cosine_distance_with_stopped_targets():
    encoded = [torch.randn(2, 4, 6, 6, requires_grad=True) for _ in range(3)]
    same, parts = fe.edc_loss(encoded, [e.detach().clone().requires_grad_() for e in encoded])
    assert same.item() == pytest.approx(0.0, abs=1e-6) and parts == pytest.approx([0.0] * 3, abs=1e-6)
    decoded = [(-2.0 * e.detach()).requires_grad_() for e in encoded]
    loss, parts = fe.edc_loss(encoded, decoded)
    assert loss.item() == pytest.approx(6.0) and parts == pytest.approx([2.0] * 3)
    loss.backward()
    assert all(e.grad is None for e in encoded) and all(d.grad is not None for d in decoded)


def test_default_levels_are_the_three_stages_before_the_deepest():
    assert fe.default_levels(5) == (1, 2, 3)
    assert fe.default_levels(4) == (0, 1, 2)
    with pytest.raises(UserError, match="at least 4"):
        fe.default_levels(3)


def test_wrong_br35h_layout_is_a_one_line_cli_error(tmp_path):
    (tmp_path / "data" / "yes").mkdir(parents=True)
    _brain_png(tmp_path / "data" / "yes" / "y0.png", 0)
    result = run_cli("finetune-encoder", "--out", str(tmp_path / "e.safetensors"), "--device", "cpu",
                     str(tmp_path / "data"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "no 'no/' subfolder" in errors[0] and str(tmp_path / "data") in errors[0]
    assert not (tmp_path / "e.safetensors").exists()


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("empty_no", "no: no images ("),
        ("no_volumes", "no usable cases found"),
        ("lesion_only", "only lesion volumes found"),
        ("bad_out", "must end in .safetensors"),
    ],
)
def test_wrong_sources_give_clear_errors(tmp_path, capsys, layout, message):
    out, source, extra = tmp_path / "e.safetensors", tmp_path / "src", []
    source.mkdir()
    if layout == "empty_no":
        (source / "no").mkdir()
    elif layout == "lesion_only":
        affine = grid_affine((48, 56, 40), (3.0, 3.0, 3.0))
        save_volume(source / "case.nii.gz", phantom((48, 56, 40), affine), affine)
        save_volume(source / "case_mask.nii.gz", np.ones((48, 56, 40), np.uint8), affine)
    elif layout == "bad_out":
        out = tmp_path / "e.pth"
    code = main(["--progress", "none", "finetune-encoder", "--out", str(out), *TINY, *extra, str(source)])
    assert code == 1
    assert message in capsys.readouterr().err
    assert not out.exists()
