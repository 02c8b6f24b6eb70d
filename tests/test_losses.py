"""QSMnet's loss terms against analytic values."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from bids_qsmnet.models import losses
from bids_qsmnet.models.losses import (
    gradient_loss,
    l1_loss,
    model_loss,
    neighbour_gradient,
    qsmnet_loss,
)
from bids_qsmnet.models.modelfile import ModelSpec, Normalization
from bids_qsmnet.physics.dipole import dipole_kernel, dipole_kernel_torch, forward_field

torch.set_num_threads(2)

N = 16
NORM = {"input_mean": 0.003, "input_std": 0.02, "label_mean": 0.05, "label_std": 0.1}
# Σ 1/|n| over the 9 neighbours on one side of a plane: 1 face, 4 edges, 4 corners.
HALF_SHELL = 1 + 4 / math.sqrt(2) + 4 / math.sqrt(3)


def _batch(seed=0, b=2, n=N, voxel_size=(1.0, 1.0, 1.0), b0_dir=(0.0, 0.0, 1.0)):
    """Random χ (ppm), its exact field (ppm, numpy FFT in float64) and both normalised."""
    rng = np.random.default_rng(seed)
    chi = rng.normal(0.05, 0.1, size=(b, 1, n, n, n))
    field = np.stack(
        [forward_field(c[0], voxel_size, b0_dir)[None] for c in chi]
    )  # (B, 1, n, n, n)
    nrm = Normalization(**NORM)
    label = torch.as_tensor(nrm.normalise_label(chi), dtype=torch.float64)
    x = torch.as_tensor(nrm.normalise_input(field), dtype=torch.float64)
    return label, x, chi, field


def test_l1_known_value():
    pred = torch.zeros(2, 1, 4, 4, 4)
    label = torch.zeros(2, 1, 4, 4, 4)
    label[0, 0, :2] = 2.0  # a quarter of all voxels differ by 2 → mean 0.5
    assert l1_loss(pred, label).item() == pytest.approx(0.5)
    assert l1_loss(label, pred).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="differ"):
        l1_loss(pred, label[:1])


def test_all_terms_zero_for_a_perfect_prediction():
    label, x, _, _ = _batch()
    kernel = dipole_kernel_torch((N, N, N), dtype=torch.float64)
    out = qsmnet_loss(label, label, x, torch.ones_like(label), kernel, NORM)
    assert set(out) == {"total", "l1", "model", "grad"}
    assert out["l1"].item() == 0.0 and out["grad"].item() == 0.0
    # forward_field_torch computes its FFT in float32: round-off ~1e-9 ppm on ~0.05 ppm fields
    assert out["model"].item() < 1e-7
    assert out["total"].item() < 1e-6


def test_model_loss_zero_when_field_is_dipole_convolved_label():
    label, x, _, field = _batch(seed=1)
    kernel = dipole_kernel_torch((N, N, N))
    mask = torch.ones_like(label, dtype=torch.bool)
    loss = model_loss(label.float(), x.float(), mask, kernel, NORM).item()
    scale = np.abs(field).mean()  # typical field magnitude in ppm
    assert loss < 1e-5 * scale
    # Ignoring the normalisation would be far off: the check has teeth.
    wrong = {"input_mean": 0.0, "input_std": 1.0, "label_mean": 0.0, "label_std": 1.0}
    assert model_loss(label.float(), x.float(), mask, kernel, wrong).item() > 0.1 * scale


def test_model_loss_known_value_cosine():
    """χ = a·cos(2πk/N) along B0 (third axis), field 0: |D·χ̂| = 2/3 → loss = 2a/3 · mean|cos|."""
    a = 0.2
    k = torch.arange(N, dtype=torch.float64)
    chi = a * torch.cos(2 * math.pi * k / N).expand(1, 1, N, N, N)
    nrm = Normalization(**NORM)
    pred = nrm.normalise_label(chi)
    x = torch.full_like(pred, nrm.normalise_input(0.0))  # field 0 ppm
    kernel = dipole_kernel_torch((N, N, N), dtype=torch.float64)
    expected = 2 * a / 3 * np.abs(np.cos(2 * np.pi * np.arange(N) / N)).mean()
    got = model_loss(pred, x, torch.ones(1, 1, N, N, N), kernel, nrm).item()
    assert got == pytest.approx(expected, rel=1e-6)  # float32 FFT
    # Along a perpendicular axis D = 1/3: half the value.
    chi_x = a * torch.cos(2 * math.pi * k / N).reshape(1, 1, N, 1, 1).expand(1, 1, N, N, N)
    got_x = model_loss(nrm.normalise_label(chi_x), x, torch.ones(1, 1, N, N, N), kernel, nrm)
    assert got_x.item() == pytest.approx(expected / 2, rel=1e-6)


def test_model_loss_counts_only_mask_voxels():
    label, x, _, field = _batch(seed=2, b=2)
    kernel = dipole_kernel_torch((N, N, N), dtype=torch.float64)
    mask = torch.zeros_like(label)
    mask[..., : N // 2, :, :] = 1
    spoiled = x.clone()
    spoiled[..., N // 2 :, :, :] += 50.0  # wrong field outside the mask only
    assert model_loss(label, spoiled, mask, kernel, NORM).item() < 1e-7  # float32 FFT
    # Inside the mask, a field off by δ ppm everywhere gives exactly δ (mean over mask voxels).
    delta = 0.01
    off = x + delta / NORM["input_std"]
    assert model_loss(label, off, mask, kernel, NORM).item() == pytest.approx(delta, rel=1e-5)
    # A (B, D, H, W) mask, or a bool one, gives the same.
    assert model_loss(label, off, mask[:, 0], kernel, NORM).item() == pytest.approx(delta)
    assert model_loss(label, off, mask > 0, kernel, NORM).item() == pytest.approx(delta)
    # An empty mask contributes nothing rather than NaN.
    assert model_loss(label, off, torch.zeros_like(mask), kernel, NORM).item() == 0.0


def test_model_loss_per_sample_kernels():
    """Per-sample kernels (B, 1, D, H, W): each sample checked against its own B0 direction."""
    label_z, x_z, _, _ = _batch(seed=3, b=1, b0_dir=(0, 0, 1))
    label_x, x_x, _, _ = _batch(seed=3, b=1, voxel_size=(1, 1, 2), b0_dir=(1, 0, 1))
    label = torch.cat([label_z, label_x])
    x = torch.cat([x_z, x_x])
    kernels = torch.stack(
        [
            torch.as_tensor(dipole_kernel((N, N, N)))[None],
            torch.as_tensor(dipole_kernel((N, N, N), (1, 1, 2), (1, 0, 1)))[None],
        ]
    )
    assert kernels.shape == (2, 1, N, N, N)
    mask = torch.ones_like(label)
    assert model_loss(label, x, mask, kernels, NORM).item() < 1e-7  # float32 FFT
    # One shared kernel is wrong for the second sample.
    assert model_loss(label, x, mask, kernels[0, 0], NORM).item() > 1e-3
    with pytest.raises(ValueError, match="kernel grid"):
        model_loss(label, x, mask, kernels[..., :8], NORM)


def _naive_gradient(x: np.ndarray) -> np.ndarray:
    """The formula by slicing: Σ_n relu(x(v+n) - x(v)) / |n| over interior voxels."""
    c = x[..., 1:-1, 1:-1, 1:-1]
    d, h, w = x.shape[-3:]
    g = np.zeros_like(c)
    for i, j, k in itertools.product((-1, 0, 1), repeat=3):
        if i == j == k == 0:
            continue
        nb = x[..., 1 + i : d - 1 + i, 1 + j : h - 1 + j, 1 + k : w - 1 + k]
        g += np.maximum(nb - c, 0) / math.sqrt(i * i + j * j + k * k)
    return g


def test_neighbour_gradient_matches_definition():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 3, 7, 6, 5))
    g = neighbour_gradient(torch.as_tensor(x)).numpy()
    assert g.shape == (2, 3, 5, 4, 3)
    np.testing.assert_allclose(g, _naive_gradient(x), rtol=1e-12, atol=1e-12)


def test_neighbour_gradient_of_a_point():
    """A single voxel of height h: every neighbour sees +h at offset -n, weight 1/|n|."""
    h = 3.0
    x = torch.zeros(1, 1, 7, 7, 7, dtype=torch.float64)
    x[0, 0, 3, 3, 3] = h
    g = neighbour_gradient(x)[0, 0]  # interior 5³, the point at (2, 2, 2)
    assert g[2, 2, 2].item() == 0.0  # nothing around it is higher
    assert g[1, 2, 2].item() == pytest.approx(h)  # face neighbour
    assert g[1, 1, 2].item() == pytest.approx(h / math.sqrt(2))  # edge neighbour
    assert g[1, 1, 1].item() == pytest.approx(h / math.sqrt(3))  # corner neighbour
    assert g.sum().item() == pytest.approx(h * (6 + 12 / math.sqrt(2) + 8 / math.sqrt(3)))


def test_gradient_loss_zero_for_label_plus_constant():
    label, _, _, _ = _batch(seed=5)
    assert gradient_loss(label + 0.75, label).item() < 1e-12
    assert gradient_loss(label, label).item() == 0.0


def test_gradient_loss_shifted_edge_known_value():
    """Step of height h at index s (label) and s+1 (pred), along the first axis.

    Only the voxels just below a step see higher neighbours: 9 of them, so G = h·HALF_SHELL on
    one plane for each image; the planes differ, so the mean over the (n-2)³ interior voxels is
    2·h·HALF_SHELL/(n-2).
    """
    h, s, n = 0.5, 8, 12
    label = torch.zeros(1, 1, n, n, n, dtype=torch.float64)
    label[..., s:, :, :] = h
    pred = torch.zeros_like(label)
    pred[..., s + 1 :, :, :] = h
    expected = 2 * h * HALF_SHELL / (n - 2)
    assert gradient_loss(pred, label).item() == pytest.approx(expected, rel=1e-12)
    assert gradient_loss(pred, label).item() > 0
    # A step down instead (same edge position) has the same rectified gradient: loss 0 vs a
    # shifted constant, which QSMnet's loss treats like the label.
    assert gradient_loss(label + 1.0, label).item() == 0.0


def test_weights_combine_and_zero_weights_skip(monkeypatch):
    label, x, _, _ = _batch(seed=6)
    rng = np.random.default_rng(7)
    pred = label + torch.as_tensor(rng.normal(0, 0.3, size=label.shape))
    mask = torch.ones_like(label)
    kernel = dipole_kernel_torch((N, N, N), dtype=torch.float64)
    full = qsmnet_loss(pred, label, x, mask, kernel, NORM)
    l1 = l1_loss(pred, label)
    ml = model_loss(pred, x, mask, kernel, NORM)
    gl = gradient_loss(pred, label)
    assert full["l1"].item() == pytest.approx(l1.item())
    assert full["model"].item() == pytest.approx(ml.item())
    assert full["grad"].item() == pytest.approx(gl.item())
    assert full["total"].item() == pytest.approx(l1.item() + 5 * ml.item() + 0.1 * gl.item())
    assert min(full["model"].item(), full["grad"].item()) > 0

    # w_model = 0: field, mask and kernel are not needed at all.
    no_model = qsmnet_loss(pred, label, None, None, None, None, w_model=0.0)
    assert no_model["model"].item() == 0.0
    assert no_model["total"].item() == pytest.approx(l1.item() + 0.1 * gl.item())

    # w_grad = 0: the gradient loss is not computed.
    def boom(*args, **kwargs):
        raise AssertionError("gradient loss computed although w_grad == 0")

    monkeypatch.setattr(losses, "gradient_loss", boom)
    no_grad = qsmnet_loss(pred, label, x, mask, kernel, NORM, w_grad=0.0, w_model=2.0)
    assert no_grad["grad"].item() == 0.0
    assert no_grad["total"].item() == pytest.approx(l1.item() + 2 * ml.item())

    with pytest.raises(ValueError, match="needs field, mask and kernel"):
        qsmnet_loss(pred, label, None, mask, kernel, NORM, w_grad=0.0)
    with pytest.raises(ValueError, match=">= 0"):
        qsmnet_loss(pred, label, x, mask, kernel, NORM, w_model=-1.0)


def test_norm_as_dict_normalization_or_spec():
    label, x, _, _ = _batch(seed=8, b=1)
    pred = label * 1.1
    kernel = dipole_kernel_torch((N, N, N), dtype=torch.float64)
    mask = torch.ones_like(label)
    spec = ModelSpec(
        name="m",
        architecture={
            "in_channels": 1,
            "out_channels": 1,
            "channels": [2, 4],
            "kernel_size": 5,
            "act": "relu",
        },
        normalization=NORM,
    )
    values = [
        model_loss(pred, x, mask, kernel, n).item()
        for n in (NORM, Normalization(**NORM), spec, spec.normalization)
    ]
    assert values == [values[0]] * 4 and values[0] > 0
    with pytest.raises(ValueError, match="label_std"):
        model_loss(pred, x, mask, kernel, {"input_mean": 0, "input_std": 1, "label_mean": 0})


def test_loss_is_differentiable():
    label, x, _, _ = _batch(seed=9, b=1)
    pred = (label + 0.1).float().requires_grad_(True)
    kernel = dipole_kernel_torch((N, N, N))
    out = qsmnet_loss(pred, label.float(), x.float(), torch.ones_like(pred), kernel, NORM)
    out["total"].backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
    assert pred.grad.abs().sum() > 0
