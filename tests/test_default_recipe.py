"""The default model's recipe: stage-2 smoothness/texture variety and the stores' hashes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bids_qsmnet.data.synthetic import simulate_local_field
from bids_qsmnet.training.default_recipe import (
    Recipe,
    _make_pair,
    smooth_variety,
    validation_volumes,
)


def _ball(shape=(40, 44, 36), radius=14.0):
    g = np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing="ij", sparse=True)
    return sum(x * x for x in g) <= radius**2


def test_blur_keeps_a_uniform_map_uniform_up_to_the_mask_edge():
    """Normalised convolution: blurring a constant χ inside the mask changes nothing (a plain
    Gaussian would fade it towards the zero outside)."""
    mask = _ball()
    chi = np.where(mask, 0.05, 0.0).astype(np.float32)
    recipe = dataclasses.replace(Recipe(), p_blur=1.0, blur_sigma_mm=(2.0, 2.0), p_texture=0.0)
    out, info = smooth_variety(chi, mask, np.random.default_rng(0), recipe)
    assert info == {"blur_mm": 2.0}
    np.testing.assert_allclose(out[mask], 0.05, rtol=1e-5)
    assert not out[~mask].any()


def test_blur_smooths_an_edge_by_the_requested_width():
    """A step between two halves of the mask becomes an erf of width σ: 84 % of the step one σ
    into the high side (σ = 1.5 mm on 0.75 mm voxels: 2 voxels)."""
    mask = np.ones((24, 24, 48), bool)
    chi = np.zeros(mask.shape, np.float32)
    chi[:, :, 24:] = 0.1
    recipe = dataclasses.replace(Recipe(), p_blur=1.0, blur_sigma_mm=(1.5, 1.5), p_texture=0.0)
    out, _ = smooth_variety(chi, mask, np.random.default_rng(0), recipe,
                            voxel_size=(1.0, 1.0, 0.75))
    # the step sits between voxels 23 and 24, i.e. at z = 23.5 voxels
    from scipy.special import erf

    z = np.arange(48) - 23.5
    expected = 0.05 * (1 + erf(z * 0.75 / (1.5 * np.sqrt(2))))
    np.testing.assert_allclose(out[12, 12, 8:40], expected[8:40], atol=2e-3)


def test_texture_has_the_requested_amplitude_inside_the_mask_only():
    mask = _ball((48, 48, 48), 20.0)
    chi = np.zeros(mask.shape, np.float32)
    recipe = dataclasses.replace(Recipe(), p_blur=0.0, p_texture=1.0,
                                 texture_ppm=(0.01, 0.01), texture_mm=(3.0, 3.0))
    out, info = smooth_variety(chi, mask, np.random.default_rng(1), recipe)
    assert info == {"texture_ppm": 0.01, "texture_mm": 3.0}
    assert 0.007 < out[mask].std() < 0.013
    assert not out[~mask].any()


def test_stage2_pairs_are_physically_consistent():
    """Field and label of a varied volume: the field is the dipole field of the label."""
    mask = _ball()
    rng = np.random.default_rng(3)
    chi = np.where(mask, rng.normal(0, 0.05, mask.shape), 0).astype(np.float32)
    recipe = dataclasses.replace(Recipe(), p_blur=1.0, p_texture=1.0, max_erosion=0,
                                 noise_ppm=(1e-12, 1e-12), p_background=0.0, p_linearity=0.0)
    vol = _make_pair(chi, mask, np.random.default_rng(4), recipe, "v", variety=True)
    assert {"blur_mm", "texture_ppm", "texture_mm"} <= set(vol.sources)
    assert not np.allclose(vol.chi, chi)
    expected = simulate_local_field(vol.chi, mask)
    np.testing.assert_allclose(vol.field[mask], expected[mask], atol=1e-6)


def test_store_hashes():
    r = Recipe()
    # stage 1's store (and so the shipped weights' data) must not change with stage 2's knobs
    assert r.data_hash() == "1ef2a359b4e78ff4"
    assert dataclasses.replace(r, p_blur=0.1).data_hash() == r.data_hash()
    assert dataclasses.replace(r, p_blur=0.1).finetune_hash() != r.finetune_hash()
    assert dataclasses.replace(r, seed=1).finetune_hash() != r.finetune_hash()


@pytest.mark.parametrize("stage,names", [(1, ["val-0"]), (2, ["val-0", "val-0-smooth"])])
def test_validation_volumes(stage, names):
    r = dataclasses.replace(Recipe(), brain_shape=(72, 84, 72))
    vols = validation_volumes(r, stage=stage)
    assert [v.name for v in vols] == names
    if stage == 2:
        sharp, smooth = vols
        m = sharp.mask & smooth.mask
        # the same brain, smoother: less energy in the voxel-to-voxel differences
        assert np.abs(np.diff(smooth.chi, axis=0))[m[1:]].mean() < \
            0.8 * np.abs(np.diff(sharp.chi, axis=0))[m[1:]].mean()


def _small(**kw):
    return dataclasses.replace(Recipe(), n_brains=2, n_sources=2, ft_brains=1, ft_sources=1,
                               brain_shape=(48, 56, 48), source_shape=(32, 32, 32), **kw)


@pytest.mark.parametrize("stage", [1, 2])
def test_parallel_generation_gives_the_serial_volumes(stage):
    """Worker processes change nothing: same volumes, same order (each draws from its own
    child seed), as the serial generator and as one volume made alone."""
    from bids_qsmnet.training.default_recipe import training_volume, training_volumes

    r = _small()
    serial = list(training_volumes(r, stage=stage))
    parallel = list(training_volumes(r, stage=stage, workers=2))
    n = 4 if stage == 1 else 2
    assert [v.subject for v in serial] == [v.subject for v in parallel]
    assert len(serial) == n and serial[0].subject.endswith("brain-000")
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a.field, b.field)
        np.testing.assert_array_equal(a.chi, b.chi)
        np.testing.assert_array_equal(a.mask, b.mask)
        assert a.sources == b.sources
    alone = training_volume(r, stage, n - 1)
    np.testing.assert_array_equal(alone.field, serial[-1].field)
    with pytest.raises(IndexError, match="volumes"):
        training_volume(r, stage, n)


def test_volumes_draw_from_the_stage_seed_children():
    """Volume i is made from child i of SeedSequence(seed), phantom first, then the field:
    how the shipped stage-1 store was made (before volumes could be made in workers)."""
    from bids_qsmnet.data.synthetic import make_brain_phantom
    from bids_qsmnet.training.default_recipe import training_volume

    r = _small()
    seeds = np.random.SeedSequence(r.seed).spawn(r.n_brains + r.n_sources)
    rng = np.random.default_rng(seeds[1])
    ph = make_brain_phantom(r.brain_shape, rng=rng)
    expected = _make_pair(ph.chi, ph.mask, rng, r, "brain-001")
    vol = training_volume(r, 1, 1)
    assert vol.subject == "brain-001"
    np.testing.assert_array_equal(vol.field, expected.field)
    np.testing.assert_array_equal(vol.chi, expected.chi)


def test_set_fields():
    from bids_qsmnet.training.default_recipe import set_fields

    r = set_fields(Recipe(), ["n_brains=60", "learning_rate=1", "noise_ppm=[0.001, 0.002]",
                              "architecture=qsmnet-lite", "channels_last=false"])
    assert (r.n_brains, r.learning_rate, r.noise_ppm) == (60, 1.0, (0.001, 0.002))
    assert r.architecture == "qsmnet-lite" and r.channels_last is False
    assert r.data_hash() != Recipe().data_hash()
    for bad, msg in [("n_bran=3", "FIELD one of"), ("n_brains", "FIELD=VALUE"),
                     ("n_brains=2.5", "takes a int"), ("channels_last=1", "true or false"),
                     ("noise_ppm=[1]", "takes a tuple")]:
        with pytest.raises(ValueError, match=msg):
            set_fields(Recipe(), [bad])


def test_stage3_plan_and_hashes():
    from bids_qsmnet.training.default_recipe import PRESETS, _stage_plan, set_fields

    r = Recipe()
    assert _stage_plan(r, 3) == (r.chain_seed, r.chain_brains + r.chain_plain_brains,
                                 r.chain_sources, "chain-")
    with pytest.raises(ValueError, match="stages 1, 2, 3 and 4"):
        _stage_plan(r, 5)
    assert dataclasses.replace(r, chain_brains=3).chain_hash() != r.chain_hash()
    assert dataclasses.replace(r, p_blur=0.1).chain_hash() != r.chain_hash()  # stage 2 data
    assert dataclasses.replace(r, chain_brains=3).finetune_hash() == r.finetune_hash()
    # the shipped weights were trained with --preset gpu on these stores
    g = set_fields(Recipe(), PRESETS["gpu"])
    assert (g.data_hash(), g.finetune_hash(), g.chain_hash()) == (
        "e72c38b25f4bcf18", "4a570fdcdf59354f", "8fb1e432a88d2c25")
    assert (g.architecture, g.chain_patch_size, g.chain_epochs) == ("qsmnet-mid", 96, 3)
    # the store of a stage 3 on 48³ patches (chain_patch_size=48) has its own hash
    assert dataclasses.replace(g, chain_patch_size=48).chain_hash() == "cdff6bea3f65773d"


def test_chain_volume_is_the_local_field_through_the_apps_phase_chain():
    """A stage-3 volume: the V-SHARP field of a simulated GRE of the brain in a head.  Deep
    inside the mask it matches the exact local field of the brain (ppm) up to V-SHARP's
    residual; the label is χ inside the brain and zero in mask voxels outside it."""
    from bids_qsmnet.data.synthetic import erode_mask, make_brain_phantom
    from bids_qsmnet.training.default_recipe import _make_pair

    r = dataclasses.replace(Recipe(), p_linearity=0.0, p_blur=0.0, p_texture=0.0,
                            chain_snr=(1e6, 1e6))
    ph = make_brain_phantom((72, 84, 72), rng=np.random.default_rng(5))
    vol = _make_pair(ph.chi, ph.mask, np.random.default_rng(6), r, "c", chain=True)
    assert {"chain_snr", "echoes", "te1_ms", "dte_ms", "background"} <= set(vol.sources)
    assert vol.mask.sum() > 0.6 * ph.mask.sum()
    assert not vol.chi[vol.mask & ~ph.mask].any() and not vol.field[~vol.mask].any()
    np.testing.assert_array_equal(vol.chi[vol.mask & ph.mask], ph.chi[vol.mask & ph.mask])
    exact = simulate_local_field(np.where(ph.mask, ph.chi, 0).astype(np.float32), ph.mask)
    inner = erode_mask(vol.mask, 4) & vol.mask
    a, b = vol.field[inner], exact[inner]
    assert np.corrcoef(a, b)[0, 1] > 0.8  # same field, same units (a ppm/Hz slip fails)
    assert 0.7 < np.std(a) / np.std(b) < 1.4


def test_stage3_patch_size_names_its_own_store_and_cuts_patches_of_that_size(tmp_path):
    """``chain_patch_size`` (stage 3's patch edge): the stage-3 store of the default edge keeps
    the hash it had before the field existed; another edge is another store, cut at that edge
    (stages 1-2 unchanged)."""
    from bids_qsmnet.training.default_recipe import _patch_store
    from bids_qsmnet.training.patches import TrainingVolume

    r = Recipe()
    assert r.chain_patch_size == r.patch_size == 48
    big = dataclasses.replace(r, chain_patch_size=96)
    assert big.chain_hash() != r.chain_hash()
    assert dataclasses.replace(r, chain_patch_size=64).chain_hash() != big.chain_hash()
    assert (big.data_hash(), big.finetune_hash()) == (r.data_hash(), r.finetune_hash())

    mask = _ball((40, 44, 36), 15.0)
    chi = np.where(mask, 0.05, 0.0).astype(np.float32)
    vol = TrainingVolume(field=simulate_local_field(chi, mask), chi=chi, mask=mask,
                         voxel_size=(1.0, 1.0, 1.0), b0_dir=(0.0, 0.0, 1.0), subject="ball")
    small = dataclasses.replace(r, patch_size=16, chain_patch_size=24, max_stride=8)
    info = _patch_store(str(tmp_path / "chain.h5"), [vol], small, "test",
                        patch_size=small.chain_patch_size)
    assert info.patch_size == 24 and info.n_patches > 0
    info1 = _patch_store(str(tmp_path / "one.h5"), [vol], small, "test")  # stages 1-2
    assert info1.patch_size == 16 and info1.n_patches > info.n_patches


def test_stage4_plan_and_hash():
    """Stage 4 (real-anatomy structure): its own seed and volumes; its store's hash follows its
    own fields and the shared field model, not the earlier stages' phantom counts."""
    from bids_qsmnet.training.default_recipe import _stage_plan

    r = Recipe()
    assert _stage_plan(r, 4) == (r.tissue_seed, r.tissue_brains + r.tissue_plain_brains,
                                 r.tissue_sources, "tissue-")
    for change in ({"tissue_brains": 3}, {"tissue_p_blur": 0.0}, {"tissue_patch_size": 48},
                   {"noise_ppm": (0.001, 0.002)}, {"tissue_seed": 1}):
        assert dataclasses.replace(r, **change).tissue_hash() != r.tissue_hash()
    for same in ({"n_brains": 3}, {"chain_brains": 3}, {"ft_seed": 1}, {"tissue_epochs": 9}):
        assert dataclasses.replace(r, **same).tissue_hash() == r.tissue_hash()


def test_stage4_volumes_template_brains_first_then_procedural():
    """Stage 4's first ``tissue_brains`` volumes are INIA19-template brains with exact,
    physically consistent fields; then procedural brains and source phantoms."""
    from bids_qsmnet.data.anatomy import AnatomyUnavailable
    from bids_qsmnet.training.default_recipe import training_volume

    r = dataclasses.replace(Recipe(), tissue_brains=1, tissue_plain_brains=1, tissue_sources=1,
                            brain_shape=(96, 112, 80), source_shape=(32, 32, 32),
                            p_linearity=0.0, p_texture=0.0, tissue_p_blur=0.0,
                            p_background=0.0, max_erosion=0)
    try:
        vol = training_volume(r, 4, 0)
    except AnatomyUnavailable as exc:
        pytest.skip(str(exc))
    assert vol.subject == "tissue-template-000" and vol.mask.sum() > 50_000
    noise = vol.sources["noise_ppm"]
    exact = simulate_local_field(vol.chi, vol.mask)
    resid = (vol.field - exact)[vol.mask]
    assert abs(np.std(resid) - noise) < 0.2 * noise  # the field is the label's, plus noise
    assert training_volume(r, 4, 1).subject == "tissue-brain-001"
    assert training_volume(r, 4, 2).subject == "tissue-sources-000"
