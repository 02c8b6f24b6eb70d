"""Brain mask from magnitude on synthetic heads with a known brain.

The phantom is a head as a GRE magnitude image shows it: a bright ellipsoidal brain (with
darker ventricles inside and a mild texture), a dark gap around it (CSF and skull, low signal),
a bright thin scalp shell, two thin bright bridges joining brain and scalp (optic nerves or
vessels), a smooth multiplicative coil shading and Rician noise over a zero background.  The
true brain is the ellipsoid, so the figures below are Dice coefficients against geometry, not
against this code's earlier output.  Measured values are given next to each bound.
"""

from __future__ import annotations

import numpy as np
import pytest

from bids_qsmnet.phase.mask import brain_mask_from_magnitude, combine_echoes

BRAIN_SEMI_MM = np.array([58.0, 68.0, 50.0])  # brain ellipsoid semi-axes
GAP_MM = 8.0  # dark CSF + skull between brain and scalp
SCALP_MM = 5.0  # thickness of the bright scalp shell


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def ellipsoid_level(pos: np.ndarray, semi: np.ndarray) -> np.ndarray:
    """``Σ (x_i / a_i)²``: ≤ 1 inside the ellipsoid of semi-axes ``semi`` (mm)."""
    return sum((pos[i] / semi[i]) ** 2 for i in range(3))


def synthetic_head(
    shape=(96, 96, 80),
    voxel_size=(2.0, 2.0, 2.0),
    *,
    snr: float = 20.0,
    shading: float = 0.5,
    seed: int = 0,
    scalp_intensity: float = 2.0,
    echo_decay: float = 1.0,
):
    """Return ``(magnitude, brain, scalp)``: the image and the true brain / scalp masks.

    ``snr`` is the mean brain intensity over the noise standard deviation of each of the two
    quadrature channels; ``shading`` the peak-to-centre amplitude of the linear coil shading
    (0.5: the brain's intensity varies from 0.5 to 1.5 across the head); the scalp (fat) is
    twice as bright as the brain by default.
    """
    rng = np.random.default_rng(seed)
    vs = np.asarray(voxel_size, float)
    idx = np.indices(shape).astype(float)
    centre = (np.asarray(shape) - 1) / 2
    pos = (idx - centre[:, None, None, None]) * vs[:, None, None, None]

    brain = ellipsoid_level(pos, BRAIN_SEMI_MM) <= 1.0
    inner = ellipsoid_level(pos, BRAIN_SEMI_MM + GAP_MM) <= 1.0
    outer = ellipsoid_level(pos, BRAIN_SEMI_MM + GAP_MM + SCALP_MM) <= 1.0
    scalp = outer & ~inner

    img = np.zeros(shape)
    # Brain with a mild smooth texture (grey/white contrast) of ±10 %.
    texture = 1.0 + 0.1 * np.sin(pos[0] / 9.0) * np.cos(pos[1] / 11.0) * np.sin(pos[2] / 7.0)
    img[brain] = texture[brain]
    # Two dark ventricles inside the brain (holes to fill).
    for side in (-1.0, 1.0):
        vent_pos = pos - np.array([side * 12.0, 0.0, 5.0])[:, None, None, None]
        img[ellipsoid_level(vent_pos, np.array([6.0, 22.0, 8.0])) <= 1.0] = 0.25
    img[inner & ~brain] = 0.08  # CSF and skull
    img[scalp] = scalp_intensity
    # Bridges of 2 mm radius through the gap: along +y (front) and -z (down), off-centre.
    for axis, sign, offset in ((1, 1.0, (10.0, 0.0, -10.0)), (2, -1.0, (15.0, -20.0, 0.0))):
        others = [a for a in range(3) if a != axis]
        r2 = sum((pos[a] - offset[a]) ** 2 for a in others)
        img[(r2 <= 2.0**2) & (sign * pos[axis] > 0) & inner & ~brain] = 1.0

    img *= echo_decay
    img *= 1.0 + shading * pos[0] / np.abs(pos[0]).max()  # receive-coil shading
    sigma = 1.0 / snr
    noisy = np.hypot(img + sigma * rng.standard_normal(shape), sigma * rng.standard_normal(shape))
    return noisy, brain, scalp


@pytest.fixture(scope="module")
def head():
    return synthetic_head()


def test_dice_at_snr20_and_scalp_excluded(head):
    magnitude, brain, scalp = head
    mask = brain_mask_from_magnitude(magnitude, (2.0, 2.0, 2.0))
    assert mask.dtype == bool and mask.shape == brain.shape
    # measured: Dice 0.9997 (brief: >= 0.9)
    assert dice(mask, brain) >= 0.97
    # no scalp voxel (measured: 0 of the shell's 37 000 voxels)
    assert np.logical_and(mask, scalp).sum() == 0
    # the ventricles are filled: the whole interior (brain eroded by 4 mm) is in the mask
    from scipy import ndimage

    core = ndimage.distance_transform_edt(brain, sampling=(2.0, 2.0, 2.0)) > 4.0
    assert mask[core].all()


