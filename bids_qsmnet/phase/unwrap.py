"""Spatial phase unwrapping: Laplacian (least-squares) and path-following (congruent).

Two unwrappers with different promises:

* :func:`laplacian_unwrap` — fast, global and robust to noise and phase singularities, but
  **not congruent**: the result equals the true phase up to a function that is harmonic inside
  the mask (plus a constant), and it differs from the wrapped input by more than multiples of
  2π.  Background-field removal (V-SHARP, PDF) removes harmonic functions, so this is what a
  QSM pipeline that removes the background field afterwards needs.
* :func:`path_unwrap` — congruent: the result is the input plus ``2π k`` exactly, with ``k``
  an integer per voxel found by reliability-sorting path following (scikit-image).  Exact on
  smooth phase; a wrong path near noise or singularities leaves 2π steps.

Both fix the free global ``2π`` multiple the same way: the median of the result in the mask
lies in ``[−π, π)``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from scipy import fft as sfft

from .scaling import wrap_phase

log = logging.getLogger(__name__)

__all__ = ["laplacian_unwrap", "path_unwrap"]

_TWO_PI = 2.0 * np.pi


def _check_volume(phase, mask) -> tuple[np.ndarray, np.ndarray]:
    phase = np.asarray(phase)
    if phase.ndim != 3:
        raise ValueError(f"phase must be a 3-D volume, got shape {phase.shape}")
    if not np.all(np.isfinite(phase)):
        raise ValueError("phase contains NaN/Inf values")
    if mask is None:
        mask = np.ones(phase.shape, dtype=bool)
    else:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != phase.shape:
            raise ValueError(f"mask shape {mask.shape} does not match phase shape {phase.shape}")
        if not mask.any():
            raise ValueError("the mask is empty")
    return wrap_phase(phase.astype(np.float64)), mask


def _centre_on_zero(unwrapped: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Subtract the multiple of 2π that brings the median in the mask into [−π, π)."""
    k = np.floor((np.median(unwrapped[mask]) + np.pi) / _TWO_PI)
    return unwrapped - _TWO_PI * k


def _neumann_poisson(rho: np.ndarray, voxel_size: Sequence[float]) -> np.ndarray:
    """Solve ``L u = rho`` with the 7-point Laplacian and mirror (Neumann) boundaries.

    The DCT-II diagonalises the discrete Laplacian of the half-sample mirrored grid, with
    eigenvalues ``Σ_a (2 cos(π k_a / N_a) − 2) / h_a²``.  The k = 0 (constant) term is set to 0.
    """
    lam = np.zeros(rho.shape, dtype=np.float64)
    for axis, (n, h) in enumerate(zip(rho.shape, voxel_size)):
        shape = [1, 1, 1]
        shape[axis] = n
        lam = lam + ((2.0 * np.cos(np.pi * np.arange(n) / n) - 2.0) / h**2).reshape(shape)
    spec = sfft.dctn(rho, type=2, norm="ortho")
    lam[0, 0, 0] = 1.0
    spec /= lam
    spec[0, 0, 0] = 0.0
    return sfft.idctn(spec, type=2, norm="ortho")


