"""B0 direction from NIfTI affines: rotations, scalings, flips, and degenerate input."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from bids_qsmnet.physics import (
    b0_dir_from_affine,
    forward_field,
    obliquity_deg,
    voxel_sizes_from_affine,
)


def rot_x(deg):
    a = np.radians(deg)
    return np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])


def rot_z(deg):
    a = np.radians(deg)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


def affine(linear, translation=(-90.0, -126.0, -72.0)):
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = translation
    return out


def test_identity_affine():
    np.testing.assert_array_equal(b0_dir_from_affine(np.eye(4)), [0.0, 0.0, 1.0])
    assert obliquity_deg(b0_dir_from_affine(np.eye(4))) == 0.0
    np.testing.assert_array_equal(voxel_sizes_from_affine(np.eye(4)), [1.0, 1.0, 1.0])


def test_rotation_about_x_by_20_degrees():
    b = b0_dir_from_affine(affine(rot_x(20.0)))
    # voxel axis 3 is tilted 20° from scanner z towards −y; B0 seen from the voxels is
    # (0, sin 20°, cos 20°)
    np.testing.assert_allclose(b, [0.0, np.sin(np.radians(20)), np.cos(np.radians(20))], atol=1e-15)
    assert obliquity_deg(b) == pytest.approx(20.0, abs=1e-12)


def test_anisotropic_scaling_changes_sizes_not_direction():
    scales = np.diag([0.5, 0.8, 2.0])
    A = affine(rot_x(20.0) @ scales)
    np.testing.assert_allclose(voxel_sizes_from_affine(A), [0.5, 0.8, 2.0], rtol=1e-14)
    np.testing.assert_allclose(
        b0_dir_from_affine(A), b0_dir_from_affine(affine(rot_x(20.0))), atol=1e-15
    )


@pytest.mark.parametrize("flips", [(-1, -1, 1), (-1, 1, 1), (1, 1, -1), (-1, -1, -1)])
def test_reversed_axes_flip_components(flips):
    """LPS-like storage (reversed axes) flips the sign of those components."""
    R = rot_z(35.0) @ rot_x(20.0)
    b_ras = b0_dir_from_affine(affine(R @ np.diag([1.0, 1.2, 0.9])))
    b_flip = b0_dir_from_affine(affine(R @ np.diag(flips) @ np.diag([1.0, 1.2, 0.9])))
    np.testing.assert_allclose(b_flip, np.array(flips) * b_ras, atol=1e-15)
    assert obliquity_deg(b_flip) == pytest.approx(obliquity_deg(b_ras), abs=1e-12)


def test_direction_maps_back_to_scanner_z():
    """The defining property: the voxel-space vector, carried to world by the affine's unit
    axes, is scanner z — for any rotation, flip and voxel size."""
    rng = np.random.default_rng(3)
    for _ in range(10):
        q, _r = np.linalg.qr(rng.normal(size=(3, 3)))  # random orthogonal, det ±1
        scales = rng.uniform(0.3, 3.0, size=3)
        A = affine(q @ np.diag(scales))
        b = b0_dir_from_affine(A)
        unit_axes = A[:3, :3] / voxel_sizes_from_affine(A)
        np.testing.assert_allclose(unit_axes @ b, [0.0, 0.0, 1.0], atol=1e-14)
        assert np.linalg.norm(b) == pytest.approx(1.0, abs=1e-15)


def test_flipped_storage_gives_the_flipped_field():
    """Physics check: storing the volume with axis 1 reversed (and the affine to match) and
    simulating with the derived B0 reproduces the reversed field."""
    rng = np.random.default_rng(0)
    chi = rng.normal(size=(10, 12, 8))
    vs = (1.0, 0.9, 1.4)
    A = affine(rot_x(25.0) @ np.diag(vs))
    A_flip = A.copy()
    A_flip[:3, 0] *= -1  # axis 1 stored in reverse order
    field = forward_field(chi, vs, b0_dir_from_affine(A))
    field_flip = forward_field(np.flip(chi, 0), vs, b0_dir_from_affine(A_flip))
    # reversal on the periodic grid: index n -> -n (mod N), i.e. flip then roll by one
    np.testing.assert_allclose(
        np.roll(field_flip, 1, axis=0), np.roll(np.flip(field, 0), 1, axis=0), atol=1e-12
    )


def test_custom_world_direction():
    np.testing.assert_allclose(b0_dir_from_affine(np.eye(4), b0_world=(0, 2, 0)), [0, 1, 0])


def test_obliquity_values():
    assert obliquity_deg((0, 0, -1)) == 0.0  # polarity does not matter
    assert obliquity_deg((1, 0, 0)) == 90.0
    assert obliquity_deg((0, 0.5, np.sqrt(3) / 2)) == pytest.approx(30.0, abs=1e-12)
    assert obliquity_deg((1e-9, 0, 1)) == pytest.approx(np.degrees(1e-9), rel=1e-6)
    with pytest.raises(ValueError):
        obliquity_deg((0, 0, 0))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.diag([1.0, 0.0, 1.0, 1.0]), "zero length"),
        (np.full((4, 4), np.nan), "NaN"),
        (np.array([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float), "dependent"),
        (np.eye(2), "4x4"),
    ],
)
def test_degenerate_affine_raises(bad, message):
    with pytest.raises(ValueError, match=message):
        b0_dir_from_affine(bad)


def test_zero_scale_in_voxel_sizes():
    with pytest.raises(ValueError, match="zero"):
        voxel_sizes_from_affine(np.diag([1.0, 1.0, 0.0, 1.0]))


def test_bad_world_direction():
    with pytest.raises(ValueError, match="b0_world"):
        b0_dir_from_affine(np.eye(4), b0_world=(0, 0, 0))


def test_sheared_affine_warns(caplog):
    A = np.eye(4)
    A[0, 1] = 0.3  # axis 2 leans towards axis 1
    with caplog.at_level(logging.WARNING, logger="bids_qsmnet.physics.orientation"):
        b = b0_dir_from_affine(A)
    assert "sheared" in caplog.text
    np.testing.assert_allclose(b, [0, 0, 1], atol=1e-15)