def test_li_threshold_and_no_bias_correction(head):
    magnitude, brain, scalp = head
    for kwargs in ({"method": "li"}, {"bias_mm": None}):
        mask = brain_mask_from_magnitude(magnitude, (2.0, 2.0, 2.0), **kwargs)
        # measured: Dice 0.9995 (li), 0.995 (no bias correction); no scalp
        assert dice(mask, brain) >= 0.97, kwargs
        assert np.logical_and(mask, scalp).sum() == 0, kwargs


def test_opening_is_what_cuts_the_bridges(head):
    """Without the opening the bridges join the scalp to the brain: the phantom is not trivial."""
    magnitude, brain, scalp = head
    mask = brain_mask_from_magnitude(magnitude, (2.0, 2.0, 2.0), open_mm=0.0)
    # measured: the whole shell (37 000 voxels) comes along, Dice 0.71
    assert np.logical_and(mask, scalp).sum() > 0.9 * scalp.sum()
    assert dice(mask, brain) < 0.8


def test_erosion_in_mm(head):
    from scipy import ndimage

    magnitude, brain, _ = head
    mask = brain_mask_from_magnitude(magnitude, (2.0, 2.0, 2.0), erode_mm=6.0)
    truth = ndimage.distance_transform_edt(brain, sampling=(2.0, 2.0, 2.0)) > 6.0
    # measured: Dice 0.9996 with the brain eroded by 6 mm; strictly inside the brain
    assert dice(mask, truth) >= 0.97
    assert not np.any(mask & ~brain)


def test_anisotropic_voxels_and_echo_combination():
    """1.5 × 1.5 × 3 mm voxels, three echoes with T2* decay combined by RSS."""
    vs = (1.5, 1.5, 3.0)
    echoes = []
    for e, decay in enumerate((1.0, 0.7, 0.5)):
        magnitude, brain, scalp = synthetic_head(
            (128, 128, 54), vs, snr=20.0, seed=10 + e, echo_decay=decay
        )
        echoes.append(magnitude)
    rss = combine_echoes(np.stack(echoes, axis=-1))
    mask = brain_mask_from_magnitude(rss, vs)
    # measured: Dice 0.9995; no scalp voxel
    assert dice(mask, brain) >= 0.97
    assert np.logical_and(mask, scalp).sum() == 0


def test_combine_echoes_rss():
    a = np.full((2, 3, 4), 3.0)
    b = np.full((2, 3, 4), 4.0)
    c = np.full((2, 3, 4), 12.0)
    # 3-4-12-13: sqrt(9 + 16 + 144) = 13
    np.testing.assert_allclose(combine_echoes([a, b, c]), 13.0)
    np.testing.assert_allclose(combine_echoes(np.stack([a, b, c], axis=0), axis=0), 13.0)
    np.testing.assert_allclose(combine_echoes(a), 3.0)
    with pytest.raises(ValueError, match="one shape"):
        combine_echoes([a, np.zeros((2, 2, 2))])
    with pytest.raises(ValueError, match="NaN"):
        combine_echoes(np.stack([a, np.full_like(a, np.nan)], axis=-1))


@pytest.mark.parametrize(
    ("image", "kwargs", "match"),
    [
        (np.full((20, 20, 20), 5.0), {}, "constant"),
        (np.zeros((20, 20, 20)), {}, "constant"),
        (np.ones((20, 20)), {}, "3-D"),
        (np.full((20, 20, 20), np.nan), {}, "NaN"),
        (-np.ones((20, 20, 20)), {}, "non-negative"),
        (np.arange(8000.0).reshape(20, 20, 20), {"method": "bet"}, "method"),
        (np.arange(8000.0).reshape(20, 20, 20), {"erode_mm": -1.0}, "erode_mm"),
    ],
)
def test_bad_inputs_raise(image, kwargs, match):
    with pytest.raises(ValueError, match=match):
        brain_mask_from_magnitude(image, (1.0, 1.0, 1.0), **kwargs)


def test_bad_voxel_size_and_empty_result():
    rng = np.random.default_rng(0)
    img = rng.random((24, 24, 24))
    with pytest.raises(ValueError, match="voxel_size"):
        brain_mask_from_magnitude(img, (1.0, 0.0, 1.0))
    # a 2-voxel-thick bright slab cannot survive a 3 mm opening
    slab = np.zeros((24, 24, 24))
    slab[10:12] = 1.0
    with pytest.raises(ValueError, match="opening"):
        brain_mask_from_magnitude(slab, (1.0, 1.0, 1.0), open_mm=3.0)
