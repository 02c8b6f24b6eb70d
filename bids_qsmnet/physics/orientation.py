"""The main-field direction in voxel space, from a NIfTI affine.

A NIfTI ``affine`` maps voxel indices ``(i, j, k, 1)`` to world (scanner) coordinates in mm,
RAS+.  The scanner's main field B0 points along world z, so its direction in the voxel frame
follows from the affine's rotation.  Resampling into another frame is not done here.

The direction is returned in *physical voxel space*: components along the three array axes,
each axis taken as a unit vector in mm (the voxel sizes are divided out), which is what
:func:`~bids_qsmnet.physics.dipole.dipole_kernel` expects as ``b0_dir``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

__all__ = ["voxel_sizes_from_affine", "b0_dir_from_affine", "obliquity_deg"]

logger = logging.getLogger(__name__)

# tolerance on the column orthonormality of R before a shear warning is logged
_SHEAR_TOL = 1e-4


def _linear_part(affine) -> np.ndarray:
    try:
        a = np.asarray(affine, dtype=np.float64)
    except (TypeError, ValueError) as exc:  # ragged, complex or non-numeric entries
        raise ValueError(f"affine must be a matrix of real numbers ({exc})") from None
    if a.shape not in ((4, 4), (3, 4), (3, 3)):
        raise ValueError(f"affine must be a 4x4 (or 3x4, 3x3) matrix, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("affine contains NaN or infinite values")
    return a[:3, :3]


def _vector(value, what: str) -> np.ndarray:
    """A finite non-zero 3-vector of floats, or a ``ValueError`` naming ``what``."""
    try:
        b = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        b = np.zeros(0)
    if b.shape != (3,) or not np.all(np.isfinite(b)) or not np.any(b):
        raise ValueError(f"{what} must be a finite non-zero 3-vector, got {value!r}")
    return b


def voxel_sizes_from_affine(affine) -> np.ndarray:
    """Voxel edge lengths along the three array axes.

    Parameters
    ----------
    affine : (4, 4) array — voxel-to-world matrix (mm); a (3, 4) or (3, 3) top-left block is
        accepted too

    Returns
    -------
    voxel_size : (3,) float64 ndarray — mm, the Euclidean norms of the affine's first three
        columns

    Raises
    ------
    ValueError
        if the affine has the wrong shape, non-finite entries or a zero-length axis.

    Examples
    --------
    >>> voxel_sizes_from_affine(np.diag([0.8, -1.0, 2.0, 1.0])).tolist()
    [0.8, 1.0, 2.0]
    """
    vs = np.linalg.norm(_linear_part(affine), axis=0)
    if np.any(vs == 0):
        axes = [int(i) for i in np.flatnonzero(vs == 0)]
        raise ValueError(f"degenerate affine: voxel axis {axes} has zero length (zero scale)")
    return vs


def b0_dir_from_affine(affine, b0_world: Sequence[float] = (0.0, 0.0, 1.0)) -> np.ndarray:
    """Main-field direction in physical voxel space from a NIfTI affine.

    Parameters
    ----------
    affine : (4, 4) array — voxel-to-world matrix (mm, RAS+ world, e.g. nibabel's
        ``img.affine``)
    b0_world : (3,) float — B0 direction in world coordinates; the scanner z axis by default

    Returns
    -------
    b0_dir : (3,) float64 ndarray — unit vector, components along the array axes

    Raises
    ------
    ValueError
        if the affine is degenerate (wrong shape, non-finite, a zero-length or linearly
        dependent axis) or ``b0_world`` is not a finite non-zero 3-vector.

    Notes
    -----
    Write the linear part of the affine as ``A = R S`` with ``S = diag(voxel_size)``; the unit
    columns of ``R`` are the array axes in world space.  The component of B0 along axis ``i``
    is the projection onto that column, so

    .. math:: \\hat{b}_\\text{voxel} = R^\\mathsf{T} \\hat{b}_\\text{world}

    (normalised).  For the usual orthonormal ``R`` this is exactly ``R⁻¹ b``; a sheared affine
    (non-orthogonal axes) is accepted with a warning, since the dipole model assumes orthogonal
    axes.  A flipped axis (e.g. LPS- or LAS-stored data) flips the sign of that component;
    the dipole kernel depends on ``b̂`` only through ``(k·b̂)²``, so the sign is irrelevant to
    the physics and is kept only to be faithful to the geometry.

    Examples
    --------
    >>> b0_dir_from_affine(np.eye(4)).tolist()
    [0.0, 0.0, 1.0]
    >>> b0_dir_from_affine(np.diag([1.0, 1.0, -2.0, 1.0])).tolist()   # k axis stored I→S flipped
    [0.0, 0.0, -1.0]
    """
    A = _linear_part(affine)
    vs = voxel_sizes_from_affine(A)
    R = A / vs
    det = np.linalg.det(R)
    if abs(det) < 1e-6:
        raise ValueError(
            f"degenerate affine: its voxel axes are (nearly) linearly dependent (det={det:.3g})"
        )
    gram = R.T @ R
    if np.max(np.abs(gram - np.eye(3))) > _SHEAR_TOL:
        logger.warning(
            "affine has non-orthogonal (sheared) voxel axes; B0 direction uses the projections "
            "onto the axes"
        )
    b = _vector(b0_world, "b0_world")
    v = R.T @ (b / np.linalg.norm(b))
    return v / np.linalg.norm(v)


def obliquity_deg(b0_dir: Sequence[float]) -> float:
    """Angle between the B0 line and the third voxel axis, in degrees.

    Parameters
    ----------
    b0_dir : (3,) float — B0 direction in voxel space (need not be normalised)

    Returns
    -------
    angle : float — degrees in ``[0, 90]``; 0 means B0 along the third array axis (QSMnet's
        training frame).  B0's polarity does not matter: ``(0, 0, -1)`` gives 0.

    Examples
    --------
    >>> obliquity_deg((0, 0, 1)), obliquity_deg((0, 0, -1)), obliquity_deg((1, 0, 0))
    (0.0, 0.0, 90.0)
    """
    b = _vector(b0_dir, "b0_dir")
    # arctan2 stays accurate near 0°, where arccos of a number close to 1 loses digits
    return float(np.degrees(np.arctan2(np.hypot(b[0], b[1]), abs(b[2]))))
