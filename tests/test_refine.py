"""The data-consistency refinement after the network (bids_qsmnet.inference.refine)."""

from __future__ import annotations

import numpy as np
import pytest

from bids_qsmnet.inference.refine import (
    EDGE_FLOOR,
    DCSettings,
    dc_settings,
    edge_weights,
    refine,
    refine_adaptive,
    residual_passes,
)
from bids_qsmnet.physics.dipole import forward_field


def _box(shape=(24, 24, 24), lo=4, hi=20):
    m = np.zeros(shape, bool)
    m[lo:hi, lo:hi, lo:hi] = True
    return m


def test_edge_weights_follow_the_distance_in_mm():
    m = _box()
    w = edge_weights(m, edge_mm=4.0)
    assert np.all(w[~m] == 0)
    line = w[4:20, 12, 12]  # through the middle: 1, 2, 3, 4 … mm from the outside
    np.testing.assert_allclose(line[:5], [0.25, 0.5, 0.75, 1.0, 1.0])
    np.testing.assert_allclose(line[::-1][:4], [0.25, 0.5, 0.75, 1.0])
    assert w[m].min() == pytest.approx(0.25) and w[m].max() == 1.0
    # 3 mm slices: the first slice inside is 3 mm from the outside along z
    wa = edge_weights(m, (1.0, 1.0, 3.0), edge_mm=6.0)
    np.testing.assert_allclose(wa[12, 12, 4:8], [0.5, 1.0, 1.0, 1.0])
    # a floor keeps every mask voxel in the region; 0 mm is the binary mask
    assert edge_weights(m, edge_mm=100.0)[m].min() == pytest.approx(EDGE_FLOOR)
    np.testing.assert_array_equal(edge_weights(m, edge_mm=0.0), m.astype(float))


def test_a_mask_touching_the_grid_edge_ends_there():
    m = np.ones((8, 8, 8), bool)
    w = edge_weights(m, edge_mm=2.0)
    assert w[0, 4, 4] == pytest.approx(0.5) and w[4, 4, 4] == 1.0


def test_settings_take_explicit_values_over_the_model_file():
    defaults = {"dc_lambda": 0.3, "dc_iterations": 20, "dc_edge_mm": 6.0}
    assert dc_settings(defaults) == DCSettings(0.3, 20, 6.0)
    assert dc_settings(defaults, lam=0.0).active is False
    assert dc_settings(None) == DCSettings(0.0, 30, 0.0)
    assert dc_settings(defaults, edge_mm=0.0, n_iter=5) == DCSettings(0.3, 5, 0.0)
    assert dc_settings(defaults, lam=0.0).to_dict() == {"lambda": 0.0, "iterations": 0,
                                                      "edge_mm": 0.0, "highpass_mm": 0.0}
    assert dc_settings({**defaults, "dc_highpass_mm": 4.0}) == DCSettings(0.3, 20, 6.0, 4.0)
    assert dc_settings({**defaults, "dc_highpass_mm": 4.0}, highpass_mm=0.0).highpass_mm == 0
    assert DCSettings(0.3, 20, 6.0, 4.0).to_dict()["highpass_mm"] == 4.0
    with pytest.raises(ValueError, match="non-negative"):
        dc_settings(defaults, lam=-1.0)


def test_inactive_refinement_only_masks():
    m = _box()
    chi = np.random.default_rng(0).normal(size=m.shape)
    out = refine(chi, chi, m, DCSettings(0.0, 30, 6.0))
    np.testing.assert_array_equal(out, np.where(m, chi, 0).astype(np.float32))


def test_edge_weighting_limits_the_damage_of_boundary_field_errors():
    """A local field that is exact inside but wrong on the mask's outer two voxels (as after
    background-field removal): starting from the true χ, the refinement with the edge ramp
    stays closer to the truth than the one with the binary mask, and with an exact field both
    stay at the truth."""
    shape = (40, 40, 40)
    g = np.meshgrid(*[np.arange(n) - 19.5 for n in shape], indexing="ij")
    r = np.sqrt(sum(x**2 for x in g))
    m = r < 16
    chi = np.where(r < 6, 0.2, 0.0) + np.where(m & (g[0] > 8), -0.05, 0.0)
    field = forward_field(chi, (1, 1, 1), (0, 0, 1))
    exact = refine(chi, field, m, DCSettings(0.1, 20, 6.0))
    assert np.abs(exact - np.where(m, chi, 0))[m].max() < 2e-3  # 1 % of the sphere
    rim = m & (r >= 14)
    bad = np.where(rim, field + 0.05 * np.sign(g[2] + 0.1), field)
    plain = refine(chi, bad, m, DCSettings(0.1, 20, 0.0))
    ramped = refine(chi, bad, m, DCSettings(0.1, 20, 6.0))
    err = {k: np.sqrt(np.mean((v - chi)[m] ** 2)) for k, v in
           {"plain": plain, "ramped": ramped}.items()}
    assert err["ramped"] < 0.6 * err["plain"]


