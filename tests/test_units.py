"""Field-unit conversion against the defining relations ppm = Hz / (γ̄ B0), Hz = rad / (2π TE)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bids_qsmnet.physics import (
    GAMMA_BAR_MHZ_PER_T,
    field_to_ppm,
    hz_to_ppm,
    hz_to_rad,
    normalise_units,
    ppm_to_field,
    ppm_to_hz,
    rad_to_hz,
)


def test_gamma_bar_value():
    # proton gyromagnetic ratio / 2π in MHz/T, the value the project specifies
    assert GAMMA_BAR_MHZ_PER_T == 42.57747892


@pytest.mark.parametrize(("b0", "hz_per_ppm"), [(1.5, 63.866), (3.0, 127.732), (7.0, 298.042)])
def test_one_ppm_in_hz(b0, hz_per_ppm):
    # 1 ppm of B0 is γ̄·B0 Hz: 127.73 Hz at 3 T
    assert float(ppm_to_hz(1.0, b0)) == pytest.approx(hz_per_ppm, abs=5e-4)
    assert float(hz_to_ppm(hz_per_ppm, b0)) == pytest.approx(1.0, abs=1e-5)


def test_three_tesla_reference():
    assert float(hz_to_ppm(127.73, 3.0)) == pytest.approx(1.0, abs=3e-5)
    assert float(field_to_ppm(127.73243676, "Hz", b0=3.0)) == pytest.approx(1.0, abs=1e-10)


def test_radians_to_ppm_by_definition():
    # φ = 2π · Δf · TE and Δf = γ̄ · B0 · ppm (γ̄ in Hz/T = 1e6 · MHz/T, ppm = 1e-6)
    b0, te, ppm = 3.0, 0.020, np.array([-0.1, 0.0, 0.05, 1.0])
    phase = 2 * np.pi * te * GAMMA_BAR_MHZ_PER_T * b0 * ppm
    np.testing.assert_allclose(field_to_ppm(phase, "rad", b0=b0, te=te), ppm, rtol=1e-12)
    np.testing.assert_allclose(ppm_to_field(ppm, "rad", b0=b0, te=te), phase, rtol=1e-12)
    # 1 ppm at 3 T accumulates 16.05 rad in 20 ms
    assert float(ppm_to_field(1.0, "rad", b0=3.0, te=0.02)) == pytest.approx(16.0513, abs=1e-4)


@settings(max_examples=50, deadline=None)
@given(
    value=st.floats(-10.0, 10.0, allow_nan=False),
    b0=st.floats(0.1, 11.7),
    te=st.floats(1e-4, 0.1),
    units=st.sampled_from(["ppm", "Hz", "rad"]),
)
def test_round_trips(value, b0, te, units):
    x = np.array([value])
    there = ppm_to_field(x, units, b0=b0, te=te)
    np.testing.assert_allclose(field_to_ppm(there, units, b0=b0, te=te), x, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(rad_to_hz(hz_to_rad(x, te), te), x, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(hz_to_ppm(ppm_to_hz(x, b0), b0), x, rtol=1e-12, atol=1e-15)


def test_unit_spellings():
    assert normalise_units("HZ") == "Hz"
    assert normalise_units(" Hertz ") == "Hz"
    assert normalise_units("radians") == "rad"
    assert normalise_units("PPM") == "ppm"
    with pytest.raises(ValueError, match="unknown field units"):
        normalise_units("arbitrary")


def test_ppm_needs_nothing():
    x = np.array([0.01, -0.02])
    np.testing.assert_array_equal(field_to_ppm(x, "ppm"), x)


def test_missing_or_bad_b0_is_an_error():
    with pytest.raises(ValueError, match="B0"):
        field_to_ppm(np.ones(3), "Hz")
    with pytest.raises(ValueError, match="B0"):
        field_to_ppm(np.ones(3), "rad", te=0.02)
    with pytest.raises(ValueError, match="tesla"):
        hz_to_ppm(1.0, -3.0)
    with pytest.raises(ValueError, match="tesla"):
        hz_to_ppm(1.0, float("nan"))


def test_echo_time_in_ms_is_rejected():
    with pytest.raises(ValueError, match="seconds"):
        field_to_ppm(np.ones(3), "rad", b0=3.0, te=20.0)  # 20 ms written as 20
    with pytest.raises(ValueError, match="TE"):
        field_to_ppm(np.ones(3), "rad", b0=3.0)  # missing
    with pytest.raises(ValueError, match="TE"):
        rad_to_hz(1.0, 0.0)
