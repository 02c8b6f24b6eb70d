"""Background-field removal: V-SHARP and PDF, from the total field to the local field.

The total field measured inside the brain is the sum of the *local* field, made by the
susceptibility sources inside the brain mask, and the *background* field, made by sources
outside it (air/tissue interfaces of the sinuses and ear canals, the head surface, imperfect
shimming).  Inside the mask the background field is harmonic (its Laplacian vanishes), which
both methods here exploit in different ways:

:func:`vsharp`
    variable-radius SHARP: the spherical-mean-value (SMV) property of harmonic functions
    removes the background exactly where a sphere fits inside the mask; a truncated
    deconvolution returns the local field.  The mask is eroded near its edge.
:func:`pdf`
    projection onto dipole fields: fits a susceptibility distribution *outside* the mask whose
    dipole field best matches the total field *inside* it, and subtracts that field.  The mask
    is kept.

Conventions follow :mod:`bids_qsmnet.physics.dipole`: arrays indexed ``(i, j, k)``,
``voxel_size`` in mm, ``b0_dir`` in voxel space.  The methods are linear in the field, so the
local field comes out in the units of the input (ppm for a field in ``ΔB/B0``; Hz or rad work
too for V-SHARP, while PDF's dipole model is unit-agnostic as well since ``chi`` only scales).
Computation is in float64; the local field is returned as float32.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.fft

from ..physics.dipole import dipole_kernel, forward_field, normalise_b0_dir
from ..physics.smv import (
    check_radii,
    check_voxel_size,
    offsets_sq_mm,
    smv_kernel,
    sphere_spectra,
)

__all__ = ["BackgroundRemoval", "vsharp", "pdf", "default_vsharp_radii", "smv_kernel"]

logger = logging.getLogger(__name__)

#: largest default SMV radius of :func:`vsharp`, mm
VSHARP_MAX_RADIUS_MM = 12.0


@dataclass(frozen=True)
class BackgroundRemoval:
    """Result of a background-field removal.

    Attributes
    ----------
    local_field : (X, Y, Z) float32 ndarray — local field in the units of the input (ppm for a
        field in ``ΔB/B0``), zero outside ``mask``
    mask : (X, Y, Z) bool ndarray — where ``local_field`` is valid: the eroded mask for
        :func:`vsharp`, the input mask for :func:`pdf`
    """

    local_field: np.ndarray
    mask: np.ndarray


# --------------------------------------------------------------------------- validation


def _check_inputs(total_field, mask, voxel_size) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Validate and return ``(field, mask, voxel_size)``: float64 field zeroed outside the mask."""
    field = np.asarray(total_field)
    if field.ndim != 3:
        raise ValueError(f"total_field must be a 3-D volume, got shape {field.shape}")
    if not np.issubdtype(field.dtype, np.number) or np.iscomplexobj(field):
        raise ValueError(f"total_field must be real-valued, got dtype {field.dtype}")
    m = np.asarray(mask)
    if m.shape != field.shape:
        raise ValueError(f"mask shape {m.shape} does not match the field shape {field.shape}")
    if m.dtype != bool:
        if not np.issubdtype(m.dtype, np.number) or not np.all(np.isfinite(m)):
            raise ValueError("mask must be boolean or numeric with finite values")
        m = m != 0
    if not m.any():
        raise ValueError("mask is empty: no voxel to remove the background field from")
    vs = check_voxel_size(voxel_size)
    field = field.astype(np.float64)
    # Values outside the mask are never used (unwrapping often leaves NaN there).
    if not np.all(np.isfinite(field[m])):
        raise ValueError("total_field contains NaN or infinite values inside the mask")
    field[~m] = 0.0
    return field, m, vs