def laplacian_unwrap(
    phase: np.ndarray,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Laplacian (least-squares) phase unwrapping.

    The Laplacian of the true phase is computed from the wrapped phase and the Poisson
    equation is solved for the phase (Schofield & Zhu 2003).  Discretely, the 7-point Laplacian
    is built from the **wrapped** neighbour differences ``W(φ[i+1] − φ[i])`` (Schofield & Zhu's
    ``cos φ ∇² sin φ − sin φ ∇² cos φ`` is the same expression with ``sin`` in place of ``W``;
    the wrapped differences make it exact whenever the true phase changes by less than π
    between neighbours), and the Poisson equation is solved with mirror boundary conditions by
    a DCT (Ghiglia & Romero 1994) — no padding and no wrap-around of the FFT.

    Parameters
    ----------
    phase : (X, Y, Z) ndarray — wrapped phase, radians (any range; wrapped internally)
    voxel_size : (3,) float — mm; the Laplacian's stencil weights ``1 / h²`` per axis
    mask : (X, Y, Z) bool ndarray, optional — support: only differences between two voxels
        inside the mask are used (noise outside cannot leak in); the whole grid when None

    Returns
    -------
    unwrapped : (X, Y, Z) float64 ndarray — radians; 0 outside ``mask``

    Notes
    -----
    Let ``ρ`` be the divergence of the wrapped differences (zero across the mask boundary).
    The result ``u`` solves ``L u = ρ``; inside the mask (away from its one-voxel rim) ``ρ``
    is the discrete Laplacian of the true phase ``φ``, so ``L (u − φ) = 0``: **u equals the
    true phase up to a harmonic function plus a constant** there.  The harmonic part (e.g.
    much of a linear phase ramp across a masked region) is what background-field removal
    removes anyway.  Without a mask, and with neighbour differences below π everywhere, the
    least-squares solution is exact up to a constant.  The result is **not congruent** with
    the wrapped phase: ``u − φ_wrapped`` is not a multiple of 2π in general.

    The free constant is chosen so that ``u`` agrees with the wrapped phase modulo 2π on
    average (circular mean of the difference in the mask), then shifted by the multiple of 2π
    that puts the median in the mask in ``[−π, π)``.

    References
    ----------
    Schofield MA, Zhu Y. Fast phase unwrapping algorithm for interferometric applications.
    Opt Lett 2003;28:1194-1196.  Ghiglia DC, Romero LA. Robust two-dimensional weighted and
    unweighted phase unwrapping that uses fast transforms and iterative methods. J Opt Soc Am A
    1994;11:107-117.
    """
    phi, mask = _check_volume(phase, mask)
    vs = np.asarray(voxel_size, dtype=np.float64).reshape(-1)
    if vs.shape != (3,) or not np.all(np.isfinite(vs)) or np.any(vs <= 0):
        raise ValueError(f"voxel_size must be three positive numbers in mm, got {voxel_size!r}")

    rho = np.zeros(phi.shape, dtype=np.float64)
    for axis in range(3):
        d = wrap_phase(np.diff(phi, axis=axis))
        both = np.logical_and(np.delete(mask, -1, axis=axis), np.delete(mask, 0, axis=axis))
        d *= both / vs[axis] ** 2
        # zero flux through the grid edges (Neumann): pad a zero difference on both sides
        widths = [(0, 0)] * 3
        widths[axis] = (1, 1)
        rho += np.diff(np.pad(d, widths), axis=axis)

    u = _neumann_poisson(rho, vs)
    # the constant: best agreement with the wrapped phase modulo 2π, in the mask
    u += np.angle(np.sum(np.exp(1j * (phi[mask] - u[mask]))))
    u = _centre_on_zero(u, mask)
    u[~mask] = 0.0
    return u


def path_unwrap(phase: np.ndarray, *, mask: np.ndarray | None = None) -> np.ndarray:
    """Congruent phase unwrapping by reliability-sorting path following.

    Wraps :func:`skimage.restoration.unwrap_phase` (Abdul-Rahman et al. 2005, the 3-D form of
    Herráez et al. 2002): voxels are joined along edges sorted by a reliability computed from
    second differences, so smooth regions are unwrapped first and noise last.

    Parameters
    ----------
    phase : (X, Y, Z) ndarray — wrapped phase, radians (any range; wrapped internally)
    mask : (X, Y, Z) bool ndarray, optional — support; voxels outside it neither take part
        nor guide the path; the whole grid when None

    Returns
    -------
    unwrapped : (X, Y, Z) float64 ndarray — radians; exactly ``wrap(phase) + 2π k`` with
        integer ``k`` inside the mask, 0 outside

    Notes
    -----
    The result is determined up to one multiple of 2π per connected part of the mask; the
    multiple is chosen so that the median in the mask lies in ``[−π, π)`` (separate parts
    of a mask keep whatever relative multiple the path gives them).  The random start of the
    path is seeded, so the result is deterministic.
    """
    from skimage.restoration import unwrap_phase

    phi, mask = _check_volume(phase, mask)
    if mask.all():
        u = unwrap_phase(phi, rng=0)
    else:
        u = unwrap_phase(np.ma.masked_array(phi, mask=~mask), rng=0).filled(0.0)
    # enforce exact congruence: the integer cycles, then the wrapped phase plus 2πk
    k = np.round((u - phi) / _TWO_PI)
    k[~mask] = 0.0
    u = _centre_on_zero(phi + _TWO_PI * k, mask)
    u[~mask] = 0.0
    return u
