"""Metrics against answers known in closed form."""

import json
import math

import numpy as np
import pytest

from bids_qsmnet.metrics import hfen, log_kernel, nrmse, psnr, region_means, score_all, ssim


@pytest.fixture(scope="module")
def maps():
    """A smooth, structured reference (ppm) and a spherical mask well inside the grid."""
    rng = np.random.default_rng(0)
    n = 40
    x, y, z = np.meshgrid(*(np.arange(n) - n / 2 + 0.5,) * 3, indexing="ij")
    ref = 0.05 * np.sin(x / 4.0) * np.cos(y / 5.0) + 0.02 * np.tanh(z / 3.0)
    ref += 0.01 * rng.standard_normal(ref.shape)
    mask = x**2 + y**2 + z**2 < 14**2
    return ref, mask


def test_identical_maps_are_perfect(maps):
    ref, mask = maps
    assert nrmse(ref, ref, mask) == 0.0
    assert hfen(ref, ref, mask) == 0.0
    assert ssim(ref, ref, mask) == pytest.approx(1.0, abs=1e-12)
    assert psnr(ref, ref, mask) == math.inf


def test_nrmse_known_answers(maps):
    ref, mask = maps
    assert nrmse(np.zeros_like(ref), ref, mask) == pytest.approx(100.0, abs=1e-12)
    assert nrmse(1.1 * ref, ref, mask) == pytest.approx(10.0, abs=1e-9)
    assert nrmse(0.75 * ref, ref, mask) == pytest.approx(25.0, abs=1e-9)
    # only mask voxels count: garbage outside the mask changes nothing
    noisy_outside = np.where(mask, 1.1 * ref, 7.0)
    assert nrmse(noisy_outside, ref, mask) == pytest.approx(10.0, abs=1e-9)
    # mask=None scores the whole volume
    assert nrmse(1.2 * ref, ref) == pytest.approx(20.0, abs=1e-9)


def test_nrmse_constant_offset_and_demean(maps):
    ref, mask = maps
    c = 0.03
    expected = 100 * c * math.sqrt(mask.sum()) / np.linalg.norm(ref[mask])
    assert nrmse(ref + c, ref, mask) == pytest.approx(expected, rel=1e-12)
    assert nrmse(ref + c, ref, mask, demean=True) == pytest.approx(0.0, abs=1e-10)


def test_log_kernel_is_the_challenge_kernel():
    k = log_kernel(1.5, 15)
    assert k.shape == (15, 15, 15)
    assert abs(k.sum()) < 1e-15
    assert k[7, 7, 7] < 0 and np.allclose(k, k[::-1, :, :]) and np.allclose(k, k.transpose(1, 0, 2))
    # on a quadratic the LoG is the Laplacian: ∇²(x² + 2y²) = 6
    n = 31
    x, y, _ = np.meshgrid(*(np.arange(n, dtype=float),) * 3, indexing="ij")
    f = (x - 15) ** 2 + 2 * (y - 15) ** 2
    centre = np.sum(k * f[8:23, 8:23, 8:23])
    assert centre == pytest.approx(6.0, rel=1e-3)
    with pytest.raises(ValueError):
        log_kernel(1.5, 14)


def test_hfen_known_answers(maps):
    ref, mask = maps
    assert hfen(ref + 0.05, ref, mask) == pytest.approx(0.0, abs=1e-6)  # offset has no edges
    assert hfen(1.1 * ref, ref, mask) == pytest.approx(10.0, abs=1e-9)  # LoG is linear
    assert hfen(np.zeros_like(ref), ref, mask) == pytest.approx(100.0, abs=1e-9)
    # a smooth error weighs much less in HFEN than in NRMSE
    x = np.arange(ref.shape[0])[:, None, None] * np.ones(ref.shape)
    smooth = ref + 0.002 * x
    assert hfen(smooth, ref, mask) < 0.01 * nrmse(smooth, ref, mask)


