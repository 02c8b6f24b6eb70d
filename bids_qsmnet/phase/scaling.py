"""Phase images in scanner units → radians.

Raw phase NIfTI files hold either radians or the scanner's integer range (Siemens writes
−4096…4095 or 0…4095, other vendors and converters 0…65535, −2048…2047, …).  QSM needs radians,
and the map must be the scanner's *fixed* range mapped onto [−π, π) — never the image's own
min/max stretched, which would scale the field by a data-dependent factor.

The rule of :func:`phase_to_radians`
------------------------------------
1. Finite values only (NaN/Inf → error); a constant image → error.
2. **Radians**: every value lies in ``[−π − ε, π + ε]`` (ε = 0.01) — or in ``[0 − ε, 2π + ε]``
   (phase stored as 0…2π) — → wrapped to ``[−π, π)``; a congruent phase, so nothing is lost.
3. **Scanner integers**: every value is an integer.  The span ``N`` is the smallest power of two
   ``≥ max − min + 1``; the lower end ``lo`` is 0 when ``min ≥ 0`` and ``−N/2`` otherwise.  The
   data must lie in ``[lo, lo + N)`` and cover at least 90 % of it (a raw phase image, with its
   noise and wraps, samples its whole range; a partial cover means the range cannot be known
   from the data).  Then ``φ = −π + 2π (v − lo) / N``: −4096 → −π, 0 → 0, 4095 → π − 2π/8192
   for Siemens −4096…4095; 0 → −π, 2048 → 0 for 0…4095.
4. Anything else (non-integer values beyond ±π, e.g. 0…7.3; a partial integer cover) raises
   :class:`~bids_qsmnet.io.nifti.InputError` naming the data and its observed range.  A known
   range that the rule cannot infer (e.g. Philips milliradians −3142…3142) is passed as
   ``value_range``.
"""

from __future__ import annotations

import logging

import numpy as np

from ..io.nifti import InputError

log = logging.getLogger(__name__)

__all__ = ["phase_to_radians", "wrap_phase"]

#: tolerance (rad) on the ends of a phase already in radians (rounding in converters)
_RAD_EPS = 0.01
#: smallest fraction of the inferred integer span the data must cover
_MIN_COVER = 0.9


def wrap_phase(phase: np.ndarray) -> np.ndarray:
    """Wrap a phase (rad) onto ``[−π, π)``, keeping float32/float64 (other types → float64).

    >>> wrap_phase(np.array([np.pi, -np.pi, 3 * np.pi / 2])).round(4).tolist()
    [-3.1416, -3.1416, -1.5708]
    """
    phase = np.asarray(phase)
    dtype = phase.dtype if phase.dtype in (np.float32, np.float64) else np.float64
    out = np.mod(phase.astype(np.float64) + np.pi, 2.0 * np.pi) - np.pi
    return out.astype(dtype, copy=False)


def _affine_to_radians(data: np.ndarray, lo: float, span: float, dtype) -> np.ndarray:
    # the affine map in float64, then wrapped: the top end lo + span maps to −π, not π
    rad = -np.pi + (2.0 * np.pi / span) * (data.astype(np.float64) - lo)
    return wrap_phase(rad).astype(dtype, copy=False)


def phase_to_radians(
    data: np.ndarray,
    *,
    name: str = "phase",
    value_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """Convert a raw phase image to radians in ``[−π, π)``.

    Parameters
    ----------
    data : ndarray, any shape — phase in radians or in scanner integer units
    name : str — what the data is (a file name), for error messages
    value_range : (lo, hi), optional — the scanner's full range when it is known (e.g.
        ``(-4096, 4095)``): ``lo`` maps to −π and ``hi + 1`` would map to π, i.e.
        ``φ = −π + 2π (v − lo) / (hi − lo + 1)``; skips the detection of the module rule

    Returns
    -------
    phase : ndarray, shape of ``data`` — radians in ``[−π, π)`` (to float precision);
        float64 when ``data`` is float64, float32 otherwise

    Raises
    ------
    InputError
        NaN/Inf values, a constant image, or a range that is neither radians nor a scanner
        integer range (see the module docstring); the message names ``name`` and the range.

    Examples
    --------
    >>> phase_to_radians(np.array([-4096, 0, 4095])).tolist()[:2]
    [-3.1415927410125732, 0.0]
    """
    data = np.asarray(data)
    dtype = np.float64 if data.dtype == np.float64 else np.float32
    if data.size == 0:
        raise InputError(f"{name}: the phase image is empty")
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise InputError(f"{name}: the phase must be real numbers, got dtype {data.dtype}")
    finite = np.isfinite(data)
    if not finite.all():
        raise InputError(f"{name}: the phase contains {int((~finite).sum())} NaN/Inf values")

    vmin, vmax = float(data.min()), float(data.max())
    observed = f"observed range [{vmin:g}, {vmax:g}]"

    if value_range is not None:
        lo, hi = (float(v) for v in value_range)
        if not hi > lo:
            raise ValueError(f"value_range must be (lo, hi) with hi > lo, got {value_range!r}")
        if vmin < lo or vmax > hi:
            raise InputError(f"{name}: {observed} lies outside the given range [{lo:g}, {hi:g}]")
        return _affine_to_radians(data, lo, hi - lo + 1.0, dtype)

    if vmin == vmax:
        raise InputError(f"{name}: the phase is constant ({vmin:g}); no phase information")

    if vmin >= -np.pi - _RAD_EPS and vmax <= np.pi + _RAD_EPS:
        return wrap_phase(data.astype(dtype, copy=False))
    if vmin >= -_RAD_EPS and vmax <= 2.0 * np.pi + _RAD_EPS:
        log.info("%s: phase in [0, 2π] radians, wrapped to [-π, π)", name)
        return wrap_phase(data.astype(dtype, copy=False))

    integral = np.issubdtype(data.dtype, np.integer) or bool(np.all(data == np.round(data)))
    if integral:
        n_values = vmax - vmin + 1.0
        span = 2.0 ** int(np.ceil(np.log2(n_values)))
        lo = 0.0 if vmin >= 0 else -span / 2.0
        if vmax < lo + span and n_values >= _MIN_COVER * span:
            log.info("%s: integer phase, range [%d, %d) mapped onto [-π, π)", name, lo, lo + span)
            return _affine_to_radians(data, lo, span, dtype)
        raise InputError(
            f"{name}: integer phase with {observed} fits no scanner range "
            f"(it covers {n_values / span:.0%} of [{lo:g}, {lo + span:g})); "
            "pass the scanner's range (e.g. -4096..4095) explicitly"
        )
    raise InputError(
        f"{name}: {observed} is neither radians ([-π, π] or [0, 2π]) nor a scanner "
        "integer range (e.g. -4096..4095, 0..4095)"
    )
