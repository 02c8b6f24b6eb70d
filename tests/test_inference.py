"""Inference: padding, tiled prediction with blending, de-normalisation with the model file's
constants, and deterministic CPU inference."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch
from _bidsapp_fixtures import (
    TEST_NORMALIZATION,
    identity_unet,
    make_model_file,
    sphere_field,
    write_nifti,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bids_qsmnet.inference.predict import (
    MAX_RECOMPUTE,
    blend_weights,
    exact_overlap,
    pad_to_multiple,
    plan_tiles,
    predict_chi,
    predict_normalised,
    receptive_radius,
    tile_starts,
)
from bids_qsmnet.models.blocks import ConvNormAct
from bids_qsmnet.models.modelfile import LoadedModel, ModelSpec, load_model, save_model

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lite_model(tmp_path_factory):
    """A random qsmnet-lite model file (8-16-32-64 channels, 3³ kernels, 3 poolings)."""
    return make_model_file(tmp_path_factory.mktemp("model") / "lite.safetensors", seed=1)


@pytest.fixture(scope="module")
def identity_model(tmp_path_factory):
    """A model file whose network returns its input exactly (see ``identity_unet``)."""
    net = identity_unet()
    spec = ModelSpec(name="identity", architecture=net.config, normalization=TEST_NORMALIZATION)
    return str(save_model(tmp_path_factory.mktemp("model") / "identity.safetensors", net, spec))


class LocalNet(nn.Module):
    """Two 3³ ConvNormAct (no norm) and a 1×1×1 conv: receptive-field radius 2 voxels."""

    multiple = 8  # pad like a 3-pooling U-Net so that tiles start where a U-Net's would

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = ConvNormAct(1, 4, kernel_size=3, norm=None, act="leaky_relu")
        self.b = ConvNormAct(4, 4, kernel_size=3, norm=None, act="leaky_relu")
        self.c = nn.Conv3d(4, 1, 1)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def _random_field(shape, seed=0):
    rng = np.random.default_rng(seed)
    field = rng.normal(0.0, 0.02, shape).astype(np.float32)
    g = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    mask = sum(x**2 for x in g) < 0.8
    return np.where(mask, field, 0), mask


# --------------------------------------------------------------------------- padding and tiles


@pytest.mark.parametrize("shape", [(5, 16, 17), (1, 1, 1), (33, 32, 31), (112, 128, 96)])
@pytest.mark.parametrize("multiple", [1, 2, 8, 16])
def test_pad_to_multiple_round_trip(shape, multiple):
    x = np.random.default_rng(0).normal(size=shape)
    y, crop = pad_to_multiple(x, multiple)
    assert all(n % multiple == 0 and n - m < multiple for n, m in zip(y.shape, shape))
    np.testing.assert_array_equal(y[crop], x)
    assert np.abs(y).sum() == pytest.approx(np.abs(x).sum())  # only zeros were added
    for s, n in zip(crop, y.shape):  # centred: the two sides differ by ≤ 1 voxel
        assert 0 <= (n - s.stop) - s.start <= 1


@settings(max_examples=200, deadline=None)
@given(
    length=st.integers(1, 40).map(lambda k: 8 * k),
    tile=st.integers(1, 12).map(lambda k: 8 * k),
    overlap=st.floats(0.0, 0.89),
)
def test_tiles_cover_and_weights_never_vanish(length, tile, overlap):
    tile = min(tile, length)
    starts = tile_starts(length, tile, overlap, multiple=8)
    assert starts[0] == 0 and starts[-1] + tile == length
    assert all(s % 8 == 0 for s in starts) and starts == sorted(set(starts))
    weights = blend_weights(tile, starts)
    total = np.zeros(length)
    for s, w in zip(starts, weights):
        assert w.shape == (tile,) and np.all((w >= 0) & (w <= 1))
        total[s : s + tile] += w
    assert total.min() > 0.1
    for n, (s, w) in enumerate(zip(starts, weights)):
        if n > 0:  # zero weight on the outer quarter of the overlap with the previous tile
            margin = (starts[n - 1] + tile - s) // 4
            assert np.all(w[:margin] == 0)
        else:
            assert w[0] == 1.0  # the volume border is covered by this tile only
        if n + 1 < len(starts):
            margin = (s + tile - starts[n + 1]) // 4
            assert np.all(w[tile - margin :] == 0)
        else:
            assert w[-1] == 1.0


# --------------------------------------------------------------------------- tiled = whole


def _loaded(network, norm=TEST_NORMALIZATION):
    spec = ModelSpec(
        name="local",
        architecture={
            "in_channels": 1,
            "out_channels": 1,
            "channels": [2, 2],
            "kernel_size": 3,
            "act": "relu",
        },
        normalization=norm,
    )
    return LoadedModel(network=network.eval(), spec=spec, sha256="", path=None)


@pytest.mark.parametrize(("tile", "overlap"), [(32, 0.25), (32, 0.5), (24, 0.5), (48, 0.3)])
def test_tiled_equals_whole_for_a_local_network(tile, overlap):
    """Receptive-field radius 2 ≤ the zero-weight margin (overlap // 4 ≥ 2 voxels): tiled and
    whole-volume χ agree to float32 rounding (measured ≤ 2.3e-8 ppm; bound 1e-4 ppm).  The
    earlier blending, which gave the tile borders a small non-zero weight, was off by
    2.9e-3 to 1.8e-2 ppm on these four cases."""
    field, mask = _random_field((50, 60, 44))
    loaded = _loaded(LocalNet())
    whole = predict_chi(loaded, field, mask)
    tiled = predict_chi(loaded, field, mask, tile=tile, overlap=overlap)
    assert np.abs(tiled - whole).max() < 1e-4
    assert np.abs(whole).max() > 0.01  # the comparison is not between zeros


def _gradient_radius(network, multiple: int, length: int = 192) -> int:
    """Receptive radius along the first axis by back-propagation from one output voxel
    (an independent measure: ReLU zeros can only shrink it)."""
    radius = 0
    for p in range(multiple):
        x = torch.randn(1, 1, length, multiple, multiple, requires_grad=True)
        c = length // 2 + p
        network(x)[0, 0, c, multiple // 2, multiple // 2].backward()
        where = torch.nonzero(x.grad[0, 0].abs().sum(dim=(1, 2))).flatten()
        radius = max(radius, c - int(where.min()), int(where.max()) - c)
    return radius


def test_receptive_radius_is_measured_exactly():
    assert receptive_radius(LocalNet().eval(), 8) == 2
    stack = nn.Sequential(nn.Conv3d(1, 2, 5, padding=2), nn.ReLU(), nn.Conv3d(2, 1, 3, padding=1))
    assert receptive_radius(stack.eval(), 1) == 3
    # a global operation (instance norm) reaches everything: tiles can never be exact
    glob = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.InstanceNorm3d(2))
    assert receptive_radius(glob.eval(), 1, limit=128) is None


def test_receptive_radius_of_a_unet_matches_back_propagation(lite_model):
    """qsmnet-lite (3³ kernels, two per level, 3 poolings): the NaN probe and the gradient
    support agree to within the pooling grid; the analytic count of its convolutions alone
    (2·(1+2+4)·2 + 2·8 = 44 voxels) is a lower bound."""
    net = load_model(lite_model).network
    r_nan = receptive_radius(net, net.multiple)
    r_grad = _gradient_radius(net, net.multiple)
    assert 44 <= r_grad <= r_nan <= r_grad + net.multiple
    assert net._bids_qsmnet_receptive_radius == r_nan  # cached


def test_exact_tiles_equal_the_whole_volume_for_a_unet(lite_model):
    """Overlaps of 2R + 2^depth voxels with zero weight on the outer R voxels: a U-Net whose
    receptive field is far wider than any blending margin gives exactly its whole-volume map
    in tiles (measured max |Δχ| ~1e-7 ppm: float rounding).  With the old quarter-overlap
    bands (explicit overlap 0.25) the same tiles differ by much more than 1e-4 ppm."""
    loaded = load_model(lite_model)
    field, mask = _random_field((40, 48, 232))
    whole = predict_chi(loaded, field, mask)
    assert np.abs(whole).max() > 0.01
    tiled = predict_chi(loaded, field, mask, tile=160)  # overlap: exact
    assert np.abs(tiled - whole).max() < 1e-4
    budget = predict_chi(loaded, field, mask, max_voxels=40 * 48 * 160)
    assert np.abs(budget - whole).max() < 1e-4
    approx = predict_chi(loaded, field, mask, tile=64, overlap=0.25)
    diff = (approx - whole)[mask]
    assert np.abs(diff).max() > 1e-4  # the check above can fail
    assert np.sqrt(np.mean(diff**2)) / np.sqrt(np.mean(whole[mask] ** 2)) < 0.3


@settings(max_examples=150, deadline=None)
@given(
    shape=st.tuples(*[st.integers(2, 40).map(lambda k: 8 * k)] * 3),
    radius=st.integers(1, 60),
    budget_fraction=st.floats(0.02, 1.2),
)
def test_tile_plans_cover_fit_and_are_exact_when_they_say_so(shape, radius, budget_fraction):
    total = int(np.prod(shape))
    budget = max(int(total * budget_fraction), 16**3)
    try:
        plan = plan_tiles(shape, 8, radius, budget)
    except MemoryError:
        assert budget < 16**3 or min(shape) < 16
        return
    if total <= budget:
        assert plan.n_tiles == 1 and plan.sizes == shape
        return
    assert plan.tile_voxels <= budget
    o = exact_overlap(radius, 8)
    for n, size, starts in zip(shape, plan.sizes, plan.starts):
        assert starts[0] == 0 and starts[-1] + size == n and size <= n
        assert all(st_ % 8 == 0 for st_ in starts) and list(starts) == sorted(set(starts))
        if plan.exact:
            assert all(b - a <= size - o for a, b in zip(starts, starts[1:]))
            assert plan.computed_voxels <= MAX_RECOMPUTE * total
        weights = blend_weights(size, list(starts), radius)
        cover = np.zeros(n)
        for s0, w in zip(starts, weights):
            cover[s0:s0 + size] += w
            if plan.exact:  # no weight within the receptive radius of an inner side
                if s0 > 0:
                    assert np.all(w[:radius] == 0)
                if s0 + size < n:
                    assert np.all(w[size - radius:] == 0)
        assert cover.min() > 0.1


def test_bad_tile_options():
    net = LocalNet().eval()
    x = np.zeros((40, 40, 40), np.float32)
    with pytest.raises(ValueError, match="multiple of 8"):
        predict_normalised(net, x, multiple=8, tile=20)
    with pytest.raises(ValueError, match="overlap"):
        predict_normalised(net, x, multiple=8, tile=16, overlap=0.95)


# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("tile", [None, 16])
def test_predict_chi_denormalises_with_the_model_constants(identity_model, tile):
    """With a network that returns its input, χ = (f − μ_f)/σ_f · σ_χ + μ_χ inside the mask
    and 0 outside, with the constants written in the model file."""
    loaded = load_model(identity_model)
    assert loaded.spec.normalization.to_dict() == TEST_NORMALIZATION
    field, mask = _random_field((20, 26, 18), seed=3)
    field = np.where(mask, field + 0.01, 0.0).astype(np.float32)  # also outside-mask zeros
    chi = predict_chi(loaded, field, mask, tile=tile)
    n = TEST_NORMALIZATION
    expected = (field - n["input_mean"]) / n["input_std"] * n["label_std"] + n["label_mean"]
    assert chi.dtype == np.float32 and chi.shape == field.shape
    np.testing.assert_allclose(chi[mask], expected[mask], rtol=1e-6, atol=1e-8)
    assert np.all(chi[~mask] == 0)


def test_predict_chi_zeroes_the_field_outside_the_mask(identity_model):
    """Values outside the mask never reach the network (their normalised input is 0)."""
    loaded = load_model(identity_model)
    field, mask = _random_field((16, 16, 16), seed=4)
    noisy = np.where(mask, field, 5.0).astype(np.float32)
    np.testing.assert_array_equal(
        predict_chi(loaded, noisy, mask), predict_chi(loaded, field, mask)
    )


def test_predict_chi_checks_shapes(identity_model):
    loaded = load_model(identity_model)
    with pytest.raises(ValueError, match="3-D volume"):
        predict_chi(loaded, np.zeros((4, 4, 4, 2)))
    with pytest.raises(ValueError, match="mask shape"):
        predict_chi(loaded, np.ones((4, 4, 4)), np.ones((4, 4, 5), bool))


# --------------------------------------------------------------------------- run_qsmnet


def test_cpu_inference_is_deterministic(tmp_path, lite_model):
    """Two runs of the same model on the same field write the same bytes."""
    from bids_qsmnet.inference.run import run_qsmnet

    field, mask, _ = sphere_field((32, 32, 32))
    f = write_nifti(tmp_path / "field.nii.gz", field)
    m = write_nifti(tmp_path / "mask.nii.gz", mask, dtype=np.uint8)
    outs = []
    for name in ("a", "b"):
        os.makedirs(tmp_path / name)
        out, info = run_qsmnet(
            f, m, model=lite_model, device="cpu", num_threads=1, newpath=str(tmp_path / name)
        )
        outs.append(out)
    assert os.path.basename(outs[0]) == "field_chi.nii.gz"
    a, b = (open(p, "rb").read() for p in outs)
    assert a == b
    with open(lite_model, "rb") as fh:
        assert info["sha256"] == hashlib.sha256(fh.read()).hexdigest()
    assert info["name"] == "test-lite" and info["device"] == "cpu"
    assert info["data_consistency"] == {"lambda": 0.0, "iterations": 0, "edge_mm": 0.0,
                                        "highpass_mm": 0.0}


# --------------------------------------------------------------------------- flip ensemble


def test_flip_sets():
    from bids_qsmnet.inference.predict import flip_sets

    assert flip_sets(()) == [()]
    assert flip_sets([1, 0, 1]) == [(), (0,), (1,), (0, 1)]
    with pytest.raises(ValueError, match="0, 1 or 2"):
        flip_sets([3])


def test_ensemble_axes_option_before_model_default():
    from bids_qsmnet.inference.predict import ensemble_axes

    assert ensemble_axes(None) == [] and ensemble_axes({}) == []
    assert ensemble_axes({"flip_axes": [1, 0, 1]}) == [0, 1]  # the model file's default
    assert ensemble_axes({"flip_axes": [0, 1]}, []) == []     # [] turns it off
    assert ensemble_axes({"flip_axes": [0]}, (2, 2, 1)) == [1, 2]


def test_flip_ensemble_is_the_mean_of_flipped_maps_and_flip_equivariant(lite_model):
    """Flip ensemble over axes A: the mean of g⁻¹ f(g x) over the flips g of A.  So it is
    exactly equivariant under those flips (a random network alone is not)."""
    loaded = load_model(lite_model)
    field, mask = _random_field((24, 32, 16), seed=3)
    single = predict_chi(loaded, field, mask)
    flipped = predict_chi(loaded, np.ascontiguousarray(field[::-1]),
                          np.ascontiguousarray(mask[::-1]))[::-1]
    ens = predict_chi(loaded, field, mask, flip_axes=[0])
    np.testing.assert_allclose(ens, (single + flipped) / 2, atol=1e-6)
    assert not np.allclose(single, flipped, atol=1e-4)  # the network is not flip-symmetric
    ens2 = predict_chi(loaded, field, mask, flip_axes=[0, 1])
    g = predict_chi(loaded, np.ascontiguousarray(field[:, ::-1]),
                    np.ascontiguousarray(mask[:, ::-1]), flip_axes=[0, 1])[:, ::-1]
    np.testing.assert_allclose(ens2, g, atol=1e-6)


def test_run_qsmnet_takes_the_flip_axes_from_the_model_file(tmp_path):
    from bids_qsmnet.inference.run import run_qsmnet

    path = make_model_file(tmp_path / "m.safetensors", seed=2)
    loaded = load_model(path)
    spec = loaded.spec
    spec = ModelSpec(name=spec.name, architecture=spec.architecture,
                     normalization=spec.normalization, inference={"flip_axes": [1, 0]})
    path = str(save_model(tmp_path / "flips.safetensors", loaded.network, spec))
    field, mask, _ = sphere_field((32, 32, 32))
    f = write_nifti(tmp_path / "field.nii.gz", field)
    m = write_nifti(tmp_path / "mask.nii.gz", mask, dtype=np.uint8)
    _, info = run_qsmnet(f, m, model=path, device="cpu", num_threads=1, newpath=str(tmp_path))
    assert info["flip_axes"] == [0, 1]
    _, info = run_qsmnet(f, m, model=path, device="cpu", num_threads=1, newpath=str(tmp_path),
                         flip_axes=[])
    assert info["flip_axes"] == []


def test_run_qsmnet_residual_passes(tmp_path):
    """run_qsmnet takes ``residual_passes`` from the model file unless given, and one pass is
    the network's map plus the network's map of the field it leaves unexplained."""
    import nibabel as nib

    from bids_qsmnet.inference.run import run_qsmnet
    from bids_qsmnet.physics.dipole import forward_field

    path = make_model_file(tmp_path / "m.safetensors", seed=2)
    loaded = load_model(path)
    spec = loaded.spec
    spec = ModelSpec(name=spec.name, architecture=spec.architecture,
                     normalization=spec.normalization, inference={"residual_passes": 1})
    path = str(save_model(tmp_path / "passes.safetensors", loaded.network, spec))
    field, mask, _ = sphere_field((32, 32, 32))
    f = write_nifti(tmp_path / "field.nii.gz", field)
    m = write_nifti(tmp_path / "mask.nii.gz", mask, dtype=np.uint8)
    out, info = run_qsmnet(f, m, model=path, device="cpu", num_threads=1, dc_lambda=0.0,
                           newpath=str(tmp_path / "a"))
    assert info["residual_passes"] == 1
    got = nib.load(out).get_fdata()
    mask = mask > 0
    chi0 = predict_chi(loaded, field, mask)
    res = np.where(mask, field - forward_field(chi0, pad=16), 0).astype(np.float32)
    want = np.where(mask, chi0 + predict_chi(loaded, res, mask), 0)
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
    assert np.abs(want - chi0).max() > 1e-3 * np.abs(chi0).max()
    out, info = run_qsmnet(f, m, model=path, device="cpu", num_threads=1, dc_lambda=0.0,
                           residual_passes=0, newpath=str(tmp_path / "b"))
    assert info["residual_passes"] == 0
    np.testing.assert_allclose(nib.load(out).get_fdata(), chi0, atol=1e-5 * np.abs(chi0).max())
