"""QSMnet's training loss: L1 + physics (model) loss + gradient-difference loss.

``total = L1(pred, label) + w_model · model_loss + w_grad · gradient_loss`` with QSMnet's
weights ``w_model = 5`` and ``w_grad = 0.1``.  ``pred``, ``label`` and ``field`` are in the
network's normalised units (see :class:`~bids_qsmnet.models.modelfile.Normalization`); the model
loss de-normalises them to ppm because the dipole model holds in ppm.

Definitions (tensors ``(B, C, D, H, W)``)
-----------------------------------------
* **L1**: ``mean |pred - label|`` over every voxel.
* **Model loss**: ``Σ m |D ⊛ χ_pred - f| / Σ m`` with ``χ_pred = pred · label_std +
  label_mean`` and ``f = field · input_std + input_mean`` (both ppm), ``D ⊛`` the FFT dipole
  convolution (:func:`~bids_qsmnet.physics.dipole.forward_field_torch`), ``m`` the brain mask.
  The original TensorFlow code averages ``|m·(D⊛χ) - m·f|`` over the whole patch instead; that
  is this value times the mask's volume fraction, so here a patch's weight does not depend on
  how much brain it holds.
* **Gradient loss** (the original's rectified 26-neighbour gradient, ``grad_loss``): for every
  voxel ``v`` away from the border

  .. math:: G(x)(v) = \\sum_{n \\in N_{26}} \\frac{1}{|n|} \\max(x(v + n) - x(v), 0)

  with ``N_26`` the 26 offsets in {-1, 0, 1}³ \\ {0} and ``|n|`` ∈ {1, √2, √3} their lengths;
  the loss is ``mean |G(pred) - G(label)|`` over the interior voxels (no padding; each channel
  separately).  ``G`` sums the rectified differences first and compares the sums, exactly as
  the original.  It is invariant to adding a constant to ``pred`` and is computed as 26
  shifted differences of views of ``x``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ..physics.dipole import forward_field_torch

__all__ = ["l1_loss", "model_loss", "gradient_loss", "neighbour_gradient", "qsmnet_loss"]

_NORM_KEYS = ("input_mean", "input_std", "label_mean", "label_std")


def _norm_values(norm: Any) -> dict[str, float]:
    """The four normalisation constants from a mapping, Normalization or ModelSpec."""
    norm = getattr(norm, "normalization", norm)  # a ModelSpec carries it
    if isinstance(norm, Mapping):
        values = {k: norm.get(k) for k in _NORM_KEYS}
    else:
        values = {k: getattr(norm, k, None) for k in _NORM_KEYS}
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise ValueError(f"norm lacks {missing}; expected the keys {list(_NORM_KEYS)}")
    return {k: float(v) for k, v in values.items()}


def l1_loss(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference over all elements (normalised units)."""
    if pred.shape != label.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and label {tuple(label.shape)} differ")
    return (pred - label).abs().mean()


def model_loss(
    pred: torch.Tensor,
    field: torch.Tensor,
    mask: torch.Tensor,
    kernel: torch.Tensor,
    norm: Any,
) -> torch.Tensor:
    """Data-consistency L1 in ppm inside the mask.

    Parameters
    ----------
    pred : (B, C, D, H, W) Tensor — predicted χ, normalised
    field : (B, C, D, H, W) Tensor — input local field, normalised
    mask : Tensor — brain mask (bool or {0, 1}), ``(B, D, H, W)`` or broadcastable to ``pred``
    kernel : (D, H, W) or (B, 1, D, H, W) Tensor — k-space dipole kernel (FFT order) of the
        patch grid, from :func:`~bids_qsmnet.physics.dipole.dipole_kernel_torch`
    norm : mapping, Normalization or ModelSpec — ``input_mean/std``, ``label_mean/std`` (ppm)

    Returns
    -------
    loss : scalar Tensor — ppm; ``Σ m |D⊛χ - f| / Σ m`` (0 for an empty mask)
    """
    nv = _norm_values(norm)
    if pred.shape != field.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and field {tuple(field.shape)} differ")
    if tuple(kernel.shape[-3:]) != tuple(pred.shape[-3:]):
        raise ValueError(
            f"kernel grid {tuple(kernel.shape[-3:])} does not match the patch "
            f"{tuple(pred.shape[-3:])}"
        )
    chi = pred * nv["label_std"] + nv["label_mean"]
    f = field * nv["input_std"] + nv["input_mean"]
    if mask.ndim == pred.ndim - 1:  # (B, D, H, W): add the channel axis
        mask = mask.unsqueeze(1)
    m = mask.to(pred.dtype).expand_as(pred)
    residual = (forward_field_torch(chi, kernel) - f).abs()
    return (residual * m).sum() / m.sum().clamp_min(1.0)


