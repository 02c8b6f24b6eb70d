"""Spatial unwrapping of smooth phase with many wraps, against the known unwrapped phase.

Path following must return the true phase up to one global multiple of 2π, congruently.  The
Laplacian unwrapper must return the true phase up to a constant on the whole grid, and up to a
harmonic function inside a mask: the discrete Laplacian of its error vanishes there.
"""

from __future__ import annotations

import numpy as np
import pytest

from bids_qsmnet.phase.scaling import wrap_phase
from bids_qsmnet.phase.unwrap import laplacian_unwrap, path_unwrap

N = 64


def _coords(shape=(N, N, N), voxel_size=(1.0, 1.0, 1.0)):
    """Centred coordinates in mm, normalised by the half-extent of the first axis."""
    half = (shape[0] - 1) / 2 * voxel_size[0]
    return np.meshgrid(
        *[(np.arange(n) - (n - 1) / 2) * h / half for n, h in zip(shape, voxel_size)],
        indexing="ij",
    )


def _smooth_phase(x, y, z):
    # quadratic plus mixed terms: about −18…+35 rad, non-zero Laplacian, < π per voxel
    return 20 * x**2 - 10 * y**2 + 8 * z + 6 * x * z + 0.7


def _laplace(f, voxel_size=(1.0, 1.0, 1.0)):
    """7-point discrete Laplacian with 1/h² weights (interior voxels; edges left at 0)."""
    out = np.zeros_like(f)
    core = (slice(1, -1),) * 3
    for axis, h in enumerate(voxel_size):
        fwd = [slice(1, -1)] * 3
        bwd = [slice(1, -1)] * 3
        fwd[axis], bwd[axis] = slice(2, None), slice(None, -2)
        out[core] += (f[tuple(fwd)] - 2 * f[core] + f[tuple(bwd)]) / h**2
    return out


def _erode(mask, n=1):
    from scipy import ndimage as ndi

    return ndi.binary_erosion(mask, iterations=n)


@pytest.fixture(scope="module")
def scene():
    x, y, z = _coords()
    phi = _smooth_phase(x, y, z)
    sphere = x**2 + y**2 + z**2 < 0.85**2
    return phi, wrap_phase(phi), sphere


def test_phase_has_many_wraps(scene):
    phi, wrapped, _ = scene
    assert np.ptp(phi) > 45  # about 8 cycles across the volume
    assert np.abs(np.diff(phi, axis=0)).max() < np.pi  # but sampled densely enough


@pytest.mark.parametrize("masked", [False, True])
def test_path_unwrap_exact_up_to_global_cycle(scene, masked):
    phi, wrapped, sphere = scene
    mask = sphere if masked else np.ones_like(sphere)
    u = path_unwrap(wrapped, mask=mask if masked else None)
    # congruent: the input plus whole cycles, to rounding
    cycles = (u - wrapped)[mask] / (2 * np.pi)
    np.testing.assert_allclose(cycles, np.round(cycles), atol=1e-9)
    # the true phase up to one global multiple of 2π
    k = (u - phi)[mask] / (2 * np.pi)
    assert np.ptp(k) < 1e-9 and abs(k[0] - round(k[0])) < 1e-9
    # the global multiple puts the median into [−π, π)
    assert -np.pi <= np.median(u[mask]) < np.pi
    if masked:
        assert np.all(u[~mask] == 0)


def test_laplacian_unwrap_without_mask_is_exact_up_to_a_constant(scene):
    phi, wrapped, _ = scene
    u = laplacian_unwrap(wrapped, (1.0, 1.0, 1.0))
    err = u - phi
    # least squares on consistent (curl-free, < π per voxel) differences: exact
    assert np.ptp(err) < 1e-8
    # the constant is a whole number of cycles: the circular mean matched the data
    assert abs(err.mean() / (2 * np.pi) - round(err.mean() / (2 * np.pi))) < 1e-9


def test_laplacian_unwrap_in_mask_is_true_phase_plus_harmonic(scene):
    phi, wrapped, sphere = scene
    u = laplacian_unwrap(wrapped, (1.0, 1.0, 1.0), mask=sphere)
    err = u - phi
    inner = _erode(sphere)
    # the error is large — the mask boundary cuts the ramp, and its harmonic part is lost …
    assert np.ptp(err[sphere]) > 5.0
    # … but harmonic: its discrete Laplacian vanishes inside (the phase's own is 0.02)
    lap_phi = np.abs(_laplace(phi)[inner]).max()
    assert lap_phi > 0.01
    assert np.abs(_laplace(err)[inner]).max() < 1e-9
    # and the result is not congruent with the wrapped input
    cycles = (u - wrapped)[sphere] / (2 * np.pi)
    assert np.abs(cycles - np.round(cycles)).max() > 0.1
    assert np.all(u[~sphere] == 0)


def test_noise_outside_mask_does_not_leak_in(scene):
    phi, wrapped, sphere = scene
    noisy = wrapped.copy()
    rng = np.random.default_rng(0)
    noisy[~sphere] = rng.uniform(-np.pi, np.pi, int((~sphere).sum()))
    np.testing.assert_array_equal(
        laplacian_unwrap(noisy, mask=sphere), laplacian_unwrap(wrapped, mask=sphere)
    )
    u = path_unwrap(noisy, mask=sphere)
    k = (u - phi)[sphere] / (2 * np.pi)
    assert np.ptp(k) < 1e-9


def test_anisotropic_voxels_are_honoured():
    vs = (1.0, 1.5, 2.5)
    shape = (48, 40, 24)
    x, y, z = _coords(shape, vs)
    phi = _smooth_phase(x, y, z) * 0.8
    wrapped = wrap_phase(phi)
    mask = x**2 + y**2 + z**2 < 0.8**2
    inner = _erode(mask)
    assert np.abs(np.diff(phi, axis=2)).max() < np.pi

    err = laplacian_unwrap(wrapped, vs, mask=mask) - phi
    lap_phi = np.abs(_laplace(phi, vs)[inner]).max()
    assert np.abs(_laplace(err, vs)[inner]).max() < 1e-9 * max(lap_phi, 1.0)
    # with the wrong (isotropic) voxel size the error is not harmonic in mm space
    err_iso = laplacian_unwrap(wrapped, (1.0, 1.0, 1.0), mask=mask) - phi
    assert np.abs(_laplace(err_iso, vs)[inner]).max() > 0.1 * lap_phi
    # without a mask: exact up to a constant whatever the voxel size
    assert np.ptp(laplacian_unwrap(wrapped, vs) - phi) < 1e-8

    k = (path_unwrap(wrapped, mask=mask) - phi)[mask] / (2 * np.pi)
    assert np.ptp(k) < 1e-9


def test_input_checks():
    with pytest.raises(ValueError, match="3-D"):
        path_unwrap(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="does not match"):
        laplacian_unwrap(np.zeros((4, 4, 4)), mask=np.ones((4, 4, 3), bool))
    with pytest.raises(ValueError, match="empty"):
        path_unwrap(np.zeros((4, 4, 4)), mask=np.zeros((4, 4, 4), bool))
    with pytest.raises(ValueError, match="voxel_size"):
        laplacian_unwrap(np.zeros((4, 4, 4)), (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="NaN"):
        laplacian_unwrap(np.full((4, 4, 4), np.nan))
