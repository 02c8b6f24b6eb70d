"""Classical dipole inversions: baselines for the networks and a data-consistency refinement.

All functions take the local field in **ppm** (``ΔB/B0``, see :mod:`bids_qsmnet.physics.dipole`)
and return susceptibility ``chi`` in **ppm** as a **float64** array of the input's shape,
multiplied by the mask.  ``voxel_size`` is in mm and ``b0_dir`` is the main-field direction in
voxel space, exactly as for :func:`~bids_qsmnet.physics.dipole.dipole_kernel`.  Computation is
in float64 with numpy FFTs; nothing here imports torch.

Methods
-------
:func:`tkd`
    truncated k-space division (one FFT pair, no parameters but the threshold).
:func:`closed_form_l2`
    Tikhonov inversion with a gradient penalty, closed form in k-space.
:func:`tv_admm`
    total-variation-regularised inversion by ADMM with a weighted (masked) data term.
:func:`data_consistency`
    conjugate-gradient refinement of an initial map (e.g. a network's output) towards the
    measured field.

Conventions shared by the regularised methods: finite differences are forward differences on the
periodic grid, **scaled by the voxel size** (``∂_i χ = (χ[n + e_i] − χ[n]) / h_i``, ppm/mm), so
a regularisation weight means the same physical smoothing at any resolution; its unit is given
with each function.  The k = 0 component, which the dipole kernel does not see
(``D(0) = 0``), is set to zero by :func:`tkd`, :func:`closed_form_l2` and :func:`tv_admm`
(the mean of ``chi`` over the padded grid is zero before masking), and left at the initial
map's by :func:`data_consistency`: QSM is relative, reference it to a region if needed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from .dipole import dipole_kernel

__all__ = ["tkd", "closed_form_l2", "tv_admm", "data_consistency", "gradient_kernel_sq"]

logger = logging.getLogger(__name__)

_Vec3 = Sequence[float]


# --------------------------------------------------------------------------- helpers


def _as_volume(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 3:
        raise ValueError(f"{name} must be a 3-D volume, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _as_mask(mask, shape: tuple[int, ...]) -> np.ndarray:
    """Binary mask as float64 (1 inside); ``None`` means the whole grid."""
    if mask is None:
        return np.ones(shape, dtype=np.float64)
    m = np.asarray(mask)
    if m.shape != shape:
        raise ValueError(f"mask shape {m.shape} does not match the field shape {shape}")
    return (m != 0).astype(np.float64)


def _as_weight(weight, shape: tuple[int, ...], name: str = "weight") -> np.ndarray:
    w = np.asarray(weight, dtype=np.float64)
    if w.shape != shape:
        raise ValueError(f"{name} shape {w.shape} does not match the field shape {shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"{name} must be finite and non-negative")
    return w


def _check_pad(pad) -> int:
    p = int(pad)
    if p < 0 or p != pad:
        raise ValueError(f"pad must be a non-negative integer number of voxels, got {pad!r}")
    return p


def _pad(x: np.ndarray, pad: int) -> np.ndarray:
    return np.pad(x, pad, mode="constant") if pad else x


def _crop(x: np.ndarray, pad: int) -> np.ndarray:
    return x[pad:-pad, pad:-pad, pad:-pad] if pad else x


def _check_positive(value: float, name: str, *, allow_zero: bool = False) -> float:
    v = float(value)
    if not np.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number")
    return v


def gradient_kernel_sq(shape: Sequence[int], voxel_size: _Vec3 = (1.0, 1.0, 1.0)) -> np.ndarray:
    """``|E(k)|²``: squared k-space response of the forward-difference gradient.

    Parameters
    ----------
    shape : (3,) int — grid size in voxels
    voxel_size : (3,) float — mm

    Returns
    -------
    E2 : ndarray, shape ``shape`` — mm⁻², FFT order, ``E2[0, 0, 0] = 0``

    Notes
    -----
    For the periodic forward difference ``(x[n + 1] − x[n]) / h`` along an axis of ``N`` voxels,
    the response at DFT index ``m`` is ``E(m) = (exp(2πi m/N) − 1) / h`` and

    .. math:: |E|^2 = \\sum_{i=1}^{3} \\frac{4 \\sin^2(\\pi m_i / N_i)}{h_i^2}.

    Examples
    --------
    >>> E2 = gradient_kernel_sq((4, 4, 4))
    >>> float(E2[0, 0, 0]), float(E2[2, 0, 0]), float(E2[2, 2, 2])
    (0.0, 4.0, 12.0)
    """
    shape = tuple(int(s) for s in shape)
    vs = tuple(float(v) for v in voxel_size)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive integers, got {shape!r}")
    if len(vs) != 3 or not all(np.isfinite(v) and v > 0 for v in vs):
        raise ValueError(f"voxel_size must be three positive numbers in mm, got {voxel_size!r}")
    parts = []
    for axis, (n, h) in enumerate(zip(shape, vs, strict=True)):
        e = 4.0 * np.sin(np.pi * np.arange(n) / n) ** 2 / h**2
        view = [1, 1, 1]
        view[axis] = n
        parts.append(e.reshape(view))
    return parts[0] + parts[1] + parts[2]


def _grad(x: np.ndarray, vs: tuple[float, float, float]) -> np.ndarray:
    """Periodic forward differences, shape ``(3, X, Y, Z)``, ppm/mm."""
    return np.stack([(np.roll(x, -1, axis=a) - x) / vs[a] for a in range(3)])


def _grad_adjoint(g: np.ndarray, vs: tuple[float, float, float]) -> np.ndarray:
    """Adjoint of :func:`_grad` (minus the backward-difference divergence)."""
    return sum((np.roll(g[a], 1, axis=a) - g[a]) / vs[a] for a in range(3))


def _conv(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    return np.fft.ifftn(kernel * np.fft.fftn(x)).real


# --------------------------------------------------------------------------- TKD


def tkd(
    field: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    voxel_size: _Vec3 = (1.0, 1.0, 1.0),
    b0_dir: _Vec3 = (0.0, 0.0, 1.0),
    threshold: float = 0.19,
    pad: int = 0,
) -> np.ndarray:
    """Truncated k-space division (TKD).

    Parameters
    ----------
    field : (X, Y, Z) ndarray — local field, ppm
    mask : (X, Y, Z) ndarray, optional — region of interest (nonzero = inside); the field is
        zeroed outside it before the inversion and ``chi`` is zeroed outside it afterwards.
        ``None``: the whole grid.
    voxel_size : (3,) float — mm
    b0_dir : (3,) float — main-field direction in voxel space
    threshold : float — truncation level ``t`` of ``|D|``, dimensionless, in ``(0, 1/3]``
        (0.19 is a common default; 0.1–0.2 is the usual range)
    pad : int — zero voxels added on every side before the FFT (reduces the periodic
        wrap-around); the result is cropped back to ``field.shape``

    Returns
    -------
    chi : (X, Y, Z) float64 ndarray — ppm, zero outside the mask

    Notes
    -----
    With ``F`` the DFT and ``D`` the dipole kernel,

    .. math:: \\chi = M \\cdot F^{-1}\\left[ D_t^{-1}(\\mathbf{k})\\, F[M f] \\right], \\qquad
       D_t^{-1} = \\begin{cases} 1/D & |D| \\ge t \\\\ \\operatorname{sign}(D)/t & |D| < t
       \\end{cases}

    with ``sign(0) = 0``: where ``D`` is exactly zero (k = 0 and grid points lying exactly on
    the magic-angle cone) the inverse is 0.  A noise-free field has no energy there, so this is
    the minimum-norm choice, and it keeps the convention that the inversion sets the k = 0
    term (the mean) to zero.  Components near the cone are *under*-estimated by the factor
    ``|D|/t``, which makes TKD maps systematically low; no correction factor is applied.

    References
    ----------
    .. [1] Shmueli K, de Zwart JA, van Gelderen P, Li TQ, Dodd SJ, Duyn JH. Magnetic
       susceptibility mapping of brain tissue in vivo using MRI phase data. Magn Reson Med
       2009;62:1510–1522. doi:10.1002/mrm.22135
    .. [2] Wharton S, Schäfer A, Bowtell R. Susceptibility mapping in the human brain using
       threshold-based k-space division. Magn Reson Med 2010;63:1292–1304.
       doi:10.1002/mrm.22334

    """
    f = _as_volume(field, "field")
    m = _as_mask(mask, f.shape)
    t = _check_positive(threshold, "threshold")
    if t > 1.0 / 3.0:
        raise ValueError(f"threshold must be in (0, 1/3] (|D| never exceeds 2/3), got {t}")
    p = _check_pad(pad)

    x = _pad(f * m, p)
    D = dipole_kernel(x.shape, voxel_size, b0_dir)
    with np.errstate(divide="ignore"):
        Dinv = np.where(np.abs(D) >= t, 1.0 / np.where(D == 0, 1.0, D), np.sign(D) / t)
    chi = _crop(_conv(x, Dinv), p)
    return chi * m


# --------------------------------------------------------------------------- closed-form L2


def closed_form_l2(
    field: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    lam: float = 1e-2,
    voxel_size: _Vec3 = (1.0, 1.0, 1.0),
    b0_dir: _Vec3 = (0.0, 0.0, 1.0),
    pad: int = 0,
) -> np.ndarray:
    """Tikhonov inversion with a gradient penalty, solved in closed form.

    Parameters
    ----------
    field : (X, Y, Z) ndarray — local field, ppm
    mask : (X, Y, Z) ndarray, optional — region of interest; the field is zeroed outside it
        before the inversion and ``chi`` afterwards.  ``None``: the whole grid.
    lam : float — regularisation weight λ, mm² (the gradient is in ppm/mm); 1e-2 is a
        starting point for 1 mm data with ~0.002–0.005 ppm field noise; tune it (L-curve)
    voxel_size : (3,) float — mm
    b0_dir : (3,) float — main-field direction in voxel space
    pad : int — zero voxels added on every side before the FFT; cropped afterwards

    Returns
    -------
    chi : (X, Y, Z) float64 ndarray — ppm, zero outside the mask

    Notes
    -----
    Minimises, over the periodic (padded) grid,

    .. math:: \\|D \\ast \\chi - M f\\|_2^2 + \\lambda \\|\\nabla \\chi\\|_2^2

    whose normal equations are diagonal in k-space:

    .. math:: \\chi = M \\cdot F^{-1}\\left[ \\frac{D(\\mathbf{k})\\, F[M f]}
       {D(\\mathbf{k})^2 + \\lambda |E(\\mathbf{k})|^2} \\right]

    with ``|E|²`` from :func:`gradient_kernel_sq`.  Only k = 0 makes the denominator vanish;
    its value is set to 0.  The data term covers the whole grid (the field is taken as zero
    outside the mask), which is what makes the solution closed-form; :func:`tv_admm` instead
    ignores the data outside the mask.

    References
    ----------
    .. [1] Bilgic B, Fan AP, Polimeni JR, Cauley SF, Bianciardi M, Adalsteinsson E, Wald LL,
       Setsompop K. Fast quantitative susceptibility mapping with L1-regularization and
       automatic parameter selection. Magn Reson Med 2014;72:1444–1459. doi:10.1002/mrm.25029
    """
    f = _as_volume(field, "field")
    m = _as_mask(mask, f.shape)
    lam = _check_positive(lam, "lam", allow_zero=False)
    p = _check_pad(pad)

    x = _pad(f * m, p)
    D = dipole_kernel(x.shape, voxel_size, b0_dir)
    denom = D**2 + lam * gradient_kernel_sq(x.shape, voxel_size)
    denom[0, 0, 0] = 1.0  # D(0) = 0 there: the filter is 0 at k = 0
    chi = _crop(_conv(x, D / denom), p)
    return chi * m


# --------------------------------------------------------------------------- TV by ADMM


def tv_admm(
    field: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    lam: float = 3e-4,
    rho: float | None = None,
    rho_data: float = 1.0,
    n_iter: int = 100,
    tol: float = 3e-3,
    weight: np.ndarray | None = None,
    voxel_size: _Vec3 = (1.0, 1.0, 1.0),
    b0_dir: _Vec3 = (0.0, 0.0, 1.0),
    pad: int = 0,
    chi0: np.ndarray | None = None,
    prior_weight: float = 0.0,
    device=None,
) -> np.ndarray:
    """Total-variation-regularised dipole inversion by ADMM (weighted linear data term).

    Parameters
    ----------
    field : (X, Y, Z) ndarray — local field, ppm
    mask : (X, Y, Z) ndarray, optional — region where the field is trusted; ``chi`` is zeroed
        outside it.  ``None``: the whole grid.
    lam : float — TV weight λ, ppm·mm (the data term is in ppm², the gradient in ppm/mm);
        3e-4 is a starting point for 1 mm data with ~0.002–0.005 ppm field noise; tune it
    rho : float, optional — ADMM penalty of the gradient split, mm²; default ``100 · lam``
        (numerically; FANSI's rule)
    rho_data : float — ADMM penalty of the data split, dimensionless
    n_iter : int — maximum number of iterations
    tol : float — stop when ``‖χ_k − χ_{k−1}‖ / ‖χ_k‖ < tol``
    weight : (X, Y, Z) ndarray, optional — per-voxel data weight ``W ≥ 0`` (e.g. the magnitude
        scaled to at most 1, or an inverse noise standard deviation scaled likewise), multiplied
        by the mask.  ``None``: 1 inside the mask.
    voxel_size : (3,) float — mm
    b0_dir : (3,) float — main-field direction in voxel space
    pad : int — zero voxels added on every side (weight 0 there); cropped afterwards
    chi0 : (X, Y, Z) ndarray, optional — ppm; the iterations start from it (every split
        variable consistent with it: ``z = ∇χ₀``, ``v = D ∗ χ₀``) instead of from 0, and, with
        ``prior_weight`` μ > 0, the term ``(μ/2) ‖χ − χ₀‖²`` joins the objective.  With a fixed
        ``n_iter`` and ``tol = 0`` the result then depends on χ₀ also through the early stop
        (how the app refines a network's map: :mod:`bids_qsmnet.inference.refine`).
    prior_weight : float — μ, dimensionless (as the data term); needs ``chi0``
    device : torch device of the iterations (default CPU; a GPU runs them there)

    Returns
    -------
    chi : (X, Y, Z) float64 ndarray — ppm, zero outside the mask

    Notes
    -----
    Solves

    .. math:: \\min_\\chi \\tfrac12 \\|W (D \\ast \\chi - f)\\|_2^2
       + \\lambda \\|\\nabla \\chi\\|_1
       + \\tfrac{\\mu}{2} \\|\\chi - \\chi_0\\|_2^2, \\qquad W = \\text{weight} \\cdot M,

    with anisotropic TV (``‖∇χ‖₁ = Σ_i Σ_n |∂_i χ[n]|``), by splitting ``z = ∇χ`` and
    ``v = D ∗ χ`` (scaled-form ADMM, duals ``u``, ``s``):

    .. math::
       \\hat\\chi &= \\frac{\\rho\\, E^H \\widehat{(z - u)} + \\rho_d\\, D\\, \\widehat{(v - s)}
                        + \\mu \\hat\\chi_0}
                        {\\rho |E|^2 + \\rho_d D^2 + \\mu} \\quad
                        \\text{(in k-space; 0 at k = 0 when μ = 0)} \\\\
       z &= \\operatorname{shrink}(\\nabla\\chi + u,\\ \\lambda/\\rho) \\\\
       v &= \\frac{W^2 f + \\rho_d (D \\ast \\chi + s)}{W^2 + \\rho_d} \\\\
       u &\\leftarrow u + \\nabla\\chi - z, \\qquad s \\leftarrow s + D \\ast \\chi - v

    where ``shrink(a, κ) = sign(a) max(|a| − κ, 0)``.  Because ``W = 0`` outside the mask, the
    field there is not fitted (``v`` is free), so the mask edge does not bias the inside; all
    steps are voxel-wise or diagonal in k-space (four real 3-D FFTs per iteration, float32).
    Iterations are logged at DEBUG level; not reaching ``tol`` within ``n_iter`` is logged at
    INFO level.

    References
    ----------
    .. [1] Bilgic B, Fan AP, Polimeni JR, Cauley SF, Bianciardi M, Adalsteinsson E, Wald LL,
       Setsompop K. Fast quantitative susceptibility mapping with L1-regularization and
       automatic parameter selection. Magn Reson Med 2014;72:1444–1459. doi:10.1002/mrm.25029
    .. [2] Milovic C, Bilgic B, Zhao B, Acosta-Cabronero J, Tejos C. Fast nonlinear
       susceptibility inversion with variational regularization. Magn Reson Med
       2018;80:814–821. doi:10.1002/mrm.27073
    .. [3] Boyd S, Parikh N, Chu E, Peleato B, Eckstein J. Distributed optimization and
       statistical learning via the alternating direction method of multipliers. Found Trends
       Mach Learn 2011;3:1–122. doi:10.1561/2200000016
    """
    f = _as_volume(field, "field")
    m = _as_mask(mask, f.shape)
    lam = _check_positive(lam, "lam")
    rho = 100.0 * lam if rho is None else _check_positive(rho, "rho")
    rho_d = _check_positive(rho_data, "rho_data")
    n_iter = int(n_iter)
    if n_iter < 1:
        raise ValueError(f"n_iter must be at least 1, got {n_iter}")
    tol = _check_positive(tol, "tol", allow_zero=True)
    w = m if weight is None else _as_weight(weight, f.shape) * m
    p = _check_pad(pad)
    vs = tuple(float(v) for v in voxel_size)

    mu = _check_positive(prior_weight, "prior_weight", allow_zero=True)
    if mu > 0 and chi0 is None:
        raise ValueError("prior_weight > 0 needs chi0, the map it pulls towards")
    if chi0 is not None and np.shape(chi0) != f.shape:
        raise ValueError(f"chi0 has shape {np.shape(chi0)}, the field {f.shape}")
    x0 = None if chi0 is None else _pad(_as_volume(chi0, "chi0") * m, p)
    f_p, w2 = _pad(f * m, p), _pad(w, p) ** 2
    chi = _tv_admm_iterations(f_p, w2, lam=lam, rho=rho, rho_d=rho_d, n_iter=n_iter, tol=tol,
                              voxel_size=vs, b0_dir=b0_dir, chi0=x0, mu=mu, device=device)
    return _crop(chi, p) * m


def _tv_admm_iterations(f_p, w2, *, lam, rho, rho_d, n_iter, tol, voxel_size, b0_dir,
                        chi0=None, mu=0.0, device=None):
    """The ADMM iterations of :func:`tv_admm` on the padded grid, in float32 with real FFTs
    on ``device`` (torch's CPU threads by default); returns χ (float64 ndarray).

    The half spectrum keeps the kernels Hermitian on the Nyquist plane, which matters only
    for B0 oblique to the grid (there ``D(k_z = −½) ≠ D(k_z = +½)`` off the axes).  The loop
    keeps only what the next iteration reads (``z − u``, ``u``, ``v − s``, ``s``) and rewrites
    it in place, each in as few passes over memory as torch's fused operations allow (the
    elementwise work costs as much as the four FFTs): with ``g = ∇χ + u``, the shrinkage gives
    ``u ← clip(g, −κ, κ)`` and ``z − u = g − 2 u`` (κ = λ/ρ); with ``t = D ∗ χ + s`` and the
    voxel-wise constants ``a = ρ_d / (W² + ρ_d)``, ``b = W² f / (W² + ρ_d)``, the data split's
    ``v = a t + b`` gives ``v − s = 2v − t = (2a − 1) t + 2b`` and ``s ← t − v = (1 − a) t − b``.
    The χ update divides by ρ: ``χ̂ = (F ∇ᵀ(z − u) + (ρ_d/ρ) D F(v − s) + (μ/ρ) χ̂₀) ρ / denom``.
    """
    import torch

    shape = f_p.shape
    dev = torch.device(device or "cpu")
    half = (slice(None), slice(None), slice(0, shape[2] // 2 + 1))

    def tensor(a):
        return torch.as_tensor(np.ascontiguousarray(a, np.float32), device=dev)

    def zeros(*lead):
        return torch.zeros((*lead, *shape), dtype=torch.float32, device=dev)

    D = tensor(dipole_kernel(shape, voxel_size, b0_dir)[half])
    denom = rho * tensor(gradient_kernel_sq(shape, voxel_size)[half]) + rho_d * D**2 + mu
    if mu == 0:
        denom[0, 0, 0] = 1.0  # numerator is 0 there too: the mean of chi stays 0
    gain, ratio_D = rho / denom, (rho_d / rho) * D
    del denom
    f_t, w2_t = tensor(f_p), tensor(w2)
    a = rho_d / (w2_t + rho_d)
    b = (1.0 - a).mul_(f_t)                              # W² f / (W² + ρ_d)
    c_vs, b_vs, c_s, b_s = 2.0 * a - 1.0, 2.0 * b, 1.0 - a, -b
    kappa = lam / rho
    ops = _FiniteDifferences(shape, voxel_size)
    if chi0 is None:
        chi, zu = zeros(), zeros(3)
        vs = torch.where(w2_t > 0, f_t, 0.0)  # v − s; unweighted data must not enter at first
        prior = None
    else:  # warm start: every split variable consistent with χ₀
        chi = tensor(chi0)
        chi0_k = torch.fft.rfftn(chi)
        zu = ops.grad(chi, zeros(3))
        vs = torch.fft.irfftn(D * chi0_k, s=shape)
        prior = chi0_k.mul_(mu / rho) if mu > 0 else None
    del a, b, chi0
    u, s, g, t = zeros(3), zeros(), zeros(3), zeros()
    track = tol > 0 or logger.isEnabledFor(logging.DEBUG)
    change = 0.0
    for it in range(1, n_iter + 1):
        # χ's spectrum serves D ∗ χ too (four real FFTs per iteration, not five)
        chi_k = torch.fft.rfftn(ops.grad_adjoint(zu, t))
        chi_k.addcmul_(torch.fft.rfftn(vs), ratio_D)
        if prior is not None:
            chi_k.add_(prior)
        chi_new = torch.fft.irfftn(chi_k.mul_(gain), s=shape)
        ops.grad(chi_new, g).add_(u)                                      # g = ∇χ + u
        torch.clamp(g, -kappa, kappa, out=u)
        torch.add(g, u, alpha=-2.0, out=zu)
        t = torch.fft.irfftn(chi_k.mul_(D), s=shape).add_(s)             # D ∗ χ + s
        torch.addcmul(b_vs, t, c_vs, out=vs)
        torch.addcmul(b_s, t, c_s, out=s)
        if track:
            norm = float(torch.linalg.vector_norm(chi_new))
            change = float(torch.linalg.vector_norm(chi_new - chi)) / norm if norm > 0 else 0.0
        chi = chi_new
        if logger.isEnabledFor(logging.DEBUG):
            dchi = torch.fft.irfftn(D * torch.fft.rfftn(chi), s=shape)
            resid = float(torch.linalg.vector_norm(torch.sqrt(w2_t) * (dchi - f_t)))
            logger.debug("tv_admm iter %d: rel. change %.3e, ||W(D chi - f)|| %.4e", it,
                         change, resid)
        if track and change < tol:
            logger.debug("tv_admm converged after %d iterations", it)
            break
    else:
        if tol > 0:  # (tol 0: a fixed number of iterations was asked for)
            logger.info("tv_admm stopped at n_iter=%d (relative change %.2e > tol %.1e)",
                        n_iter, change, tol)
    return chi.cpu().numpy().astype(np.float64)


class _FiniteDifferences:
    """Periodic forward differences ``∇`` (mm⁻¹) on a grid and their adjoint ``∇ᵀ``, written
    into buffers the caller owns (no rolled copies, no allocation per call)."""

    def __init__(self, shape, voxel_size):
        self.shape = tuple(shape)
        self.scale = [1.0 / float(v) for v in voxel_size]

    def grad(self, x, out):
        """``out[a] = (x[n + e_a] − x[n]) / h_a`` (periodic); returns ``out`` (3, *shape)."""
        import torch

        for a in range(3):
            n = self.shape[a]
            ga = out[a]
            torch.sub(x.narrow(a, 1, n - 1), x.narrow(a, 0, n - 1), out=ga.narrow(a, 0, n - 1))
            torch.sub(x.narrow(a, 0, 1), x.narrow(a, n - 1, 1), out=ga.narrow(a, n - 1, 1))
            if self.scale[a] != 1.0:
                ga.mul_(self.scale[a])
        return out

    def grad_adjoint(self, g, out):
        """``out = ∇ᵀ g = Σ_a (g_a[n − e_a] − g_a[n]) / h_a`` (periodic); returns ``out``."""
        import torch

        for a in range(3):
            n, h, ga = self.shape[a], self.scale[a], g[a]
            if a == 0:
                torch.sub(ga.narrow(0, 0, n - 1), ga.narrow(0, 1, n - 1),
                          out=out.narrow(0, 1, n - 1))
                torch.sub(ga.narrow(0, n - 1, 1), ga.narrow(0, 0, 1), out=out.narrow(0, 0, 1))
                if h != 1.0:
                    out.mul_(h)
                continue
            body, wrap = out.narrow(a, 1, n - 1), out.narrow(a, 0, 1)
            body.add_(ga.narrow(a, 0, n - 1), alpha=h).sub_(ga.narrow(a, 1, n - 1), alpha=h)
            wrap.add_(ga.narrow(a, n - 1, 1), alpha=h).sub_(ga.narrow(a, 0, 1), alpha=h)
        return out


# --------------------------------------------------------------------------- data consistency


def data_consistency(
    chi_init: np.ndarray,
    field: np.ndarray,
    mask: np.ndarray | None,
    *,
    lam: float = 1e-2,
    n_iter: int = 30,
    tol: float = 0.0,
    voxel_size: _Vec3 = (1.0, 1.0, 1.0),
    b0_dir: _Vec3 = (0.0, 0.0, 1.0),
    pad: int = 0,
    highpass_mm: float = 0.0,
) -> np.ndarray:
    """Refine a susceptibility map towards the measured field by conjugate gradients.

    Parameters
    ----------
    chi_init : (X, Y, Z) ndarray — initial map (e.g. a network's output), ppm; also the prior
    field : (X, Y, Z) ndarray — local field, ppm
    mask : (X, Y, Z) ndarray or None — where the field is trusted and ``chi`` may be nonzero:
        binary, or weights ``W`` in ``[0, 1]`` (e.g. normalised magnitude) whose support
        ``S = (W ≠ 0)`` is the region.  ``None``: the whole grid with weight 1.
    lam : float — weight λ of the prior ``‖χ − χ_init‖²``, dimensionless; small values trust
        the field more
    n_iter : int — number of conjugate-gradient iterations (0 returns ``chi_init`` masked)
    tol : float — stop early when the normal-equation residual falls below ``tol`` times its
        initial value (0: always run ``n_iter`` iterations)
    voxel_size : (3,) float — mm
    b0_dir : (3,) float — main-field direction in voxel space
    pad : int — zero voxels added on every side (outside the region); cropped afterwards
    highpass_mm : float — 0: the data term compares fields; ``r > 0``: it compares their
        spherical-mean-value high-passes ``H = δ − S_r`` (radius ``r`` mm, see
        :func:`bids_qsmnet.phase.background.smv_kernel`), on the voxels whose sphere lies in
        the region — blind to any harmonic field, such as the residual background a
        background-field removal leaves

    Returns
    -------
    chi : (X, Y, Z) float64 ndarray — ppm, zero outside the region ``S``

    Notes
    -----
    With ``χ`` restricted to the region (``χ = S χ``), minimises

    .. math:: J(\\chi) = \\|W (D \\ast \\chi - f)\\|_2^2 + \\lambda \\|\\chi - S\\chi_0\\|_2^2

    by conjugate gradients on the normal equations
    ``(S D W² D S + λ S) χ = S D W² f + λ S χ₀`` (``D ∗`` is self-adjoint), starting from
    ``S χ₀``.  With ``highpass_mm = r`` the data term is ``‖W E (H ∗ (D ∗ χ − f))‖²`` with
    ``E`` the region eroded by the sphere: by the mean-value property ``H ∗ b = 0`` on ``E`` for
    every field ``b`` harmonic in the region, so a residual background in ``f`` does not pull
    on ``χ``; ``1 − Ŝ_r(k) ≈ (2π|k|r)²/10`` weakens the data's low spatial frequencies, which
    then stay closer to ``χ₀``.  The operator is symmetric positive definite on the region
    for ``λ > 0``, so every iteration lowers ``J`` of the returned map; the data residual
    ``‖W (D ∗ χ − f)‖`` is tracked without extra FFTs and logged at DEBUG level.  Restricting
    ``χ`` to the region (as a masked network output is) means the field inside cannot be
    explained by sources outside it.  Each iteration costs two FFT pairs.  Components the
    field does not constrain (near the magic-angle cone, k = 0) stay close to ``χ₀``.

    References
    ----------
    .. [1] Hestenes MR, Stiefel E. Methods of conjugate gradients for solving linear systems.
       J Res Natl Bur Stand 1952;49:409–436. doi:10.6028/jres.049.044
    .. [2] Aggarwal HK, Mani MP, Jacob M. MoDL: model-based deep learning architecture for
       inverse problems. IEEE Trans Med Imaging 2019;38:394–405. doi:10.1109/TMI.2018.2865356
    """
    f = _as_volume(field, "field")
    x0 = _as_volume(chi_init, "chi_init")
    if x0.shape != f.shape:
        raise ValueError(f"chi_init shape {x0.shape} does not match the field shape {f.shape}")
    w = np.ones(f.shape) if mask is None else _as_weight(mask, f.shape, "mask")
    lam = _check_positive(lam, "lam")
    n_iter = int(n_iter)
    if n_iter < 0:
        raise ValueError(f"n_iter must be non-negative, got {n_iter}")
    tol = _check_positive(tol, "tol", allow_zero=True)
    p = _check_pad(pad)

    hp = _check_positive(highpass_mm, "highpass_mm", allow_zero=True)

    w2 = _pad(w, p) ** 2
    support = w2 > 0
    f_p = _pad(f, p)
    x = _pad(x0, p) * support  # a new array: updated in place below
    D = dipole_kernel(f_p.shape, voxel_size, b0_dir)
    if hp > 0:
        from .smv import smv_kernel

        S = smv_kernel(f_p.shape, voxel_size, hp)
        # voxels whose whole sphere lies in the region: the kernel's weights sum to 1 and
        # each is at least 1/(voxels in the sphere) > 1e-6, far above the FFT's rounding
        inside = _conv(support.astype(np.float64), S) > 1.0 - 1e-6
        w2 = w2 * (inside & support)
        if not w2.any():
            raise ValueError(f"the region is too thin for a {hp:g} mm sphere (highpass_mm)")
        f_p = _conv(f_p * support, 1.0 - S)
        D = D * (1.0 - S)

    Dx = _conv(x, D)
    r = _conv(w2 * (f_p - Dx), D) * support  # b - A x0 (the prior term vanishes at S x0)
    d = r.copy()
    rr = rr0 = float(np.vdot(r, r))
    for it in range(1, n_iter + 1):
        if rr == 0.0 or (tol > 0 and rr <= tol**2 * rr0):
            logger.debug("data_consistency converged after %d iterations", it - 1)
            break
        Dd = _conv(d, D)  # kept so that D x is updated without another FFT pair
        Ad = _conv(w2 * Dd, D) * support + lam * d
        alpha = rr / float(np.vdot(d, Ad))
        x += alpha * d
        Dx += alpha * Dd
        r -= alpha * Ad
        rr_new = float(np.vdot(r, r))
        d = r + (rr_new / rr) * d
        rr = rr_new
        if logger.isEnabledFor(logging.DEBUG):
            resid = np.sqrt(np.sum(w2 * (Dx - f_p) ** 2))
            logger.debug("data_consistency iter %d: ||W(D chi - f)|| %.4e", it, resid)
    return _crop(x, p)
