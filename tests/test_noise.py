"""The field's noise estimate (bids_qsmnet.physics.noise) against analytic cases: white
Gaussian noise of known σ, fields the diagonal Haar detail annihilates exactly, and a dipole
field of a smooth source plus noise."""

import numpy as np
import pytest

from bids_qsmnet.physics.noise import noise_share, noise_sigma


def _ball(shape=(64, 64, 64), r=28):
    x, y, z = np.indices(shape) - np.array(shape)[:, None, None, None] / 2
    return x**2 + y**2 + z**2 < r**2


@pytest.mark.parametrize("sigma", [1e-4, 1e-3, 5e-3])
def test_white_noise_sigma_is_recovered(sigma):
    m = _ball()
    f = np.random.default_rng(3).normal(0, sigma, m.shape)
    # the median of ~12 000 |N(0, σ)| samples: relative standard error about 1.1 %
    assert noise_sigma(f, m) == pytest.approx(sigma, rel=0.04)
    assert noise_share(f, m) == pytest.approx(1.0, rel=0.08)


def test_fields_without_an_xyz_term_give_exactly_zero():
    m = _ball()
    x, y, z = np.indices(m.shape, dtype=float)
    smooth = 0.3 + 0.01 * x - 0.02 * y + 1e-3 * (x**2 + y**2 * z + np.sin(z) * x**3)
    assert noise_sigma(smooth, m) == pytest.approx(0.0, abs=1e-9)
    assert noise_share(smooth, m) == pytest.approx(0.0, abs=1e-12)


def test_noise_on_a_dipole_field_is_measured_not_the_field():
    """A sphere's exact field (analytic: χ/3 inside, a dipole outside) plus noise of 1 % of the
    field's scale: σ̂ within 5 % of σ despite the field's edge."""
    from bids_qsmnet.physics.dipole import dipole_kernel

    shape = (64, 64, 64)
    chi = _ball(shape, 8).astype(float) * 0.1
    field = np.real(np.fft.ifftn(dipole_kernel(shape, (1, 1, 1), (0, 0, 1))
                                 * np.fft.fftn(chi)))
    m = _ball(shape, 28)
    sigma = 1e-3
    noisy = field + np.random.default_rng(5).normal(0, sigma, shape)
    assert noise_sigma(noisy, m) == pytest.approx(sigma, rel=0.05)
    energy = np.sum(noisy[m] ** 2)
    assert noise_share(noisy, m) == pytest.approx(m.sum() * sigma**2 / energy, rel=0.1)


def test_a_mask_without_a_whole_block_is_refused():
    m = np.zeros((8, 8, 8), bool)
    m[::2, ::2, ::2] = True
    with pytest.raises(ValueError, match="2×2×2 block"):
        noise_sigma(np.ones(m.shape), m)
    assert noise_share(np.zeros(m.shape), m) == 0.0
