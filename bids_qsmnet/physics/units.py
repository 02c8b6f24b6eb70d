"""Unit conversion of field maps: Hz, radians and ppm.

The local field is stored by pipelines in one of three units (BIDS sidecar ``Units``):

* ``ppm`` — relative field ΔB/B0 × 10⁶, what QSM inverts;
* ``Hz``  — frequency offset Δf = γ̄ · ΔB;
* ``rad`` — phase accumulated at echo time TE, φ = 2π · Δf · TE.

so that

.. math::
   \\mathrm{ppm} = \\frac{\\Delta f\\,[\\mathrm{Hz}]}
   {\\bar\\gamma\\,[\\mathrm{MHz/T}] \\cdot B_0\\,[\\mathrm{T}]},
   \\qquad \\Delta f = \\frac{\\varphi}{2\\pi\\,\\mathrm{TE}}

with γ̄ = 42.57747892 MHz/T (proton gyromagnetic ratio / 2π, CODATA 2014, as QSM
toolboxes use it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "GAMMA_BAR_MHZ_PER_T",
    "MAX_B0_T",
    "MAX_ECHO_TIME_S",
    "UNITS",
    "normalise_units",
    "check_field_strength",
    "check_echo_time",
    "check_echo_times",
    "hz_to_ppm",
    "ppm_to_hz",
    "rad_to_hz",
    "hz_to_rad",
    "field_to_ppm",
    "ppm_to_field",
]

#: proton gyromagnetic ratio / 2π in MHz/T
GAMMA_BAR_MHZ_PER_T = 42.57747892

#: the units a field map may carry, as spelled in BIDS sidecars (case-insensitive aliases)
UNITS = ("ppm", "Hz", "rad")
_ALIASES = {
    "ppm": "ppm",
    "hz": "Hz",
    "hertz": "Hz",
    "rad": "rad",
    "rads": "rad",
    "radian": "rad",
    "radians": "rad",
}


def normalise_units(units: str) -> str:
    """Canonical spelling of a field unit (``ppm``, ``Hz`` or ``rad``).

    >>> normalise_units("hz"), normalise_units("radians")
    ('Hz', 'rad')
    """
    key = str(units).strip().lower()
    if key not in _ALIASES:
        raise ValueError(f"unknown field units {units!r}: expected one of ppm, Hz, rad")
    return _ALIASES[key]


#: longest echo time accepted, seconds: a larger number is milliseconds written as seconds
MAX_ECHO_TIME_S = 1.0

#: strongest main field accepted, tesla (human scanners reach 11.7 T, animal scanners ~21 T):
#: a larger number is a unit mistake (mT, gauss), not a field strength
MAX_B0_T = 30.0


def _real_number(value, what: str) -> float:
    """``value`` as a float when it is one real number (not a bool, string or sequence)."""
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)) \
            or isinstance(value, (complex, np.complexfloating)):
        raise ValueError(f"{what} must be one number, got {value!r}")
    return float(value)


def check_field_strength(b0: float | None) -> float:
    """The main field strength as a float, or a ``ValueError`` saying what is wrong.

    Parameters
    ----------
    b0 : float — tesla (BIDS ``MagneticFieldStrength``)

    Returns
    -------
    b0 : float — tesla, finite, in ``(0, MAX_B0_T]``

    >>> check_field_strength(3)
    3.0
    """
    if b0 is None:
        raise ValueError("the main field strength B0 (tesla, MagneticFieldStrength) is required")
    b0 = _real_number(b0, "B0 (tesla, MagneticFieldStrength)")
    if not np.isfinite(b0) or b0 <= 0:
        raise ValueError(f"B0 must be a positive field strength in tesla, got {b0}")
    if b0 > MAX_B0_T:
        raise ValueError(f"B0 = {b0} is implausible: MagneticFieldStrength is in tesla")
    return b0


def check_echo_time(te: float | None) -> float:
    """The echo time as a float, or a ``ValueError`` saying what is wrong.

    Parameters
    ----------
    te : float — seconds (BIDS ``EchoTime``)

    Returns
    -------
    te : float — seconds, finite, in ``(0, MAX_ECHO_TIME_S]``

    >>> check_echo_time(0.02)
    0.02
    """
    if te is None:
        raise ValueError("the echo time TE (seconds, EchoTime) is required for units 'rad'")
    te = _real_number(te, "TE (seconds, EchoTime)")
    if not np.isfinite(te):
        raise ValueError(f"TE must be a finite number of seconds, got {te}")
    if te <= 0:
        raise ValueError(f"TE must be a positive echo time in seconds, got {te}")
    if te > MAX_ECHO_TIME_S:
        raise ValueError(f"TE = {te} is not in seconds (BIDS EchoTime is in seconds, not ms; "
                         f"expected 0 < TE ≤ {MAX_ECHO_TIME_S:g} s)")
    return te


def check_echo_times(echo_times: Sequence[float], n_echo: int | None = None) -> np.ndarray:
    """Validate the echo times of a series: each as :func:`check_echo_time`, strictly
    increasing.

    Parameters
    ----------
    echo_times : (E,) float — seconds, BIDS ``EchoTime``
    n_echo : int, optional — the number of echoes the times must match

    Returns
    -------
    te : (E,) float64 ndarray — seconds

    Raises
    ------
    ValueError
        naming the problem (e.g. milliseconds given instead of seconds).

    >>> check_echo_times([0.004, 0.009]).tolist()
    [0.004, 0.009]
    """
    te = np.asarray(echo_times, dtype=np.float64).reshape(-1)
    if te.size == 0:
        raise ValueError("no echo times given")
    if n_echo is not None and te.size != n_echo:
        raise ValueError(f"{te.size} echo times given for {n_echo} echoes")
    for t in te:
        try:
            check_echo_time(float(t))
        except ValueError as exc:
            raise ValueError(f"echo times {te.tolist()}: {exc}") from None
    if np.any(np.diff(te) <= 0):
        raise ValueError(f"echo times {te.tolist()} do not increase with the echo index "
                         "(they must be strictly increasing)")
    return te


_check_b0 = check_field_strength
_check_te = check_echo_time


def hz_to_ppm(field_hz, b0: float):
    """Frequency offset (Hz) → relative field (ppm).  ``b0`` in tesla.

    >>> round(float(hz_to_ppm(127.7324, 3.0)), 6)
    1.0
    """
    return np.asarray(field_hz) / (GAMMA_BAR_MHZ_PER_T * _check_b0(b0))


def ppm_to_hz(field_ppm, b0: float):
    """Relative field (ppm) → frequency offset (Hz).  ``b0`` in tesla."""
    return np.asarray(field_ppm) * (GAMMA_BAR_MHZ_PER_T * _check_b0(b0))


def rad_to_hz(phase_rad, te: float):
    """Phase (rad) accumulated at echo time ``te`` (seconds) → frequency offset (Hz)."""
    return np.asarray(phase_rad) / (2.0 * np.pi * _check_te(te))


def hz_to_rad(field_hz, te: float):
    """Frequency offset (Hz) → phase (rad) at echo time ``te`` (seconds)."""
    return np.asarray(field_hz) * (2.0 * np.pi * _check_te(te))


def field_to_ppm(data, units: str, *, b0: float | None = None, te: float | None = None):
    """Convert a field map to ppm.

    Parameters
    ----------
    data : ndarray — the field in ``units``
    units : {"ppm", "Hz", "rad"} — BIDS ``Units`` of ``data``
    b0 : float — tesla; required for Hz and rad
    te : float — seconds; required for rad

    Returns
    -------
    field : ndarray — ppm
    """
    u = normalise_units(units)
    if u == "ppm":
        return np.asarray(data)
    if u == "Hz":
        return hz_to_ppm(data, b0)
    return hz_to_ppm(rad_to_hz(data, te), b0)


def ppm_to_field(data, units: str, *, b0: float | None = None, te: float | None = None):
    """Inverse of :func:`field_to_ppm`: a ppm map expressed in ``units``."""
    u = normalise_units(units)
    if u == "ppm":
        return np.asarray(data)
    hz = ppm_to_hz(data, b0)
    return hz if u == "Hz" else hz_to_rad(hz, te)
