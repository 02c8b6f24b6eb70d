"""Background-field removal (V-SHARP, PDF) against analytic fields.

Every field here is analytic: the Lorentz-corrected field of a uniformly magnetised sphere of
susceptibility ``χ`` and radius ``R`` is zero inside it and, outside,

    b(r) = χ/3 · (R/r)³ · (3 cos²θ − 1)        (ppm, θ from B0)

so the total field = background (air-like spheres, χ = +9 ppm, outside the brain mask, plus
a shim-like harmonic polynomial) + local field (small spheres of ±0.05–0.2 ppm inside the
mask) has a known local part.  Errors are RMS over the returned mask relative to the RMS of the
true local field there; the measured value is given next to each bound.  The local sources lie
at least 14 mm (more than the largest SMV radius) inside the mask, where V-SHARP is exact up to
discretisation; sources at the very edge are V-SHARP's and PDF's known weak spot and are not
what these bounds are about.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from bids_qsmnet.phase.background import BackgroundRemoval, default_vsharp_radii, pdf, vsharp

SEMI_MM = np.array([48.0, 42.0, 38.0])  # brain-mask ellipsoid semi-axes


def positions_mm(shape, voxel_size):
    """Voxel-centre coordinates (mm) relative to the grid centre, shape (3, *shape)."""
    vs = np.asarray(voxel_size, float)
    centre = (np.asarray(shape) - 1) / 2
    idx = np.indices(shape).astype(float)
    return (idx - centre[:, None, None, None]) * vs[:, None, None, None]


def sphere_field(pos, centre, radius, chi, b0_dir=(0.0, 0.0, 1.0)):
    """Analytic field (ppm) of a sphere (mm, ppm) with the Lorentz correction."""
    b = np.asarray(b0_dir, float) / np.linalg.norm(b0_dir)
    d = pos - np.asarray(centre, float)[:, None, None, None]
    r2 = np.sum(d * d, axis=0)
    cos2 = np.tensordot(b, d, axes=1) ** 2 / np.maximum(r2, 1e-12)
    field = chi / 3.0 * radius**3 * (3.0 * cos2 - 1.0) / np.maximum(r2, 1e-12) ** 1.5
    field[r2 <= radius**2] = 0.0
    return field


def phantom(shape, voxel_size, *, b0_dir=(0.0, 0.0, 1.0), shim=True, seed=1):
    """Return ``(total, local, background, mask)`` in ppm, local sources ≥ 14 mm deep."""
    pos = positions_mm(shape, voxel_size)
    x, y, z = pos
    mask = (x / SEMI_MM[0]) ** 2 + (y / SEMI_MM[1]) ** 2 + (z / SEMI_MM[2]) ** 2 <= 1.0
    depth = ndimage.distance_transform_edt(mask, sampling=voxel_size)
    # air-like spheres below and beside the brain (sinus, ear canal), 5-8 mm from the mask
    background = sphere_field(pos, (0.0, 10.0, -52.0), 9.0, 9.0, b0_dir)
    background += sphere_field(pos, (56.0, 0.0, -20.0), 6.0, 9.0, b0_dir)
    if shim:
        # a residual shim field: constant + linear + second-order harmonic terms
        background += 0.05 + 0.3 * x / 60.0 - 0.1 * z / 60.0 + 0.2 * (x * x - y * y) / 60.0**2
    rng = np.random.default_rng(seed)
    local = np.zeros(shape)
    placed = 0
    while placed < 10:
        centre = rng.uniform(-1.0, 1.0, 3) * SEMI_MM
        radius = rng.uniform(3.0, 6.0)
        ball = np.sum((pos - centre[:, None, None, None]) ** 2, axis=0) <= radius**2
        if not ball.any() or not mask[ball].all() or depth[ball].min() < 14.0:
            continue
        chi = rng.choice([-1.0, 1.0]) * rng.uniform(0.05, 0.2)
        local += sphere_field(pos, centre, radius, chi, b0_dir)
        placed += 1
    return background + local, local, background, mask


def rel_rms(estimate, truth, region):
    err = estimate[region] - truth[region]
    return float(np.sqrt(np.mean(err**2) / np.mean(truth[region] ** 2)))


@pytest.fixture(scope="module")
def iso():
    return phantom((64, 64, 64), (2.0, 2.0, 2.0))


# --------------------------------------------------------------------------- V-SHARP


def test_vsharp_recovers_local_field(iso):
    total, local, background, mask = iso
    # the background dominates: 29x the local field's RMS inside the mask
    assert np.sqrt(np.mean(background[mask] ** 2)) > 10 * np.sqrt(np.mean(local[mask] ** 2))
    res = vsharp(total, mask, (2.0, 2.0, 2.0))
    assert isinstance(res, BackgroundRemoval)
    assert res.local_field.dtype == np.float32 and res.mask.dtype == bool
    assert not np.any(res.local_field[~res.mask])
    # measured: 0.060
    assert rel_rms(res.local_field, local, res.mask) < 0.10


def test_vsharp_eroded_mask_is_the_smallest_sphere_erosion(iso):
    """At 2 mm isotropic the smallest default sphere (r = 2 mm) is the 6-neighbour cross."""
    _, _, _, mask = iso
    res = vsharp(np.zeros(mask.shape), mask, (2.0, 2.0, 2.0))
    cross = ndimage.generate_binary_structure(3, 1)
    np.testing.assert_array_equal(res.mask, ndimage.binary_erosion(mask, cross))
    np.testing.assert_array_equal(res.local_field, 0.0)


def test_vsharp_removes_harmonic_fields(iso):
    _, _, background, mask = iso
    res = vsharp(background, mask, (2.0, 2.0, 2.0))
    bg_rms = np.sqrt(np.mean(background[res.mask] ** 2))
    # outside-sphere fields + polynomial: measured residual 0.09 % of the background RMS
    assert np.sqrt(np.mean(res.local_field[res.mask] ** 2)) < 0.005 * bg_rms
    # harmonic polynomials up to third order: the discrete sphere is symmetric, exact zero
    x, y, z = positions_mm(mask.shape, (2.0, 2.0, 2.0))
    for poly in (1.0 + 0.01 * x - 0.02 * z, (x * x - z * z) / 900.0, (x**3 - 3 * x * y * y) / 1e5):
        out = vsharp(poly, mask, (2.0, 2.0, 2.0)).local_field
        assert np.max(np.abs(out)) < 1e-5 * np.max(np.abs(poly[mask]))


def test_vsharp_ignores_nan_outside_mask(iso):
    total, _, _, mask = iso
    with_nan = np.where(mask, total, np.nan)
    a = vsharp(with_nan, mask, (2.0, 2.0, 2.0), radii_mm=[8.0, 4.0])
    b = vsharp(np.where(mask, total, 0.0), mask, (2.0, 2.0, 2.0), radii_mm=[4.0, 8.0])
    np.testing.assert_array_equal(a.local_field, b.local_field)


def test_default_radii():
    np.testing.assert_allclose(default_vsharp_radii((1.0, 1.0, 1.0)), np.arange(12, 0, -1))
    np.testing.assert_allclose(default_vsharp_radii((2.0, 2.0, 2.0)), [12, 10, 8, 6, 4, 2])
    np.testing.assert_allclose(default_vsharp_radii((1.6, 1.6, 3.2)), [12.8, 9.6, 6.4, 3.2])
    np.testing.assert_allclose(default_vsharp_radii((0.5, 0.5, 20.0)), [20.0])


# --------------------------------------------------------------------------- PDF


@pytest.fixture(scope="module")
def coarse():
    """The same head on a 48³ grid of 8/3 mm voxels: PDF's 100 CG iterations stay fast."""
    return phantom((48, 48, 48), (8 / 3,) * 3)


