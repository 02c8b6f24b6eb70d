"""The processing settings of a run, read from its BIDS sidecars: units, field strength, echo
times and B0 direction.

Each value is checked here, where the sidecar can be named in the error
(:class:`SettingsError`): a sidecar value is whatever JSON holds.
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError
from ..physics.units import (
    check_echo_time,
    check_echo_times,
    check_field_strength,
    normalise_units,
)
from .discovery import FieldRun

__all__ = ["SettingsError", "run_settings"]


class SettingsError(UserError, ValueError):
    """A run cannot be processed with the metadata it has (names the file)."""


def run_settings(run: FieldRun, *, b0_strength: float | None = None) -> dict:
    """Units, field strength, echo time and B0 direction of a run, from its sidecar.

    ``b0_strength`` (``--b0-strength``) replaces a missing ``MagneticFieldStrength``.  A sidecar
    ``B0_dir`` (as qsm-forward writes it) wins over the affine.
    """
    if run.is_raw:
        return _raw_settings(run, b0_strength=b0_strength)
    meta = run.metadata
    units = run.units
    if not units:
        raise SettingsError(f"{run.field}: the sidecar has no 'Units' (ppm, Hz or rad)")
    try:
        units = normalise_units(units)
    except ValueError as exc:
        raise SettingsError(f"{run.field}: {exc}") from None
    b0 = meta.get("MagneticFieldStrength", b0_strength)
    te = meta.get("EchoTime")
    if units in ("Hz", "rad") and b0 is None:
        raise SettingsError(f"{run.field}: Units '{units}' needs MagneticFieldStrength (tesla) "
                            "in the sidecar; give it with --b0-strength")
    if units == "rad" and te is None:
        raise SettingsError(f"{run.field}: Units 'rad' needs EchoTime (seconds) in the sidecar")
    if units == "rad" and isinstance(te, list):
        raise SettingsError(f"{run.field}: EchoTime is a list; a local field in rad needs the "
                            "single effective echo time")
    # a sidecar value is whatever JSON holds: check it here, where the file can be named
    # (MagneticFieldStrength is copied into the output sidecar, so it is checked whenever
    # present; EchoTime matters to 'rad' alone)
    try:
        b0 = check_field_strength(b0) if b0 is not None else None
    except ValueError as exc:
        raise SettingsError(f"{run.field}: MagneticFieldStrength {b0!r}: {exc}") from None
    try:
        te = check_echo_time(te) if units == "rad" else None
    except ValueError as exc:
        raise SettingsError(f"{run.field}: EchoTime {te!r}: {exc}") from None
    b0_dir = _sidecar_b0_dir(run.field, meta)
    return {"units": units, "b0_strength": b0, "echo_time": te, "b0_dir": b0_dir,
            "b0_dir_source": "sidecar B0_dir" if b0_dir is not None else "affine"}


def _sidecar_b0_dir(path: str, meta: dict):
    b0_dir = meta.get("B0_dir")
    if b0_dir is None:
        return None
    try:
        b0_dir = np.asarray(b0_dir, dtype=float).ravel()
    except (TypeError, ValueError):
        b0_dir = np.zeros(0)
    if b0_dir.shape != (3,) or not np.all(np.isfinite(b0_dir)) or not np.any(b0_dir):
        raise SettingsError(f"{path}: sidecar B0_dir must be three numbers, not zero")
    return [float(v) for v in b0_dir / np.linalg.norm(b0_dir)]


def _raw_settings(run: FieldRun, *, b0_strength: float | None) -> dict:
    """Echo times, field strength and B0 direction of a raw GRE run (one sidecar per echo)."""
    tes = []
    for echo in run.echoes:
        if echo.echo_time is None:
            raise SettingsError(f"{echo.phase}: the sidecar has no 'EchoTime' (seconds)")
        try:
            tes.append(check_echo_time(echo.echo_time))
        except ValueError as exc:
            raise SettingsError(f"{echo.phase}: 'EchoTime' {echo.echo_time!r}: {exc}") from None
    try:
        tes = check_echo_times(tes).tolist()
    except ValueError as exc:
        raise SettingsError(f"{run.field}: {exc}") from None
    b0 = run.metadata.get("MagneticFieldStrength", b0_strength)
    if b0 is None:
        raise SettingsError(f"{run.field}: raw GRE phase needs MagneticFieldStrength (tesla) in "
                            "the sidecar; give it with --b0-strength")
    try:  # the same check as for local fields: one real number (not true/false), in tesla
        b0 = check_field_strength(b0)
    except ValueError as exc:
        raise SettingsError(f"{run.field}: MagneticFieldStrength {b0!r}: {exc}") from None
    missing = [e.phase for e in run.echoes if e.magnitude is None]
    if missing and run.mask is None:
        raise SettingsError(f"{missing[0]}: no magnitude image for this echo and no brain mask: "
                            "one of them is needed to find the brain")
    b0_dir = _sidecar_b0_dir(run.field, run.metadata)
    return {"units": "rad", "b0_strength": b0, "echo_time": None, "echo_times": tes,
            "b0_dir": b0_dir,
            "b0_dir_source": "sidecar B0_dir" if b0_dir is not None else "affine",
            "weighted": not missing}
