"""Raw phase → radians against the scanner ranges' defining maps (−4096 → −π, 0 → 0, …)."""

from __future__ import annotations

import numpy as np
import pytest

from bids_qsmnet.io.nifti import InputError
from bids_qsmnet.phase.scaling import phase_to_radians, wrap_phase

PI32 = float(np.float32(np.pi))


def test_siemens_signed_range_exact_values():
    data = np.arange(-4096, 4096, dtype=np.int16)
    rad = phase_to_radians(data)
    assert rad.dtype == np.float32
    lut = dict(zip(data.tolist(), rad.astype(np.float64).tolist()))
    assert lut[-4096] == pytest.approx(-np.pi, abs=1e-6)
    assert lut[0] == 0.0
    assert lut[4095] == pytest.approx(np.pi - 2 * np.pi / 8192, abs=1e-6)
    assert lut[2048] == pytest.approx(np.pi / 2, abs=1e-6)
    # one integer step is 2π/8192 everywhere
    np.testing.assert_allclose(np.diff(rad.astype(np.float64)), 2 * np.pi / 8192, atol=1e-6)


def test_siemens_dcm2niix_even_values():
    # Siemens stores 0…4095 with slope 2, intercept −4096: only even values −4096…4094
    data = np.arange(-4096, 4095, 2, dtype=np.float32)
    rad = phase_to_radians(data).astype(np.float64)
    assert rad[0] == pytest.approx(-np.pi, abs=1e-6)
    assert rad[-1] == pytest.approx(np.pi - 4 * np.pi / 8192, abs=1e-6)
    assert rad[data == 0][0] == 0.0


@pytest.mark.parametrize(
    ("lo", "hi", "dtype"),
    [(0, 4095, np.uint16), (-2048, 2047, np.int16), (0, 65535, np.uint16), (0, 4095, np.float32)],
)
def test_generic_power_of_two_ranges(lo, hi, dtype):
    data = np.arange(lo, hi + 1).astype(dtype)
    rad = phase_to_radians(data).astype(np.float64)
    span = hi - lo + 1
    assert rad[0] == pytest.approx(-np.pi, abs=1e-6)  # the bottom of the range is −π
    mid = lo + span // 2
    assert rad[mid - lo] == pytest.approx(0.0, abs=1e-6)  # the middle is 0
    assert rad[-1] == pytest.approx(np.pi - 2 * np.pi / span, abs=1e-6)


def test_range_inferred_from_a_partial_but_dense_cover():
    # noise rarely hits both ends exactly: −4090…4093 is still the Siemens range
    data = np.arange(-4090, 4094, dtype=np.int16)
    assert phase_to_radians(data)[list(data).index(0)] == 0.0
    bottom = -np.pi + 6 * 2 * np.pi / 8192  # −4090 is six steps above −4096
    assert float(phase_to_radians(data)[0]) == pytest.approx(bottom, abs=1e-6)


def test_radians_pass_through_and_wrap():
    x = np.array([-np.pi, -1.0, 0.0, 2.5, np.pi])
    rad = phase_to_radians(x)
    assert rad.dtype == np.float64
    np.testing.assert_allclose(rad, [-np.pi, -1.0, 0.0, 2.5, -np.pi], atol=1e-12)
    # 0…2π is radians too: 3π/2 ≡ −π/2
    y = np.array([0.0, np.pi / 2, 3 * np.pi / 2, 2 * np.pi - 0.01])
    np.testing.assert_allclose(phase_to_radians(y), [0.0, np.pi / 2, -np.pi / 2, -0.01], atol=1e-12)


def test_output_range_is_half_open():
    rad = phase_to_radians(np.arange(-4096, 4096)).astype(np.float64)
    assert rad.min() >= -PI32 and rad.max() < np.pi


def test_explicit_value_range_for_non_power_of_two_conventions():
    # Philips-style milliradians −3142…3141: the span is not a power of two
    data = np.arange(-3142, 3142, dtype=np.int16)
    with pytest.raises(InputError, match="fits no scanner range"):
        phase_to_radians(data, name="sub-01_phase.nii.gz")
    rad = phase_to_radians(data, value_range=(-3142, 3141)).astype(np.float64)
    assert rad[0] == pytest.approx(-np.pi, abs=1e-6)
    assert rad[3142] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(InputError, match="outside the given range"):
        phase_to_radians(data, value_range=(-2048, 2047))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (np.linspace(0.0, 7.3, 50), r"\[0, 7.3\]"),
        (np.full(10, 3.0), "constant"),
        (np.array([0.0, np.nan, 1.0]), "NaN"),
        (np.array([0.0, np.inf, 1.0]), "NaN/Inf"),
        (np.arange(-100, 4096), "fits no scanner range"),  # only half of −8192…8191
        (np.arange(0, 3000) * 1.5, "neither radians"),
    ],
)
def test_unusable_data_raise_input_error_naming_the_file(data, match):
    with pytest.raises(InputError, match=match) as info:
        phase_to_radians(data, name="sub-01_echo-1_part-phase_MEGRE.nii.gz")
    assert "sub-01_echo-1_part-phase_MEGRE.nii.gz" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_wrap_phase_is_congruent_and_half_open():
    x = np.linspace(-40.0, 40.0, 10001)
    w = wrap_phase(x)
    assert w.min() >= -np.pi and w.max() < np.pi
    k = (x - w) / (2 * np.pi)
    np.testing.assert_allclose(k, np.round(k), atol=1e-9)
