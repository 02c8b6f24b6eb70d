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
``dc_edge_mm``, ``dc_highpass_mm``), chosen on a held-out tuning brain
(``benchmarks/accuracy.py --tune-dc``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["DCSettings", "dc_settings", "edge_weights", "refine"]

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