def _harmonic_background(g, scale):
    """A field harmonic everywhere: quadratic and linear harmonic polynomials plus the field
    of a point dipole outside the grid (like an air sinus)."""
    x, y, z = g
    d = np.stack([x - 60.0, y + 10.0, z - 30.0])
    rr = np.sqrt((d**2).sum(0))
    dipole = (3 * d[2] ** 2 / rr**2 - 1) / rr**3  # ∝ field of a z-dipole: harmonic off-source
    b = (x * x - y * y) / 400 + x * y / 300 + z / 20 + 2e4 * dipole
    return scale * b / np.abs(b).max()


@pytest.mark.parametrize("vs", [(1.0, 1.0, 1.0), (0.8, 0.8, 1.6)])
def test_smv_kernel_annihilates_harmonic_fields(vs):
    """(δ − S_r) ⊛ b = 0 where the sphere fits, for b harmonic — to second order exactly on
    anisotropic grids too (the moment-matched kernel); Ŝ(0) = 1."""
    from bids_qsmnet.phase.background import smv_kernel

    shape = (48, 48, 32)
    S = smv_kernel(shape, vs, 4.0)
    assert S[0, 0, 0] == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(S[:, :, : shape[2] // 2 + 1],
                               smv_kernel(shape, vs, 4.0, real=True), atol=1e-12)
    g = np.meshgrid(*[(np.arange(n) - n / 2) * h for n, h in zip(shape, vs)], indexing="ij")
    x, y, z = g
    b = x * x - y * y + 0.5 * (x * x + y * y - 2 * z * z) + 3 * x * y - 2 * z
    hb = np.fft.ifftn(np.fft.fftn(b) * (1 - S)).real
    interior = tuple(slice(8, n - 8) for n in shape)
    assert np.abs(hb[interior]).max() < 1e-9 * np.abs(b).max()


def test_high_passed_data_term_ignores_a_residual_background():
    """Field = dipole field of the true χ + a harmonic background 10× the local field's size.
    Started at the truth, the high-passed refinement stays there (its data term vanishes
    identically on the eroded region) while the plain one is dragged off; started from a
    noisy map, the high-passed one moves towards the truth."""
    from bids_qsmnet.physics.inversion import data_consistency

    shape = (44, 44, 44)
    g = np.meshgrid(*[np.arange(n) - 21.5 for n in shape], indexing="ij")
    r = np.sqrt(sum(x**2 for x in g))
    m = r < 18
    rng = np.random.default_rng(0)
    chi = np.where(m, np.where(r < 7, 0.1, 0.0) + np.where(g[0] > 6, -0.04, 0.0), 0.0)
    chi = np.where(m, chi + 0.01 * rng.normal(size=shape), 0.0)
    local = forward_field(chi, (1, 1, 1), (0, 0, 1))
    bg = _harmonic_background(g, 10 * np.abs(local[m]).max())
    field = np.where(m, local + bg, 0.0)
    kw = dict(lam=0.01, n_iter=20, pad=0)
    # the local field of data_consistency's own (circular, unpadded) model
    from bids_qsmnet.physics.dipole import dipole_kernel

    local_c = np.fft.ifftn(np.fft.fftn(chi) * dipole_kernel(shape)).real
    field_c = np.where(m, local_c + bg, 0.0)
    stay = data_consistency(chi, field_c, m, highpass_mm=4.0, **kw)
    # exact for the polynomials; the voxelised sphere's mean value misses the point dipole's
    # higher-order terms by ~1e-5 of the background
    np.testing.assert_allclose(stay[m], chi[m], atol=1e-5)
    drift = data_consistency(chi, field_c, m, **kw)
    assert np.sqrt(np.mean((drift - chi)[m] ** 2)) > 0.02
    noisy = np.where(m, chi + 0.03 * rng.normal(size=shape), 0.0)

    def rmse(x, where=m):
        return float(np.sqrt(np.mean((x - chi)[where] ** 2)))

    hp = data_consistency(noisy, field, m, highpass_mm=4.0, **kw)
    # where the 4 mm sphere fits (r < 14) the data pulls the map to the truth; the outer
    # layer keeps its prior (the noisy map) but gains from its neighbours
    inner = r < 13
    assert rmse(hp, inner) < 0.6 * rmse(noisy, inner)  # 0.46 here
    assert rmse(hp) < 0.85 * rmse(noisy)
    assert rmse(data_consistency(noisy, field, m, **kw)) > rmse(noisy)
    with pytest.raises(ValueError, match="too thin"):
        data_consistency(chi, field, r < 3, highpass_mm=4.0, **kw)


def test_refine_passes_the_high_pass_radius_on():
    """refine() with highpass_mm is data_consistency with it (edge ramp and all)."""
    from bids_qsmnet.physics.inversion import data_consistency

    m = _box((32, 32, 32), 4, 28)
    rng = np.random.default_rng(1)
    chi = np.where(m, rng.normal(0, 0.05, m.shape), 0.0)
    field = forward_field(chi, (1, 1, 1), (0, 0, 1)) + 0.01
    out = refine(np.zeros_like(chi), field, m, DCSettings(0.05, 10, 3.0, 3.0))
    w = edge_weights(m, edge_mm=3.0)
    ref = data_consistency(np.zeros_like(chi), np.where(m, field, 0), w, lam=0.05, n_iter=10,
                           pad=8, highpass_mm=3.0)
    np.testing.assert_allclose(out, ref.astype(np.float32), atol=1e-7)


def test_residual_passes_are_a_richardson_iteration():
    """With a linear stand-in for the network, predict(r) = c·D∗r on a periodic grid with the
    whole grid as mask, n passes give in k-space χ̂ₙ = χ̂ − (1 − c·D̂²)ⁿ (χ̂ − χ̂₀) exactly
    (Landweber's iteration); n = 0 only masks."""
    from bids_qsmnet.physics.dipole import dipole_kernel

    shape = (20, 24, 16)
    rng = np.random.default_rng(4)
    chi = rng.normal(0, 0.05, shape)
    D = dipole_kernel(shape, (1, 1, 1), (0, 0, 1))
    field = np.fft.ifftn(D * np.fft.fftn(chi)).real
    chi0 = 0.5 * chi + rng.normal(0, 0.01, shape)
    c = 1.5

    def predict(r):
        return c * np.fft.ifftn(D * np.fft.fftn(r)).real

    m = np.ones(shape, bool)
    for n in (1, 3):
        got = residual_passes(predict, chi0, field, m, n, pad=0)
        want = np.fft.ifftn(np.fft.fftn(chi) - (1 - c * D**2) ** n
                            * np.fft.fftn(chi - chi0)).real
        np.testing.assert_allclose(got, want, atol=2e-6)
    part = _box(shape, 3, 13)
    np.testing.assert_array_equal(residual_passes(predict, chi0, field, part, 0),
                                  np.where(part, chi0, 0).astype(np.float32))
    with pytest.raises(ValueError, match="non-negative"):
        residual_passes(predict, chi0, field, m, -1)


def test_residual_passes_restore_a_shrunk_sphere():
    """A "network" that recovers only 60 % of a source (0.6 × the closed-form L2 inverse):
    its map of a uniformly magnetised sphere (the analytic field: χ/3 inside, the dipole
    field outside, here sampled on the grid) is 40 % short; each residual pass shrinks what
    is missing by about 0.4, so two passes bring the sphere's mean within 20 % of the truth
    and the data residual falls with every pass."""
    from bids_qsmnet.physics.inversion import closed_form_l2

    shape = (48, 48, 48)
    g = np.meshgrid(*[np.arange(n) - 23.5 for n in shape], indexing="ij")
    r = np.sqrt(sum(x**2 for x in g))
    a, dchi = 6.0, 0.4
    # analytic field of a uniformly magnetised sphere (Lorentz-corrected): 0 inside,
    # dchi·a³/3 · (3cos²θ − 1)/r³ outside
    cos2 = np.where(r > 0, g[2] ** 2 / np.maximum(r, 1e-9) ** 2, 0)
    field = np.where(r <= a, 0.0, dchi * a**3 / 3 * (3 * cos2 - 1) / np.maximum(r, a) ** 3)
    m = r < 22
    field = np.where(m, field, 0.0)

    def predict(f):
        return 0.6 * closed_form_l2(f, m, lam=1e-3)

    chi0 = predict(field)
    sphere = r <= a - 1

    def shortfall(x):
        return 1 - float(x[sphere].mean()) / dchi

    assert shortfall(chi0) > 0.35
    out1 = residual_passes(predict, chi0, field, m, 1)
    out2 = residual_passes(predict, chi0, field, m, 2)
    assert shortfall(out2) < 0.2 and shortfall(out2) < shortfall(out1) < shortfall(chi0)
    res = [np.linalg.norm(np.where(m, field - forward_field(x, pad=16), 0))
           for x in (chi0, out1, out2)]
    assert res[0] > res[1] > res[2]
    assert np.abs(out2[~m]).max() == 0


def test_fast_fft_lengths_have_no_prime_factor_above_13():
    from bids_qsmnet.inference.refine import fast_fft_length

    for n in range(2, 1000):
        m = fast_fft_length(n)
        assert m >= n and m % 2 == 0 and m - n <= max(10, 0.04 * n)
        k = m
        for p in (2, 3, 5, 7, 11, 13):
            while k % p == 0:
                k //= p
        assert k == 1, (n, m)
    assert [fast_fft_length(n) for n in (142, 167, 207, 236)] == [144, 168, 208, 240]


def test_brain_box_grows_the_bounding_box_from_an_even_corner():
    from bids_qsmnet.inference.refine import brain_box, fft_grid

    m = np.zeros((50, 40, 30), bool)
    m[11:20, 3:30, 20:29] = True
    assert brain_box(m, 8) == (slice(2, 28), slice(0, 38), slice(12, 30))
    assert fft_grid(m) == (42, 54, 36)  # + 2 × 8 voxels of padding, 34 = 2·17 → 36
    assert brain_box(np.zeros((5, 6, 7), bool)) == (slice(0, 5), slice(0, 6), slice(0, 7))


def _sphere_brain(shape):
    """A ball-shaped brain (radius 10 voxels, 8 or more voxels from every face) holding three
    spheres of χ, its exact field plus 1 ppb noise."""
    g = np.indices(shape).astype(float)
    c = np.array(shape, float)[:, None, None, None] / 2
    mask = ((g - c) ** 2).sum(0) <= 10**2
    chi = np.zeros(shape)
    for centre, r, value in (((17, 20, 20), 3, 0.1), ((23, 18, 21), 2, -0.05),
                             ((20, 24, 17), 2.5, 0.08)):
        chi[((g - np.array(centre, float)[:, None, None, None]) ** 2).sum(0) <= r * r] = value
    rng = np.random.default_rng(0)
    field = (forward_field(chi, pad=16) + 1e-3 * rng.normal(size=shape)) * mask
    return {"chi": chi, "field": field, "mask": mask}


@pytest.mark.parametrize("tv", [0.0, 1e-3])
def test_refinement_ignores_empty_space_around_the_brain(tv):
    """The refinement works on the mask's box (plus margin, padding and fast lengths), so
    a volume with more empty space around the same brain gives the same map: the box is the
    same.  The plain and the TV refinement, λ chosen by the rule from the data."""
    from bids_qsmnet.physics.dc_path import AutoLambda

    ph = _sphere_brain((40, 40, 40))
    auto = AutoLambda(floor=0.1, lambda_ref=0.01, power=1.0, e_ref=0.05)
    settings = DCSettings(0.0, 10, auto=auto, tv=tv, tv_iterations=10)
    prior = 0.7 * ph["chi"]
    small, rep_small = refine_adaptive(prior, ph["field"], ph["mask"], settings)
    big = [np.pad(a, ((10, 20), (30, 4), (2, 16))) for a in (prior, ph["field"], ph["mask"])]
    large, rep_large = refine_adaptive(*big, settings)
    assert rep_small["lambda"] == rep_large["lambda"] > 0
    np.testing.assert_allclose(large[10:50, 30:70, 2:42], small, atol=1e-6)
    assert not large[ph["mask"].shape[0] + 10:].any()
