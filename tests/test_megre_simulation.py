"""Raw multi-echo GRE simulation against its defining relations.

total = local + background; local = the dipole field of the brain's own susceptibility;
noise-free phase = wrap(2π f TE + φ0); noise-free brain magnitude = 0.8 exp(−R2* TE); the
background field is harmonic (discrete Laplacian ≈ 0) inside the source-free brain; the noise
has the requested SNR; and the field fit recovers the total field from the simulated echoes.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from bids_qsmnet.data.megre import (
    AIR_CHI_PPM,
    DEFAULT_ECHO_TIMES,
    MegreSimulation,
    simulate_megre,
)
from bids_qsmnet.data.synthetic import make_brain_phantom
from bids_qsmnet.phase.echo_fit import fit_total_field
from bids_qsmnet.phase.scaling import phase_to_radians, wrap_phase
from bids_qsmnet.physics.dipole import forward_field
from bids_qsmnet.physics.units import GAMMA_BAR_MHZ_PER_T

B0 = 3.0
HZ_PER_PPM = GAMMA_BAR_MHZ_PER_T * B0


@pytest.fixture(scope="module")
def phantom():
    return make_brain_phantom((64, 64, 64), rng=3)


@pytest.fixture(scope="module")
def clean(phantom):
    return simulate_megre(phantom.chi, phantom.mask, voxel_size=(1, 1, 1), snr=None, rng=7)


def test_outputs(clean, phantom):
    s = clean
    assert isinstance(s, MegreSimulation)
    n = len(DEFAULT_ECHO_TIMES)
    assert s.magnitude.shape == s.phase.shape == (n, 64, 64, 64)
    assert s.magnitude.dtype == s.phase.dtype == np.float32
    assert s.b0_tesla == B0 and s.voxel_size == (1.0, 1.0, 1.0) and s.b0_dir == (0.0, 0.0, 1.0)
    np.testing.assert_array_equal(s.echo_times, DEFAULT_ECHO_TIMES)
    assert s.echo_times[-1] <= 0.03
    assert s.phase.min() >= -np.pi and s.phase.max() < np.pi
    assert s.noise_std == 0.0
    assert np.all(s.head_mask[phantom.mask])  # the brain is inside the head


def test_total_is_local_plus_background(clean):
    s = clean
    total = (s.local_field_ppm.astype(np.float64) + s.background_field_ppm) * HZ_PER_PPM
    np.testing.assert_allclose(s.total_field_hz, total, rtol=1e-6, atol=1e-4)


def test_local_field_is_the_field_of_the_brain_alone(clean, phantom):
    # an independent dipole convolution of chi·mask with generous zero padding
    ref = forward_field(np.where(phantom.mask, phantom.chi, 0.0), (1, 1, 1), (0, 0, 1), pad=32)
    b = phantom.mask
    diff = np.sqrt(np.mean((clean.local_field_ppm - ref)[b] ** 2))
    assert diff < 0.01 * np.sqrt(np.mean(ref[b] ** 2))


def test_noise_free_phase_and_magnitude(clean, phantom):
    s = clean
    for n, te in enumerate(s.echo_times):
        model = 2 * np.pi * s.total_field_hz.astype(np.float64) * te + s.offset_rad
        assert np.abs(wrap_phase(s.phase[n] - model)).max() < 1e-4
    # brain magnitude: proton density 0.8 and R2* = 20 + 120·|chi| (1/s)
    b = phantom.mask
    r2s = np.clip(20.0 + 120.0 * np.abs(phantom.chi[b].astype(np.float64)), 0, 200)
    for n, te in enumerate(s.echo_times):
        np.testing.assert_allclose(s.magnitude[n][b], 0.8 * np.exp(-r2s * te), rtol=1e-5)
    # no signal in air
    assert np.all(s.magnitude[:, ~s.head_mask & (s.magnitude[0] < 0.05)] < 0.05)
    # the offset is smooth but not trivial: a few radians across the grid
    assert 1.0 < np.ptp(s.offset_rad) < 20.0


def test_background_is_strong_and_harmonic_inside_the_brain(clean, phantom):
    s = clean
    b = phantom.mask
    bg = s.background_field_ppm.astype(np.float64)
    bg_hz = bg * HZ_PER_PPM
    # tens to hundreds of Hz at 3 T across the brain (air cavity, head shape), even shimmed
    assert np.ptp(bg_hz[b]) > 60
    assert np.abs(bg_hz[s.head_mask]).max() > 100
    # harmonic where there are no sources: the discrete Laplacian is small inside the brain …
    inner = ndi.binary_erosion(b, iterations=2)
    lap_bg_brain = np.sqrt(np.mean(ndi.laplace(bg)[inner] ** 2))
    # … relative to where its sources are (skull, scalp, cavity) …
    lap_bg_head = np.sqrt(np.mean(ndi.laplace(bg)[s.head_mask & ~b] ** 2))
    # … and relative to the local field's Laplacian in the brain
    lap_local = np.sqrt(np.mean(ndi.laplace(s.local_field_ppm.astype(np.float64))[inner] ** 2))
    assert lap_bg_brain < 0.01 * lap_bg_head
    assert lap_bg_brain < 0.05 * lap_local


def test_first_order_shim(clean, phantom):
    # the background has no mean and no linear gradient over the brain
    idx = np.nonzero(phantom.mask)
    design = np.column_stack([np.ones(len(idx[0]))] + [i.astype(float) for i in idx])
    coef, *_ = np.linalg.lstsq(design, clean.background_field_ppm[idx].astype(float), rcond=None)
    assert np.abs(coef[0]) < 1e-4 and np.abs(coef[1:]).max() < 1e-5


def test_without_background(phantom):
    s = simulate_megre(
        phantom.chi,
        phantom.mask,
        voxel_size=(1, 1, 1),
        snr=None,
        background=None,
        phase_offset=False,
        echo_times=(0.005, 0.01),
    )
    assert np.all(s.background_field_ppm == 0) and np.all(s.offset_rad == 0)
    np.testing.assert_allclose(s.total_field_hz, s.local_field_ppm * HZ_PER_PPM, rtol=1e-6)
    np.testing.assert_array_equal(s.head_mask, phantom.mask)
    assert np.all(s.magnitude[:, ~phantom.mask] == 0)


def test_the_cavity_adds_air_below_the_brain(phantom, clean):
    with_cavity = clean
    without = simulate_megre(
        phantom.chi,
        phantom.mask,
        voxel_size=(1, 1, 1),
        snr=None,
        rng=7,
        background="head-no-cavity",
        echo_times=(0.005,),
    )
    cavity = without.head_mask & ~with_cavity.head_mask
    assert cavity.sum() > 50
    # under the front of the brain: below the brain in every column they share, anterior
    brain = phantom.mask
    has_brain = brain.any(axis=2)
    lowest = np.argmax(brain, axis=2)  # lowest brain voxel of each column
    i, j, k = np.nonzero(cavity & has_brain[:, :, None])
    assert len(k) > 0 and np.all(k < lowest[i, j])
    assert np.nonzero(cavity)[1].mean() > np.nonzero(brain)[1].mean()
    # air in tissue: up to about χ/3 ≈ 3 ppm at the interface, hundreds of Hz
    diff = (with_cavity.background_field_ppm - without.background_field_ppm) * HZ_PER_PPM
    assert np.abs(diff).max() > 100
    assert np.abs(diff).max() < AIR_CHI_PPM * HZ_PER_PPM


def test_noise_has_the_requested_snr(phantom, clean):
    snr = 40.0
    s = simulate_megre(phantom.chi, phantom.mask, voxel_size=(1, 1, 1), snr=snr, rng=7)
    b = phantom.mask
    assert s.noise_std == pytest.approx(clean.magnitude[0][b].mean() / snr, rel=1e-6)
    # same seed → same offset; the complex difference is the noise
    z = s.magnitude * np.exp(1j * s.phase.astype(np.float64))
    z0 = clean.magnitude * np.exp(1j * clean.phase.astype(np.float64))
    noise = (z - z0).ravel()
    assert np.std(noise.real) == pytest.approx(s.noise_std, rel=0.02)
    assert np.std(noise.imag) == pytest.approx(s.noise_std, rel=0.02)


@pytest.fixture(scope="module")
def integer(phantom):
    return simulate_megre(
        phantom.chi, phantom.mask, voxel_size=(1, 1, 1), snr=None, rng=7, integer_phase=True
    )


def test_integer_phase(integer, clean):
    s = integer
    assert s.phase.dtype == np.int16
    assert s.phase.min() >= -4096 and s.phase.max() <= 4095
    rad = phase_to_radians(s.phase, name="simulated")
    assert np.abs(wrap_phase(rad.astype(np.float64) - clean.phase)).max() <= np.pi / 8192 + 1e-6


def test_field_fit_recovers_the_simulated_total_field(integer):
    s = integer
    fit = fit_total_field(
        phase_to_radians(s.phase), s.magnitude, s.echo_times, mask=s.brain_mask, unwrap="path"
    )
    err = (fit.field_hz - s.total_field_hz)[s.brain_mask]
    # 2π/8192 quantisation of the phase: a few mHz
    assert np.sqrt(np.mean(err**2)) < 0.01


def test_anisotropic_voxels_and_oblique_field():
    vs, b0_dir = (1.0, 1.0, 2.0), (0.0, 0.3, 1.0)
    p = make_brain_phantom((48, 48, 32), vs, rng=5)
    s = simulate_megre(p.chi, p.mask, voxel_size=vs, b0_dir=b0_dir, snr=None, rng=0)
    ref = forward_field(np.where(p.mask, p.chi, 0.0), vs, b0_dir, pad=40)
    diff = np.sqrt(np.mean((s.local_field_ppm - ref)[p.mask] ** 2))
    assert diff < 0.01 * np.sqrt(np.mean(ref[p.mask] ** 2))
    assert s.voxel_size == vs
    np.testing.assert_allclose(np.linalg.norm(s.b0_dir), 1.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(background="skull"), "background"),
        (dict(snr=0.0), "snr"),
        (dict(echo_times=(5.0, 10.0)), "seconds"),
        (dict(b0_tesla=-3.0), "b0_tesla"),
        (dict(voxel_size=(1.0, 1.0)), "voxel_size"),
    ],
)
def test_input_checks(kwargs, match):
    chi = np.zeros((8, 8, 8), np.float32)
    mask = np.zeros((8, 8, 8), bool)
    mask[2:6, 2:6, 2:6] = True
    kwargs = {"voxel_size": (1.0, 1.0, 1.0), **kwargs}
    with pytest.raises(ValueError, match=match):
        simulate_megre(chi, mask, **kwargs)
    with pytest.raises(ValueError, match="one shape"):
        simulate_megre(chi, mask[:-1], voxel_size=(1, 1, 1))
    with pytest.raises(ValueError, match="empty"):
        simulate_megre(chi, np.zeros_like(mask), voxel_size=(1, 1, 1))
