"""Reading and writing 3D volumes (NIfTI, NRRD) with their RAS affines, atomically.

Every array here is indexed (i, j, k) in file order and paired with a 4x4 affine that maps
voxel indices to RAS millimetres, as nibabel does. NRRD stores LPS directions; they are
converted on the way in and out.
"""

from __future__ import annotations

import gzip
import os
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from isal import igzip, isal_zlib

from .errors import VolumeError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + NRRD_SUFFIXES
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """A 3D scalar volume: ``array[i, j, k]`` and the voxel-to-RAS ``affine``."""

    array: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3])) / 1000.0)


def volume_stem(path: str | os.PathLike) -> str:
    """File name without its volume suffix: ``case.nii.gz`` -> ``case``."""
    name = Path(path).name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def is_volume_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(VOLUME_SUFFIXES)


def load_volume(path: str | os.PathLike, *, allow_nonfinite: bool = False) -> Volume:
    """Load a 3D NIfTI or NRRD volume as float32 with its RAS affine.

    Raises :class:`VolumeError` with a one-line message for every kind of unusable file.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: file not found; check the path")
    if path.is_dir():
        raise VolumeError(f"{path}: is a folder, not a volume file")
    if not is_volume_path(path):
        raise VolumeError(
            f"{path}: not a volume file name; expected one of {', '.join(VOLUME_SUFFIXES)}"
        )
    import nrrd

    try:
        if path.name.lower().endswith(NRRD_SUFFIXES):
            array, affine = _read_nrrd(path)
        else:
            array, affine = _read_nifti(path)
    except VolumeError:
        raise
    except (OSError, EOFError, zlib.error, isal_zlib.error, gzip.BadGzipFile, ValueError, KeyError, TypeError,
            nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError, nib.wrapstruct.WrapStructError,
            nrrd.errors.NRRDError) as exc:
        raise VolumeError(f"{path}: cannot be read as a volume ({_short(exc)}); is the file complete?") from exc
    return Volume(_checked_array(path, array, allow_nonfinite), _checked_affine(path, affine))


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else type(exc).__name__


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.name.lower().endswith(".gz"):
        image = nib.load(str(path))
        if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
            raise VolumeError(f"{path}: not a NIfTI image")
        return _squeeze_to_3d(path, np.asanyarray(image.dataobj)), image.affine
    # Decompressed by ISA-L straight into the array: half the time of nibabel's zlib reader (reading
    # was a tenth of a detection).
    with igzip.open(path, "rb") as stream:
        nifti2 = nib.Nifti2Header.may_contain_header(stream.read(nib.Nifti2Header.sizeof_hdr))
        stream.seek(0)
        image = (nib.Nifti2Image if nifti2 else nib.Nifti1Image).from_stream(stream)
        array = np.asanyarray(image.dataobj)
    return _squeeze_to_3d(path, array), image.affine


def _read_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nrrd

    array, header = nrrd.read(str(path))
    array = _squeeze_to_3d(path, array)
    directions = header.get("space directions")
    if directions is None:
        matrix = np.eye(3)
    else:
        rows = [np.asarray(d, dtype=float) for d in directions if d is not None and not np.all(np.isnan(d))]
        if len(rows) != 3:
            raise VolumeError(f"{path}: NRRD has {len(rows)} spatial axes; expected a 3D volume")
        matrix = np.stack(rows, axis=1)
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=float)
    affine = np.eye(4)
    affine[:3, :3] = matrix
    affine[:3, 3] = origin
    space = str(header.get("space", "left-posterior-superior")).lower()
    if space in ("left-posterior-superior", "lps"):
        affine = LPS_TO_RAS @ affine
    elif space not in ("right-anterior-superior", "ras"):
        raise VolumeError(f"{path}: NRRD space '{space}' is not supported; save it in LPS or RAS")
    return array, affine


def _squeeze_to_3d(path: Path, array: np.ndarray) -> np.ndarray:
    if array.dtype.names is not None or np.iscomplexobj(array):
        raise VolumeError(f"{path}: voxels are not scalar (RGB or complex); give a scalar MRI volume")
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim == 5 and array.shape[3:] == (1, 1):
        array = array[..., 0, 0]
    if array.ndim == 4:
        raise VolumeError(
            f"{path}: 4D image with {array.shape[3]} volumes; give one 3D volume (split it first)"
        )
    if array.ndim != 3:
        raise VolumeError(f"{path}: {array.ndim}D image of shape {array.shape}; a 3D volume is required")
    return array


def _checked_array(path: Path, array: np.ndarray, allow_nonfinite: bool) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    if min(array.shape) < 8:
        raise VolumeError(
            f"{path}: volume of shape {array.shape} is too small (at least 8 voxels along each axis)"
        )
    if not allow_nonfinite and not np.isfinite(array).all():
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise VolumeError(f"{path}: {bad} voxels are NaN or infinite; fix or mask them before detection")
    return array


def _checked_affine(path: Path, affine: np.ndarray) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise VolumeError(f"{path}: the voxel-to-world transform is not a finite 4x4 matrix")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(spacing < 0.05) or np.any(spacing > 20.0) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise VolumeError(
            f"{path}: voxel spacing {np.round(spacing, 4).tolist()} mm is outside 0.05-20 mm; "
            "check the header's pixel dimensions"
        )
    return affine


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the real suffix so writers that dispatch on it (nibabel, matplotlib) still work.
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates owner-only files; give the result the usual permissions (umask applies).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_volume(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray) -> Path:
    """Write ``array`` with ``affine`` to NIfTI or NRRD (chosen by suffix), atomically."""
    path = Path(path)
    if array.ndim != 3:
        raise ValueError(f"save_volume needs a 3D array, got shape {array.shape}")
    with atomic_path(path) as tmp:
        if path.name.lower().endswith(NRRD_SUFFIXES):
            _write_nrrd(tmp, array, affine)
        else:
            image = nib.Nifti1Image(array, affine)
            image.set_qform(affine, code=1)
            image.set_sform(affine, code=1)
            image.header.set_xyzt_units("mm", "sec")
            if path.name.lower().endswith(".gz"):
                # ISA-L writes the same gzip format about 3x faster than zlib at a similar size (level 1, like
                # nibabel's), streamed from nibabel: writing the heatmap was a tenth of a detection.
                with igzip.open(tmp, "wb", compresslevel=1) as stream:
                    image.to_stream(stream)
            else:
                nib.save(image, str(tmp))
    return path


def _write_nrrd(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    import nrrd

    lps = LPS_TO_RAS @ np.asarray(affine, dtype=float)
    header = {
        "space": "left-posterior-superior",
        "space directions": lps[:3, :3].T,
        "space origin": lps[:3, 3],
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
    }
    nrrd.write(str(path), np.ascontiguousarray(array), header, index_order="F")
