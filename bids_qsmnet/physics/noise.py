"""The white-noise level of a local field, estimated from the field alone.

The finest diagonal Haar detail of a volume, taken on the non-overlapping 2×2×2 blocks,

.. math:: d_{ijk} = \\tfrac{1}{\\sqrt 8} \\sum_{a,b,c \\in \\{0,1\\}}
          (-1)^{a+b+c} f_{2i+a,\\,2j+b,\\,2k+c},

is an orthonormal combination of eight voxels: for white noise of standard deviation σ it has
standard deviation σ, while any field that is, within a block, a sum of functions each of which
is constant along at least one axis (constants, planes, every polynomial without an ``xyz``
term) gives exactly 0.  A local field is smooth on the scale of two voxels except at the
edges of its sources, which touch few blocks, so the median absolute detail over the blocks
that lie wholly inside the brain mask, divided by Φ⁻¹(¾) ≈ 0.6745, estimates σ without being
pulled up by the field itself (Donoho & Johnstone's estimator, on the finest wavelet subband
in three dimensions).

The refinement's rule for λ (:class:`bids_qsmnet.physics.dc_path.AutoLambda`) uses the
**noise share** ``ν = N σ̂² / ‖M f‖²`` — the part of the field's energy in the mask that is
white noise — to tell a noisy field (which the TV refinement's own total-variation term
handles) from a field with structured content no susceptibility explains.

References
----------
.. [1] Donoho DL, Johnstone IM. Ideal spatial adaptation by wavelet shrinkage. Biometrika
   1994;81:425–455. doi:10.1093/biomet/81.3.425
"""

from __future__ import annotations

import numpy as np

__all__ = ["noise_share", "noise_sigma"]

#: Φ⁻¹(3/4): the median of |N(0, 1)|
MAD_TO_SIGMA = 0.6744897501960817


def _diagonal_detail(volume: np.ndarray) -> np.ndarray:
    """The finest diagonal Haar detail on 2×2×2 blocks, shape ``(X//2, Y//2, Z//2)``."""
    x, y, z = (s - s % 2 for s in volume.shape)
    v = np.asarray(volume, np.float64)[:x, :y, :z]
    d = v[0::2] - v[1::2]
    d = d[:, 0::2] - d[:, 1::2]
    d = d[:, :, 0::2] - d[:, :, 1::2]
    return d / np.sqrt(8.0)


def _inside_blocks(mask: np.ndarray) -> np.ndarray:
    x, y, z = (s - s % 2 for s in mask.shape)
    m = np.asarray(mask, bool)[:x, :y, :z]
    return m.reshape(x // 2, 2, y // 2, 2, z // 2, 2).all(axis=(1, 3, 5))


def noise_sigma(field: np.ndarray, mask: np.ndarray) -> float:
    """The standard deviation of the field's white noise, in the field's unit (e.g. ppm):
    the median absolute diagonal Haar detail over the 2×2×2 blocks inside ``mask``, over
    Φ⁻¹(¾).  Raises ValueError when no whole block lies inside the mask."""
    inside = _inside_blocks(mask)
    if not inside.any():
        raise ValueError("no 2×2×2 block of voxels lies wholly inside the mask")
    detail = _diagonal_detail(field)[inside]
    return float(np.median(np.abs(detail)) / MAD_TO_SIGMA)


def noise_share(field: np.ndarray, mask: np.ndarray, sigma: float | None = None) -> float:
    """``ν = N σ̂² / ‖M f‖²``: the estimated share of the field's energy inside the mask
    (``N`` voxels) that is white noise (dimensionless, 0 for a noise-free field, about 1 for
    pure noise; 0 when the field is zero in the mask).  ``sigma``: σ̂ when already estimated
    (:func:`noise_sigma`)."""
    mask = np.asarray(mask, bool)
    energy = float(np.sum(np.asarray(field, np.float64)[mask] ** 2))
    if energy == 0.0:
        return 0.0
    sigma = noise_sigma(field, mask) if sigma is None else float(sigma)
    return float(mask.sum()) * sigma**2 / energy
