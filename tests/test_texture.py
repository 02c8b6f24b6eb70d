"""Training χ maps from the INIA19 primate template (bids_qsmnet.data.texture)."""

from __future__ import annotations

import numpy as np
import pytest

from bids_qsmnet.data.anatomy import AnatomyUnavailable

SHAPE = (152, 184, 152)  # the recipe's brain grid


@pytest.fixture(scope="module")
def maps():
    from bids_qsmnet.data.texture import texture_phantom

    try:
        return [texture_phantom(SHAPE, np.random.default_rng(s)) for s in (0, 1)]
    except AnatomyUnavailable as exc:
        pytest.skip(str(exc))


def test_maps_are_brains_with_tissue_values(maps):
    for chi, mask in maps:
        assert chi.shape == mask.shape == SHAPE and chi.dtype == np.float32
        assert not chi[~mask].any()
        assert 0.1 < mask.mean() < 0.5  # a brain, not a slab or a speck
        v = chi[mask]
        # healthy-tissue range (ppm): white matter to iron-rich nuclei
        assert -0.1 < np.percentile(v, 0.5) and np.percentile(v, 99.5) < 0.3
        assert 0.004 < v.std() < 0.05


def test_white_matter_is_diamagnetic_to_grey_matter(maps):
    """χ_WM < χ_GM (ranges −0.06…−0.01 and 0…+0.04 ppm): white matter, most of a brain's
    volume, is diamagnetic; cortex and nuclei are paramagnetic."""
    for chi, mask in maps:
        v = chi[mask]
        assert np.median(v) < 0 and np.percentile(v, 95) > 0


def test_seeded_and_varied(maps):
    from bids_qsmnet.data.texture import texture_phantom

    chi0, mask0 = maps[0]
    again, mask = texture_phantom(SHAPE, np.random.default_rng(0))
    np.testing.assert_array_equal(again, chi0)
    chi1, mask1 = maps[1]
    assert (mask0 != mask1).mean() > 0.02  # other geometry
    assert abs(np.corrcoef(chi0.ravel(), chi1.ravel())[0, 1]) < 0.9


def test_never_reads_the_evaluation_anatomies(monkeypatch):
    """The human templates of the evaluation (MNI152, Colin27) are never opened."""
    import nibabel as nib

    from bids_qsmnet.data import texture

    opened = []
    real = nib.load
    monkeypatch.setattr(nib, "load", lambda p, *a, **k: opened.append(str(p)) or real(p))
    texture._template.cache_clear()
    try:
        texture.texture_phantom((64, 72, 56), np.random.default_rng(3))
    except AnatomyUnavailable as exc:
        pytest.skip(str(exc))
    finally:
        texture._template.cache_clear()
    assert opened and all("inia19" in p for p in opened)
