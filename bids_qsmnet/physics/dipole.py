"""The unit dipole kernel and the QSM forward model.

Conventions (used everywhere in bids_qsmnet)
--------------------------------------------
* Arrays are indexed ``(i, j, k)`` along the three voxel axes; ``voxel_size`` is the edge
  length of a voxel along those axes in **mm**.
* ``b0_dir`` is the direction of the main field **in voxel space**: a 3-vector whose components
  are along the array axes (in physical, i.e. mm-scaled, space).  ``(0, 0, 1)`` means B0 along
  the third array axis, QSMnet's training frame.  It is normalised internally.
* Susceptibility ``chi`` is in **ppm** and the field is the relative field perturbation
  ``ΔB/B0`` in **ppm** (Lorentz-sphere corrected), so ``field = D ⊛ chi``.
* k-space kernels are returned in FFT order (not shifted): index 0 is k = 0.
* **k = 0:** ``D(0) = 0``.  The mean susceptibility of the field of view produces no
  measurable local field (background-field removal removes it anyway), so the forward model
  maps a constant to zero and every inversion returns a map whose k = 0 term is whatever the
  inversion's prior puts there (TKD: zero).

The kernel is

.. math::
   D(\\mathbf{k}) = \\frac{1}{3}
   - \\frac{(\\mathbf{k}\\cdot\\hat{\\mathbf{b}})^2}{|\\mathbf{k}|^2}

with ``k`` in cycles/mm on the grid's FFT frequencies.  Its values lie in ``[-2/3, 1/3]``.

References
----------
Salomir R, de Senneville BD, Moonen CT. A fast calculation method for magnetic field
inhomogeneity due to an arbitrary distribution of bulk susceptibility. Concepts Magn Reson B
2003;19B:26-34.  Marques JP, Bowtell R. Application of a Fourier-based method for rapid
calculation of field inhomogeneity due to spatial variation of magnetic susceptibility.
Concepts Magn Reson B 2005;25B:65-78.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "normalise_b0_dir",
    "kspace_grid",
    "dipole_kernel",
    "forward_field",
    "forward_field_adjoint",
    "dipole_kernel_torch",
    "forward_field_torch",
]


def normalise_b0_dir(b0_dir: Sequence[float]) -> np.ndarray:
    """Return ``b0_dir`` as a unit float64 3-vector; raise ``ValueError`` if impossible."""
    b = np.asarray(b0_dir, dtype=np.float64).reshape(-1)
    if b.shape != (3,) or not np.all(np.isfinite(b)):
        raise ValueError(f"b0_dir must be three finite numbers, got {b0_dir!r}")
    norm = np.linalg.norm(b)
    if norm == 0:
        raise ValueError("b0_dir must not be the zero vector")
    return b / norm


def _check_geometry(shape: Sequence[int], voxel_size: Sequence[float]) -> tuple:
    shape = tuple(int(s) for s in shape)
    vs = tuple(float(v) for v in voxel_size)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive integers, got {shape!r}")
    if len(vs) != 3 or not all(np.isfinite(v) and v > 0 for v in vs):
        raise ValueError(f"voxel_size must be three positive numbers in mm, got {voxel_size!r}")
    return shape, vs


def kspace_grid(shape: Sequence[int], voxel_size: Sequence[float] = (1.0, 1.0, 1.0)):
    """Spatial frequencies of a grid in FFT order.

    Parameters
    ----------
    shape : (3,) int — grid size in voxels
    voxel_size : (3,) float — mm

    Returns
    -------
    ki, kj, kk : ndarray — cycles/mm, broadcastable to ``shape``
    """
    shape, vs = _check_geometry(shape, voxel_size)
    ks = [np.fft.fftfreq(n, d=d) for n, d in zip(shape, vs)]
    return np.meshgrid(*ks, indexing="ij", sparse=True)


def dipole_kernel(
    shape: Sequence[int],
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    *,
    dtype=np.float64,
) -> np.ndarray:
    """Unit dipole kernel in k-space (FFT order), ``D(0) = 0``.

    Parameters
    ----------
    shape : (3,) int — grid size in voxels
    voxel_size : (3,) float — mm
    b0_dir : (3,) float — main-field direction in voxel space (normalised here)
    dtype : numpy float dtype of the result

    Returns
    -------
    D : ndarray, shape ``shape`` — dimensionless, values in ``[-2/3, 1/3]``

    Examples
    --------
    >>> D = dipole_kernel((8, 8, 8))
    >>> float(D[0, 0, 0]), float(D[1, 0, 0]), float(D[0, 0, 1])
    (0.0, 0.3333333333333333, -0.6666666666666667)
    """
    b = normalise_b0_dir(b0_dir)
    ki, kj, kk = kspace_grid(shape, voxel_size)
    k2 = ki**2 + kj**2 + kk**2
    kb = ki * b[0] + kj * b[1] + kk * b[2]
    with np.errstate(divide="ignore", invalid="ignore"):
        D = 1.0 / 3.0 - kb**2 / k2
    D[0, 0, 0] = 0.0
    return D.astype(dtype, copy=False)


def _pad_centre(x: np.ndarray, pad: int) -> np.ndarray:
    return np.pad(x, pad, mode="constant") if pad else x


def _crop_centre(x: np.ndarray, pad: int) -> np.ndarray:
    return x[pad:-pad, pad:-pad, pad:-pad] if pad else x


def forward_field(
    chi: np.ndarray,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    *,
    pad: int = 0,
    kernel: np.ndarray | None = None,
) -> np.ndarray:
    """Field perturbation of a susceptibility distribution, ``field = D ⊛ chi``.

    Parameters
    ----------
    chi : (X, Y, Z) ndarray — ppm
    voxel_size : (3,) float — mm
    b0_dir : (3,) float — main-field direction in voxel space
    pad : int — zero voxels added on every side before the FFT (reduces the periodic
        wrap-around of the discrete convolution); the result is cropped back to ``chi.shape``
    kernel : ndarray, optional — precomputed :func:`dipole_kernel` of the padded shape

    Returns
    -------
    field : (X, Y, Z) float64 ndarray — ppm (ΔB/B0)
    """
    chi = np.asarray(chi, dtype=np.float64)
    if chi.ndim != 3:
        raise ValueError(f"chi must be a 3-D volume, got shape {chi.shape}")
    x = _pad_centre(chi, int(pad))
    D = dipole_kernel(x.shape, voxel_size, b0_dir) if kernel is None else kernel
    if D.shape != x.shape:
        raise ValueError(f"kernel shape {D.shape} does not match the padded volume {x.shape}")
    field = np.fft.ifftn(D * np.fft.fftn(x)).real
    return _crop_centre(field, int(pad))


def forward_field_adjoint(
    field: np.ndarray,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    *,
    kernel: np.ndarray | None = None,
) -> np.ndarray:
    """Adjoint of :func:`forward_field` (without padding).

    ``D`` is real and even in k (``D(k) = D(-k)``), so the operator ``F⁻¹ D F`` is self-adjoint
    and the adjoint is the same convolution.  Units: ppm in, ppm out.
    """
    return forward_field(field, voxel_size, b0_dir, kernel=kernel)


# --------------------------------------------------------------------------- torch twins


def dipole_kernel_torch(
    shape: Sequence[int],
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    *,
    device=None,
    dtype=None,
):
    """:func:`dipole_kernel` as a ``torch.Tensor`` (float32 by default) on ``device``."""
    import torch

    D = dipole_kernel(shape, voxel_size, b0_dir)
    return torch.as_tensor(D, dtype=dtype or torch.float32, device=device)


def forward_field_torch(chi, kernel):
    """Differentiable ``field = D ⊛ chi`` on the last three dimensions.

    Parameters
    ----------
    chi : Tensor, shape ``(..., X, Y, Z)`` — ppm
    kernel : Tensor, shape ``(X, Y, Z)`` or broadcastable to ``chi`` (e.g. ``(B, 1, X, Y, Z)``
        for per-sample kernels) — from :func:`dipole_kernel_torch`

    Returns
    -------
    field : Tensor, same shape as ``chi`` — ppm
    """
    import torch

    spec = torch.fft.fftn(chi.float(), dim=(-3, -2, -1))
    return torch.fft.ifftn(spec * kernel, dim=(-3, -2, -1)).real.to(chi.dtype)