#: the 26 neighbour offsets ``n`` and their weights ``1/|n|``
_NEIGHBOURS = tuple((n, 1.0 / math.sqrt(sum(c * c for c in n)))
                    for n in itertools.product((-1, 0, 1), repeat=3) if any(n))


def neighbour_gradient(x: torch.Tensor) -> torch.Tensor:
    """QSMnet's rectified 26-neighbour gradient ``G(x)`` (see the module notes).

    Sums the 26 shifted differences one at a time (views of ``x``): no 26-channel tensor of
    the batch, as an equivalent 26-filter convolution would build.

    Parameters
    ----------
    x : (B, C, D, H, W) Tensor, ``D, H, W ≥ 3``

    Returns
    -------
    G : (B, C, D-2, H-2, W-2) Tensor — interior voxels only
    """
    if x.ndim != 5 or min(x.shape[2:]) < 3:
        raise ValueError(f"need (B, C, D, H, W) with D, H, W >= 3, got {tuple(x.shape)}")
    d, h, w = x.shape[2:]
    centre = x[:, :, 1:d - 1, 1:h - 1, 1:w - 1]
    g = None
    for (i, j, k), weight in _NEIGHBOURS:
        term = F.relu(x[:, :, 1 + i:d - 1 + i, 1 + j:h - 1 + j, 1 + k:w - 1 + k] - centre)
        g = term * weight if g is None else g + term * weight
    return g


def gradient_loss(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """``mean |G(pred) - G(label)|`` over interior voxels (normalised units)."""
    if pred.shape != label.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and label {tuple(label.shape)} differ")
    with torch.no_grad():
        g_label = neighbour_gradient(label)
    return (neighbour_gradient(pred) - g_label).abs().mean()


def qsmnet_loss(
    pred: torch.Tensor,
    label: torch.Tensor,
    field: torch.Tensor | None,
    mask: torch.Tensor | None,
    kernel: torch.Tensor | None,
    norm: Any,
    *,
    w_model: float = 5.0,
    w_grad: float = 0.1,
) -> dict[str, torch.Tensor]:
    """QSMnet's total loss and its terms.

    Parameters
    ----------
    pred, label : (B, C, D, H, W) Tensor — predicted and true χ, normalised
    field : (B, C, D, H, W) Tensor — the network's input field, normalised (may be ``None``
        when ``w_model == 0``)
    mask : Tensor broadcastable to ``pred`` — brain mask (``None`` allowed when ``w_model == 0``)
    kernel : (D, H, W) or (B, 1, D, H, W) Tensor — k-space dipole kernel of the patch grid
        (``None`` allowed when ``w_model == 0``)
    norm : mapping, Normalization or ModelSpec — normalisation constants (ppm)
    w_model : float — weight of the model loss; 0 skips computing it
    w_grad : float — weight of the gradient loss; 0 skips computing it

    Returns
    -------
    dict with scalar tensors ``total``, ``l1``, ``model`` (ppm), ``grad``; a skipped term is a
    detached zero.
    """
    if w_model < 0 or w_grad < 0:
        raise ValueError(f"loss weights must be >= 0, got w_model={w_model}, w_grad={w_grad}")
    zero = torch.zeros((), dtype=pred.dtype, device=pred.device)
    terms = {"l1": l1_loss(pred, label), "model": zero, "grad": zero}
    total = terms["l1"]
    if w_model:
        if field is None or mask is None or kernel is None:
            raise ValueError("the model loss needs field, mask and kernel (or w_model=0)")
        terms["model"] = model_loss(pred, field, mask, kernel, norm)
        total = total + w_model * terms["model"]
    if w_grad:
        terms["grad"] = gradient_loss(pred, label)
        total = total + w_grad * terms["grad"]
    return {"total": total, **terms}