def test_pdf_recovers_local_field(coarse):
    total, local, background, mask = coarse
    vs = (8 / 3,) * 3
    res = pdf(total, mask, vs)
    np.testing.assert_array_equal(res.mask, mask)
    assert res.local_field.dtype == np.float32
    assert not np.any(res.local_field[~mask])
    # measured: 0.16 over the whole mask (PDF's projection also takes part of the local field
    # near the edge, where outside dipoles can mimic it), 0.05 deeper than 14 mm
    assert rel_rms(res.local_field, local, mask) < 0.25
    deep = ndimage.distance_transform_edt(mask, sampling=vs) > 14.0
    assert rel_rms(res.local_field, local, deep) < 0.10
    # the background, 50x the local field here, is gone: measured residual 0.3 % of its RMS
    resid = res.local_field[mask] - local[mask]
    assert np.sqrt(np.mean(resid**2)) < 0.01 * np.sqrt(np.mean(background[mask] ** 2))


def test_pdf_weight_is_scale_free(coarse):
    total, _, _, mask = coarse
    vs = (8 / 3,) * 3
    w = np.where(mask, 1.0 + 0.5 * np.linspace(0, 1, mask.size).reshape(mask.shape), 0.0)
    a = pdf(total, mask, vs, weight=w, iterations=15)
    b = pdf(total, mask, vs, weight=7.0 * w, iterations=15)
    np.testing.assert_allclose(a.local_field, b.local_field, atol=1e-6)


