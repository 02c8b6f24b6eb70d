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
                                                      "edge_mm": 0.0}
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
