"""NIfTI loading with the checks QSM needs, and atomic writing.

Every error names the file and what is wrong, so a user can fix the input without reading a
traceback.  :func:`inspect_volume` runs the checks that need only the header (readable, 3-D,
an orthogonal non-degenerate affine, a size that fits in memory, a body as long as the header
says); :func:`load_volume` runs them before it reads the voxels, so an impossible volume is
refused before anything is allocated.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from ..errors import UserError
from .atomic import atomic_output, tmp_sibling

LOGGER = logging.getLogger(__name__)

__all__ = [
    "InputError",
    "inspect_volume",
    "load_volume",
    "save_volume",
    "atomic_path",
    "available_memory",
    "derived_path",
    "WORKING_COPIES",
]

#: float32 copies of a volume the QSM chain holds at once (input, mask, resampled field, FFT
#: work arrays, output): a volume whose copies do not fit in memory is refused up front
WORKING_COPIES = 8

# |cos| of the angle between two voxel axes above which an affine counts as sheared (0.06°:
# far above the float32 rounding of a stored sform, far below any real shear)
_SHEAR_TOL = 1e-3


class InputError(UserError, ValueError):
    """An input file is unusable; the message names the file and the problem."""


def _cgroup_free_bytes() -> int | None:
    """Memory left under the tightest cgroup limit of this process (v1 or v2), if any."""
    free = []
    try:
        with open("/proc/self/cgroup") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "":  # cgroup v2
            root, limit_f, usage_f = "/sys/fs/cgroup", "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            root, limit_f, usage_f = ("/sys/fs/cgroup/memory", "memory.limit_in_bytes",
                                      "memory.usage_in_bytes")
        else:
            continue
        # the process's own cgroup and its ancestors (inside a container the mount root is
        # the container's cgroup, so the root itself is a candidate too)
        parts = [p for p in rel.split("/") if p]
        for n in range(len(parts), -1, -1):
            d = os.path.join(root, *parts[:n])
            try:
                with open(os.path.join(d, limit_f)) as fh:
                    limit = fh.read().strip()
                with open(os.path.join(d, usage_f)) as fh:
                    usage = int(fh.read().strip())
            except (OSError, ValueError):
                continue
            if limit.isdigit() and int(limit) < 1 << 60:  # "max" or ~2^63: no limit
                free.append(max(0, int(limit) - usage))
    return min(free) if free else None


#: environment variable holding the run's memory budget in MB (``--mem-mb``)
MEMORY_BUDGET_ENV = "BIDS_QSMNET_MEM_MB"


def available_memory() -> int | None:
    """Bytes of memory this process can still use, or None when it cannot be told.

    With a memory budget (``--mem-mb``, in :data:`MEMORY_BUDGET_ENV`), the budget, capped by
    the room left under a cgroup limit; otherwise the smaller of the kernel's ``MemAvailable``
    and that room (a container's or a SLURM job's ``--mem``); the physical memory where
    neither is readable.
    """
    budget = os.environ.get(MEMORY_BUDGET_ENV, "")
    if budget.isdigit() and int(budget) > 0:
        cgroup = _cgroup_free_bytes()
        mb = int(budget) * 2**20
        return mb if cgroup is None else min(mb, cgroup)
    found = []
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    cgroup = _cgroup_free_bytes()
    if cgroup is not None:
        found.append(cgroup)
    if not found:
        try:
            found.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, ValueError, OSError):
            return None
    return min(found)


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _check_affine(path: str, affine: np.ndarray) -> None:
    affine = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise InputError(f"{path}: degenerate affine (NaN or infinite entries in the header's "
                         "sform/qform)")
    lin = affine[:3, :3]
    sizes = np.linalg.norm(lin, axis=0)
    if np.any(sizes < 1e-6):
        axes = ", ".join(str(int(i)) for i in np.flatnonzero(sizes < 1e-6))
        raise InputError(f"{path}: degenerate affine: voxel axis {axes} has zero length (zero "
                         "scaling in the header's sform/qform)")
    unit = lin / sizes
    cosines = np.abs(unit.T @ unit - np.eye(3))
    i, j = np.unravel_index(int(np.argmax(cosines)), cosines.shape)
    if cosines[i, j] > _SHEAR_TOL:
        angle = np.degrees(np.arccos(np.clip(unit[:, i] @ unit[:, j], -1.0, 1.0)))
        raise InputError(f"{path}: degenerate affine: voxel axes {i} and {j} meet at "
                         f"{angle:.2f}°, not 90° (sheared); the dipole model needs an orthogonal "
                         "grid: resample the image onto one")


def inspect_volume(path: str | os.PathLike, *, what: str = "volume"):
    """Check a NIfTI volume from its header alone; no voxel data is read.

    Parameters
    ----------
    path : NIfTI file (``.nii`` or ``.nii.gz``)
    what : what the file is, for error messages ("local field", "brain mask", …)

    Returns
    -------
    img : nibabel image (header and affine); ``img.shape[:3]`` is the 3-D grid

    Raises
    ------
    InputError
        naming the file, when it is missing or not NIfTI, not of a real data type (complex,
        RGB), not 3-D (a 4-D series of one volume counts as 3-D), empty along an axis, with
        a zero-scaled, non-finite or sheared affine, shorter than its header says
        (uncompressed files), or too large for the memory left (:data:`WORKING_COPIES`
        float32 copies, see :func:`available_memory`).
    """
    import nibabel as nib

    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{path}: {what} file does not exist")
    try:
        img = nib.load(path)
        shape = tuple(int(n) for n in img.shape)
        affine = img.affine
    except Exception as exc:  # nibabel raises many types for files that are not NIfTI
        raise InputError(f"{path}: cannot read the {what} as NIfTI ({exc})") from None
    dtype = np.dtype(img.header.get_data_dtype())
    if dtype.kind not in "biuf":  # complex (its imaginary part would be dropped), RGB, ...
        raise InputError(f"{path}: the {what} has data type {dtype} ({dtype.name}); a real "
                         "(integer or floating-point) volume is needed")
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(f"{path}: the {what} must be a 3-D volume, got shape {shape}"
                         + (" (an echo or time series?)" if len(shape) == 4 else ""))
    if min(shape) < 1:
        raise InputError(f"{path}: the {what} has an empty axis (shape {shape})")
    _check_affine(path, affine)
    n_vox = int(np.prod(shape, dtype=np.int64))
    need = n_vox * 4 * WORKING_COPIES
    avail = available_memory()
    if avail is not None and need > avail:
        raise InputError(
            f"{path}: the {what} is too large: {'x'.join(map(str, shape))} voxels need about "
            f"{_gib(need)} of memory to process, {_gib(avail)} is available; crop it to the "
            "brain or process it on a machine with more memory")
    offset = getattr(img.dataobj, "offset", None)  # the header copy in img says 0
    if not path.endswith(".gz") and offset is not None:
        expected = int(offset) + n_vox * dtype.itemsize
        size = os.path.getsize(path)
        if size < expected:
            raise InputError(f"{path}: the {what} file is truncated: its header describes "
                             f"{expected} bytes, the file has {size}")
    return img


def load_volume(path: str | os.PathLike, *, what: str = "volume", allow_nonfinite: bool = False):
    """Load a 3-D NIfTI volume as float32 plus its image.

    The header checks of :func:`inspect_volume` run first.

    Parameters
    ----------
    path : NIfTI file (``.nii`` or ``.nii.gz``)
    what : what the file is, for error messages ("local field", "mask", …)
    allow_nonfinite : accept NaN/Inf voxels (they are refused by default)

    Returns
    -------
    data : (X, Y, Z) float32 ndarray
    img : nibabel image (header and affine)

    Raises
    ------
    InputError
        naming the file: see :func:`inspect_volume`; also a truncated or corrupt body and
        NaN/Inf voxels.
    """
    path = os.fspath(path)
    img = inspect_volume(path, what=what)
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
    except MemoryError:
        raise InputError(f"{path}: not enough memory to read the {what} "
                         f"(shape {img.shape})") from None
    except Exception as exc:  # zlib, EOFError, OSError: a damaged body
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise InputError(f"{path}: the {what} file is truncated or corrupt ({msg})") from None
    if data.ndim == 4:  # a series of one volume (checked by inspect_volume)
        data = data[..., 0]
    if not allow_nonfinite and not np.all(np.isfinite(data)):
        n = int((~np.isfinite(data)).sum())
        raise InputError(f"{path}: the {what} contains {n} NaN/Inf voxels")
    return data, img


def atomic_path(path: str | os.PathLike) -> str:
    """A temporary sibling name for ``path`` that keeps its extension (``.x.tmp123.nii.gz``)."""
    return tmp_sibling(path, keep_extension=True)


def save_volume(data: np.ndarray, reference, path: str | os.PathLike, *, dtype=np.float32) -> str:
    """Write ``data`` with the reference image's affine, qform and sform, atomically; the
    header's units are mm and seconds.

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
    img.header.set_xyzt_units("mm", "sec")  # the affine is in mm (BIDS: units in the header)
    with atomic_output(path, keep_extension=True) as tmp:
        nib.save(img, tmp)
    return path


def derived_path(in_file: str | os.PathLike, suffix: str, newpath: str | None = None, *,
                 extension: str = ".nii.gz") -> str:
    """Path of a file derived from ``in_file``: its name without extension, ``suffix`` and
    ``extension``, in ``newpath`` (default: the current folder).

    >>> derived_path("/data/sub-01_phase.nii.gz", "_echoes", "/work")
    '/work/sub-01_phase_echoes.nii.gz'
    """
    from nipype.utils.filemanip import fname_presuffix

    return fname_presuffix(os.fspath(in_file), suffix=suffix, newpath=newpath or os.getcwd(),
                           use_ext=False) + extension
