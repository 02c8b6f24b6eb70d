"""Total field from multi-echo GRE phase: a magnitude-weighted fit of phase against echo time.

Signal model and sign convention
--------------------------------
Echo ``n`` at echo time ``TE_n`` (seconds) has the complex signal
``m_n · exp(i φ_n)`` with

.. math::  \\varphi_n = 2\\pi f \\, \\mathrm{TE}_n + \\varphi_0 \\pmod{2\\pi}

where ``f`` is the total field in **Hz** (a positive field makes the phase grow with TE) and
``φ0`` the phase at TE = 0 (coil and receiver phase).  Scanners whose phase turns the other
way need ``-phase`` before the fit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from ..physics.units import check_echo_times
from .scaling import wrap_phase
from .unwrap import laplacian_unwrap, path_unwrap

log = logging.getLogger(__name__)

__all__ = ["FieldFit", "check_echo_times", "fit_total_field"]

_TWO_PI = 2.0 * np.pi
#: relative tolerance under which two echo spacings count as equal
_SPACING_RTOL = 1e-3


@dataclass(eq=False)
class FieldFit:
    """Result of :func:`fit_total_field`.

    Attributes
    ----------
    field_hz : (X, Y, Z) float32 ndarray — total field, Hz (0 outside ``mask``)
    offset_rad : (X, Y, Z) float32 ndarray — phase at TE = 0, radians in [−π, π)
    residual_rad : (X, Y, Z) float32 ndarray — magnitude-weighted rms residual of the fit,
        radians (0 for one or two echoes, which the model fits exactly)
    weights : (X, Y, Z) float32 ndarray — dimensionless, proportional to 1 / variance of
        ``field_hz`` under complex Gaussian noise (``Σ m_n² (TE_n − t̄)²``, one echo:
        ``m² TE²``), normalised to a median of 1 in the mask; for weighted background removal
    mask : (X, Y, Z) bool ndarray — the support used
    """

    field_hz: np.ndarray
    offset_rad: np.ndarray
    residual_rad: np.ndarray
    weights: np.ndarray
    mask: np.ndarray


def _weighted_line(echoes, te, valid):
    """Weighted least-squares line ``y = a + b t`` per voxel.

    ``echoes`` yields ``(y, w)`` volume pairs, one per echo time: the sums are accumulated
    one echo at a time, so memory does not grow with the number of echoes.
    """
    s = st = stt = sy = sty = 0.0
    for (y, w), t in zip(echoes, te):
        s = s + w
        st = st + w * t
        stt = stt + w * (t * t)
        sy = sy + w * y
        sty = sty + w * (t * y)
    det = s * stt - st * st
    # a voxel whose weight sits on one echo (or nowhere) has no slope: flagged, left to caller
    ok = valid & (det > 1e-12 * np.maximum(s * stt, np.finfo(np.float64).tiny))
    det_safe = np.where(ok, det, 1.0)
    s_safe = np.where(ok, s, 1.0)
    slope = (s * sty - st * sy) / det_safe
    intercept = (sy - slope * st) / s_safe
    info = det / s_safe  # Σ w (t − t̄)², the inverse variance of the slope up to σ²
    return slope, intercept, np.where(ok, info, 0.0), ok


def _normalise_weights(info: np.ndarray, mask: np.ndarray) -> np.ndarray:
    positive = mask & (info > 0)
    scale = float(np.median(info[positive])) if positive.any() else 1.0
    return np.where(mask, info / scale, 0.0).astype(np.float32)


def _check_fit_inputs(phase, magnitude, echo_times, mask):
    """``(phase, magnitude, echo times, mask)`` checked and as 4-D arrays (a 3-D array is one
    echo), the mask the whole grid when None."""
    phase = np.asarray(phase)
    magnitude = np.asarray(magnitude)
    if phase.ndim == 3:
        phase = phase[None]
    if magnitude.ndim == 3:
        magnitude = magnitude[None]
    if phase.ndim != 4:
        raise ValueError(f"phase must have shape (n_echo, X, Y, Z), got {phase.shape}")
    if magnitude.shape != phase.shape:
        raise ValueError(
            f"magnitude shape {magnitude.shape} does not match phase shape {phase.shape}"
        )
    n_echo, shape = phase.shape[0], phase.shape[1:]
    te = check_echo_times(echo_times, n_echo)
    if not (np.all(np.isfinite(phase)) and np.all(np.isfinite(magnitude))):
        raise ValueError("phase and magnitude must be finite")
    if np.any(magnitude < 0):
        raise ValueError("magnitude must be non-negative")
    if mask is None:
        mask = np.ones(shape, dtype=bool)
    else:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != shape:
            raise ValueError(f"mask shape {mask.shape} does not match the echo shape {shape}")
        if not mask.any():
            raise ValueError("the mask is empty")
    return phase, magnitude, te, mask


def _single_echo_fit(echo, unwrapper, te0: float, mask) -> FieldFit:
    """One echo: the offset is taken as zero, ``f = unwrap(φ_1) / (2π TE_1)``."""
    phi, mag = echo(0)
    field = unwrapper(phi) / (_TWO_PI * te0)
    zeros = np.zeros(mask.shape, dtype=np.float32)
    return FieldFit(
        field_hz=np.where(mask, field, 0.0).astype(np.float32),
        offset_rad=zeros,
        residual_rad=zeros.copy(),
        weights=_normalise_weights(mag**2 * te0 ** 2, mask),
        mask=mask,
    )


def _wrapped_frequency(echo, te, shape) -> tuple[np.ndarray, float]:
    """``(ψ, ΔTE)``: the phase ``2π f ΔTE`` (wrapped) of the magnitude-weighted sum of
    consecutive-echo products over the pairs with the shortest spacing ``ΔTE`` (seconds)."""
    spacing = np.diff(te)
    dte = float(spacing.min())
    pairs = np.flatnonzero(spacing <= dte * (1.0 + _SPACING_RTOL))
    if len(pairs) < len(spacing):
        log.info("unequal echo spacing: wrapped frequency from echo pairs %s", pairs.tolist())
    product = np.zeros(shape, dtype=np.complex128)
    for n in pairs:
        (p0, m0), (p1, m1) = echo(n), echo(n + 1)
        product += (m0 * m1) * np.exp(1j * (p1 - p0))
    return np.angle(product), dte


def _fit_echo_lines(echo, te, intercept, slope, valid, weight_sum):
    """Each echo unwrapped in time towards the predicted line, then a weighted line fit,
    twice.  Returns ``(slope, intercept, information, rms residual)``; the residual is zero
    for two echoes (which a line fits exactly)."""
    n_echo = len(te)

    def unwrapped_echoes(intercept, slope):
        for n in range(n_echo):
            p, m = echo(n)
            pred = intercept + slope * te[n]
            yield p + _TWO_PI * np.round((pred - p) / _TWO_PI), m * m

    for _ in range(2):
        pred_intercept, pred_slope = intercept, slope
        new_slope, new_intercept, info, ok = _weighted_line(
            unwrapped_echoes(pred_intercept, pred_slope), te, valid
        )
        slope = np.where(ok, new_slope, slope)
        intercept = np.where(ok, new_intercept, intercept)

    if n_echo > 2:
        sq = 0.0
        for (y, w), t in zip(unwrapped_echoes(pred_intercept, pred_slope), te):
            sq = sq + w * (y - intercept - slope * t) ** 2
        residual = np.where(valid, np.sqrt(sq / np.where(valid, weight_sum, 1.0)), 0.0)
    else:  # two points fit a line exactly; what is left is rounding
        residual = np.zeros(valid.shape)
    return slope, intercept, info, residual


def fit_total_field(
    phase: np.ndarray,
    magnitude: np.ndarray,
    echo_times: Sequence[float],
    *,
    mask: np.ndarray | None = None,
    unwrap: str = "laplacian",
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
) -> FieldFit:
    """Total field (Hz) and phase offset from multi-echo GRE phase and magnitude.

    Parameters
    ----------
    phase : (E, X, Y, Z) ndarray — wrapped phase, radians (see :func:`phase_to_radians`);
        a 3-D array is one echo
    magnitude : (E, X, Y, Z) ndarray — magnitude, any unit (only relative values matter)
    echo_times : (E,) float — seconds, BIDS ``EchoTime``: positive, strictly increasing, at
        most 1 s (:func:`~bids_qsmnet.physics.units.check_echo_times`)
    mask : (X, Y, Z) bool ndarray, optional — support of the spatial unwrapping and of the
        outputs; the whole grid when None
    unwrap : {"laplacian", "path"} — spatial unwrapper: ``"laplacian"`` gives the field up to
        a harmonic function (removed by background-field removal; robust), ``"path"`` a field
        congruent with the data (exact on clean data; 2π/ΔTE steps where the path fails)
    voxel_size : (3,) float — mm (used by the Laplacian unwrapper)

    Returns
    -------
    FieldFit — ``field_hz`` (Hz), ``offset_rad``, ``residual_rad``, ``weights``, ``mask``

    Notes
    -----
    Model ``φ_n = 2π f TE_n + φ0`` (module docstring).  With ``E ≥ 2`` echoes:

    1. **Wrapped frequency.**  The magnitude-weighted sum of consecutive-echo products
       ``Σ z_{n+1} z̄_n`` (``z_n = m_n e^{iφ_n}``) over the pairs with the shortest spacing
       ``ΔTE`` cancels the offset and has the phase ``ψ = 2π f ΔTE`` wrapped — far fewer wraps
       than the echoes themselves.
    2. **Spatial unwrapping** of ``ψ`` with the chosen unwrapper, rounded to the integer
       number of cycles that is congruent with ``ψ``: ``f0 = f + j/ΔTE`` with ``j`` = 0 for
       a correct path (``j`` steps where the Laplacian's harmonic error exceeds half a cycle,
       harmless for equally spaced echoes).
    3. **Offset** ``φ0 = arg Σ_n m_n z_n e^{−2πi f0 TE_n}`` (weights ``m_n²``).
    4. **Temporal unwrapping and fit.**  Each echo gets the multiple of 2π that brings it
       closest to the prediction ``φ0 + 2π f0 TE_n``; then a weighted least-squares line with
       intercept, weights ``m_n²`` (the inverse variance of the phase: σ_φ ≈ σ / m), gives
       ``f`` and ``φ0``; repeated once with the fitted line as prediction.
    5. ``"laplacian"`` only: the fitted ``2π f ΔTE`` is wrapped and unwrapped once more with
       the Laplacian unwrapper, so the field is smooth (true field + harmonic function), and
       the offset is moved with it so that the model still matches the first echo.

    The field is determined by the data only up to multiples of ``1/ΔTE`` over the whole
    (connected) mask; the multiple that puts the median field in the mask in
    ``[−1/(2ΔTE), 1/(2ΔTE))`` is chosen (a shimmed brain is on resonance on average).

    **One echo:** the offset is assumed to be zero (no data can separate it from the field):
    ``f = unwrap(φ_1) / (2π TE_1)``, with the median of the unwrapped phase in ``[−π, π)``;
    an actual offset ends up in the field as ``φ0 / (2π TE_1)``.
    """
    if unwrap not in ("laplacian", "path"):
        raise ValueError(f"unwrap must be 'laplacian' or 'path', got {unwrap!r}")
    phase, magnitude, te, mask = _check_fit_inputs(phase, magnitude, echo_times, mask)
    n_echo, shape = phase.shape[0], phase.shape[1:]
    if unwrap == "path":
        unwrapper = partial(path_unwrap, mask=mask)
    else:
        unwrapper = partial(laplacian_unwrap, voxel_size=voxel_size, mask=mask)

    def echo(n):  # one echo as float64 (keeps the memory at a few volumes)
        return wrap_phase(phase[n].astype(np.float64)), magnitude[n].astype(np.float64)

    if n_echo == 1:
        return _single_echo_fit(echo, unwrapper, te[0], mask)
    # 1. wrapped frequency from the consecutive pairs with the shortest spacing
    psi, dte = _wrapped_frequency(echo, te, shape)

    # 2. spatial unwrapping, then the congruent number of cycles
    psi_u = unwrapper(psi)
    f0 = (psi + _TWO_PI * np.round((psi_u - psi) / _TWO_PI)) / (_TWO_PI * dte)

    # 3. offset at the first guess of the field
    acc = np.zeros(shape, dtype=np.complex128)
    for n in range(n_echo):
        p, m = echo(n)
        acc += m * m * np.exp(1j * (p - _TWO_PI * f0 * te[n]))
    intercept, slope = np.angle(acc), _TWO_PI * f0
    weight_sum = sum(echo(n)[1] ** 2 for n in range(n_echo))
    valid = mask & (weight_sum > 0)

    # 4. temporal unwrapping towards the prediction and weighted line fit, twice
    slope, intercept, info, residual = _fit_echo_lines(echo, te, intercept, slope, valid,
                                                       weight_sum)
    fitted_hz = slope / _TWO_PI

    # 5. Laplacian route: a smooth field (true + harmonic) instead of a congruent one
    if unwrap == "laplacian":
        psi_fit = laplacian_unwrap(wrap_phase(_TWO_PI * fitted_hz * dte), voxel_size, mask=mask)
        field = psi_fit / (_TWO_PI * dte)
        intercept = intercept - _TWO_PI * (field - fitted_hz) * te[0]
    else:
        field = fitted_hz

    return FieldFit(
        field_hz=np.where(mask, field, 0.0).astype(np.float32),
        offset_rad=np.where(mask, wrap_phase(intercept), 0.0).astype(np.float32),
        residual_rad=np.where(mask, residual, 0.0).astype(np.float32),
        weights=_normalise_weights(info, mask),
        mask=mask,
    )
