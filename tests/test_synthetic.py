"""Synthetic phantoms and field simulation: determinism, anatomy, ranges, physics, noise."""

import time

import numpy as np
import pytest
from scipy import ndimage as ndi

from bids_qsmnet.data.synthetic import (
    BRAIN_LABELS,
    SOURCE_LABELS,
    erode_mask,
    make_brain_phantom,
    make_source_phantom,
    random_b0_dir,
    simulate_local_field,
    snr_to_noise_std,
)
from bids_qsmnet.physics.dipole import forward_field

NAME = {v: k for k, v in BRAIN_LABELS.items()}


@pytest.fixture(scope="module")
def brain():
    # 144 × 168 × 144 mm: room for a life-size brain
    return make_brain_phantom((96, 112, 96), (1.5, 1.5, 1.5), rng=11)


def test_same_seed_same_phantom_other_seed_other_phantom():
    a = make_brain_phantom((48, 56, 48), rng=3)
    b = make_brain_phantom((48, 56, 48), rng=np.random.default_rng(3))
    c = make_brain_phantom((48, 56, 48), rng=4)
    np.testing.assert_array_equal(a.chi, b.chi)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert not np.array_equal(a.mask, c.mask)
    assert np.abs(a.chi - c.chi).max() > 0.1


def test_types_and_support(brain):
    assert brain.chi.dtype == np.float32 and brain.chi.shape == (96, 112, 96)
    assert brain.mask.dtype == bool and brain.labels.dtype == np.int16
    assert brain.voxel_size == (1.5, 1.5, 1.5)
    assert brain.label_names == BRAIN_LABELS
    assert np.all(brain.chi[~brain.mask] == 0)
    assert np.all(brain.labels[~brain.mask] == 0)
    assert np.all(brain.labels[brain.mask] > 0)
    assert np.isfinite(brain.chi).all()


def test_mask_is_one_brain_of_realistic_size(brain):
    mask = brain.mask
    _, n = ndi.label(mask)
    assert n == 1
    extent = [
        np.ptp(np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != d)))[0]) + 1
        for d in range(3)
    ]
    lr, ap, si = np.array(extent) * 1.5  # mm
    # adult brains are about 140 × 170 mm; this grid forces a slight shrink (AP 168 mm)
    assert 100 <= lr <= 155 and 130 <= ap <= 168 and 90 <= si <= 150
    volume_ml = mask.sum() * 1.5**3 / 1000
    assert 700 <= volume_ml <= 1900
    # left-right and front-back faces of the grid stay clear (the brain stem may reach the bottom)
    assert not mask[[0, -1]].any() and not mask[:, [0, -1]].any() and not mask[:, :, -1].any()


def test_brain_is_scaled_into_a_small_grid():
    ph = make_brain_phantom((40, 48, 40), rng=5)
    assert ph.mask.mean() > 0.15
    assert not ph.mask[[0, -1]].any() and not ph.mask[:, [0, -1]].any()
    with pytest.raises(ValueError, match="too small"):
        make_brain_phantom((10, 10, 10), rng=0)


def test_tissues_and_value_ranges(brain):
    chi, labels = brain.chi, brain.labels
    mean = {
        name: float(chi[labels == lab].mean())
        for lab, name in BRAIN_LABELS.items()
        if lab and (labels == lab).any()
    }
    for name in (
        "csf",
        "cortical_gm",
        "white_matter",
        "caudate",
        "putamen",
        "globus_pallidus",
        "thalamus",
        "red_nucleus",
        "substantia_nigra",
        "dentate_nucleus",
        "vein",
    ):
        assert name in mean, f"{name} missing"
    # drawn ranges, widened a little for partial volume, texture and tracts
    expected = {
        "csf": (-0.02, 0.02),
        "cortical_gm": (-0.005, 0.04),
        "white_matter": (-0.07, -0.01),
        "caudate": (0.02, 0.09),
        "putamen": (0.02, 0.09),
        "globus_pallidus": (0.07, 0.21),
        "thalamus": (-0.01, 0.03),
        "red_nucleus": (0.06, 0.21),
        "substantia_nigra": (0.06, 0.21),
        "dentate_nucleus": (0.04, 0.17),
        "vein": (0.15, 0.6),
    }
    for name, (lo, hi) in expected.items():
        assert lo <= mean[name] <= hi, (name, mean[name])
    assert mean["globus_pallidus"] > mean["putamen"] > mean["cortical_gm"] > mean["white_matter"]
    normal = brain.mask & (labels <= NAME["dentate_nucleus"])
    assert -0.2 <= np.percentile(chi[normal], 0.1) and np.percentile(chi[normal], 99.9) <= 0.4
    # deep nuclei come in pairs, one in each hemisphere
    for name in ("putamen", "globus_pallidus", "thalamus"):
        i = np.nonzero(labels == NAME[name])[0]
        centre = np.nonzero(brain.mask)[0].mean()
        assert (i < centre - 3).sum() > 20 and (i > centre + 3).sum() > 20


