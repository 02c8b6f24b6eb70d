"""Data-consistency refinement of a network's χ map, with the settings a model file carries.

After the network, the app may refine its map ``χ_net`` towards the measured local field by a
few conjugate-gradient iterations on

.. math:: J(\\chi) = \\|W (D \\ast \\chi - f)\\|_2^2 + \\lambda \\|\\chi - \\chi_{net}\\|_2^2

(:func:`bids_qsmnet.physics.inversion.data_consistency`).  The weight ``W`` trusts the field
less near the edge of the brain mask: a local field from background-field removal (V-SHARP,
PDF, …) is least reliable within a few millimetres of the boundary (the spherical kernel's
reach, residual background, the mask's partial-volume layer), and fitting those errors puts
streaks and rims into χ.  ``W`` rises linearly with the distance from the outside of the mask,
from ``floor`` at the boundary voxels to 1 at ``edge_mm`` millimetres inside
(:func:`edge_weights`); ``edge_mm = 0`` gives the plain binary mask.

With ``highpass_mm = r > 0`` both fields are high-passed by ``δ − S_r`` (the spherical mean
value over ``r`` mm, as in SHARP) before they are compared, on the voxels whose sphere fits
in the mask: a residual background field is harmonic inside the brain and vanishes under
that operator, so the refinement restores the detail the field holds without fitting what
background removal left behind.

A model file's ``inference`` section holds the defaults (``dc_lambda``, ``dc_iterations``,
``dc_edge_mm``, ``dc_highpass_mm``, ``residual_passes``), chosen on a held-out tuning brain
(``benchmarks/accuracy.py --tune-dc``).

Before the refinement, the app may also run **residual-field passes**
(:func:`residual_passes`): the network maps what its map leaves unexplained of the field,
``r = M (f − D ∗ χ)``, and the result is added, ``χ ← χ + N(r)`` — a Richardson iteration
with the network as an approximate inverse of the dipole convolution.  A network that
shrinks strong or extended sources (an L1-trained network regresses large values towards the
mean) leaves a residual with the missing part's field in it, which the next pass restores.
The passes trust *all* of the field, its low spatial frequencies included: on an accurate
local field (exact simulation plus noise) two passes lowered the default model's NRMSE on the
accuracy benchmark's tuning brain from 23.8 % to 17.5 %, but on a local field from the app's
own phase chain (simulated GRE → V-SHARP) they raised it from 25.8 % to 32.3 %: the smooth
error background removal leaves in the field is mapped to χ.  They are therefore off by
default (``residual_passes`` 0) and meant for local fields whose large-scale content is
trusted (``--residual-passes``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

LOGGER = logging.getLogger(__name__)

__all__ = ["DCSettings", "dc_settings", "edge_weights", "pass_count", "refine",
           "residual_passes"]

#: weight of the boundary voxels (> 0: the region where χ may be nonzero stays the mask)
EDGE_FLOOR = 0.05


@dataclass(frozen=True)
class DCSettings:
    """The refinement's settings: prior weight λ (0: no refinement), CG iterations, the
    width (mm) of the mask-edge ramp of the data weight (0: binary mask), and the radius (mm)
    of the data term's spherical-mean-value high-pass (0: none)."""

    lam: float = 0.0
    n_iter: int = 30
    edge_mm: float = 0.0
    highpass_mm: float = 0.0

    @property
    def active(self) -> bool:
        return self.lam > 0 and self.n_iter > 0

    def to_dict(self) -> dict:
        return {"lambda": float(self.lam), "iterations": int(self.n_iter) if self.active else 0,
                "edge_mm": float(self.edge_mm) if self.active else 0.0,
                "highpass_mm": float(self.highpass_mm) if self.active else 0.0}


def dc_settings(defaults: Mapping | None, *, lam: float | None = None,
                n_iter: int | None = None, edge_mm: float | None = None,
                highpass_mm: float | None = None) -> DCSettings:
    """The settings to use: explicit values where given, else the model file's defaults."""
    d = dict(defaults or {})
    lam = float(d.get("dc_lambda", 0.0) if lam is None else lam)
    n_iter = int(d.get("dc_iterations", 30) if n_iter is None else n_iter)
    edge_mm = float(d.get("dc_edge_mm", 0.0) if edge_mm is None else edge_mm)
    highpass_mm = float(d.get("dc_highpass_mm", 0.0) if highpass_mm is None else highpass_mm)
    if lam < 0 or n_iter < 0 or edge_mm < 0 or highpass_mm < 0:
        raise ValueError(f"data-consistency settings must be non-negative (λ {lam}, "
                         f"iterations {n_iter}, edge {edge_mm} mm, high-pass {highpass_mm} mm)")
    return DCSettings(lam, n_iter, edge_mm, highpass_mm)