def default_vsharp_radii(voxel_size: Sequence[float]) -> np.ndarray:
    """Default SMV radii of :func:`vsharp`, mm, largest first.

    From about :data:`VSHARP_MAX_RADIUS_MM` (12 mm) down to the largest voxel edge ``h``, in
    steps of ``h`` (one voxel along the coarsest axis): ``h · [n, n−1, …, 1]`` with
    ``n = max(1, round(12 / h))``.  The smallest sphere then reaches the neighbouring voxels
    along every axis, so that the mean-value property is probed in all directions.

    Parameters
    ----------
    voxel_size : (3,) float — mm

    Returns
    -------
    radii : (n,) float64 ndarray — mm, strictly decreasing

    Examples
    --------
    >>> default_vsharp_radii((1.0, 1.0, 1.0)).tolist()[:3], len(default_vsharp_radii((1, 1, 1)))
    ([12.0, 11.0, 10.0], 12)
    >>> default_vsharp_radii((1.0, 1.0, 3.0)).tolist()
    [12.0, 9.0, 6.0, 3.0]
    """
    h = max(check_voxel_size(voxel_size))
    n = max(1, round(VSHARP_MAX_RADIUS_MM / h))
    return h * np.arange(n, 0, -1, dtype=np.float64)


def _check_radii(radii_mm, vs: tuple[float, float, float]) -> np.ndarray:
    if radii_mm is None:
        return default_vsharp_radii(vs)
    return check_radii(radii_mm, vs)


# --------------------------------------------------------------------------- V-SHARP