def test_ssim_known_answers():
    shape = (16, 16, 16)
    ref = np.ones(shape)
    pred = 2.0 * np.ones(shape)
    # constant maps: only the luminance term remains, (2·1·2 + C1) / (1 + 4 + C1), C1 = (0.01 L)²
    c1 = (0.01 * 1.0) ** 2
    assert ssim(pred, ref, data_range=1.0) == pytest.approx((4 + c1) / (5 + c1), rel=1e-12)
    # with the in-mask means removed the two maps are identical
    assert ssim(pred, ref, data_range=1.0, demean=True) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="data_range"):
        ssim(pred, ref)  # a constant reference has no range
    with pytest.raises(ValueError, match="edge"):
        ssim(np.ones((8, 16, 16)), np.ones((8, 16, 16)), data_range=1.0)


def test_ssim_drops_with_error(maps):
    ref, mask = maps
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(ref.shape)
    values = [ssim(ref + s * noise, ref, mask) for s in (0.0, 0.005, 0.02, 0.08)]
    assert values[0] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(values, values[1:], strict=False))


def test_psnr_known_answer(maps):
    ref, mask = maps
    delta = 0.004
    signs = np.where(np.indices(ref.shape).sum(axis=0) % 2 == 0, 1.0, -1.0)
    rng_ref = ref[mask].max() - ref[mask].min()
    assert psnr(ref + delta * signs, ref, mask) == pytest.approx(
        20 * math.log10(rng_ref / delta), rel=1e-12
    )
    assert psnr(ref + delta * signs, ref, mask, data_range=1.0) == pytest.approx(
        20 * math.log10(1.0 / delta), rel=1e-12
    )


def test_region_means_of_piecewise_constant_map():
    labels = np.zeros((10, 10, 10), np.int16)
    labels[2:5] = 1
    labels[5:7, :5] = 2
    labels[7:, 3:] = 7
    values = {0: 0.0, 1: 0.15, 2: -0.03, 7: 0.4}
    chi = np.vectorize(values.get)(labels).astype(np.float64)
    means = region_means(chi, labels, {1: "globus_pallidus", 2: "white_matter", 9: "absent"})
    assert means == {
        "globus_pallidus": pytest.approx(0.15, abs=1e-15),
        "white_matter": pytest.approx(-0.03, abs=1e-15),
        "7": pytest.approx(0.4, abs=1e-15),
    }
    assert list(means) == ["globus_pallidus", "white_matter", "7"]


def test_score_all_collects_everything(maps):
    ref, mask = maps
    labels = np.where(mask, 1 + (np.indices(ref.shape)[0] > 20), 0)
    names = {1: "left", 2: "right"}
    scores = score_all(1.1 * ref, ref, mask, labels, label_names=names)
    assert scores["nrmse"] == pytest.approx(10.0, abs=1e-9)
    assert scores["hfen"] == pytest.approx(10.0, abs=1e-9)
    assert 0.9 < scores["ssim"] < 1.0
    assert scores["psnr"] > 0
    for name, sel in (("left", labels == 1), ("right", labels == 2)):
        r = scores["regions"][name]
        assert r["ref"] == pytest.approx(ref[sel].mean(), abs=1e-15)
        assert r["error"] == pytest.approx(0.1 * ref[sel].mean(), abs=1e-15)
    json.dumps(scores)  # plain floats only
    # masked maps (zero outside, as pipelines write them) differing by an in-mask offset
    shifted = score_all((ref + 0.02) * mask, ref * mask, mask, demean=True)
    assert shifted["nrmse"] == pytest.approx(0.0, abs=1e-9)
    assert shifted["hfen"] == pytest.approx(0.0, abs=1e-9)
    assert shifted["ssim"] == pytest.approx(1.0, abs=1e-9)
    assert shifted["psnr"] > 150


def test_errors_are_clear(maps):
    ref, mask = maps
    with pytest.raises(ValueError, match="shape"):
        nrmse(ref[:-1], ref, mask)
    with pytest.raises(ValueError, match="mask shape"):
        nrmse(ref, ref, mask[:-1])
    with pytest.raises(ValueError, match="empty"):
        nrmse(ref, ref, np.zeros_like(mask))
    with pytest.raises(ValueError, match="zero"):
        nrmse(ref, np.zeros_like(ref), mask)