def pass_count(defaults: Mapping | None, n: int | None = None) -> int:
    """The number of residual-field passes to run: ``n`` where given, else the model file's
    ``residual_passes`` (0 when it has none)."""
    return int((defaults or {}).get("residual_passes", 0) if n is None else n)


def edge_weights(mask: np.ndarray, voxel_size: Sequence[float] = (1.0, 1.0, 1.0), *,
                 edge_mm: float, floor: float = EDGE_FLOOR) -> np.ndarray:
    """Data weights in ``[floor, 1]`` inside ``mask`` (0 outside) that rise linearly with the
    Euclidean distance (mm, anisotropic voxels respected) from the nearest voxel outside the
    mask: a boundary voxel, one voxel from the outside, gets ``max(floor, d / edge_mm)``."""
    from scipy import ndimage as ndi

    mask = np.asarray(mask).astype(bool)
    if edge_mm <= 0:
        return mask.astype(np.float64)
    dist = ndi.distance_transform_edt(np.pad(mask, 1), sampling=tuple(map(float, voxel_size)))
    dist = dist[1:-1, 1:-1, 1:-1]  # a mask touching the grid's edge ends there
    return np.where(mask, np.clip(dist / float(edge_mm), floor, 1.0), 0.0)


def refine(chi: np.ndarray, field: np.ndarray, mask: np.ndarray, settings: DCSettings, *,
           voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
           b0_dir: Sequence[float] = (0.0, 0.0, 1.0)) -> np.ndarray:
    """``chi`` refined towards ``field`` (ppm) inside ``mask`` (float32; ``chi`` masked when
    the settings are inactive)."""
    mask = np.asarray(mask).astype(bool)
    if not settings.active:
        return np.where(mask, chi, 0.0).astype(np.float32)
    from ..physics.inversion import data_consistency

    w = edge_weights(mask, voxel_size, edge_mm=settings.edge_mm)
    out = data_consistency(chi, np.where(mask, field, 0.0), w, lam=settings.lam,
                           n_iter=settings.n_iter, voxel_size=voxel_size, b0_dir=b0_dir, pad=8,
                           highpass_mm=settings.highpass_mm)
    return out.astype(np.float32)


def residual_passes(predict: Callable[[np.ndarray], np.ndarray], chi: np.ndarray,
                    field: np.ndarray, mask: np.ndarray, n_passes: int, *,
                    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
                    b0_dir: Sequence[float] = (0.0, 0.0, 1.0), pad: int = 16) -> np.ndarray:
    """``n_passes`` residual-field passes ``χ ← χ + predict(M (f − D ∗ χ))`` (see the module
    docstring).

    Parameters
    ----------
    predict : callable mapping a local field (ppm, masked, same grid) to χ (ppm) — the network
        (e.g. :func:`bids_qsmnet.inference.predict.predict_chi` with the model bound)
    chi : (X, Y, Z) ndarray — the network's map of ``field``, ppm
    field : (X, Y, Z) ndarray — local field, ppm
    mask : (X, Y, Z) bool ndarray — brain mask; the residual and the map are zero outside
    n_passes : int — number of passes (0 returns ``chi`` masked)
    voxel_size : (3,) float — mm
    b0_dir : (3,) float — main-field direction in voxel space
    pad : int — zero voxels around the volume for the forward convolution

    Returns
    -------
    chi : (X, Y, Z) float32 ndarray — ppm, zero outside the mask

    Notes
    -----
    The relative data residual ``‖M (f − D ∗ χ)‖ / ‖M f‖`` before and after each pass is logged
    (INFO): a pass that does not lower it is still kept (the field's noise and the magic-angle
    cone bound what it can reach), but the log shows what each pass did.
    """
    from ..physics.dipole import dipole_kernel, forward_field

    n_passes = int(n_passes)
    if n_passes < 0:
        raise ValueError(f"residual passes must be non-negative, got {n_passes}")
    mask = np.asarray(mask).astype(bool)
    if n_passes == 0:  # the app's default: nothing but the mask
        return np.where(mask, chi, 0).astype(np.float32)
    f = np.where(mask, np.asarray(field, dtype=np.float64), 0.0)
    x = np.where(mask, np.asarray(chi, dtype=np.float64), 0.0)
    shape = tuple(n + 2 * pad for n in x.shape)
    kernel = dipole_kernel(shape, voxel_size, b0_dir)
    norm_f = float(np.linalg.norm(f)) or 1.0

    def residual(x):
        return np.where(mask, f - forward_field(x, pad=pad, kernel=kernel), 0.0)

    r = residual(x)
    for k in range(n_passes):
        before = float(np.linalg.norm(r)) / norm_f
        d = np.asarray(predict(r.astype(np.float32)), dtype=np.float64)
        x = np.where(mask, x + d, 0.0)
        r = residual(x)
        LOGGER.info("residual pass %d/%d: relative data residual %.4f → %.4f", k + 1, n_passes,
                    before, float(np.linalg.norm(r)) / norm_f)
    return x.astype(np.float32)
