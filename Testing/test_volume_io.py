"""Volume I/O: NIfTI and NRRD round trips with RAS affines, LPS conversion, atomic writes, clear errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
from conftest import grid_affine, rotation

from SimpleSliceNetLib.errors import UserError, VolumeError
from SimpleSliceNetLib.volume_io import (
    LPS_TO_RAS,
    Volume,
    atomic_path,
    is_volume_path,
    load_volume,
    save_volume,
    volume_stem,
)

SHAPE = (20, 24, 16)
AFFINES = {
    "ras_1mm": grid_affine(SHAPE, (1.0, 1.0, 1.0)),
    "lps": grid_affine(SHAPE, (0.9, 0.9, 2.5), np.diag([-1.0, -1.0, 1.0])),
    "oblique_aniso": grid_affine(SHAPE, (1.0, 1.2, 3.0), rotation((0.3, -0.5, 0.8), 12.0), (4.0, -7.0, 21.0)),
    "permuted": grid_affine(SHAPE, (1.0, 1.0, 1.0), np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], dtype=float)),
}


def _array(shape=SHAPE, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(1.0, 500.0, shape).astype(np.float32)


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray = AFFINES["ras_1mm"]) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def _assert_one_line_naming(exc: pytest.ExceptionInfo, path: Path, *words: str) -> None:
    message = str(exc.value)
    assert "\n" not in message
    assert str(path) in message
    for word in words:
        assert word.lower() in message.lower(), message


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd"])
@pytest.mark.parametrize("orientation", sorted(AFFINES))
def test_round_trip_keeps_array_and_ras_affine(tmp_path, suffix, orientation):
    array, affine = _array(), AFFINES[orientation]
    path = save_volume(tmp_path / f"case{suffix}", array, affine)
    loaded = load_volume(path)
    assert loaded.array.dtype == np.float32
    np.testing.assert_array_equal(loaded.array, array)
    np.testing.assert_allclose(loaded.affine, affine, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"case{suffix}"]  # no temporary files left


@pytest.mark.parametrize("image_class", [nib.Nifti1Image, nib.Nifti2Image])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
@pytest.mark.parametrize("byteorder", ["<", ">"])
def test_nifti_written_by_other_tools(tmp_path, image_class, suffix, byteorder):
    """NIfTI-1 and NIfTI-2 files of either byte order, as nibabel writes them, read with their array and
    affine (the .nii.gz reader tells the two formats apart by the header size itself)."""
    array, affine = _array(), AFFINES["oblique_aniso"]
    path = tmp_path / f"case{suffix}"
    nib.save(image_class(array, affine, header=image_class.header_class(endianness=byteorder)), str(path))
    assert nib.load(str(path)).header.endianness == byteorder
    loaded = load_volume(path)
    np.testing.assert_array_equal(loaded.array, array)
    np.testing.assert_allclose(loaded.affine, affine, atol=1e-5)


def test_nrrd_is_stored_in_lps_and_nifti_in_ras(tmp_path):
    affine = AFFINES["oblique_aniso"]
    save_volume(tmp_path / "a.nrrd", _array(), affine)
    save_volume(tmp_path / "a.nii.gz", _array(), affine)
    _, header = nrrd.read(str(tmp_path / "a.nrrd"))
    assert header["space"] == "left-posterior-superior"
    lps = LPS_TO_RAS @ affine
    np.testing.assert_allclose(np.asarray(header["space directions"], float).T, lps[:3, :3], atol=1e-5)
    np.testing.assert_allclose(header["space origin"], lps[:3, 3], atol=1e-5)
    image = nib.load(str(tmp_path / "a.nii.gz"))
    np.testing.assert_allclose(image.affine, affine, atol=1e-5)
    assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1
    assert image.header.get_xyzt_units()[0] == "mm"
    # The same voxel lands on the same world point through either file.
    index = np.array([3, 17, 9, 1.0])
    np.testing.assert_allclose(load_volume(tmp_path / "a.nrrd").affine @ index,
                               load_volume(tmp_path / "a.nii.gz").affine @ index, atol=1e-4)


def test_nrrd_from_other_tools_lps_and_ras_spaces(tmp_path):
    array = _array()
    directions = np.diag([0.8, 0.9, 2.0])
    origin = np.array([10.0, 20.0, -30.0])
    nrrd.write(str(tmp_path / "lps.nrrd"), array, {"space": "left-posterior-superior", "space directions": directions,
                                                    "space origin": origin}, index_order="F")
    nrrd.write(str(tmp_path / "ras.nrrd"), array, {"space": "right-anterior-superior", "space directions": directions,
                                                    "space origin": origin}, index_order="F")
    lps = load_volume(tmp_path / "lps.nrrd")
    ras = load_volume(tmp_path / "ras.nrrd")
    np.testing.assert_array_equal(lps.array, array)
    # LPS x and y point the other way in RAS.
    np.testing.assert_allclose(lps.affine[:3, :3], np.diag([-0.8, -0.9, 2.0]))
    np.testing.assert_allclose(lps.affine[:3, 3], [-10.0, -20.0, -30.0])
    np.testing.assert_allclose(ras.affine[:3, :3], directions)
    np.testing.assert_allclose(ras.affine[:3, 3], origin)


def test_nrrd_in_an_unsupported_space_is_refused(tmp_path):
    path = tmp_path / "scanner.nrrd"
    nrrd.write(str(path), _array(), {"space": "scanner-xyz", "space directions": np.eye(3)}, index_order="F")
    with pytest.raises(VolumeError) as exc:
        load_volume(path)
    _assert_one_line_naming(exc, path, "space")


def test_spacing_and_voxel_volume_of_an_oblique_anisotropic_grid():
    volume = Volume(_array(), AFFINES["oblique_aniso"])
    np.testing.assert_allclose(volume.spacing, [1.0, 1.2, 3.0], atol=1e-9)
    assert volume.voxel_volume_ml == pytest.approx(3.6e-3)


def test_trailing_singleton_axes_are_squeezed(tmp_path):
    array = _array()
    path = _nifti(tmp_path / "single.nii.gz", array[..., None])
    loaded = load_volume(path)
    assert loaded.array.shape == SHAPE
    np.testing.assert_array_equal(loaded.array, array)


def test_mask_dtype_is_kept_on_disk(tmp_path):
    mask = (_array() > 250).astype(np.uint8)
    path = save_volume(tmp_path / "sub" / "mask.nii.gz", mask, AFFINES["lps"])  # parent folder is created
    assert nib.load(str(path)).get_data_dtype() == np.uint8
    np.testing.assert_array_equal(load_volume(path).array, mask)


def test_volume_stem_and_suffixes():
    assert volume_stem("/a/b/case.nii.gz") == "case"
    assert volume_stem("case.v2.NII.GZ") == "case.v2"
    assert volume_stem("x.nrrd") == "x"
    assert volume_stem("x.nhdr") == "x"
    assert is_volume_path("A.NII") and is_volume_path("b.nrrd") and not is_volume_path("c.png")


# --- unusable files: one clear line naming the file ---------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "absent.nii.gz"
    with pytest.raises(VolumeError) as exc:
        load_volume(path)
    _assert_one_line_naming(exc, path, "not found")


def test_folder_and_wrong_suffix(tmp_path):
    with pytest.raises(VolumeError) as exc:
        load_volume(tmp_path)
    _assert_one_line_naming(exc, tmp_path, "folder")
    png = tmp_path / "picture.png"
    png.write_bytes(b"\x89PNG\r\n")
    with pytest.raises(VolumeError) as exc:
        load_volume(png)
    _assert_one_line_naming(exc, png, ".nii.gz")


@pytest.mark.parametrize("name", ["notes.nii.gz", "notes.nii", "notes.nrrd"])
def test_text_file_named_like_a_volume(tmp_path, name):
    path = tmp_path / name
    path.write_text("this is not an image\n" * 40)
    with pytest.raises(VolumeError) as exc:
        load_volume(path)
    _assert_one_line_naming(exc, path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.nii.gz"
    path.write_bytes(b"")
    with pytest.raises(VolumeError) as exc:
        load_volume(path)
    _assert_one_line_naming(exc, path)


def test_truncated_gzip(tmp_path):
    path = _nifti(tmp_path / "cut.nii.gz", _array((40, 40, 40)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeError) as exc:
        load_volume(path)
    _assert_one_line_naming(exc, path, "complete")


def test_gzip_of_garbage(tmp_path):
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(gzip.compress(b"\x00\x01garbage" * 100))
    with pytest.raises(VolumeError) as exc:
        load_volume(path)
    _assert_one_line_naming(exc, path)


def test_2d_image(tmp_path):
    path = _nifti(tmp_path / "slice.nii.gz", _array((64, 64)))
    with pytest.raises(VolumeError) as exc:
        load_volume(path)
    _assert_one_line_naming(exc, path, "2D", "3D")


def test_4d_with_several_volumes(tmp_path):
    path = _nifti(tmp_path / "series.nii.gz", _array((16, 16, 16, 3)))
    with pytest.raises(VolumeError) as exc:
        load_volume(path)
    _assert_one_line_naming(exc, path, "4D", "3 volumes")


def test_4d_nrrd_with_several_volumes(tmp_path):
    path = tmp_path / "series.nrrd"
    directions = np.vstack([np.full((1, 3), np.nan), np.eye(3)])
    header = {"space": "left-posterior-superior", "kinds": ["vector", "domain", "domain", "domain"],
              "space directions": directions}
    nrrd.write(str(path), _array((3, 16, 16, 16)), header, index_order="F")
    with pytest.raises(VolumeError) as exc:
        load_volume(path)
    _assert_one_line_naming(exc, path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels(tmp_path, bad):
    array = _array()
    array[3, 4, 5] = bad
    array[6, 7, 8] = bad
    path = _nifti(tmp_path / "nan.nii.gz", array)
    with pytest.raises(VolumeError) as exc:
        load_volume(path)
    _assert_one_line_naming(exc, path, "2 voxels", "NaN")
    loaded = load_volume(path, allow_nonfinite=True)
    assert int((~np.isfinite(loaded.array)).sum()) == 2


def test_tiny_volume(tmp_path):
    path = _nifti(tmp_path / "tiny.nii.gz", _array((4, 4, 4)))
    with pytest.raises(VolumeError) as exc:
        load_volume(path)
    _assert_one_line_naming(exc, path, "too small")


@pytest.mark.parametrize("spacing", [100.0, 0.001])
def test_extreme_spacing(tmp_path, spacing):
    path = _nifti(tmp_path / "spacing.nii.gz", _array(), np.diag([1.0, 1.0, spacing, 1.0]))
    with pytest.raises(VolumeError) as exc:
        load_volume(path)
    _assert_one_line_naming(exc, path, "spacing")


def test_rgb_voxels_are_refused(tmp_path):
    rgb = np.zeros((16, 16, 16), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    path = tmp_path / "rgb.nii.gz"
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(path))
    with pytest.raises(VolumeError) as exc:
        load_volume(path)
    _assert_one_line_naming(exc, path, "scalar")


def test_volume_error_is_a_user_error():
    assert issubclass(VolumeError, UserError)


# --- atomic writes ------------------------------------------------------------------------------


def test_atomic_path_leaves_old_file_untouched_on_failure(tmp_path):
    target = tmp_path / "out.nii.gz"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        assert tmp.name.endswith(".nii.gz")  # writers that dispatch on the suffix still work
        tmp.write_bytes(b"half written")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]


@pytest.mark.parametrize("name", ["heat.nii.gz", "heat.nii"])
def test_failed_save_leaves_no_file(tmp_path, monkeypatch, name):
    def broken_save(image, filename):
        Path(filename).write_bytes(b"partial")
        raise OSError("no space left on device")

    def broken_stream(self, stream):
        stream.write(b"partial" * 100)
        raise OSError("no space left on device")

    monkeypatch.setattr(nib, "save", broken_save)  # the .nii writer
    monkeypatch.setattr(nib.Nifti1Image, "to_stream", broken_stream)  # the .nii.gz writer
    with pytest.raises(OSError):
        save_volume(tmp_path / name, _array(), np.eye(4))
    assert list(tmp_path.iterdir()) == []


def test_saved_nifti_gz_is_plain_gzip_with_the_exact_grid(tmp_path):
    affine = np.array([[-0.9, 0.1, 0.0, 91.0], [0.0, 1.1, -0.2, -120.0], [0.05, 0.0, 2.5, -70.0], [0, 0, 0, 1]])
    array = _array()
    path = save_volume(tmp_path / "heat.nii.gz", array, affine)
    with gzip.open(path) as raw:  # the standard library reads it: ordinary gzip
        assert raw.read(348)[344:348] == b"n+1\x00"  # a single-file NIfTI-1 header
    image = nib.load(path)
    np.testing.assert_array_equal(np.asarray(image.dataobj), array)
    np.testing.assert_allclose(image.affine, affine, atol=1e-6)
    assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1