def test_pathology_switches():
    kwargs = dict(p_calcification=1.0, p_hemorrhage=1.0, p_microbleeds=1.0, p_lesions=1.0)
    sick = make_brain_phantom((64, 72, 64), (1.5, 1.5, 1.5), rng=2, **kwargs)
    for name in ("calcification", "hemorrhage", "wm_lesion"):
        assert (sick.labels == NAME[name]).any(), name
    assert sick.chi[sick.labels == NAME["calcification"]].min() < -0.05  # partial volume
    assert sick.chi[sick.labels == NAME["hemorrhage"]].mean() > 0.3
    assert sick.chi.max() <= 1.2 * 1.5
    kwargs = {k: 0.0 for k in kwargs}
    healthy = make_brain_phantom((64, 72, 64), (1.5, 1.5, 1.5), rng=2, veins=False, **kwargs)
    for name in ("calcification", "hemorrhage", "wm_lesion", "vein"):
        assert not (healthy.labels == NAME[name]).any(), name


@pytest.mark.slow
def test_full_size_phantom_is_fast():
    t0 = time.perf_counter()
    ph = make_brain_phantom((160, 160, 160), rng=0)
    assert time.perf_counter() - t0 < 15.0
    assert ph.mask.sum() > 5e5


def test_source_phantom():
    a = make_source_phantom((48, 48, 48), rng=7)
    b = make_source_phantom((48, 48, 48), rng=7)
    np.testing.assert_array_equal(a.chi, b.chi)
    assert a.chi.dtype == np.float32 and a.mask.all() and a.label_names == SOURCE_LABELS
    assert set(np.unique(a.labels)) <= set(SOURCE_LABELS)
    assert (a.chi > 0.02).any() and (a.chi < -0.02).any()
    one = make_source_phantom(
        (32, 32, 32),
        rng=1,
        n_sources=1,
        strong_fraction=0.0,
        background_std=0.0,
        blur_sigma_max=0.0,
        size_range=(0.4, 0.5),
    )
    assert 0 < np.abs(one.chi).max() <= 0.3 + 1e-6
    strong = make_source_phantom(
        (32, 32, 32),
        rng=1,
        n_sources=3,
        strong_fraction=1.0,
        background_std=0.0,
        blur_sigma_max=0.0,
        size_range=(0.3, 0.5),
    )
    assert np.abs(strong.chi).max() >= 0.3
    # sizes span from a voxel or two to a large fraction of the grid
    many = make_source_phantom((64, 64, 64), rng=3, n_sources=200, blur_sigma_max=0.0)
    sizes = []
    for lab in range(1, 5):
        comp, n = ndi.label(many.labels == lab)
        sizes += list(np.bincount(comp.ravel())[1:])
    assert min(sizes) <= 8 and max(sizes) >= 0.02 * 64**3