def vsharp(
    total_field: np.ndarray,
    mask: np.ndarray,
    voxel_size: Sequence[float],
    *,
    radii_mm: Sequence[float] | None = None,
    threshold: float = 0.05,
) -> BackgroundRemoval:
    """Variable-radius SHARP (V-SHARP) background-field removal.

    Parameters
    ----------
    total_field : (X, Y, Z) ndarray — unwrapped total field, ppm (or any linear field unit:
        Hz, rad); values outside ``mask`` are ignored and may be NaN
    mask : (X, Y, Z) ndarray — brain mask (nonzero/True inside)
    voxel_size : (3,) float — mm
    radii_mm : sequence of float, optional — SMV radii in mm, each at least the largest voxel
        edge (so that every sphere reaches the neighbouring voxels along all axes); order does
        not matter.  Default :func:`default_vsharp_radii`: from 12 mm down to the largest
        voxel edge in one-voxel steps (12, 11, …, 1 mm at 1 mm isotropic).
    threshold : float — TSVD truncation level of the deconvolution, dimensionless, in
        ``(0, 1)``: spatial frequencies where ``|1 − Ŝ(k)|`` of the largest kernel is below it
        are set to zero (at 0.05 and 12 mm: wavelengths above about 11 cm)

    Returns
    -------
    BackgroundRemoval
        ``local_field`` (float32, units of the input, zero outside the eroded mask) and
        ``mask``, the input mask eroded by the smallest radius (voxels whose smallest sphere
        lies entirely inside the mask).

    Raises
    ------
    ValueError
        for a non-3-D or complex field, a mask of another shape or empty, non-finite field
        values inside the mask, invalid voxel size, radii or threshold, or a mask too thin for
        the smallest sphere.

    Notes
    -----
    With ``S_r`` the normalised spherical kernel of radius ``r`` (voxels whose centre lies
    within ``r`` mm of the centre, weights summing to one) and ``M_r`` the mask eroded by it
    (voxels whose whole sphere lies inside the mask), the mean-value property of the harmonic
    background ``b`` gives ``(δ − S_r) ⊛ b = 0`` on ``M_r``, so there

    .. math:: h_r = (\\delta - S_r) \\circledast f = (\\delta - S_r) \\circledast f_L .

    The high-passed field ``h`` takes, at every voxel, ``h_r`` of the **largest** radius whose
    eroded mask contains the voxel (large spheres in the interior, smaller ones towards the
    edge).  The local field is the truncated deconvolution

    .. math:: f_L = M_{r_\\min} \\cdot F^{-1}\\Big[ \\frac{F[h]}{1 - \\hat S_{r_\\max}} \\Big],
       \\quad \\text{zeroed where } |1 - \\hat S_{r_\\max}| < \\text{threshold}.

    A voxelised sphere is symmetric, so constant, linear and all odd-order terms of ``b``
    cancel exactly; the quadratic terms cancel only if the kernel's second moments
    ``M_ii = Σ S_r(o) o_i²`` are equal, since ``(δ − S_r) ⊛ b ≈ −½ Σ_i M_ii ∂_i² b`` and
    ``Δb = 0``.  On anisotropic grids they are not (with 2 × 2 × 4 mm voxels 1.3 % of a
    sinus-like background leaked through, 30 % of the local field), so a ``[1, −2, 1]``
    stencil along each axis is added to ``S_r`` to raise every ``M_ii`` to the largest; this
    keeps the weights' sum and the support (hence the erosion) unchanged.

    The deconvolution uses the largest kernel, as in Li et al. and Wu et al.: ``h`` equals
    ``(δ − S_rmax) ⊛ f_L`` on the interior, and ``1 − Ŝ_r ≈ (2π|k|r)²/10`` at low
    frequencies, so dividing by a smaller kernel would amplify the interior's low frequencies
    by ``(r_max/r_min)²``; the edge layer is approximate either way.  The constant component
    (k = 0, where ``1 − Ŝ = 0``) is harmonic, cannot be recovered and is set to zero.

    Convolutions are FFTs (``scipy.fft``) of the field zero-filled outside the mask, on a grid
    padded by the largest sphere's extent so that no sphere wraps around; erosions are the
    same convolutions of the mask.  Each radius costs three real FFTs.

    References
    ----------
    .. [1] Schweser F, Deistung A, Lehr BW, Reichenbach JR. Quantitative imaging of intrinsic
       magnetic tissue properties using MRI signal phase: an approach to in vivo brain iron
       metabolism? NeuroImage 2011;54:2789-2807.
    .. [2] Li W, Wu B, Liu C. Quantitative susceptibility mapping of human brain reflects
       spatial variation in tissue composition. NeuroImage 2011;55:1645-1656.
    .. [3] Wu B, Li W, Guidon A, Liu C. Whole brain susceptibility mapping using compressed
       sensing. Magn Reson Med 2012;67:137-147.
    """
    field, m, vs = _check_inputs(total_field, mask, voxel_size)
    radii = _check_radii(radii_mm, vs)
    thr = float(threshold)
    if not (np.isfinite(thr) and 0.0 < thr < 1.0):
        raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")

    shape = field.shape
    # Half-extent of the largest sphere along each axis, in voxels: padding by it on the high
    # side of each axis keeps the circular convolution from wrapping (the field is zero-filled
    # outside the mask, so the low side needs nothing).
    reach = [int(math.floor(radii[0] / h + 1e-9)) for h in vs]
    padded = tuple(scipy.fft.next_fast_len(n + w, real=True) for n, w in zip(shape, reach))
    slices = tuple(slice(0, n) for n in shape)

    def to_padded(x: np.ndarray) -> np.ndarray:
        out = np.zeros(padded, dtype=np.float64)
        out[slices] = x
        return out

    def rfft(x: np.ndarray) -> np.ndarray:
        return scipy.fft.rfftn(x, s=padded)

    def irfft(x: np.ndarray) -> np.ndarray:
        return scipy.fft.irfftn(x, s=padded)[slices]

    field_k = rfft(to_padded(field))
    mask_k = rfft(to_padded(m.astype(np.float64)))
    off2 = offsets_sq_mm(padded, vs)

    highpass = np.zeros(shape, dtype=np.float64)
    filled = np.zeros(shape, dtype=bool)  # voxels already given a larger radius's value
    deconv_kernel = None
    eroded = m
    for r in radii:
        sphere_k, smv_k, count = sphere_spectra(padded, vs, r, real=True, off2=off2)
        if deconv_kernel is None:
            deconv_kernel = 1.0 - smv_k  # largest radius: used for the deconvolution
        # Voxels whose whole sphere lies in the mask: the mean of the mask over the sphere is 1
        # there (half a sphere voxel of tolerance absorbs FFT rounding).
        eroded = (irfft(mask_k * sphere_k) > 1.0 - 0.5 / count) & m
        new = eroded & ~filled
        if new.any():
            # h_r = f − S_r ⊛ f, evaluated only where this radius is the largest that fits
            highpass[new] = field[new] - irfft(field_k * smv_k)[new]
            filled |= new
        logger.debug("V-SHARP radius %.3g mm: %d voxels in the eroded mask", r, eroded.sum())
        del sphere_k, smv_k

    if not eroded.any():
        raise ValueError(
            f"the mask is too thin for the smallest SMV radius ({radii[-1]:.3g} mm): "
            "the eroded mask is empty"
        )
    inverse = np.zeros_like(deconv_kernel)
    keep = np.abs(deconv_kernel) >= thr
    inverse[keep] = 1.0 / deconv_kernel[keep]
    local = irfft(rfft(to_padded(highpass)) * inverse)
    local[~eroded] = 0.0
    logger.info(
        "V-SHARP: %d radii from %.3g to %.3g mm, %d of %d mask voxels kept",
        radii.size,
        radii[0],
        radii[-1],
        int(eroded.sum()),
        int(m.sum()),
    )
    return BackgroundRemoval(local_field=local.astype(np.float32), mask=eroded)


