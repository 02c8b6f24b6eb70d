"""Data-consistency refinement of a network's χ map, with the settings a model file carries.

After the network, the app may refine its map ``χ_net`` towards the measured local field by a
few conjugate-gradient iterations on

.. math:: J(\\chi) = \\|W (D \\ast \\chi - f)\\|_2^2 + \\lambda \\|\\chi - \\chi_{net}\\|_2^2

(:func:`bids_qsmnet.physics.inversion.data_consistency`).  The weight ``W`` trusts the field
less near the edge of the brain mask: a local field from background-field removal (V-SHARP,
PDF, …) is least reliable within a few millimetres of the boundary (the spherical kernel's
reach, residual background, the mask's partial-volume layer), and fitting those errors puts
streaks and rims into χ.  ``W`` rises linearly with the distance from the outside of the mask,
from ``floor`` at the boundary voxels to 1 at ``edge_mm`` millimetres inside
(:func:`edge_weights`); ``edge_mm = 0`` gives the plain binary mask.

With ``highpass_mm = r > 0`` both fields are high-passed by ``δ − S_r`` (the spherical mean
value over ``r`` mm, as in SHARP) before they are compared, on the voxels whose sphere fits
in the mask: a residual background field is harmonic inside the brain and vanishes under
that operator, so the refinement restores the detail the field holds without fitting what
background removal left behind.

A model file's ``inference`` section holds the defaults (``dc_lambda``, ``dc_iterations``,
``dc_edge_mm``, ``dc_highpass_mm``, ``residual_passes`` and ``dc_auto``).

**λ chosen per input** (``dc_auto``, :class:`AutoLambda`).  How much the field should be
trusted depends on the field: an accurate local field (a simulation, a clean acquisition)
carries information the network missed and wants a small λ; a measured field also holds
parts no susceptibility inside the brain explains (residual background, white-matter
anisotropy and microstructure, noise), and fitting them puts streaks and offsets into χ.
The criterion measures, before any refinement, how much of the field the network's own map
leaves unexplained,

.. math:: \\rho_0 = \\|M (D \\ast \\chi_{net} - f)\\| / \\|M f\\|,

and subtracts from its square two parts that do not call for trusting the network more: the
field's white noise, whose share ``ν = N σ̂² / ‖M f‖²`` of the field's energy is estimated from
the field alone (σ̂ from its finest diagonal wavelet detail, :mod:`bids_qsmnet.physics.noise`;
the TV term of the refinement deals with noise), and the part the network leaves even on an
accurate field of a brain (``floor``, a property of the network measured on a tuning
anatomy).  The excess ``e = max(ρ₀² − noise·ν − floor², ρ_min²)`` estimates the field's
structured content that no susceptibility inside the brain explains, relative to the field,
and the prior weight follows a power law of it, ``λ = lambda_ref · (e / e_ref)^power`` (the
Bayesian weight ``σ_data² / σ_prior²`` grows with the data's error variance).  λ above
``lambda_max`` means "trust the network": no refinement.  The constants are fitted on
simulated fields of the MNI152 anatomy (exact fields with 0.5–2 ppb noise, fields with a
non-dipolar part, fields from the raw-GRE chain; two random draws of each) by
``benchmarks/calibrate_dc.py`` and stored in the model file; the chosen λ, ρ₀, σ̂ and ν and
the data residual after the refinement go into the χ map's sidecar.

Before the refinement, the app may also run **residual-field passes**
(:func:`residual_passes`): the network maps what its map leaves unexplained of the field,
``r = M (f − D ∗ χ)``, and the result is added, ``χ ← χ + N(r)`` — a Richardson iteration
with the network as an approximate inverse of the dipole convolution.  A network that
shrinks strong or extended sources (an L1-trained network regresses large values towards the
mean) leaves a residual with the missing part's field in it, which the next pass restores.
The passes trust *all* of the field, its low spatial frequencies included: on an accurate
local field (exact simulation plus noise) two passes lowered the default model's NRMSE on the
accuracy benchmark's tuning brain from 23.8 % to 17.5 %, but on a local field from the app's
own phase chain (simulated GRE → V-SHARP) they raised it from 25.8 % to 32.3 %: the smooth
error background removal leaves in the field is mapped to χ.  They are therefore off by
default (``residual_passes`` 0) and meant for local fields whose large-scale content is
trusted (``--residual-passes``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..physics.dc_path import AutoLambda

LOGGER = logging.getLogger(__name__)

__all__ = ["AutoLambda", "DCSettings", "brain_box", "dc_settings", "edge_weights", "fft_grid",
           "pass_count", "refine",
           "refine_adaptive", "refine_grid", "refine_tv", "residual_passes",
           "tv_penalties"]

#: weight of the boundary voxels (> 0: the region where χ may be nonzero stays the mask)
EDGE_FLOOR = 0.05
#: voxels kept around the mask's bounding box: the refinement's FFT domain is that box plus
#: FFT_PAD zero voxels on each side (and a few more to a fast FFT length), not the whole
#: volume
BOX_MARGIN = 8
#: zero voxels on each side of the refinement's FFT grid against the wrap-around
FFT_PAD = 8


@dataclass(frozen=True)
class DCSettings:
    """The refinement's settings: prior weight λ (0: no refinement), CG iterations, the
    width (mm) of the mask-edge ramp of the data weight (0: binary mask), the radius (mm)
    of the data term's spherical-mean-value high-pass (0: none), and, when ``auto`` is set,
    the rule that chooses λ per input instead (``lam`` is then ignored).  With ``tv`` > 0
    the refinement adds a total-variation term of that weight (ppm·mm) and runs
    ``tv_iterations`` ADMM iterations from the network's map (:func:`refine_tv`) instead of
    ``n_iter`` conjugate-gradient iterations, with the ADMM penalties scaled by
    ``tv_penalty_scale`` (:func:`tv_penalties`)."""

    lam: float = 0.0
    n_iter: int = 30
    edge_mm: float = 0.0
    highpass_mm: float = 0.0
    auto: AutoLambda | None = None
    tv: float = 0.0
    tv_iterations: int = 60
    tv_penalty_scale: float = 1.0

    @property
    def active(self) -> bool:
        return (self.lam > 0 or self.auto is not None) and self.n_iter > 0

    def to_dict(self) -> dict:
        out = {"lambda": float(self.lam), "iterations": int(self.n_iter) if self.active else 0,
               "edge_mm": float(self.edge_mm) if self.active else 0.0,
               "highpass_mm": float(self.highpass_mm) if self.active else 0.0}
        if self.auto is not None and self.active:
            out["lambda"] = "auto"
            out["auto"] = self.auto.to_dict()
        if self.tv > 0 and self.active:
            out.update(tv=float(self.tv), iterations=int(self.tv_iterations),
                       penalty_scale=float(self.tv_penalty_scale))
        return out


def tv_penalties(tv: float, scale: float = 1.0) -> dict:
    """The ADMM penalties of the TV refinement for TV weight ``tv`` (ppm·mm) and penalty
    scale ``c``: ``rho = 100 c · tv`` (gradient split, mm²) and ``rho_data = 1 / c`` (data
    split), keyword arguments of :func:`bids_qsmnet.physics.inversion.tv_admm`.

    ``c = 1`` is FANSI's rule.  Started from the same map, ``n`` iterations with ``c`` give
    nearly the map of ``c·n`` iterations with ``c = 1``: on the MNI152 anatomy's exact field,
    fields with a non-dipolar part and the exact field with a haemorrhage and a calcification
    added, 30 iterations with ``c = 2`` differ from 60 with ``c = 1`` by at most 6.6e-4 ppm
    rms and 0.11 NRMSE points (``docs/refinement.md``, ``benchmarks/tv_penalty.py``), for
    half the iterations, four real FFTs each.  Larger scales drift further where strong
    sources are (``c = 3``, 20 iterations: 0.9 points)."""
    c = float(scale)
    if not c > 0:
        raise ValueError(f"the TV penalty scale must be positive, got {scale!r}")
    return {"rho": 100.0 * c * float(tv), "rho_data": 1.0 / c}


def dc_settings(defaults: Mapping | None, *, lam: float | str | None = None,
                n_iter: int | None = None, edge_mm: float | None = None,
                highpass_mm: float | None = None, tv: float | None = None) -> DCSettings:
    """The settings to use: explicit values where given, else the model file's defaults.

    ``lam``: a number (a fixed λ; 0 turns the refinement off), ``"auto"`` (λ chosen per input
    by the model file's ``dc_auto`` rule) or None (the model file's choice: ``dc_auto`` when it
    has one, else its ``dc_lambda``).  ``tv``: the total-variation weight (0: the plain
    refinement; None: the model file's ``dc_tv``); its iterations and penalty scale are the
    file's ``dc_tv_iterations`` and ``dc_tv_penalty_scale`` (60 and 1 when absent)."""
    d = dict(defaults or {})
    auto = None
    if lam == "auto" or (lam is None and d.get("dc_auto")):
        if not d.get("dc_auto"):
            raise ValueError("λ 'auto' needs a model file with a dc_auto calibration "
                             "(benchmarks/calibrate_dc.py); this one has none: give a number")
        auto = AutoLambda.from_dict(d["dc_auto"])
        lam = 0.0
    lam = float(d.get("dc_lambda", 0.0) if lam is None else lam)
    n_iter = int(d.get("dc_iterations", 30) if n_iter is None else n_iter)
    edge_mm = float(d.get("dc_edge_mm", 0.0) if edge_mm is None else edge_mm)
    highpass_mm = float(d.get("dc_highpass_mm", 0.0) if highpass_mm is None else highpass_mm)
    tv = float(d.get("dc_tv", 0.0) if tv is None else tv)
    tv_iterations = int(d.get("dc_tv_iterations", 60))
    tv_penalty_scale = float(d.get("dc_tv_penalty_scale", 1.0))
    tv_penalties(tv, tv_penalty_scale)  # refuses a scale that is not positive
    if min(lam, n_iter, edge_mm, highpass_mm, tv, tv_iterations) < 0:
        raise ValueError(f"data-consistency settings must be non-negative (λ {lam}, "
                         f"iterations {n_iter}, edge {edge_mm} mm, high-pass {highpass_mm} mm, "
                         f"TV {tv}, TV iterations {tv_iterations})")
    if tv > 0 and highpass_mm > 0:
        raise ValueError("the TV refinement has no high-pass data term: set dc_highpass_mm 0")
    return DCSettings(lam, n_iter, edge_mm, highpass_mm, auto, tv, tv_iterations,
                      tv_penalty_scale)


def pass_count(defaults: Mapping | None, n: int | None = None) -> int:
    """The number of residual-field passes to run: ``n`` where given, else the model file's
    ``residual_passes`` (0 when it has none)."""
    return int((defaults or {}).get("residual_passes", 0) if n is None else n)


def edge_weights(mask: np.ndarray, voxel_size: Sequence[float] = (1.0, 1.0, 1.0), *,
                 edge_mm: float, floor: float = EDGE_FLOOR) -> np.ndarray:
    """Data weights in ``[floor, 1]`` inside ``mask`` (0 outside) that rise linearly with the
    Euclidean distance (mm, anisotropic voxels respected) from the nearest voxel outside the
    mask: a boundary voxel, one voxel from the outside, gets ``max(floor, d / edge_mm)``."""
    from scipy import ndimage as ndi

    mask = np.asarray(mask).astype(bool)
    if edge_mm <= 0:
        return mask.astype(np.float64)
    dist = ndi.distance_transform_edt(np.pad(mask, 1), sampling=tuple(map(float, voxel_size)))
    dist = dist[1:-1, 1:-1, 1:-1]  # a mask touching the grid's edge ends there
    return np.where(mask, np.clip(dist / float(edge_mm), floor, 1.0), 0.0)


def brain_box(mask: np.ndarray, margin: int = BOX_MARGIN) -> tuple[slice, slice, slice]:
    """The bounding box of ``mask`` grown by ``margin`` voxels on each side (within the
    volume); the whole volume for an empty mask.

    The refinements work on this box: the field and the weights are zero outside the mask,
    so the box holds all the data, and χ outside the mask is free only within the margin
    and the 8-voxel FFT padding, 16 voxels (as in a volume whose brain nearly fills it).
    The box starts on even indices, so that the noise estimate's 2×2×2 blocks are those of
    the whole volume.  With the padding, and zeros up to fast FFT lengths
    (:func:`fast_fft_length`), a brain that fills 17 % of a 160³ grid is refined on an FFT
    grid of 144 × 168 × 144 instead of 176³.

    >>> m = np.zeros((40, 40, 40), bool); m[10:20, 5:35, 18:22] = True
    >>> brain_box(m, 8)
    (slice(2, 28, None), slice(0, 40, None), slice(10, 30, None))
    """
    idx = np.argwhere(mask)
    if not len(idx):
        return tuple(slice(0, n) for n in mask.shape)
    lo = np.maximum(idx.min(0) - margin, 0)
    lo -= lo % 2
    hi = np.minimum(idx.max(0) + 1 + margin, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def fast_fft_length(n: int) -> int:
    """The smallest even length ≥ ``n`` without a prime factor above 13: a real FFT of a
    length with a large prime factor (142 = 2·71, 167, 207 = 9·23) takes 2–2.5× longer per
    voxel than a nearby smooth one (``benchmarks/speed.py fftlen``).

    >>> [fast_fft_length(n) for n in (142, 167, 176, 207)]
    [144, 168, 176, 208]
    """
    m = int(n) + int(n) % 2
    while True:
        k = m
        for p in (2, 3, 5, 7, 11, 13):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 2


class _WorkGrid:
    """The brain's box of a volume (:func:`brain_box`), extended with zeros at its far ends
    so that the box plus the FFT padding has fast FFT lengths (:func:`fast_fft_length`)."""

    def __init__(self, mask: np.ndarray):
        self.shape = mask.shape
        self.box = brain_box(mask)
        sizes = [s.stop - s.start for s in self.box]
        #: the FFT grid: the box, its padding and the zeros up to fast lengths
        self.fft_shape = tuple(fast_fft_length(n + 2 * FFT_PAD) for n in sizes)
        self.ext = [(0, m - 2 * FFT_PAD - n) for m, n in zip(self.fft_shape, sizes)]
        self.inner = tuple(slice(0, n) for n in sizes)

    def take(self, volume: np.ndarray) -> np.ndarray:
        """The box of ``volume``, extended with zeros."""
        return np.pad(np.asarray(volume)[self.box], self.ext)

    def put(self, work: np.ndarray) -> np.ndarray:
        """A work array placed back in a zero volume (float32)."""
        out = np.zeros(self.shape, np.float32)
        out[self.box] = work[self.inner]
        return out


def fft_grid(mask: np.ndarray) -> tuple[int, int, int]:
    """The shape of the FFT grid the refinements of a volume with ``mask`` work on."""
    return _WorkGrid(np.asarray(mask).astype(bool)).fft_shape


def refine(chi: np.ndarray, field: np.ndarray, mask: np.ndarray, settings: DCSettings, *,
           voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
           b0_dir: Sequence[float] = (0.0, 0.0, 1.0), device=None) -> np.ndarray:
    """``chi`` refined towards ``field`` (ppm) inside ``mask`` (float32; ``chi`` masked when
    the settings are inactive); :func:`refine_adaptive` without its report."""
    return refine_adaptive(chi, field, mask, settings, voxel_size=voxel_size, b0_dir=b0_dir,
                           device=device)[0]


def refine_adaptive(chi: np.ndarray, field: np.ndarray, mask: np.ndarray,
                    settings: DCSettings, *, voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
                    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
                    device=None) -> tuple[np.ndarray, dict]:
    """Refine ``chi`` towards ``field`` with the settings' fixed λ or, with ``settings.auto``,
    the λ that rule chooses for this field (see the module docstring), on the brain's box
    (:func:`brain_box`).

    Parameters
    ----------
    chi : (X, Y, Z) ndarray — the network's map, ppm
    field : (X, Y, Z) ndarray — local field, ppm
    mask : (X, Y, Z) bool ndarray — brain mask
    settings : DCSettings
    voxel_size : (3,) float — mm
    b0_dir : (3,) float — main-field direction in voxel space
    device : torch device of the FFTs (default CPU)

    Returns
    -------
    chi : (X, Y, Z) float32 ndarray — ppm, zero outside the mask
    report : dict — ``settings.to_dict()`` with the λ used (``lambda``; 0 when no refinement
        ran), the rule's inputs ``rho0``, ``noise_ppb`` (σ̂) and ``noise_share`` (ν), the
        relative data residual ``residual`` after it, and
        the ``solver`` with the ``iterations_run`` (see
        :func:`bids_qsmnet.physics.dc_path.refine_path`)
    """
    mask = np.asarray(mask).astype(bool)
    report = settings.to_dict()
    chi = np.where(mask, chi, 0.0).astype(np.float32)
    if not settings.active:
        return chi, report
    grid = _WorkGrid(mask)
    out, report = _refine_box(grid.take(chi), grid.take(field), grid.take(mask), settings,
                              report, voxel_size=voxel_size, b0_dir=b0_dir, device=device)
    return grid.put(out), report


def _refine_box(chi, field, mask, settings, report, *, voxel_size, b0_dir, device):
    """:func:`refine_adaptive` on the work grid (``chi`` already masked)."""
    from ..physics.dc_path import refine_path

    field = np.where(mask, field, 0.0).astype(np.float32)
    w = edge_weights(mask, voxel_size, edge_mm=settings.edge_mm)
    if settings.tv > 0:
        return refine_tv(chi, field, mask, w, settings, report, voxel_size=voxel_size,
                         b0_dir=b0_dir, device=device)
    geom = dict(voxel_size=voxel_size, b0_dir=b0_dir, pad=FFT_PAD,
                highpass_mm=settings.highpass_mm, device=device)
    chosen = {}
    noise = _noise(field, mask) if settings.auto is not None else None

    def choose(rho0: float) -> list[float]:
        lam = _choose(settings, rho0, noise, report)
        chosen.update(lam=lam, rho0=rho0)
        return [] if lam is None else [lam]

    path = refine_path(chi, field, w, choose, n_iter=settings.n_iter, **geom)
    lam, rho0 = chosen["lam"], chosen["rho0"]
    if lam is None:
        report.update({"lambda": 0.0, "residual": round(rho0, 4)})
        return chi, report
    report.update({"lambda": float(lam), "residual": round(float(path.residuals[0]), 4),
                   "solver": path.solver, "iterations_run": path.iterations})
    return path.chis[0].astype(np.float32), report


def _noise(field: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """The field's estimated noise σ̂ (ppm) and noise share ν (:mod:`..physics.noise`);
    (0, 0) where the mask holds no whole 2×2×2 block."""
    from ..physics.noise import noise_share, noise_sigma

    try:
        sigma = noise_sigma(field, mask)
    except ValueError:
        return 0.0, 0.0
    return sigma, noise_share(field, mask, sigma)


def _choose(settings: DCSettings, rho0: float, noise: tuple[float, float] | None,
            report: dict) -> float | None:
    """λ: the fixed one, or the rule's for ρ₀ and the noise share (recorded in ``report``
    and the log)."""
    if settings.auto is None:
        return settings.lam
    sigma, nu = noise
    lam = settings.auto.choose(rho0, nu)
    report.update(rho0=round(rho0, 4), noise_ppb=round(1000 * sigma, 3),
                  noise_share=round(nu, 4), lambda_rule="auto")
    LOGGER.info("data consistency%s: the network leaves %.1f %% of the field unexplained, "
                "noise %.2f ppb (%.1f %% of the field's energy) → λ %s",
                f" (TV {settings.tv:.3g})" if settings.tv > 0 else "", 100 * rho0,
                1000 * sigma, 100 * nu, "none (network kept)" if lam is None else f"{lam:.4g}")
    return lam


def refine_tv(chi: np.ndarray, field: np.ndarray, mask: np.ndarray, weight: np.ndarray,
              settings: DCSettings, report: dict, *,
              voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
              b0_dir: Sequence[float] = (0.0, 0.0, 1.0), device=None) -> tuple[np.ndarray, dict]:
    """The TV refinement: ``settings.tv_iterations`` ADMM iterations on

    .. math:: \\tfrac12 \\|W (D \\ast \\chi - f)\\|^2 + \\alpha \\|\\nabla\\chi\\|_1
              + \\tfrac{\\lambda}{2} \\|\\chi - \\chi_{net}\\|^2

    started from the network's map (:func:`bids_qsmnet.physics.inversion.tv_admm` with
    ``chi0``), α = ``settings.tv``, λ fixed or chosen per input from ρ₀ and ν as for the
    plain refinement, ADMM penalties from ``settings.tv_penalty_scale``
    (:func:`tv_penalties`).  The fixed iteration count is part of the method: from the
    network's map, the early stop keeps its content in the magic-angle cone, which the
    converged TV solution loses on fields with a non-dipolar part.  Returns the map and
    ``report`` updated with λ, the rule's inputs, the relative data residual after, the
    solver, its iterations and penalty scale."""
    from ..physics.dc_path import data_residual
    from ..physics.inversion import tv_admm

    geom = dict(voxel_size=tuple(voxel_size), b0_dir=tuple(b0_dir), device=device)
    rho0 = float(data_residual(chi, field, weight, pad=FFT_PAD, **geom))
    noise = _noise(field, mask) if settings.auto is not None else None
    lam = _choose(settings, rho0, noise, report)
    if lam is None:
        report.update({"lambda": 0.0, "residual": round(rho0, 4)})
        return chi, report
    out = tv_admm(field, mask, lam=settings.tv, chi0=chi, prior_weight=float(lam),
                  n_iter=settings.tv_iterations, tol=0.0, weight=weight, pad=FFT_PAD,
                  **tv_penalties(settings.tv, settings.tv_penalty_scale), **geom)
    out = np.where(mask, out, 0.0).astype(np.float32)
    resid = float(data_residual(out, field, weight, pad=FFT_PAD, **geom))
    report.update({"lambda": float(lam), "residual": round(resid, 4), "solver": "tv-admm",
                   "iterations_run": int(settings.tv_iterations),
                   "penalty_scale": float(settings.tv_penalty_scale)})
    return out, report


def refine_grid(chi: np.ndarray, field: np.ndarray, mask: np.ndarray, lams: Sequence[float],
                *, tv: float = 0.0, tv_iterations: int = 60, tv_penalty_scale: float = 1.0,
                n_iter: int = 30, voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
                b0_dir: Sequence[float] = (0.0, 0.0, 1.0)):
    """The network's map refined with each fixed prior weight of ``lams`` (binary mask, no
    high-pass): one shifted-CG path for the plain refinement (``n_iter`` iterations), one
    ADMM run of ``tv_iterations`` (penalty scale ``tv_penalty_scale``) per λ for the TV
    refinement (``tv`` > 0) — for choosing λ
    on data with a known truth (``benchmarks/calibrate_dc.py``, ``benchmarks/accuracy.py``).

    Returns
    -------
    rho0 : float — the relative data residual of ``chi``
    chis : list of (X, Y, Z) float32 ndarray — ppm, one per λ
    residuals : list of float — their relative data residuals
    """
    from ..physics.dc_path import data_residual, refine_path
    from ..physics.inversion import tv_admm

    grid = _WorkGrid(np.asarray(mask).astype(bool))
    mask, chi, field = grid.take(mask).astype(bool), grid.take(chi), grid.take(field)
    w = mask.astype(np.float32)
    geom = dict(voxel_size=tuple(voxel_size), b0_dir=tuple(b0_dir))
    if not tv:
        path = refine_path(chi, field, w, lams, n_iter=n_iter, **geom)
        return (path.residual_prior, [grid.put(x) for x in path.chis],
                [float(r) for r in path.residuals])
    penalties = tv_penalties(tv, tv_penalty_scale)
    chis = [np.where(mask, tv_admm(field, mask, lam=tv, chi0=chi, prior_weight=float(lam),
                                   n_iter=tv_iterations, tol=0.0, pad=FFT_PAD, **penalties,
                                   **geom),
                     0).astype(np.float32) for lam in lams]
    return (float(data_residual(chi, field, w, pad=FFT_PAD, **geom)),
            [grid.put(x) for x in chis],
            [float(data_residual(x, field, w, pad=FFT_PAD, **geom)) for x in chis])


def residual_passes(predict: Callable[[np.ndarray], np.ndarray], chi: np.ndarray,
                    field: np.ndarray, mask: np.ndarray, n_passes: int, *,
                    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
                    b0_dir: Sequence[float] = (0.0, 0.0, 1.0), pad: int = 16) -> np.ndarray:
    """``n_passes`` residual-field passes ``χ ← χ + predict(M (f − D ∗ χ))`` (see the module
    docstring).

    Parameters
    ----------
    predict : callable mapping a local field (ppm, masked, same grid) to χ (ppm) — the network
        (e.g. :func:`bids_qsmnet.inference.predict.predict_chi` with the model bound)
    chi : (X, Y, Z) ndarray — the network's map of ``field``, ppm
    field : (X, Y, Z) ndarray — local field, ppm
    mask : (X, Y, Z) bool ndarray — brain mask; the residual and the map are zero outside
    n_passes : int — number of passes (0 returns ``chi`` masked)
    voxel_size : (3,) float — mm
    b0_dir : (3,) float — main-field direction in voxel space
    pad : int — zero voxels around the volume for the forward convolution

    Returns
    -------
    chi : (X, Y, Z) float32 ndarray — ppm, zero outside the mask

    Notes
    -----
    The relative data residual ``‖M (f − D ∗ χ)‖ / ‖M f‖`` before and after each pass is logged
    (INFO): a pass that does not lower it is still kept (the field's noise and the magic-angle
    cone bound what it can reach), but the log shows what each pass did.
    """
    from ..physics.dipole import dipole_kernel, forward_field

    n_passes = int(n_passes)
    if n_passes < 0:
        raise ValueError(f"residual passes must be non-negative, got {n_passes}")
    mask = np.asarray(mask).astype(bool)
    if n_passes == 0:  # the app's default: nothing but the mask
        return np.where(mask, chi, 0).astype(np.float32)
    f = np.where(mask, np.asarray(field, dtype=np.float64), 0.0)
    x = np.where(mask, np.asarray(chi, dtype=np.float64), 0.0)
    shape = tuple(n + 2 * pad for n in x.shape)
    kernel = dipole_kernel(shape, voxel_size, b0_dir)
    norm_f = float(np.linalg.norm(f)) or 1.0

    def residual(x):
        return np.where(mask, f - forward_field(x, pad=pad, kernel=kernel), 0.0)

    r = residual(x)
    for k in range(n_passes):
        before = float(np.linalg.norm(r)) / norm_f
        d = np.asarray(predict(r.astype(np.float32)), dtype=np.float64)
        x = np.where(mask, x + d, 0.0)
        r = residual(x)
        LOGGER.info("residual pass %d/%d: relative data residual %.4f → %.4f", k + 1, n_passes,
                    before, float(np.linalg.norm(r)) / norm_f)
    return x.astype(np.float32)