def test_field_is_the_dipole_convolution_inside_the_mask(brain):
    kw = dict(voxel_size=(1.5, 1.5, 1.5), b0_dir=(0.1, 0.2, 1.0))
    field = simulate_local_field(brain.chi, brain.mask, **kw, pad=8)
    assert field.dtype == np.float32
    expected = forward_field(brain.chi, kw["voxel_size"], kw["b0_dir"], pad=8)
    scale = np.abs(expected[brain.mask]).max()
    np.testing.assert_allclose(field[brain.mask], expected[brain.mask], atol=1e-6 * scale)
    assert np.all(field[~brain.mask] == 0)


def test_field_of_a_sphere_matches_the_analytic_dipole():
    n, radius, chi0 = 64, 6.0, 0.5
    x, y, z = np.meshgrid(*(np.arange(n) - n // 2,) * 3, indexing="ij")
    chi = np.where(x**2 + y**2 + z**2 <= radius**2, chi0, 0.0)
    field = simulate_local_field(chi, np.ones(chi.shape, bool), b0_dir=(1, 0, 0), pad=32)
    # outside a sphere: chi · (R/r)³ · (3 cos²θ − 1) / 3, θ from B0 (here the first axis)
    r_eff = (3 * chi.astype(bool).sum() / (4 * np.pi)) ** (1 / 3)  # the voxelised radius
    pole = field[n // 2 + 14, n // 2, n // 2]
    equator = field[n // 2, n // 2 + 14, n // 2]
    assert pole == pytest.approx(chi0 * (r_eff / 14) ** 3 * 2 / 3, rel=0.05)
    assert equator == pytest.approx(-chi0 * (r_eff / 14) ** 3 / 3, rel=0.05)
    assert abs(field[n // 2, n // 2, n // 2]) < 0.02 * chi0  # Lorentz-corrected: ~0 inside


def test_noise_has_the_requested_std(brain):
    clean = simulate_local_field(brain.chi, brain.mask, voxel_size=brain.voxel_size)
    std = snr_to_noise_std(clean, brain.mask, 20.0)
    assert std == pytest.approx(np.std(clean[brain.mask].astype(np.float64)) / 20, rel=1e-9)
    noisy = simulate_local_field(
        brain.chi, brain.mask, voxel_size=brain.voxel_size, noise_std=std, rng=5
    )
    noise = (noisy - clean)[brain.mask]
    assert noise.std() == pytest.approx(std, rel=0.02)
    assert abs(noise.mean()) < 5 * std / np.sqrt(noise.size)
    assert np.all(noisy[~brain.mask] == 0)
    again = simulate_local_field(
        brain.chi, brain.mask, voxel_size=brain.voxel_size, noise_std=std, rng=5
    )
    np.testing.assert_array_equal(noisy, again)
    with pytest.raises(ValueError):
        snr_to_noise_std(clean, brain.mask, 0.0)
    with pytest.raises(ValueError):
        simulate_local_field(brain.chi, brain.mask, noise_std=-1.0)


def test_erode_mask():
    mask = np.zeros((20, 20, 20), bool)
    mask[5:15, 5:15, 5:15] = True
    eroded = erode_mask(mask, 2)
    assert eroded.sum() == 6**3 and eroded[7:13, 7:13, 7:13].all()
    copy = erode_mask(mask, 0)
    assert copy is not mask and np.array_equal(copy, mask)
    full = erode_mask(np.ones((5, 5, 5), bool), 1)  # outside the grid counts as outside
    assert full.sum() == 27


def test_random_b0_dir():
    rng = np.random.default_rng(0)
    dirs = np.array([random_b0_dir(30.0, rng) for _ in range(4000)])
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=1), 1.0)
    cos_t = dirs[:, 2]
    assert cos_t.min() >= np.cos(np.deg2rad(30.0)) - 1e-12
    # uniform on the cap: cos θ uniform on [cos 30°, 1]
    assert cos_t.mean() == pytest.approx((1 + np.cos(np.deg2rad(30.0))) / 2, abs=0.005)
    assert abs(dirs[:, 0].mean()) < 0.02 and abs(dirs[:, 1].mean()) < 0.02
    np.testing.assert_array_equal(random_b0_dir(0.0, 1), [0.0, 0.0, 1.0])
    with pytest.raises(ValueError):
        random_b0_dir(200.0, 1)