# --------------------------------------------------------------------------- PDF


def pdf(
    total_field: np.ndarray,
    mask: np.ndarray,
    voxel_size: Sequence[float],
    *,
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    weight: np.ndarray | None = None,
    iterations: int = 100,
    tol: float = 1e-5,
    pad: int | None = None,
) -> BackgroundRemoval:
    """Projection onto dipole fields (PDF) background-field removal.

    Parameters
    ----------
    total_field : (X, Y, Z) ndarray — unwrapped total field, ppm (``ΔB/B0``; Hz or rad give
        the same local field in those units, the fitted ``chi`` being scaled); values outside
        ``mask`` are ignored and may be NaN
    mask : (X, Y, Z) ndarray — brain mask (nonzero/True inside)
    voxel_size : (3,) float — mm
    b0_dir : (3,) float — main-field direction in voxel space
    weight : (X, Y, Z) ndarray, optional — data weight inside the mask, non-negative, e.g. the
        magnitude or the inverse noise standard deviation of the field (any unit: only ratios
        matter).  Default: uniform.
    iterations : int — maximum number of conjugate-gradient iterations.  The count acts as a
        regulariser: more iterations fit more of the background but also explain away more of
        the local field near the mask edge; on brain-like phantoms the error of the local
        field is flat between about 80 and 200 iterations.
    tol : float — stop earlier when the normal-equation residual falls below ``tol`` times its
        initial value, dimensionless.  The initial residual is dominated by the (large)
        background, so the tolerance must be small for the local field to be accurate.
    pad : int, optional — zero voxels added on every side for the FFT convolutions (limits the
        periodic wrap-around of the dipole fields).  Default: ``ceil(max(X, Y, Z) / 8)``.

    Returns
    -------
    BackgroundRemoval
        ``local_field`` (float32, units of the input, zero outside the mask) and ``mask``, the
        input mask as bool (PDF does not erode).

    Raises
    ------
    ValueError
        for a non-3-D or complex field, a mask of another shape, empty or covering the whole
        grid, non-finite field values inside the mask, or invalid options.

    Notes
    -----
    With ``M`` the mask, ``W`` the weight, ``D`` the dipole convolution (see
    :func:`~bids_qsmnet.physics.dipole.forward_field`) and ``χ_b`` restricted to the field of
    view outside the mask, PDF solves

    .. math:: \\hat\\chi_b = \\arg\\min_{\\chi_b} \\| W M (f - D \\chi_b) \\|_2^2,
       \\qquad f_L = M (f - D \\hat\\chi_b)

    by conjugate gradients on the normal equations
    ``(1 − M) D M W² M D (1 − M) χ_b = (1 − M) D M W² f``, starting from ``χ_b = 0``.  The
    padded, cropped convolution ``crop ∘ D ∘ pad`` is self-adjoint, so the adjoint of the
    forward operator is the same call.  The field of the local sources that happens to be
    representable by outside dipoles is removed with the background; this is PDF's known
    (small) bias.

    References
    ----------
    .. [1] Liu T, Khalidov I, de Rochefort L, Spincemaille P, Liu J, Tsiouris AJ, Wang Y. A
       novel background field removal method for MRI using projection onto dipole fields
       (PDF). NMR Biomed 2011;24:1129-1136.
    """
    field, m, vs = _check_inputs(total_field, mask, voxel_size)
    b = normalise_b0_dir(b0_dir)
    if m.all():
        raise ValueError("mask covers the whole grid: PDF needs voxels outside the mask")
    n_iter = int(iterations)
    if n_iter != iterations or n_iter < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    tol = float(tol)
    if not (np.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    if pad is None:
        p = int(math.ceil(max(field.shape) / 8))
    else:
        p = int(pad)
        if p != pad or p < 0:
            raise ValueError(f"pad must be a non-negative integer number of voxels, got {pad!r}")
    if weight is None:
        w2 = m.astype(np.float64)
    else:
        w = np.asarray(weight, dtype=np.float64)
        if w.shape != field.shape:
            raise ValueError(f"weight shape {w.shape} does not match the field shape {field.shape}")
        if not np.all(np.isfinite(w[m])) or np.any(w[m] < 0):
            raise ValueError("weight must be finite and non-negative inside the mask")
        w = np.where(m, w, 0.0)
        if not np.any(w > 0):
            raise ValueError("weight is zero everywhere inside the mask")
        w2 = (w / w[m].mean()) ** 2  # the scale of W does not change the solution
    outside = ~m

    kernel = dipole_kernel(tuple(n + 2 * p for n in field.shape), vs, b)

    def dipole(x: np.ndarray) -> np.ndarray:
        return forward_field(x, vs, b, pad=p, kernel=kernel)

    def normal_op(x: np.ndarray) -> np.ndarray:
        # (1 − M) Dᵀ W² M D (1 − M) x; x is kept zero inside the mask by construction.
        y = dipole(x) * w2
        return dipole(y) * outside

    rhs = dipole(field * w2) * outside
    chi = np.zeros_like(field)
    resid = rhs.copy()
    direction = resid.copy()
    rr = float(np.vdot(resid, resid))
    rr0 = rr
    if rr0 == 0.0:
        logger.info("PDF: the field inside the mask has no dipole-representable component")
    it = 0
    while it < n_iter and rr > (tol**2) * rr0:
        q = normal_op(direction)
        alpha = rr / float(np.vdot(direction, q))
        chi += alpha * direction
        resid -= alpha * q
        rr_new = float(np.vdot(resid, resid))
        direction = resid + (rr_new / rr) * direction
        rr = rr_new
        it += 1
    rel = math.sqrt(rr / rr0) if rr0 > 0 else 0.0
    # Hitting the iteration cap is the usual end, not a failure: the number of iterations
    # regularises the fit (more iterations remove more background but also more of the local
    # field near the mask edge).
    logger.info("PDF: %d CG iterations, relative residual %.2g (tol %.2g)", it, rel, tol)
    background = dipole(chi)
    local = np.where(m, field - background, 0.0)
    return BackgroundRemoval(local_field=local.astype(np.float32), mask=m.copy())
