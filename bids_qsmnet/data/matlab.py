"""Volumes from MATLAB ``.mat`` files (the original QSMnet tutorial's data layout).

The tutorial keeps its data as ``phs_tissue.mat`` (local field) and ``chi_cosmos.mat`` (COSMOS
label), written by MATLAB either as v5 files (read with :func:`scipy.io.loadmat`) or as v7.3
files, which are HDF5 (read with h5py).  MATLAB stores arrays column-major, and h5py shows a
v7.3 array with its axes reversed, so those are transposed back to MATLAB's ``(x, y, z)``.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["load_mat_volume", "TUTORIAL_KEYS"]

#: variable names used in the tutorial's files, tried in order when no key is given
TUTORIAL_KEYS = (
    "phs_tissue",
    "chi_cosmos",
    "multiphs",
    "multicos",
    "phs",
    "chi",
    "mask",
    "msk",
    "sus",
    "field",
    "label",
)


#: MATLAB classes of v7.3 variables that are not numeric arrays
_NON_NUMERIC_CLASSES = {"char", "cell", "struct", "function_handle", "string", "table"}


def _is_hdf5(path: str) -> bool:
    import h5py

    with open(path, "rb") as fh:
        head = fh.read(128)
    # h5py also finds the HDF5 signature behind a user block of any size (MATLAB: 512 bytes)
    return head.startswith(b"MATLAB 7.3") or h5py.is_hdf5(path)


def _read_hdf5_variable(f, k: str, path: str) -> np.ndarray:
    import h5py

    obj = f[k]
    cls = obj.attrs.get("MATLAB_class", b"")
    cls = cls.decode() if isinstance(cls, bytes) else str(cls)
    if not isinstance(obj, h5py.Dataset) or cls in _NON_NUMERIC_CLASSES:
        raise ValueError(
            f"{path}: variable {k!r} is not a numeric array "
            f"(MATLAB class {cls or type(obj).__name__})"
        )
    return np.asarray(obj[()]).T  # h5py reverses MATLAB's column-major axes


def _pick(names, key, path):
    if key is not None:
        if key not in names:
            raise ValueError(f"{path}: no variable {key!r} (found: {', '.join(sorted(names))})")
        return key
    for k in TUTORIAL_KEYS:
        if k in names:
            return k
    if len(names) == 1:
        return next(iter(names))
    raise ValueError(
        f"{path}: several variables ({', '.join(sorted(names))}); say which one with key="
    )


def load_mat_volume(path: str | os.PathLike, key: str | None = None) -> np.ndarray:
    """Load one 3-D (or 4-D, subjects last) numeric array from a MATLAB file.

    Parameters
    ----------
    path : path to a ``.mat`` file (v5 or v7.3)
    key : variable name; by default the first of :data:`TUTORIAL_KEYS` present, or the only
        variable in the file

    Returns
    -------
    volume : ndarray, float32 — in MATLAB's axis order ``(x, y, z[, n])``
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if _is_hdf5(path):
        import h5py

        with h5py.File(path, "r") as f:
            names = [k for k in f.keys() if not k.startswith("#")]
            k = _pick(names, key, path)
            arr = _read_hdf5_variable(f, k, path)
    else:
        from scipy.io import loadmat

        try:
            data = loadmat(path)
        except Exception as exc:  # scipy raises several types for broken files
            raise ValueError(f"{path}: not a readable MATLAB file ({exc})") from exc
        names = [k for k in data if not k.startswith("__")]
        k = _pick(names, key, path)
        arr = np.asarray(data[k])
    if arr.dtype.kind not in "fiub":
        raise ValueError(f"{path}: variable {k!r} is not a numeric array (dtype {arr.dtype})")
    if arr.ndim not in (3, 4):
        raise ValueError(f"{path}: variable {k!r} has shape {arr.shape}; expected a 3-D volume")
    return arr.astype(np.float32)
