"""The network frame: resampling a volume so that B0 lies along its third axis at the model's
isotropic voxel size, and back onto the input grid.

QSMnet was trained with B0 along the volume's third axis at ~1 mm isotropic.  An oblique or
anisotropic acquisition is therefore rotated (in physical space) so that B0 becomes the third
axis, resampled at the model's voxel size, predicted, and resampled back.  Rotating the map is
exact physics: the field of the rotated χ with the rotated B0 is the rotated field, so only
interpolation error is added.

Coordinates
-----------
``p = S · v`` maps voxel indices ``v`` of the input to physical voxel-space coordinates in mm
(``S = diag(voxel_size)``); ``b0_dir`` is a unit vector in that space.  The frame is an
orthonormal basis ``Q = [q1 q2 q3]`` with ``q3 = b0_dir`` and ``q1``, ``q2`` as close as
possible to the input's first two axes, so that ``p = c0 + Q · (h · u)`` for frame indices ``u``
and voxel size ``h``.  When B0 is already along the third axis (within ``tol_deg``) and the
voxels are already ``h`` (within 1 %), the frame is the input grid and nothing is resampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..physics.dipole import normalise_b0_dir

__all__ = ["NetworkFrame", "network_frame", "to_frame", "from_frame"]


@dataclass(frozen=True)
class NetworkFrame:
    """How an input grid maps to the network frame (see the module docstring).

    Attributes
    ----------
    input_shape : (3,) int
    voxel_size : (3,) float — input voxel size, mm
    b0_dir : (3,) float — B0 in the input's voxel space
    target_voxel : float — mm
    basis : (3, 3) float — Q, columns are the frame axes in input physical space
    origin : (3,) float — c0, mm in input physical space
    shape : (3,) int — frame grid size
    identity : bool — True when no resampling is needed
    """

    input_shape: tuple
    voxel_size: tuple
    b0_dir: tuple
    target_voxel: float
    basis: np.ndarray
    origin: np.ndarray
    shape: tuple
    identity: bool

    @property
    def obliquity_deg(self) -> float:
        return float(np.degrees(np.arccos(min(1.0, abs(self.b0_dir[2])))))


def _basis(b0: np.ndarray) -> np.ndarray:
    q3 = b0 if b0[2] >= 0 else -b0  # the kernel is even in B0: keep the frame unflipped
    e1 = np.array([1.0, 0.0, 0.0])
    if abs(q3 @ e1) > 0.9:  # B0 nearly along the first axis: start from the second
        e1 = np.array([0.0, 1.0, 0.0])
    q1 = e1 - (e1 @ q3) * q3
    q1 /= np.linalg.norm(q1)
    q2 = np.cross(q3, q1)
    return np.stack([q1, q2, q3], axis=1)


def network_frame(shape: Sequence[int], voxel_size: Sequence[float],
                  b0_dir: Sequence[float] = (0.0, 0.0, 1.0), *, target_voxel: float = 1.0,
                  tol_deg: float = 0.5) -> NetworkFrame:
    """The network frame of an input grid.

    Parameters
    ----------
    shape : (3,) int — input grid
    voxel_size : (3,) float — mm
    b0_dir : (3,) float — B0 in the input's voxel space
    target_voxel : float — the model's isotropic voxel size, mm
    tol_deg : float — obliquity below which B0 counts as along the third axis, degrees
    """
    shape = tuple(int(s) for s in shape)
    vs = np.asarray(voxel_size, dtype=np.float64)
    b0 = normalise_b0_dir(b0_dir)
    oblique = np.degrees(np.arccos(min(1.0, abs(b0[2])))) > tol_deg
    same_size = np.allclose(vs, target_voxel, rtol=0.01)
    if not oblique and same_size:
        return NetworkFrame(shape, tuple(vs), tuple(b0), float(target_voxel), np.eye(3),
                            np.zeros(3), shape, True)
    Q = np.eye(3) if not oblique else _basis(b0)
    # corners of the input field of view (voxel centres) in physical space, in frame coords
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(3, -1)
    coords = Q.T @ (vs[:, None] * corners)
    lo, hi = coords.min(axis=1), coords.max(axis=1)
    out_shape = tuple(int(np.floor((h - l) / target_voxel + 1e-6)) + 1 for l, h in zip(lo, hi))
    return NetworkFrame(shape, tuple(vs), tuple(b0), float(target_voxel), Q, Q @ lo, out_shape,
                        False)


def to_frame(data: np.ndarray, frame: NetworkFrame, *, order: int = 3) -> np.ndarray:
    """Resample an input-grid volume into the network frame (spline ``order``; 0 for masks)."""
    from scipy.ndimage import affine_transform

    data = np.asarray(data)
    if data.shape != frame.input_shape:
        raise ValueError(f"volume shape {data.shape} differs from the frame's input grid "
                         f"{frame.input_shape}")
    if frame.identity:
        return data.copy()
    s_inv = 1.0 / np.asarray(frame.voxel_size)
    matrix = s_inv[:, None] * frame.basis * frame.target_voxel
    offset = s_inv * frame.origin
    return affine_transform(data.astype(np.float64), matrix, offset, output_shape=frame.shape,
                            order=order, mode="constant", cval=0.0, prefilter=order > 1)


def from_frame(data: np.ndarray, frame: NetworkFrame, *, order: int = 3) -> np.ndarray:
    """Resample a network-frame volume back onto the input grid."""
    from scipy.ndimage import affine_transform

    data = np.asarray(data)
    if data.shape != frame.shape:
        raise ValueError(f"volume shape {data.shape} differs from the frame's {frame.shape}")
    if frame.identity:
        return data.copy()
    matrix = (frame.basis.T * np.asarray(frame.voxel_size)[None, :]) / frame.target_voxel
    offset = -(frame.basis.T @ frame.origin) / frame.target_voxel
    return affine_transform(data.astype(np.float64), matrix, offset,
                            output_shape=frame.input_shape, order=order, mode="constant",
                            cval=0.0, prefilter=order > 1)
