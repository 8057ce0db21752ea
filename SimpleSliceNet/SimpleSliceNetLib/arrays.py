"""Array helpers that read memory in order (nibabel's volumes are Fortran-ordered, numpy's C order
is the default: visiting one in the other's order is several times slower)."""

from __future__ import annotations

import numpy as np


def memory_order(array: np.ndarray) -> str:
    """"F" for a Fortran-ordered array, else "C"."""
    return "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"


def nonzero_in_memory_order(mask: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """The flat positions (in ``mask``'s memory order) and the indices of its true voxels.

    3-30x faster than ``np.nonzero`` on a Fortran-ordered volume; the voxels come in memory order.
    """
    order = memory_order(mask)
    flat = np.flatnonzero(mask.ravel(order=order))
    return flat, np.unravel_index(flat, mask.shape, order=order)


def values_at(array: np.ndarray, where: np.ndarray) -> np.ndarray:
    """``array``'s values at ``where``'s true voxels, in ``where``'s memory order (that of
    ``nonzero_in_memory_order``): a boolean gather over flat views, several times faster than
    indexing the volume with the mask."""
    order = memory_order(where)
    return array.ravel(order=order)[where.ravel(order=order)]


def filled_at(where: np.ndarray, values: np.ndarray) -> np.ndarray:
    """A float32 volume laid out like ``where``: ``values`` (in ``where``'s memory order) at its true
    voxels, 0 elsewhere."""
    order = memory_order(where)
    out = np.zeros(where.shape, dtype=np.float32, order=order)
    np.place(out.ravel(order=order), where.ravel(order=order), values)
    return out
