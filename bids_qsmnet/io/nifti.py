"""NIfTI loading with the checks QSM needs, and atomic writing.

Every error names the file and what is wrong, so a user can fix the input without reading a
traceback.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["InputError", "load_volume", "save_volume", "atomic_path"]


class InputError(ValueError):
    """An input file is unusable; the message names the file and the problem."""


def load_volume(path: str | os.PathLike, *, what: str = "volume", allow_nonfinite: bool = False):
    """Load a 3-D NIfTI volume as float32 plus its image.

    Parameters
    ----------
    path : NIfTI file (``.nii`` or ``.nii.gz``)
    what : what the file is, for error messages ("local field", "mask", …)
    allow_nonfinite : accept NaN/Inf voxels (they are refused by default)

    Returns
    -------
    data : (X, Y, Z) float32 ndarray
    img : nibabel image (header and affine)
    """
    import nibabel as nib

    path = os.fspath(path)
    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj, dtype=np.float32)
    except FileNotFoundError:
        raise InputError(f"{path}: {what} file does not exist") from None
    except Exception as exc:  # nibabel raises many types for truncated/corrupt files
        raise InputError(f"{path}: cannot read the {what} as NIfTI ({exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{path}: the {what} must be a 3-D volume, got shape {data.shape}"
                         + (" (an echo or time series?)" if data.ndim == 4 else ""))
    affine = img.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(f"{path}: degenerate affine (zero or non-finite voxel scaling)")
    if not allow_nonfinite and not np.all(np.isfinite(data)):
        n = int((~np.isfinite(data)).sum())
        raise InputError(f"{path}: the {what} contains {n} NaN/Inf voxels")
    return data, img


def atomic_path(path: str | os.PathLike) -> str:
    """A temporary sibling name for ``path`` that keeps its extension (``x.tmp123.nii.gz``)."""
    path = os.fspath(path)
    d, b = os.path.split(path)
    stem, ext = (b[:-7], ".nii.gz") if b.endswith(".nii.gz") else os.path.splitext(b)
    return os.path.join(d, f".{stem}.tmp{os.getpid()}{ext}")


def save_volume(data: np.ndarray, reference, path: str | os.PathLike, *, dtype=np.float32) -> str:
    """Write ``data`` with the reference image's affine, qform and sform, atomically.

    ``reference`` is a nibabel image (or an affine array).  Returns ``path``.
    """
    import nibabel as nib

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if hasattr(reference, "affine"):
        hdr = reference.header.copy()
        img = nib.Nifti1Image(np.asarray(data, dtype=dtype), reference.affine, hdr)
        img.set_data_dtype(dtype)
        q, qcode = reference.header.get_qform(coded=True)
        s, scode = reference.header.get_sform(coded=True)
        img.set_qform(q if q is not None else reference.affine, int(qcode or 1))
        img.set_sform(s if s is not None else reference.affine, int(scode or 1))
        img.header["scl_slope"], img.header["scl_inter"] = 1.0, 0.0
    else:
        img = nib.Nifti1Image(np.asarray(data, dtype=dtype), np.asarray(reference))
    tmp = atomic_path(path)
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
