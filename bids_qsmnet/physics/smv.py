"""The spherical-mean-value (SMV) kernel: the sphere average that V-SHARP background removal
and the high-pass of the data-consistency refinement are built on.

Grids are periodic (FFT order, the kernel wraps around the origin), ``voxel_size`` in mm.
By the mean-value property, ``(δ − S_r) ⊛ b = 0`` inside the region for every field ``b``
harmonic there (a background field), to second order on anisotropic grids.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.fft

__all__ = ["check_voxel_size", "check_radii", "offsets_sq_mm", "sphere_spectra", "smv_kernel"]


def check_voxel_size(voxel_size: Sequence[float]) -> tuple[float, float, float]:
    """``voxel_size`` as three positive floats (mm), or a ``ValueError``."""
    vs = np.asarray(voxel_size, dtype=np.float64).reshape(-1)
    if vs.shape != (3,) or not np.all(np.isfinite(vs)) or np.any(vs <= 0):
        raise ValueError(f"voxel_size must be three positive numbers in mm, got {voxel_size!r}")
    return (float(vs[0]), float(vs[1]), float(vs[2]))


def check_radii(radii_mm: Sequence[float], vs: tuple[float, float, float]) -> np.ndarray:
    """Sphere radii (mm), each at least the largest voxel edge of ``vs``; unique, largest first.

    The sphere must reach the neighbouring voxel along every axis, or it would not probe the
    field's curvature along that axis (and its second moment could not be matched).
    """
    r = np.asarray(radii_mm, dtype=np.float64).reshape(-1)
    if r.size == 0 or not np.all(np.isfinite(r)):
        raise ValueError(f"radii_mm must be one or more finite numbers in mm, got {radii_mm!r}")
    if np.any(r < max(vs) * (1.0 - 1e-9)):
        raise ValueError(
            f"every SMV radius must be at least the largest voxel edge ({max(vs)} mm), "
            f"got {radii_mm!r}"
        )
    return np.unique(r)[::-1]


def _axis_view(values: np.ndarray, axis: int) -> np.ndarray:
    view = [1, 1, 1]
    view[axis] = values.size
    return values.reshape(view)


def offsets_sq_mm(shape: tuple[int, ...], vs: tuple[float, float, float]) -> list[np.ndarray]:
    """Per-axis squared offsets (mm²) from the origin on the periodic grid, broadcastable."""
    parts = []
    for axis, (n, h) in enumerate(zip(shape, vs)):
        idx = np.arange(n)
        off = np.where(idx <= n // 2, idx, idx - n) * h  # FFT order: wrap negative offsets
        parts.append(_axis_view(off**2, axis))
    return parts


def _second_difference_k(shape: tuple[int, ...], *, real: bool = True) -> list[np.ndarray]:
    """Response of the stencil ``[1, −2, 1]`` along each axis, ``2 cos(2πm/N) − 2``, on the
    rfft grid (``real``) or the full fft grid."""
    out = []
    for axis, n in enumerate(shape):
        m = np.arange(n // 2 + 1 if real and axis == len(shape) - 1 else n)
        out.append(_axis_view(2.0 * np.cos(2.0 * np.pi * m / n) - 2.0, axis))
    return out


def sphere_spectra(shape: tuple[int, ...], vs: tuple[float, float, float], r: float, *,
                   real: bool, off2: list[np.ndarray] | None = None):
    """``(Ŝ of the plain voxelised sphere, moment-matched Ŝ_r, voxels in the sphere)``: the
    first erodes masks, the second filters fields (see :func:`smv_kernel`).  ``off2``: the
    grid's :func:`offsets_sq_mm`, when the caller already has them."""
    off2 = offsets_sq_mm(shape, vs) if off2 is None else off2
    sphere = (off2[0] + off2[1] + off2[2]) <= r * r * (1.0 + 1e-9)
    count = int(sphere.sum())
    # The sphere is symmetric about the origin, so its spectrum is real.
    fft = scipy.fft.rfftn if real else scipy.fft.fftn
    sphere_k = fft(sphere / count).real
    # Match the second moments: with anisotropic voxels the voxelised sphere is not isotropic,
    # and (δ − S) ⊛ b ≈ −½ Σ M_ii ∂_i² b is then not zero for harmonic b.  Adding
    # α_i·[1, −2, 1] along axis i raises M_ii by 2 α_i h_i² without changing the weights' sum
    # or the support, so every M_ii equals the largest.
    moments = [float(np.sum(sphere * o2)) / count for o2 in off2]
    smv_k = sphere_k.copy()
    for mom, h, sd_k in zip(moments, vs, _second_difference_k(shape, real=real)):
        alpha = (max(moments) - mom) / (2.0 * h * h)
        if alpha > 0:
            smv_k += alpha * sd_k
    return sphere_k, smv_k, count


def smv_kernel(shape: Sequence[int], voxel_size: Sequence[float], radius_mm: float, *,
               real: bool = False) -> np.ndarray:
    """Spectrum ``Ŝ_r(k)`` of the normalised spherical-mean-value kernel on a periodic grid.

    The kernel averages the voxels whose centres lie within ``radius_mm`` of the centre
    (weights summing to one); on anisotropic grids a ``[1, −2, 1]`` stencil along each axis
    raises every second moment ``M_ii`` to the largest, so that ``(δ − S_r) ⊛ b = 0`` holds for
    harmonic ``b`` to second order (see :func:`bids_qsmnet.phase.background.vsharp`).  The
    kernel is symmetric, so its spectrum is real.

    Parameters
    ----------
    shape : (3,) int — grid (FFT order; the kernel wraps around the origin)
    voxel_size : (3,) float — mm
    radius_mm : float — at least the largest voxel edge
    real : bool — return the ``rfftn`` half-spectrum instead of the full ``fftn`` grid

    Returns
    -------
    (X, Y, Z) or (X, Y, Z//2+1) float64 ndarray — ``Ŝ_r``, 1 at k = 0
    """
    vs = check_voxel_size(voxel_size)
    r = float(check_radii([radius_mm], vs)[0])
    return sphere_spectra(tuple(int(n) for n in shape), vs, r, real=real)[1]
