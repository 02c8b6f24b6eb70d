"""Multi-echo field fit against a known field and offset, and the noise of a weighted fit.

Noise-free echoes ``φ_n = wrap(2π f TE_n + φ0)`` of a smooth known field must give back ``f``
(path unwrapping: to 1e-3 Hz; Laplacian: up to a constant on the full grid, up to a harmonic
function inside a mask).  With complex Gaussian noise the magnitude-weighted fit must reach the
analytic standard deviation of a weighted least-squares slope and beat the unweighted fit.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from bids_qsmnet.phase.echo_fit import FieldFit, check_echo_times, fit_total_field
from bids_qsmnet.phase.scaling import wrap_phase

TE = np.array([0.005, 0.010, 0.015, 0.020, 0.025, 0.030])  # s


def _grid(n):
    return np.meshgrid(*[(np.arange(n) - (n - 1) / 2) / ((n - 1) / 2)] * 3, indexing="ij")


def _echoes(field_hz, offset, te, magnitude=None):
    t = np.asarray(te)[:, None, None, None]
    phase = wrap_phase(2 * np.pi * field_hz[None] * t + offset[None]).astype(np.float32)
    if magnitude is None:
        magnitude = np.broadcast_to(np.exp(-t / 0.05), phase.shape)
    return phase, np.ascontiguousarray(magnitude, dtype=np.float32)


def _laplace(f):
    return ndi.laplace(f.astype(np.float64), mode="nearest")


@pytest.fixture(scope="module")
def scene():
    x, y, z = _grid(40)
    # ±150 Hz: 2π f ΔTE wraps in space (±4.7 rad); the last echo holds up to 4.5 cycles
    field = 150 * (x**2 - 0.5 * y**2) + 60 * z + 40 * x * y * z + 20 * np.sin(2 * x + y) - 30
    offset = 1.5 * x - 2.0 * z + 0.8 + 0.5 * x * y
    sphere = x**2 + y**2 + z**2 < 0.9**2
    return field, offset, sphere


def test_scene_wraps(scene):
    field, _, _ = scene
    assert np.abs(field).max() * TE[-1] > 4  # cycles at the last echo
    assert np.abs(2 * np.pi * field * (TE[1] - TE[0])).max() > np.pi  # ψ itself wraps


@pytest.mark.parametrize("masked", [False, True])
def test_path_fit_recovers_field_and_offset(scene, masked):
    field, offset, sphere = scene
    phase, mag = _echoes(field, offset, TE)
    mask = sphere if masked else None
    fit = fit_total_field(phase, mag, TE, mask=mask, unwrap="path")
    assert isinstance(fit, FieldFit)
    inside = sphere if masked else np.ones_like(sphere)
    assert fit.field_hz.dtype == np.float32 and fit.field_hz.shape == field.shape
    assert np.abs(fit.field_hz - field)[inside].max() < 1e-3
    assert np.abs(wrap_phase(fit.offset_rad.astype(np.float64) - offset))[inside].max() < 1e-4
    assert fit.residual_rad[inside].max() < 1e-5
    if masked:
        assert np.all(fit.field_hz[~sphere] == 0) and np.all(fit.weights[~sphere] == 0)


def test_laplacian_fit_full_grid_is_exact(scene):
    field, offset, _ = scene
    phase, mag = _echoes(field, offset, TE)
    fit = fit_total_field(phase, mag, TE, unwrap="laplacian")
    # no mask: the least-squares unwrap of consistent differences is exact, the cycle rule
    # (median within ±1/(2ΔTE) = ±100 Hz) picks the true one
    assert np.abs(fit.field_hz - field).max() < 1e-3


def test_laplacian_fit_in_mask_is_field_plus_harmonic(scene):
    field, offset, sphere = scene
    phase, mag = _echoes(field, offset, TE)
    fit = fit_total_field(phase, mag, TE, mask=sphere, unwrap="laplacian", voxel_size=(1, 1, 1))
    err = fit.field_hz.astype(np.float64) - field
    inner = ndi.binary_erosion(sphere, iterations=1)
    assert np.ptp(err[sphere]) > 10  # the lost harmonic part is large …
    lap_field = np.sqrt(np.mean(_laplace(field)[inner] ** 2))
    lap_err = np.sqrt(np.mean(_laplace(err)[inner] ** 2))
    # … but harmonic: float32 output rounding (~1e-5 Hz) bounds the Laplacian of the error
    assert lap_field > 0.2
    assert lap_err < 1e-4 * lap_field
    # the offset moves with the field: the model still reproduces the first echo
    model = wrap_phase(fit.offset_rad + 2 * np.pi * fit.field_hz.astype(np.float64) * TE[0])
    assert np.abs(wrap_phase(model - phase[0]))[sphere].max() < 1e-4


def test_unequal_echo_spacing(scene):
    field, offset, sphere = scene
    te = np.array([0.004, 0.008, 0.014, 0.022, 0.030])
    phase, mag = _echoes(0.6 * field, offset, te)
    fit = fit_total_field(phase, mag, te, mask=sphere, unwrap="path")
    assert np.abs(fit.field_hz - 0.6 * field)[sphere].max() < 1e-3


def test_two_echoes(scene):
    field, offset, sphere = scene
    te = TE[:2]
    phase, mag = _echoes(field, offset, te)
    fit = fit_total_field(phase, mag, te, mask=sphere, unwrap="path")
    assert np.abs(fit.field_hz - field)[sphere].max() < 1e-3
    assert np.all(fit.residual_rad == 0)


def test_single_echo_assumes_zero_offset(scene):
    field, offset, sphere = scene
    te = TE[:1]
    phase, mag = _echoes(field, np.zeros_like(field), te)
    fit = fit_total_field(phase[0], mag[0], te, mask=sphere, unwrap="path")
    assert np.abs(fit.field_hz - field)[sphere].max() < 2e-3  # float32 phase / (2π·5 ms)
    assert np.all(fit.offset_rad == 0)
    # a constant offset c is attributed to the field: + c / (2π TE)
    phase_c, _ = _echoes(field, np.full_like(field, 0.6), te)
    fit_c = fit_total_field(phase_c[0], mag[0], te, mask=sphere, unwrap="path")
    expected = field + 0.6 / (2 * np.pi * te[0])
    assert np.abs(fit_c.field_hz - expected)[sphere].max() < 2e-3


def _noisy(field, offset, magnitude, sigma, seed):
    rng = np.random.default_rng(seed)
    t = TE[:, None, None, None]
    z = magnitude * np.exp(1j * (2 * np.pi * field[None] * t + offset[None]))
    z = z + sigma * (rng.standard_normal(z.shape) + 1j * rng.standard_normal(z.shape))
    return np.angle(z).astype(np.float32), np.abs(z).astype(np.float32)


def test_weighted_fit_reaches_analytic_noise_and_beats_unweighted():
    x, y, z = _grid(32)
    field = 50 * (x**2 - 0.5 * y**2) + 30 * z
    offset = 1.5 * x - 2 * z + 0.8
    m = np.exp(-TE / 0.012)  # strong T2* decay: the last echo is 12× noisier than the first
    sigma = 0.02
    phase, mag = _noisy(
        field, offset, np.broadcast_to(m[:, None, None, None], (6,) + x.shape), sigma, seed=1
    )
    weighted = fit_total_field(phase, mag, TE, unwrap="path")
    unweighted = fit_total_field(phase, np.ones_like(mag), TE, unwrap="path")
    rms_w = np.sqrt(np.mean((weighted.field_hz - field) ** 2))
    rms_u = np.sqrt(np.mean((unweighted.field_hz - field) ** 2))

    # analytic standard deviations of the two least-squares slopes (phase noise σ/m_n), in Hz
    w = m**2
    t_w = np.sum(w * TE) / np.sum(w)
    sd_w = sigma / np.sqrt(np.sum(w * (TE - t_w) ** 2)) / (2 * np.pi)
    t_u = TE.mean()
    sd_u = np.sqrt(np.sum((sigma / m) ** 2 * (TE - t_u) ** 2)) / np.sum((TE - t_u) ** 2)
    sd_u /= 2 * np.pi
    assert rms_w == pytest.approx(sd_w, rel=0.08)
    assert rms_u == pytest.approx(sd_u, rel=0.10)
    assert rms_u > 1.5 * rms_w


def test_weights_follow_inverse_variance():
    x, y, z = _grid(16)
    field = 20 * x
    scale = np.where(x > 0, 2.0, 1.0)  # twice the signal on one side: 4× the information
    phase, mag = _echoes(field, np.zeros_like(field), TE)
    fit = fit_total_field(phase, mag * scale[None], TE, unwrap="path")
    assert np.median(fit.weights) == pytest.approx(1.0, rel=0.5)
    ratio = fit.weights[x > 0].mean() / fit.weights[x < 0].mean()
    assert ratio == pytest.approx(4.0, rel=1e-4)


def test_residual_of_a_perturbed_echo():
    # one echo off the line by δ: the weighted rms residual of the fit is known from the
    # least-squares hat matrix of the design (1, TE) with weights m²
    x, _, _ = _grid(8)
    field = 10 * x
    phase, mag = _echoes(field, np.zeros_like(field), TE)
    delta = 0.2
    phase[2] = wrap_phase(phase[2] + delta)
    fit = fit_total_field(phase, mag, TE, unwrap="path")
    w = mag[:, 0, 0, 0].astype(np.float64) ** 2
    design = np.column_stack([np.ones_like(TE), TE])
    sw = np.sqrt(w)
    e = np.zeros(6)
    e[2] = delta
    beta, *_ = np.linalg.lstsq(design * sw[:, None], e * sw, rcond=None)
    r = e - design @ beta
    expected = np.sqrt(np.sum(w * r**2) / np.sum(w))
    np.testing.assert_allclose(fit.residual_rad, expected, rtol=1e-4)


@pytest.mark.parametrize(
    ("te", "match"),
    [
        ([0.005, 0.004, 0.006], "strictly increasing"),
        ([0.005, 0.005, 0.006], "strictly increasing"),
        ([-0.001, 0.004, 0.006], "positive"),
        ([5.0, 10.0, 15.0], "seconds, not ms"),
        ([0.005, np.nan, 0.015], "finite"),
        ([0.005, 0.010], "2 echo times given for 3 echoes"),
        ([], "no echo times"),
    ],
)
def test_bad_echo_times_raise(te, match):
    phase = np.zeros((3, 4, 4, 4), dtype=np.float32)
    with pytest.raises(ValueError, match=match):
        fit_total_field(phase, np.ones_like(phase), te)


def test_check_echo_times_returns_seconds():
    np.testing.assert_array_equal(check_echo_times((0.004, 0.009)), [0.004, 0.009])


def test_input_checks():
    phase = np.zeros((3, 4, 4, 4), dtype=np.float32)
    te = [0.005, 0.01, 0.015]
    with pytest.raises(ValueError, match="magnitude shape"):
        fit_total_field(phase, np.ones((3, 4, 4, 5)), te)
    with pytest.raises(ValueError, match="unwrap"):
        fit_total_field(phase, np.ones_like(phase), te, unwrap="quality")
    with pytest.raises(ValueError, match="mask shape"):
        fit_total_field(phase, np.ones_like(phase), te, mask=np.ones((4, 4, 3), bool))
    with pytest.raises(ValueError, match="non-negative"):
        fit_total_field(phase, -np.ones_like(phase), te)