# --------------------------------------------------------------------------- anisotropy, B0


def test_anisotropic_voxels_and_tilted_b0():
    vs = (2.0, 2.0, 4.0)
    b0 = (0.0, 0.3, 1.0)  # B0 tilted by 17° in the j-k plane
    total, local, background, mask = phantom((64, 64, 32), vs, b0_dir=b0)
    res = vsharp(total, mask, vs)
    # measured: 0.069 (radii 12, 8, 4 mm)
    assert rel_rms(res.local_field, local, res.mask) < 0.10
    # harmonic background alone: measured residual 0.14 % of its RMS
    h = vsharp(background, mask, vs)
    bg_rms = np.sqrt(np.mean(background[h.mask] ** 2))
    assert np.sqrt(np.mean(h.local_field[h.mask] ** 2)) < 0.005 * bg_rms
    # x² − z² is harmonic but the voxelised sphere's second moments differ along i and k:
    # the moment-matched kernel still annihilates it.  (Measured without the matching: 3.5 %
    # of it and 1.3 % of the sinus-like background leak through, local-field error 0.30.)
    x, _, z = positions_mm(mask.shape, vs)
    poly = (x * x - z * z) / 900.0
    out = vsharp(poly, mask, vs).local_field
    assert np.max(np.abs(out)) < 1e-5 * np.max(np.abs(poly[mask]))
    res = pdf(total, mask, vs, b0_dir=b0)
    # measured: 0.28
    assert rel_rms(res.local_field, local, mask) < 0.40


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("method", [vsharp, pdf])
def test_bad_inputs_raise(method):
    field = np.zeros((16, 16, 16))
    mask = np.zeros((16, 16, 16), bool)
    mask[4:12, 4:12, 4:12] = True
    vs = (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="3-D"):
        method(np.zeros((16, 16)), mask, vs)
    with pytest.raises(ValueError, match="mask shape"):
        method(field, mask[:-1], vs)
    with pytest.raises(ValueError, match="empty"):
        method(field, np.zeros_like(mask), vs)
    with pytest.raises(ValueError, match="NaN"):
        method(np.where(mask, np.nan, 0.0), mask, vs)
    with pytest.raises(ValueError, match="voxel_size"):
        method(field, mask, (1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="real"):
        method(field.astype(complex), mask, vs)


def test_bad_options_raise():
    field = np.zeros((16, 16, 16))
    mask = np.zeros((16, 16, 16), bool)
    mask[4:12, 4:12, 4:12] = True
    vs = (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="radius"):
        vsharp(field, mask, vs, radii_mm=[4.0, 0.5])
    with pytest.raises(ValueError, match="threshold"):
        vsharp(field, mask, vs, threshold=0.0)
    with pytest.raises(ValueError, match="too thin"):
        vsharp(field, mask, vs, radii_mm=[5.0])
    with pytest.raises(ValueError, match="whole grid"):
        pdf(field, np.ones_like(mask), vs)
    with pytest.raises(ValueError, match="iterations"):
        pdf(field, mask, vs, iterations=0)
    with pytest.raises(ValueError, match="pad"):
        pdf(field, mask, vs, pad=-2)
    with pytest.raises(ValueError, match="weight"):
        pdf(field, mask, vs, weight=np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="b0_dir"):
        pdf(field, mask, vs, b0_dir=(0.0, 0.0, 0.0))
