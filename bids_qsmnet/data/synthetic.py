"""Synthetic susceptibility phantoms and local-field simulation.

Two generators feed the tests, the example dataset and the training of the default model:

* :func:`make_brain_phantom` — a procedural, brain-like head: an irregular brain mask, a
  folded cortical ribbon, white matter with tracts and texture, paired deep grey nuclei,
  ventricles, veins and optional calcifications, haemorrhages, microbleeds and white-matter
  lesions.  Anatomy, placement, tilt and every susceptibility value change with the seed.
* :func:`make_source_phantom` — DeepQSM-style random sources (rotated ellipsoids, boxes,
  spheres and tubes from voxel size to half the volume) for spatial-frequency variety.

and :func:`simulate_local_field` turns a susceptibility map into the local field that a
background-field removal step would leave behind (``D ⊛ chi`` inside the mask, plus noise).

Conventions are those of :mod:`bids_qsmnet.physics.dipole`: arrays indexed ``(i, j, k)``,
``voxel_size`` in mm, ``b0_dir`` in voxel space, susceptibility and field in ppm.  The brain
phantom's anatomical axes are left→right, posterior→anterior, inferior→superior along
``(i, j, k)`` (an axial RAS-like grid, B0 along ``k``) up to a small random head tilt.

Value ranges
------------
Tissue susceptibilities are drawn per subject from ranges typical of in-vivo QSM at 3 T
referenced to CSF (review values: deep grey nuclei +0.03…+0.2 ppm with the globus pallidus,
substantia nigra and red nucleus highest; white matter −0.02…−0.05 ppm; cortex slightly
paramagnetic; veins +0.3…+0.6 ppm; calcifications −0.1…−0.3 ppm; haemorrhage +0.4…+1.2 ppm as
used for pathology augmentation by iQSM).  The anatomy is hand-placed (approximate positions of
the structures in a standard adult brain, moved to the cerebrum centre) — it is no atlas.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import fft as sfft
from scipy import ndimage as ndi
from scipy.interpolate import make_interp_spline

from ..physics.dipole import forward_field, normalise_b0_dir

log = logging.getLogger(__name__)

__all__ = [
    "BRAIN_LABELS",
    "SOURCE_LABELS",
    "Phantom",
    "make_brain_phantom",
    "make_source_phantom",
    "simulate_local_field",
    "snr_to_noise_std",
    "erode_mask",
    "random_b0_dir",
]

#: tissue labels of :func:`make_brain_phantom` (index → name)
BRAIN_LABELS: dict[int, str] = {
    0: "background",
    1: "csf",
    2: "cortical_gm",
    3: "white_matter",
    4: "caudate",
    5: "putamen",
    6: "globus_pallidus",
    7: "thalamus",
    8: "red_nucleus",
    9: "substantia_nigra",
    10: "dentate_nucleus",
    11: "vein",
    12: "calcification",
    13: "hemorrhage",
    14: "wm_lesion",
}

#: labels of :func:`make_source_phantom`: the kind of source that covers the voxel last
SOURCE_LABELS: dict[int, str] = {0: "background", 1: "ellipsoid", 2: "box", 3: "sphere", 4: "tube"}

_CSF, _GM, _WM, _VEIN, _CALC, _HEM, _LESION = 1, 2, 3, 11, 12, 13, 14


@dataclass(eq=False)
class Phantom:
    """A synthetic susceptibility map with its masks.

    Attributes
    ----------
    chi : (X, Y, Z) float32 ndarray — susceptibility, ppm (0 outside ``mask``)
    mask : (X, Y, Z) bool ndarray — brain (or support) mask
    labels : (X, Y, Z) int16 ndarray — tissue label of each voxel (see ``label_names``)
    label_names : dict int → str — name of each label value
    voxel_size : (3,) tuple of float — mm
    """

    chi: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    label_names: dict[int, str]
    voxel_size: tuple[float, float, float]


# ------------------------------------------------------------------------------ helpers


def _check_grid(shape: Sequence[int], voxel_size: Sequence[float]):
    shape = tuple(int(s) for s in shape)
    vs = np.asarray(voxel_size, dtype=np.float64).reshape(-1)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive integers, got {shape!r}")
    if vs.shape != (3,) or not np.all(np.isfinite(vs)) or np.any(vs <= 0):
        raise ValueError(f"voxel_size must be three positive numbers in mm, got {voxel_size!r}")
    return shape, vs


def _noise_field(shape, voxel_size, rng, length_mm, *, bandpass=False, rel_bandwidth=0.3):
    """Smooth Gaussian random field, zero mean, unit standard deviation (float32).

    Low-pass: white noise filtered by a Gaussian of standard deviation ``length_mm``.
    Band-pass: spectrum concentrated on wavelengths near ``length_mm`` (its zero level set is a
    set of folded sheets about half a wavelength apart — used for sulci).  Built in k-space, so
    the field is periodic over the grid, which is harmless for textures.
    """
    axes = [np.fft.fftfreq(n, d) for n, d in zip(shape[:-1], voxel_size[:-1], strict=True)]
    axes.append(np.fft.rfftfreq(shape[-1], voxel_size[-1]))
    k0, k1, k2 = (a.astype(np.float32) for a in axes)
    ksq = k0[:, None, None] ** 2 + k1[None, :, None] ** 2 + k2[None, None, :] ** 2
    if bandpass:
        kc = 1.0 / length_mm
        env = np.exp(-((np.sqrt(ksq) - kc) ** 2) / (2.0 * (rel_bandwidth * kc) ** 2))
    else:
        env = np.exp(-2.0 * np.pi**2 * length_mm**2 * ksq)
    spec = rng.standard_normal(ksq.shape, dtype=np.float32) * env
    spec = spec + 1j * (rng.standard_normal(ksq.shape, dtype=np.float32) * env)
    f = sfft.irfftn(spec, s=shape, axes=(0, 1, 2))
    f -= f.mean()
    sd = float(f.std())
    return (f / sd if sd > 0 else f).astype(np.float32, copy=False)


def _grad_norm(f, voxel_size):
    g = np.gradient(f, *voxel_size)
    return np.sqrt(g[0] ** 2 + g[1] ** 2 + g[2] ** 2)


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rotation matrix (radians): about the third axis, then the first, then the second."""
    cz, sz = np.cos(yaw), np.sin(yaw)
    cx, sx = np.cos(pitch), np.sin(pitch)
    cy, sy = np.cos(roll), np.sin(roll)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return rz @ rx @ ry


def _random_rotation(rng) -> np.ndarray:
    """Uniformly distributed 3-D rotation (QR of a Gaussian matrix with the sign fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _box(shape, centre_vox, radius_vox):
    lo = np.floor(np.asarray(centre_vox) - radius_vox).astype(int)
    hi = np.ceil(np.asarray(centre_vox) + radius_vox).astype(int) + 1
    lo = np.clip(lo, 0, shape)
    hi = np.clip(hi, 0, shape)
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def _box_mm(sl, voxel_size, centre_vox):
    """Per-axis 1-D position offsets (mm) of a box's voxels from ``centre_vox``, broadcastable."""
    out = []
    for ax, (s, c, v) in enumerate(zip(sl, centre_vox, voxel_size, strict=True)):
        x = (np.arange(s.start, s.stop, dtype=np.float32) - np.float32(c)) * np.float32(v)
        shp = [1, 1, 1]
        shp[ax] = -1
        out.append(x.reshape(shp))
    return out


def _soft_ellipsoid(
    shape, voxel_size, centre_vox, semi_mm, rot, *, edge_mm=1.0, wobble=0.0, rng=None
):
    """Partial-volume occupancy (0…1) of a rotated ellipsoid, evaluated in its bounding box.

    ``rot`` columns are the ellipsoid's axes in grid (mm) space.  ``wobble`` > 0 deforms the
    surface radially by a few random low-order ripples (irregular lesions).  The edge is a
    linear ramp ``edge_mm`` wide across the (first-order) signed distance to the surface — a
    cheap stand-in for the partial-volume fraction of a voxel.  Returns ``(slices, occ)`` or
    ``None`` when the ellipsoid lies outside the grid.
    """
    semi = np.asarray(semi_mm, dtype=np.float64)
    rad_vox = semi.max() * (1.0 + 1.5 * wobble) / np.asarray(voxel_size) + edge_mm + 1.0
    sl = _box(shape, centre_vox, rad_vox)
    if sl is None:
        return None
    x = _box_mm(sl, voxel_size, centre_vox)
    y = [sum(np.float32(rot[e, d]) * x[e] for e in range(3)) for d in range(3)]
    rho = np.sqrt(sum((y[d] / np.float32(semi[d])) ** 2 for d in range(3)))
    grad = np.sqrt(sum((y[d] / np.float32(semi[d] ** 2)) ** 2 for d in range(3)))
    rho_safe = np.maximum(rho, 1e-6)
    if wobble > 0:
        rmax = np.float32(semi.max())
        ripple = 0
        for _ in range(3):
            u = rng.standard_normal(3)
            u /= np.linalg.norm(u)
            f = rng.uniform(1.0, 3.0)
            ph = rng.uniform(0, 2 * np.pi)
            proj = sum(np.float32(u[d]) * y[d] for d in range(3)) / rmax
            ripple = ripple + np.cos(np.float32(2 * np.pi * f) * proj + np.float32(ph))
        scale = 1.0 + np.float32(wobble / np.sqrt(3.0)) * ripple
        rho = rho / scale
    sd = (rho - 1.0) * rho_safe / np.maximum(grad, 1e-6)  # ≈ distance to surface (mm)
    occ = np.clip(0.5 - sd / np.float32(edge_mm), 0.0, 1.0)
    # small blobs: keep the occupied volume near the true volume
    r_min = float(semi.min())
    if r_min < 0.5 * edge_mm:
        occ *= np.float32(min(1.0, (r_min / (0.5 * edge_mm)) ** 2))
    return sl, occ.astype(np.float32, copy=False)


def _soft_box(shape, voxel_size, centre_vox, half_mm, rot, *, edge_mm=1.0):
    """Partial-volume occupancy of a rotated box (Chebyshev-like signed distance)."""
    half = np.asarray(half_mm, dtype=np.float64)
    rad_vox = np.linalg.norm(half) / np.asarray(voxel_size) + edge_mm + 1.0
    sl = _box(shape, centre_vox, rad_vox)
    if sl is None:
        return None
    x = _box_mm(sl, voxel_size, centre_vox)
    y = [sum(np.float32(rot[e, d]) * x[e] for e in range(3)) for d in range(3)]
    sd = np.maximum(
        np.maximum(np.abs(y[0]) - half[0], np.abs(y[1]) - half[1]), np.abs(y[2]) - half[2]
    )
    occ = np.clip(0.5 - sd / np.float32(edge_mm), 0.0, 1.0).astype(np.float32)
    return sl, occ


def _sample_curve(ctrl, radii, step):
    """Smooth curve through control points, sampled every ``step`` (same units as ``ctrl``)."""
    ctrl = np.asarray(ctrl, dtype=np.float64)
    radii = np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(ctrl),))
    seg = np.linalg.norm(np.diff(ctrl, axis=0), axis=1)
    keep = np.concatenate([[True], seg > 1e-6])
    ctrl, radii = ctrl[keep], radii[keep]
    if len(ctrl) < 2:
        return ctrl, radii
    t = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(ctrl, axis=0), axis=1))])
    spline = make_interp_spline(t, ctrl, k=min(3, len(ctrl) - 1))
    n = max(2, int(np.ceil(t[-1] / step)) + 1)
    ts = np.linspace(0.0, t[-1], n)
    return spline(ts), np.interp(ts, t, radii)


def _tube_pieces(shape, voxel_size, pts_vox, radii_mm, *, edge_mm=1.0, piece=8):
    """Partial-volume occupancy of a tube along a polyline, piece by piece.

    Yields ``(slices, occ)`` for consecutive pieces of ``piece`` segments; the occupancy of the
    whole tube is the maximum over pieces.  ``pts_vox`` (M, 3) in voxel coordinates,
    ``radii_mm`` (M,) in mm.  Thin tubes (radius below half the edge) are dimmed so that their
    cross-section keeps about the right area (partial volume of small veins).
    """
    vs = np.asarray(voxel_size, dtype=np.float64)
    pts = np.asarray(pts_vox, dtype=np.float64)
    radii = np.asarray(radii_mm, dtype=np.float64)
    for start in range(0, max(len(pts) - 1, 1), piece):
        p = pts[start : start + piece + 1]
        r = radii[start : start + piece + 1]
        if len(p) < 2:
            p = np.vstack([p, p])
            r = np.concatenate([r, r])
        lo = p.min(axis=0) - (r.max() + edge_mm) / vs - 1
        hi = p.max(axis=0) + (r.max() + edge_mm) / vs + 1
        centre = (lo + hi) / 2
        sl = _box(shape, centre, (hi - lo) / 2)
        if sl is None:
            continue
        origin = np.array([s.start for s in sl], dtype=np.float64)
        x = _box_mm(sl, vs, origin)  # mm from the box corner
        pm = (p - origin) * vs
        occ = None
        for a, b, ra, rb in zip(pm[:-1], pm[1:], r[:-1], r[1:], strict=True):
            ab = b - a
            L2 = float(ab @ ab)
            d = [x[i] - np.float32(a[i]) for i in range(3)]
            if L2 > 0:
                t = sum(d[i] * np.float32(ab[i]) for i in range(3)) / np.float32(L2)
                t = np.clip(t, 0.0, 1.0)
            else:
                t = np.zeros((1, 1, 1), np.float32)
            dist = np.sqrt(sum((d[i] - t * np.float32(ab[i])) ** 2 for i in range(3)))
            rad = np.float32(ra) + t * np.float32(rb - ra)
            r_eff = np.maximum(rad, np.float32(0.5 * edge_mm))
            o = np.clip(0.5 + (r_eff - dist) / np.float32(edge_mm), 0.0, 1.0)
            o = o * np.minimum(np.float32(1.0), (rad / r_eff) ** 2)
            occ = o if occ is None else np.maximum(occ, o)
        yield sl, occ.astype(np.float32, copy=False)


def _union_pieces(pieces):
    """Merge ``(slices, occ)`` pieces into one box (maximum where they overlap)."""
    if not pieces:
        return None
    box = tuple(
        slice(min(p[0][d].start for p in pieces), max(p[0][d].stop for p in pieces))
        for d in range(3)
    )
    occ = np.zeros(tuple(b.stop - b.start for b in box), np.float32)
    for sl, o in pieces:
        local = tuple(
            slice(a.start - b.start, a.stop - b.start) for a, b in zip(sl, box, strict=True)
        )
        np.maximum(occ[local], o, out=occ[local])
    return box, occ


def _paint_tube(occ_arr, val_arr, pts_vox, radii_mm, value, voxel_size, *, edge_mm=1.0):
    """Write a tube into ``occ_arr`` / ``val_arr`` where it is more present than what is there."""
    for sl, occ in _tube_pieces(occ_arr.shape, voxel_size, pts_vox, radii_mm, edge_mm=edge_mm):
        cur = occ_arr[sl]
        win = occ > cur
        cur[win] = occ[win]
        val_arr[sl][win] = value


# ------------------------------------------------------------------------- brain template
# Template space: mm, origin at the centre of the cerebrum, axes left→right, posterior→anterior,
# inferior→superior.  Positions are approximate adult-brain positions (standard-space
# coordinates shifted by (0, +17, −16) mm so that the cerebrum is centred), hand-placed.
_CEREBRUM = np.array([68.0, 84.0, 60.0])  # semi-axes: a brain of ~136 × 168 × 111-120 mm
_CEREBELLUM = (np.array([0.0, -43.0, -50.0]), np.array([48.0, 27.0, 21.0]))
_BRAINSTEM = (np.array([0.0, -12.0, -52.0]), np.array([12.0, 12.0, 34.0]), 15.0)  # pitch, deg
_SULCAL_SPHERE = 65.0  # radius (template mm) at which the sulcal pattern is drawn
_FIT_LO = np.array([-68.0, -84.0, -71.0])  # bounding box that must fit the grid (brain stem
_FIT_HI = np.array([68.0, 84.0, 60.0])  # below the cerebellum may be cut, as in real scans

# fmt: off
# (label, centre of the right-hemisphere structure, semi-axes, yaw in degrees)
_NUCLEI = (
    (4, (15.0, 31.0, -7.0), (4.5, 9.0, 8.0), 0.0),  # caudate head
    (5, (25.0, 20.0, -15.0), (5.5, 15.0, 9.0), -10.0),  # putamen
    (6, (19.0, 14.0, -17.0), (3.5, 9.0, 5.0), -10.0),  # globus pallidus
    (7, (10.5, -1.0, -8.0), (8.0, 14.0, 9.0), 5.0),  # thalamus
    (8, (5.0, -3.0, -25.0), (3.2, 3.2, 4.0), 0.0),  # red nucleus
    (9, (10.0, 1.0, -28.0), (2.8, 8.0, 2.5), 35.0),  # substantia nigra
    (10, (14.0, -39.0, -50.0), (6.0, 9.0, 6.0), -20.0),  # dentate nucleus
)
# susceptibility ranges (ppm) drawn per subject; see the module docstring for their origin
_CHI_RANGE = {
    _CSF: (-0.01, 0.01), _GM: (0.01, 0.03), _WM: (-0.05, -0.02),
    4: (0.03, 0.08), 5: (0.03, 0.08), 6: (0.10, 0.20), 7: (0.00, 0.02),  # caudate … thalamus
    8: (0.10, 0.20), 9: (0.10, 0.20), 10: (0.06, 0.16),  # red nucleus, nigra, dentate
}
_CAUDATE_BODY = ((16.0, 26.0, 0.0), (19.0, 12.0, 8.0), (22.0, -3.0, 10.0), (26.0, -15.0, 5.0))
_CAUDATE_BODY_R = (3.5, 3.0, 2.2, 1.5)
# lateral ventricle: frontal horn → body → atrium → occipital horn, then the temporal horn
_LAT_VENTRICLE = ((6.0, 44.0, -3.0), (8.0, 30.0, 0.0), (11.0, 12.0, 5.0), (15.0, -5.0, 6.0),
                  (24.0, -19.0, 2.0), (22.0, -35.0, -3.0), (18.0, -48.0, -6.0))
_LAT_VENTRICLE_R = (3.0, 4.0, 3.5, 3.5, 5.0, 3.0, 2.0)
_TEMPORAL_HORN = ((24.0, -19.0, 2.0), (30.0, -10.0, -14.0), (28.0, 8.0, -28.0))
_TEMPORAL_HORN_R = (4.0, 2.5, 2.0)
_THIRD_VENTRICLE = ((0.0, 2.0, -9.0), (1.5, 12.0, 8.0))  # (centre, semi-axes)
_FOURTH_VENTRICLE = ((0.0, -26.0, -46.0), (5.0, 2.5, 5.0))
# white-matter tracts with extra diamagnetism (myelin): (points, radius)
_TRACTS = (
    (((0.0, 45.0, -11.0), (0.0, 40.0, 2.0), (0.0, 27.0, 8.0), (0.0, 2.0, 10.0),
      (0.0, -19.0, 2.0), (0.0, -23.0, -6.0)), 4.0),  # corpus callosum
    (((22.0, 20.0, 20.0), (18.0, 5.0, -5.0), (14.0, -5.0, -20.0), (8.0, -8.0, -35.0),
      (5.0, -12.0, -60.0)), 3.0),  # corticospinal tract through the internal capsule
    (((20.0, -5.0, -12.0), (30.0, -20.0, -8.0), (28.0, -45.0, -5.0),
      (18.0, -70.0, -2.0)), 3.0),  # optic radiation
    (((35.0, 40.0, 10.0), (38.0, 0.0, 15.0), (35.0, -35.0, 10.0)), 4.0),  # longitudinal fasc.
)
# deep veins (points, radius range in mm) on the right, mirrored to the left
_DEEP_VEINS = (
    (((2.0, 20.0, -2.0), (2.0, 5.0, 0.0), (1.5, -15.0, 0.0), (0.0, -25.0, 0.0)),
     (0.8, 1.5)),  # internal cerebral vein
    (((18.0, 15.0, -25.0), (14.0, -5.0, -25.0), (8.0, -18.0, -12.0), (0.0, -25.0, 0.0)),
     (0.7, 1.2)),  # basal vein
    (((14.0, -10.0, 4.0), (9.0, 10.0, 2.0), (2.0, 18.0, -2.0)), (0.5, 1.0)),  # thalamostriate
)
# fmt: on
_PINEAL = (0.0, -22.0, -4.0)
_ATRIUM = (24.0, -19.0, 2.0)


@dataclass(frozen=True)
class _Frame:
    """Placement of the template in the grid: ``x_mm = origin + scale · rot · q``."""

    shape: tuple
    voxel_size: np.ndarray
    origin_mm: np.ndarray  # grid position (mm from the centre of voxel 0) of the template origin
    rot: np.ndarray  # (3, 3): columns are the template axes in grid space
    scale: float  # grid mm per template mm

    def to_vox(self, q):
        q = np.atleast_2d(np.asarray(q, dtype=np.float64))
        return (self.origin_mm + self.scale * q @ self.rot.T) / self.voxel_size

    def template_coords(self):
        """Template coordinates (3 float32 arrays of the grid's shape)."""
        x = [
            (np.arange(n, dtype=np.float32) * np.float32(v) - np.float32(o))
            for n, v, o in zip(self.shape, self.voxel_size, self.origin_mm, strict=True)
        ]
        x = [x[0][:, None, None], x[1][None, :, None], x[2][None, None, :]]
        inv = np.float32(1.0 / self.scale)
        return [
            (
                np.float32(self.rot[0, d]) * x[0]
                + np.float32(self.rot[1, d]) * x[1]
                + np.float32(self.rot[2, d]) * x[2]
            )
            * inv
            for d in range(3)
        ]


def _fit_frame(shape, vs, aspect, rng, max_tilt_deg):
    # pitch (nodding) varies most between real head positions, yaw and roll less
    tilt = np.deg2rad(rng.uniform(-1.0, 1.0, 3) * max_tilt_deg * np.array([0.5, 1.0, 0.5]))
    rot = _rotation(*tilt)
    corners = np.array(
        list(itertools.product(*zip(_FIT_LO * aspect, _FIT_HI * aspect, strict=True)))
    )
    ext = corners @ rot.T
    e_lo, e_hi = ext.min(axis=0), ext.max(axis=0)
    fov = np.asarray(shape) * vs
    margin = 2.0 + vs
    avail = fov - 2 * margin
    if np.any(avail < 16.0):
        raise ValueError(f"grid {shape} × {tuple(vs)} mm is too small for a brain phantom")
    head_size = rng.uniform(0.92, 1.06)  # adult head-size variation
    scale = float(min(head_size, np.min(avail / (e_hi - e_lo))))
    lo_o = margin - vs / 2 - scale * e_lo
    hi_o = fov - vs / 2 - margin - scale * e_hi
    half = np.minimum((hi_o - lo_o) / 2, 8.0)  # placement jitter, at most 8 mm
    origin = (lo_o + hi_o) / 2 + rng.uniform(-1.0, 1.0, 3) * half
    return _Frame(tuple(shape), vs, origin, rot, scale)


def _rho(q, centre, semi, rot=None):
    """Normalised radius (1 on the surface) of an ellipsoid whose axes are ``rot``'s columns."""
    d = [q[i] - np.float32(centre[i]) for i in range(3)]
    if rot is not None:
        d = [sum(np.float32(rot[e, k]) * d[e] for e in range(3)) for k in range(3)]
    return np.sqrt(sum((d[k] / np.float32(semi[k])) ** 2 for k in range(3)))


def _tube_occ(shape, voxel_size, pts_vox, radii_mm):
    """``(slices, occ)`` of a whole tube (see :func:`_tube_pieces`), or None."""
    return _union_pieces(list(_tube_pieces(shape, voxel_size, pts_vox, radii_mm)))


def _mirror(p, side):
    p = np.array(p, dtype=np.float64)
    p[..., 0] *= side
    return p


def _yaw(deg):
    return _rotation(np.deg2rad(deg), 0.0, 0.0)


# -------------------------------------------------------------------------- brain phantom


@dataclass(eq=False)
class _Brain:
    """The brain phantom while it is drawn: grid, template frame, mask and depth, and the
    tissue labels and base susceptibility (ppm) that the drawing stages paint into."""

    shape: tuple
    vs: np.ndarray
    frame: _Frame
    aspect: np.ndarray
    mask: np.ndarray
    depth: np.ndarray  # ≈ mm below the brain surface
    labels: np.ndarray | None = None
    base: np.ndarray | None = None
    value: dict | None = None  # label → this subject's susceptibility, ppm
    shift: np.ndarray | None = None  # template mm: where the deep structures sit

    def paint(self, sl_occ, lab, val, where=None) -> None:
        """Label ``lab`` and susceptibility ``val`` where a shape's occupancy is ≥ ½ (in the
        mask, and where ``where(labels)`` holds)."""
        if sl_occ is None:
            return
        sl, occ = sl_occ
        sel = (occ >= 0.5) & self.mask[sl]
        if where is not None:
            sel &= where(self.labels[sl])
        self.labels[sl][sel] = lab
        self.base[sl][sel] = val

    def template_blob(self, centre_q, semi_q, rot_q):
        """The soft ellipsoid of template centre, semi-axes (mm) and rotation."""
        s = self.frame.scale
        return _soft_ellipsoid(self.shape, self.vs, self.frame.to_vox(centre_q)[0],
                               s * np.asarray(semi_q), self.frame.rot @ rot_q)


def _brain_shape(shape, vs, q, aspect, rng):
    """Union of three deformed ellipsoids (F < 0 inside): ``(mask, depth, region, (f_cer,
    f_cb, f_bs), a, a_inf)`` with region 0 cerebrum, 1 cerebellum, 2 brain stem."""
    q0, q1, q2 = q
    n_shape = _noise_field(shape, vs, rng, 25.0)
    delta = np.float32(rng.uniform(0.025, 0.05)) * n_shape
    a = _CEREBRUM * aspect
    a_inf = a[2] * rng.uniform(0.8, 0.9)  # flatter base of the brain
    zs = np.where(q2 < 0, np.float32(a_inf), np.float32(a[2]))
    f_cer = np.sqrt((q0 / np.float32(a[0])) ** 2 + (q1 / np.float32(a[1])) ** 2 + (q2 / zs) ** 2)
    f_cer -= 1.0 + delta
    del zs
    a_cb = _CEREBELLUM[1] * aspect * rng.uniform(0.92, 1.08, 3)
    f_cb = _rho((q0, q1, q2), _CEREBELLUM[0] * aspect, a_cb) - (1.0 + 0.6 * delta)
    tilt_bs = _rotation(0.0, -np.deg2rad(_BRAINSTEM[2]), 0.0)  # top tilted forwards
    f_bs = _rho((q0, q1, q2), _BRAINSTEM[0] * aspect, _BRAINSTEM[1] * aspect, tilt_bs)
    f_bs -= 1.0 + 0.3 * delta
    del delta
    region = np.where(f_cb < f_cer, np.int8(1), np.int8(0))
    F = np.minimum(f_cer, f_cb)
    region[f_bs < F] = 2
    np.minimum(F, f_bs, out=F)
    mask = F < 0
    depth = -F / np.maximum(_grad_norm(F, vs), 1e-6)
    return mask, depth, region, (f_cer, f_cb, f_bs), a, a_inf


def _csf_sheet(noise, half_width, max_depth, depth, vs):
    """``(csf, distance in mm)`` of the zero level set of ``noise``, ``half_width`` mm on each
    side, down to ``max_depth`` mm below the surface."""
    d = np.abs(noise) / np.maximum(_grad_norm(noise, vs), 1e-6)
    inside = np.maximum(d - np.float32(half_width), 0)
    shallow = depth < max_depth
    csf = shallow & (d < half_width)
    dist = np.where(shallow, inside, np.hypot(inside, depth - max_depth))
    return csf, dist


def _sulci(brain: _Brain, q, n_depth, depth_scale, rng):
    """Sulci: the zero level set of a band-pass field (wavelength 14-22 mm) that is constant
    along rays from the brain centre, so the sheets run inwards like real sulci; 3-25 mm
    deep.  Returns ``(csf, distance)``."""
    shape, vs, depth = brain.shape, brain.vs, brain.depth
    q0, q1, q2 = q
    n_sulci = _noise_field(shape, vs, rng, rng.uniform(14.0, 22.0), bandpass=True)
    d_max = rng.uniform(8.0, 18.0) * depth_scale * np.clip(1.0 + 0.4 * n_depth, 0.3, None)
    shell = (depth > -3.0) & (depth < float(d_max.max()) + 8.0)
    idx = np.nonzero(shell)
    qs = np.stack([q0[idx], q1[idx], q2[idx]], axis=1).astype(np.float64)
    qs *= _SULCAL_SPHERE / np.maximum(np.linalg.norm(qs, axis=1, keepdims=True), 1e-3)
    radial = np.full(shape, 10.0, np.float32)  # far from any sheet outside the shell
    radial[idx] = ndi.map_coordinates(n_sulci, brain.frame.to_vox(qs).T, order=1,
                                      mode="grid-wrap")
    del n_sulci, qs, idx, shell
    return _csf_sheet(radial, rng.uniform(0.35, 0.8), d_max, depth, vs)


def _fissure(brain: _Brain, q, n_depth, rng):
    """The interhemispheric fissure: a wavy midline sheet, down to the corpus callosum
    centrally and through the whole depth in front of the genu and behind the splenium.
    Returns ``(csf, distance)``."""
    q0, q1, q2 = q
    s, aspect = brain.frame.scale, brain.aspect
    disp = n_depth * np.float32(rng.uniform(1.0, 3.0))
    d_if = np.abs(q0 * np.float32(s) - disp)
    w_if = rng.uniform(0.6, 1.5)
    central = (q1 < 50.0 * aspect[1]) & (q1 > -28.0 * aspect[1])
    overshoot = np.where(central, np.maximum(np.float32(18.0 * aspect[2]) - q2, 0) * s, 0)
    csf_if = (d_if < w_if) & (overshoot == 0)
    e_if = np.hypot(np.maximum(d_if - np.float32(w_if), 0), overshoot)
    return csf_if, e_if


def _tentorium(brain: _Brain, parts, rng):
    """The tentorium, the seam between cerebrum and cerebellum: ``(csf, distance)``."""
    f_cer, f_cb, f_bs = parts
    g = f_cer - f_cb
    d_t = np.abs(g) / np.maximum(_grad_norm(g, brain.vs), 1e-6)
    near = (f_cer < 0.05) & (f_cb < 0.05) & (f_bs > 0)
    w_t = rng.uniform(0.5, 1.2)
    csf_t = near & (d_t < w_t)
    e_t = np.where(near, np.maximum(d_t - np.float32(w_t), 0), np.float32(np.inf))
    return csf_t, e_t


def _csf_and_cortex(brain: _Brain, q, region, parts, rng) -> np.ndarray:
    """Tissue labels (CSF, grey and white matter) of the CSF sheets and the cortical ribbon
    wrapped around them (distances are first-order, in mm)."""
    shape, vs, depth = brain.shape, brain.vs, brain.depth
    t_csf = rng.uniform(0.5, 1.8)  # subarachnoid CSF layer
    depth_scale = float(np.clip(brain.frame.scale, 0.6, 1.0))  # shallower in small brains
    n_depth = _noise_field(shape, vs, rng, 30.0)
    csf_s, e_s = _sulci(brain, q, n_depth, depth_scale, rng)
    # cerebellar folia: finer and shallower
    n_folia = _noise_field(shape, vs, rng, rng.uniform(4.5, 7.0), bandpass=True)
    csf_f, e_f = _csf_sheet(n_folia, rng.uniform(0.3, 0.5),
                            rng.uniform(5.0, 10.0) * depth_scale, depth, vs)
    del n_folia
    csf_if, e_if = _fissure(brain, q, n_depth, rng)
    csf_t, e_t = _tentorium(brain, parts, rng)

    cerebrum, cerebellum = region == 0, region == 1
    e_outer = depth - np.float32(t_csf)
    gm_dist = np.where(
        cerebrum,
        np.minimum(np.minimum(e_outer, e_s), np.minimum(e_if, e_t)),
        np.where(cerebellum, np.minimum(np.minimum(e_outer, e_f), e_t), np.float32(np.inf)),
    )
    t_gm = rng.uniform(2.0, 3.2)
    t_gm_cb = rng.uniform(1.2, 2.0)
    gm = gm_dist < np.where(cerebellum, np.float32(t_gm_cb), np.float32(t_gm))
    csf = (depth < t_csf) | (cerebrum & (csf_s | csf_if)) | (cerebellum & csf_f) | csf_t
    del e_s, e_f, e_if, e_t, e_outer, gm_dist, csf_s, csf_f, csf_if, csf_t

    labels = np.zeros(shape, np.int16)
    labels[brain.mask] = _WM
    labels[brain.mask & gm] = _GM
    labels[brain.mask & csf] = _CSF
    return labels


def _tissue_values(brain: _Brain, region, rng) -> None:
    """This subject's susceptibility of every label (one "iron load" shared by the nuclei,
    plus individual variation) and the base map of CSF, grey and white matter."""
    iron = rng.uniform()
    value = {}
    for lab, (lo, hi) in _CHI_RANGE.items():
        t = np.clip(0.6 * iron + 0.4 * rng.uniform(), 0, 1) if lab >= 4 else rng.uniform()
        value[lab] = lo + t * (hi - lo)
    labels = brain.labels
    base = np.zeros(brain.shape, np.float32)
    for lab in (_CSF, _GM, _WM):
        base[labels == lab] = value[lab]
    base[brain.mask & (region == 2) & (labels == _WM)] = value[_WM] * rng.uniform(0.4, 1.0)
    base[(region == 1) & (labels == _GM)] = value[_GM] * rng.uniform(0.3, 1.0)
    brain.base, brain.value = base, value


def _paint_nuclei(brain: _Brain, rng) -> None:
    """Deep grey nuclei: jittered, resized, slightly rotated, left and right drawn apart."""
    shape, vs, frame, aspect = brain.shape, brain.vs, brain.frame, brain.aspect
    s = frame.scale
    brain.shift = shift = rng.normal(0.0, 2.0, 3)
    for lab, centre, semi, yaw in _NUCLEI:
        for side in (1.0, -1.0):
            c = _mirror(centre, side) * aspect + shift + rng.normal(0.0, 1.0, 3)
            e = np.asarray(semi) * aspect * rng.uniform(0.85, 1.2)
            rot = _yaw(side * (yaw + rng.normal(0, 5))) @ _rotation(0, rng.normal(0, 0.08), 0)
            brain.paint(brain.template_blob(c, e, rot), lab,
                        brain.value[lab] * (1 + rng.normal(0, 0.05)))
            if lab == 4:  # caudate body and tail along the ventricle
                pts, r = _sample_curve(
                    _mirror(_CAUDATE_BODY, side) * aspect + shift,
                    np.asarray(_CAUDATE_BODY_R) * rng.uniform(0.8, 1.2),
                    0.5 / s,
                )
                brain.paint(_tube_occ(shape, vs, frame.to_vox(pts), r * s), lab,
                            brain.value[lab])


def _paint_ventricles(brain: _Brain, rng) -> None:
    """Lateral ventricles with their temporal horns, third and fourth ventricles (their size
    varies strongly between people and with age)."""
    shape, vs, frame, aspect = brain.shape, brain.vs, brain.frame, brain.aspect
    s = frame.scale
    csf = brain.value[_CSF]
    atrophy = rng.uniform(0.6, 1.7)
    for ctrl, radii in ((_LAT_VENTRICLE, _LAT_VENTRICLE_R), (_TEMPORAL_HORN, _TEMPORAL_HORN_R)):
        for side in (1.0, -1.0):
            ctrl_q = _mirror(ctrl, side) * aspect + brain.shift + rng.normal(0, 1.0,
                                                                            (len(ctrl), 3))
            pts, r = _sample_curve(ctrl_q, np.asarray(radii) * atrophy, 0.5 / s)
            brain.paint(_tube_occ(shape, vs, frame.to_vox(pts), r * s), _CSF, csf)
    for centre, semi in (_THIRD_VENTRICLE, _FOURTH_VENTRICLE):
        e = np.asarray(semi) * aspect * np.array([np.sqrt(atrophy), 1.0, 1.0])
        brain.paint(brain.template_blob(np.asarray(centre) * aspect + brain.shift, e,
                                        np.eye(3)), _CSF, csf)


def _paint_lesions(brain: _Brain, rng) -> None:
    """White-matter lesions: 2-10 periventricular ovoids, mildly paramagnetic."""
    s = brain.frame.scale
    for _ in range(int(rng.integers(2, 11))):
        p = _mirror(_LAT_VENTRICLE[rng.integers(1, 6)], rng.choice([-1.0, 1.0]))
        p = p * brain.aspect + brain.shift + rng.normal(0, 6.0, 3) + np.array([0, 0, 5.0])
        d = rng.uniform(3.0, 12.0)
        e = np.array([d / 2, d / 2 * rng.uniform(1.0, 2.0), d / 2]) / s
        brain.paint(
            brain.template_blob(p, e, _random_rotation(rng)),
            _LESION,
            brain.value[_WM] + rng.uniform(0.01, 0.05),
            where=lambda lab: lab == _WM,
        )


def _tract_map(brain: _Brain, a, rng):
    """White-matter tracts, a few named ones and random ones, more diamagnetic than their
    surroundings: ``(occupancy, susceptibility offset in ppm)`` maps."""
    shape, vs, frame, s = brain.shape, brain.vs, brain.frame, brain.frame.scale
    tract_occ = np.zeros(shape, np.float32)
    tract_val = np.zeros(shape, np.float32)
    tracts = []
    for pts_q, r in _TRACTS:
        for side in (1.0, -1.0) if pts_q[0][0] != 0 else (1.0,):
            tracts.append((_mirror(pts_q, side) * brain.aspect + brain.shift, r))
    for _ in range(int(rng.integers(3, 11))):
        ctrl = rng.uniform(-0.65, 0.65, (4, 3)) * a
        tracts.append((ctrl, rng.uniform(2.0, 5.0)))
    for ctrl, r in tracts:
        ctrl = ctrl + rng.normal(0, 1.5, ctrl.shape)
        pts, rr = _sample_curve(ctrl, r * rng.uniform(0.7, 1.3), 0.5 / s)
        _paint_tube(tract_occ, tract_val, frame.to_vox(pts), rr * s,
                    rng.uniform(-0.02, -0.005), vs, edge_mm=2.0)
    return tract_occ, tract_val


def _textured_chi(brain: _Brain, tracts, rng):
    """χ of the base map with texture, the tracts, a low-frequency variation and partial
    volume (a blur of 0.3-0.7 voxels).  Returns ``(chi, texture)``."""
    shape, vs, labels, base = brain.shape, brain.vs, brain.labels, brain.base
    texture = _noise_field(shape, vs, rng, 1.5) + _noise_field(shape, vs, rng, 6.0)
    texture *= np.float32(1 / np.sqrt(2))
    amp_lut = np.zeros(max(BRAIN_LABELS) + 1, np.float32)
    amp_lut[[_CSF, _GM, _WM, _LESION]] = [0.002, 0.004, 0.005, 0.005]
    amp = amp_lut[labels] * np.float32(rng.uniform(0.6, 1.4))
    nuclei = (labels >= 4) & (labels <= 10)
    amp[nuclei] = 0.12 * np.abs(base[nuclei])  # iron is patchy inside the nuclei
    chi = base + amp * texture
    del amp, nuclei
    tract_occ, tract_val = tracts
    chi += tract_occ * tract_val * (labels == _WM)
    chi += np.float32(rng.uniform(0.0, 0.006)) * _noise_field(shape, vs, rng, 35.0)
    chi[~brain.mask] = 0
    chi = ndi.gaussian_filter(chi, rng.uniform(0.3, 0.7))  # voxels: partial volume
    return chi, texture


def _paint_veins(brain: _Brain, chi, a, a_inf, rng):
    """Veins as partial-volume tubes (after the blur: they carry their own partial volume);
    returns the new χ."""
    v_occ = np.zeros(brain.shape, np.float32)
    v_val = np.zeros(brain.shape, np.float32)
    frame = brain.frame
    for pts_q, radius in _vein_curves(frame, a, a_inf, brain.aspect, brain.shift, brain.depth,
                                      rng):
        _paint_tube(v_occ, v_val, frame.to_vox(pts_q), radius, rng.uniform(0.3, 0.6), brain.vs)
    chi = chi * (1 - v_occ) + v_val * v_occ
    brain.labels[brain.mask & (v_occ >= 0.5)] = _VEIN
    return chi


def _paint_pathology(brain: _Brain, chi, texture, rng, *, p_calcification, p_hemorrhage,
                     p_microbleeds) -> None:
    """Calcifications, haemorrhages and microbleeds, each with its probability, painted into
    ``chi`` (in place) and the labels."""
    shape, vs, mask, labels = brain.shape, brain.vs, brain.mask, brain.labels

    def blob(centre_vox, diameter, val, lab, wobble=0.0):
        if centre_vox is None:
            return
        semi = diameter / 2 * rng.uniform(0.75, 1.0, 3)
        out = _soft_ellipsoid(
            shape, vs, centre_vox, semi, _random_rotation(rng), wobble=wobble, rng=rng
        )
        if out is None:
            return
        sl, occ = out
        occ = occ * mask[sl]
        v = val * (1 + 0.15 * texture[sl]) if wobble else val
        chi[sl] = chi[sl] * (1 - occ) + v * occ
        labels[sl][occ >= 0.5] = lab

    parenchyma = np.flatnonzero(mask & (labels >= _GM) & (labels <= 10) & (brain.depth > 6.0))

    def random_site():
        if not parenchyma.size:
            return None
        return np.array(np.unravel_index(rng.choice(parenchyma), shape), dtype=np.float64)

    if rng.uniform() < p_calcification:
        for _ in range(int(rng.integers(1, 5))):
            site = rng.choice(4, p=[0.35, 0.25, 0.15, 0.25])
            side = rng.choice([-1.0, 1.0])
            q = [_mirror(_NUCLEI[2][1], side), _mirror(_ATRIUM, side), _PINEAL, None][site]
            c = (
                brain.frame.to_vox(np.asarray(q) * brain.aspect + brain.shift
                                   + rng.normal(0, 1.5, 3))[0]
                if q is not None
                else random_site()
            )
            blob(c, rng.uniform(2.0, 6.0), rng.uniform(-0.3, -0.1), _CALC)
    if rng.uniform() < p_hemorrhage and parenchyma.size:
        for _ in range(int(rng.integers(1, 3))):
            blob(random_site(), rng.uniform(8.0, 30.0), rng.uniform(0.4, 1.2), _HEM, wobble=0.2)
    if rng.uniform() < p_microbleeds and parenchyma.size:
        for _ in range(int(rng.integers(1, 9))):
            blob(random_site(), rng.uniform(2.0, 5.0), rng.uniform(0.4, 1.0), _HEM)


def make_brain_phantom(
    shape: Sequence[int] = (160, 160, 160),
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    rng: np.random.Generator | int,
    max_tilt_deg: float = 10.0,
    veins: bool = True,
    p_calcification: float = 0.35,
    p_hemorrhage: float = 0.2,
    p_microbleeds: float = 0.2,
    p_lesions: float = 0.15,
) -> Phantom:
    """A procedural brain-like susceptibility phantom.

    The brain is the union of a cerebrum, a cerebellum and a brain stem (ellipsoids deformed by
    a smooth random field), about 136 × 168 × 130 mm (× a random head size of 0.92…1.06) and
    scaled down when the grid is smaller.  Inside it: an outer CSF layer, sulci as folded CSF
    sheets (zero level set of a band-pass random field) limited to a random depth, cerebellar
    folia, the interhemispheric fissure and tentorium, a 2–3.2 mm cortical ribbon wrapped
    around all of them, white matter with tracts and texture, paired deep grey nuclei
    (caudate, putamen, globus pallidus, thalamus, red nucleus, substantia nigra, dentate),
    lateral, third and fourth ventricles, and veins (sinuses, deep veins, cortical, medullary
    and random veins as partial-volume tubes).  Optional pathology: calcifications,
    haemorrhages, microbleeds and white-matter lesions.  Everything — shape, tilt (about B0),
    placement, sizes and susceptibilities — is drawn from ``rng``.

    Parameters
    ----------
    shape : (3,) int — grid size in voxels
    voxel_size : (3,) float — mm
    rng : numpy Generator or int seed — the only source of randomness (same seed, same phantom)
    max_tilt_deg : float — degrees; largest head pitch (yaw and roll: half of it)
    veins : bool — draw veins
    p_calcification, p_hemorrhage, p_microbleeds, p_lesions : float — probability (0…1) that
        the subject has calcifications (1–4, 2–6 mm, −0.3…−0.1 ppm), haemorrhages (1–2,
        8–30 mm, +0.4…+1.2 ppm), microbleeds (1–8, 2–5 mm, +0.4…+1.0 ppm) or periventricular
        white-matter lesions (2–10, 3–12 mm, +0.01…+0.05 ppm above white matter)

    Returns
    -------
    Phantom — ``chi`` float32 ppm (0 outside the mask), ``mask`` bool, ``labels`` int16 with
    ``label_names`` = :data:`BRAIN_LABELS`, ``voxel_size`` in mm

    Notes
    -----
    Normal tissue spans about −0.06…+0.25 ppm (veins up to +0.6).  A 160³ phantom takes a few
    seconds on one CPU core.
    """
    rng = np.random.default_rng(rng)
    shape, vs = _check_grid(shape, voxel_size)
    aspect = 1.0 + rng.uniform(-0.06, 0.06, 3)
    frame = _fit_frame(shape, vs, aspect, rng, max_tilt_deg)
    log.debug("brain phantom: scale %.3f, origin %s mm", frame.scale, np.round(frame.origin_mm, 1))
    q = frame.template_coords()
    # the stages draw from rng in this order: the same seed gives the same phantom
    mask, depth, region, parts, a, a_inf = _brain_shape(shape, vs, q, aspect, rng)
    brain = _Brain(tuple(shape), vs, frame, aspect, mask, depth)
    brain.labels = _csf_and_cortex(brain, q, region, parts, rng)
    del parts, q
    _tissue_values(brain, region, rng)
    del region
    _paint_nuclei(brain, rng)
    _paint_ventricles(brain, rng)
    if rng.uniform() < p_lesions:
        _paint_lesions(brain, rng)
    chi, texture = _textured_chi(brain, _tract_map(brain, a, rng), rng)
    if veins:
        chi = _paint_veins(brain, chi, a, a_inf, rng)
    _paint_pathology(brain, chi, texture, rng, p_calcification=p_calcification,
                     p_hemorrhage=p_hemorrhage, p_microbleeds=p_microbleeds)
    chi[~mask] = 0
    brain.labels[~mask] = 0
    return Phantom(
        chi.astype(np.float32, copy=False),
        mask,
        brain.labels,
        dict(BRAIN_LABELS),
        tuple(float(v) for v in vs),
    )


def _project_to_depth(frame, pts_q, target_mm, depth, centre_q, iters=4):
    """Move template points radially (from ``centre_q``) until they lie ``target_mm`` deep."""
    pts = np.array(pts_q, dtype=np.float64)
    target = np.broadcast_to(np.asarray(target_mm, dtype=np.float64), (len(pts),))
    for _ in range(iters):
        vox = frame.to_vox(pts)
        dep = ndi.map_coordinates(depth, vox.T, order=1, mode="nearest")
        u = pts - centre_q
        u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-6)
        pts += ((dep - target) / frame.scale)[:, None] * u
    return pts


def _vein_curves(frame, a, a_inf, aspect, shift, depth, rng):
    """Centre lines (template mm) and radii (mm) of the veins of one subject."""
    s = frame.scale
    step = 0.5 / s
    out = []
    origin = np.zeros(3)

    def add(ctrl, r_range, project=None, jitter=1.0):
        ctrl = np.asarray(ctrl, dtype=np.float64)
        ctrl = ctrl + rng.normal(0, jitter, ctrl.shape)
        radius = rng.uniform(*r_range)
        pts, r = _sample_curve(ctrl, radius, step)
        if project is not None:
            pts = _project_to_depth(frame, pts, radius + project, depth, origin)
        out.append((pts, r))

    # superior sagittal sinus over the vertex, straight sinus, transverse sinuses
    theta = np.deg2rad(np.linspace(20, 172, 9))
    sss = np.stack([np.zeros_like(theta), a[1] * np.cos(theta), a[2] * np.sin(theta)], axis=1)
    add(sss, (2.0, 3.5), project=rng.uniform(0.0, 1.0), jitter=0.5)
    confluence = np.array([0.0, -0.92 * a[1], -0.2 * a[2]])
    add(
        [
            np.array([0, -25.0, 0]) * aspect + shift,
            [0, -50 * aspect[1], -12 * aspect[2]],
            confluence,
        ],
        (1.5, 2.5),
        jitter=0.5,
    )
    for side in (1.0, -1.0):
        add(
            [
                confluence,
                _mirror([35, -0.85 * a[1], -0.3 * a[2]], side),
                _mirror([55 * aspect[0], -45 * aspect[1], -40 * aspect[2]], side),
            ],
            (1.5, 3.0),
        )
        for pts_q, rr in _DEEP_VEINS:
            add(_mirror(pts_q, side) * aspect + shift, rr)
    # cortical veins along the surface
    a_mean = float(np.mean(a))
    for _ in range(int(rng.integers(8, 26))):
        d0 = rng.standard_normal(3)
        if rng.uniform() < 0.8:  # mostly over the convexity, some at the base
            d0[2] = abs(d0[2])
        d0 /= np.linalg.norm(d0)
        t0 = np.cross(d0, rng.standard_normal(3))
        t0 /= np.linalg.norm(t0)
        length = rng.uniform(25.0, 80.0)
        ang = np.linspace(0, length / a_mean, 5)
        dirs = np.cos(ang)[:, None] * d0 + np.sin(ang)[:, None] * t0
        dirs += rng.normal(0, 0.06, dirs.shape)
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        semi = np.where(dirs[:, 2:3] < 0, [a[0], a[1], a_inf], a)
        ctrl = dirs / np.sqrt(((dirs / semi) ** 2).sum(axis=1, keepdims=True))
        add(ctrl, (0.4, 1.5), project=rng.uniform(0.3, 1.5), jitter=0.0)
    # medullary veins: thin, running outwards from the lateral ventricles
    for _ in range(int(rng.integers(10, 41))):
        side = rng.choice([-1.0, 1.0])
        start = _mirror(_LAT_VENTRICLE[rng.integers(1, 5)], side) * aspect + shift
        u = np.array([side * rng.uniform(0.3, 1.0), rng.normal(0, 0.4), rng.uniform(0.0, 1.0)])
        u /= np.linalg.norm(u)
        length = rng.uniform(12.0, 30.0)
        ctrl = [start + u * 4, start + u * length / 2 + rng.normal(0, 2, 3), start + u * length]
        add(ctrl, (0.3, 0.6), jitter=0.0)
    # random veins anywhere in the brain
    for _ in range(int(rng.integers(2, 9))):
        add(rng.uniform(-0.7, 0.7, (4, 3)) * a, (0.4, 1.2), jitter=0.0)
    return out


# ------------------------------------------------------------------------- source phantom


def make_source_phantom(
    shape: Sequence[int] = (64, 64, 64),
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    rng: np.random.Generator | int,
    n_sources: int | None = None,
    size_range: tuple[float, float] = (0.02, 0.8),
    chi_max: float = 0.3,
    strong_fraction: float = 0.1,
    strong_range: tuple[float, float] = (0.3, 1.2),
    background_std: float = 0.02,
    blur_sigma_max: float = 1.0,
) -> Phantom:
    """DeepQSM-style random susceptibility sources for spatial-frequency variety.

    Overlapping rotated ellipsoids, boxes, spheres and tubes, largest first, each either
    replacing what lies under it or adding to it.  A source's largest extent is drawn
    log-uniformly from ``size_range`` × the shortest grid edge, so the set spans voxel-sized
    sources to ones that fill about half the volume.

    Parameters
    ----------
    shape : (3,) int — grid size in voxels
    voxel_size : (3,) float — mm
    rng : numpy Generator or int seed
    n_sources : int — number of sources; default 20–60 per 64³ voxels (scaled with the edge)
    size_range : (2,) float — fraction of the shortest grid edge (largest extent of a source)
    chi_max : float — ppm; ordinary sources take values uniformly in ``[-chi_max, chi_max]``
    strong_fraction : float — probability that a source is strong
    strong_range : (2,) float — ppm; magnitude of strong sources (70 % positive, like
        haemorrhage and veins; 30 % negative, like calcification)
    background_std : float — ppm; the largest standard deviation of a smooth background
    blur_sigma_max : float — voxels; half of the phantoms are blurred with a random
        Gaussian up to this width (soft edges next to sharp ones)

    Returns
    -------
    Phantom — ``chi`` float32 ppm, ``mask`` all True, ``labels`` the kind of the source that
    covers each voxel last (:data:`SOURCE_LABELS`)
    """
    rng = np.random.default_rng(rng)
    shape, vs = _check_grid(shape, voxel_size)
    edge_mm = float(np.min(np.asarray(shape) * vs))
    if n_sources is None:
        n_sources = int(round(rng.integers(20, 61) * max(1.0, min(shape) / 64)))
    lo, hi = np.log(size_range[0]), np.log(size_range[1])
    sizes = np.sort(np.exp(rng.uniform(lo, hi, n_sources)))[::-1] * edge_mm
    chi = np.zeros(shape, np.float32)
    labels = np.zeros(shape, np.int16)
    for size in sizes:
        kind = int(rng.choice([1, 2, 3, 4], p=[0.35, 0.25, 0.2, 0.2]))
        centre = rng.uniform(0, 1, 3) * (np.asarray(shape) - 1)
        rot = _random_rotation(rng)
        if rng.uniform() < strong_fraction:
            value = rng.uniform(*strong_range) * (1 if rng.uniform() < 0.7 else -1)
        else:
            value = rng.uniform(-chi_max, chi_max)
        if kind == 1:
            out = _soft_ellipsoid(shape, vs, centre, size / 2 * rng.uniform(0.3, 1.0, 3), rot)
        elif kind == 2:
            out = _soft_box(shape, vs, centre, size / 2 * rng.uniform(0.3, 1.0, 3), rot)
        elif kind == 3:
            out = _soft_ellipsoid(shape, vs, centre, np.full(3, size / 2), rot)
        else:
            ctrl = centre * vs + np.outer([-0.5, 0.0, 0.5], rot[:, 0]) * size
            ctrl[1] += rng.normal(0, 0.15 * size, 3)
            pts, r = _sample_curve(ctrl, max(0.4, size * rng.uniform(0.03, 0.15)), 0.5)
            out = _union_pieces(list(_tube_pieces(shape, vs, pts / vs, r)))
        if out is None:
            continue
        sl, occ = out
        if rng.uniform() < 0.5:
            chi[sl] = chi[sl] * (1 - occ) + np.float32(value) * occ
        else:
            chi[sl] += np.float32(value) * occ
        labels[sl][occ >= 0.5] = kind
    if background_std > 0:
        length = edge_mm * rng.uniform(0.1, 0.3)
        chi += np.float32(background_std * rng.uniform()) * _noise_field(shape, vs, rng, length)
    if blur_sigma_max > 0 and rng.uniform() < 0.5:
        chi = ndi.gaussian_filter(chi, rng.uniform(0, blur_sigma_max))
    return Phantom(
        chi.astype(np.float32, copy=False),
        np.ones(shape, bool),
        labels,
        dict(SOURCE_LABELS),
        tuple(float(v) for v in vs),
    )


# --------------------------------------------------------------------------- field, noise


def simulate_local_field(
    chi: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    noise_std: float = 0.0,
    rng: np.random.Generator | int | None = None,
    pad: int = 16,
) -> np.ndarray:
    """Local field of a susceptibility map, as background-field removal would leave it.

    ``field = M · (D ⊛ chi) + M · n`` with ``D`` the unit dipole kernel
    (:func:`~bids_qsmnet.physics.dipole.forward_field`, zero-padded by ``pad`` voxels against
    wrap-around), ``M`` the mask and ``n`` white Gaussian noise.  The field of all of ``chi`` is
    computed (inside and outside the mask); pass a ``chi`` that is zero outside the mask for a
    pure local field.

    Parameters
    ----------
    chi : (X, Y, Z) ndarray — ppm
    mask : (X, Y, Z) bool ndarray — where the field is kept
    voxel_size : (3,) float — mm
    b0_dir : (3,) float — main-field direction in voxel space
    noise_std : float — ppm; standard deviation of the noise added inside the mask
    rng : numpy Generator or int seed — for the noise (a fresh unseeded one when None)
    pad : int — voxels of zero padding on every side for the FFT convolution

    Returns
    -------
    field : (X, Y, Z) float32 ndarray — ppm, zero outside the mask
    """
    chi = np.asarray(chi)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != chi.shape:
        raise ValueError(f"mask shape {mask.shape} does not match chi shape {chi.shape}")
    if noise_std < 0 or not np.isfinite(noise_std):
        raise ValueError(f"noise_std must be a non-negative number of ppm, got {noise_std}")
    field = forward_field(chi, voxel_size, normalise_b0_dir(b0_dir), pad=int(pad))
    field = field.astype(np.float32)
    field[~mask] = 0
    if noise_std > 0:
        rng = np.random.default_rng(rng)
        field[mask] += rng.normal(0.0, noise_std, int(mask.sum())).astype(np.float32)
    return field


def snr_to_noise_std(field: np.ndarray, mask: np.ndarray, snr: float) -> float:
    """Noise standard deviation (ppm) that gives a field the signal-to-noise ratio ``snr``.

    SNR is defined here as the standard deviation of the noise-free local field inside the
    mask divided by the noise standard deviation: ``noise_std = std(field[mask]) / snr``.
    (Local fields have no meaningful mean, so the spread of the field is the signal.)

    Parameters
    ----------
    field : (X, Y, Z) ndarray — noise-free local field, ppm
    mask : (X, Y, Z) bool ndarray
    snr : float — dimensionless, > 0

    Returns
    -------
    noise_std : float — ppm
    """
    if not snr > 0:
        raise ValueError(f"snr must be positive, got {snr}")
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise ValueError("the mask is empty")
    return float(np.std(np.asarray(field, dtype=np.float64)[mask]) / snr)


def erode_mask(mask: np.ndarray, iterations: int) -> np.ndarray:
    """Erode a binary mask by ``iterations`` voxels (6-connected structuring element).

    Real local fields are only valid inside a brain mask that background-field removal has
    eroded; training on eroded masks teaches the network that edge.  ``iterations <= 0``
    returns a copy.  Voxels outside the grid count as outside the mask.
    """
    mask = np.asarray(mask, dtype=bool)
    if iterations <= 0:
        return mask.copy()
    structure = ndi.generate_binary_structure(3, 1)
    return ndi.binary_erosion(mask, structure, iterations=int(iterations), border_value=0)


def random_b0_dir(max_angle_deg: float, rng: np.random.Generator | int | None) -> np.ndarray:
    """A random main-field direction within ``max_angle_deg`` of the third voxel axis.

    Uniform on the spherical cap (``cos θ`` uniform in ``[cos max, 1]``, azimuth uniform).

    Returns
    -------
    b0_dir : (3,) float64 unit vector — voxel space
    """
    if not 0 <= max_angle_deg <= 180:
        raise ValueError(f"max_angle_deg must be in [0, 180], got {max_angle_deg}")
    rng = np.random.default_rng(rng)
    cos_t = rng.uniform(np.cos(np.deg2rad(max_angle_deg)), 1.0)
    sin_t = np.sqrt(max(0.0, 1.0 - cos_t**2))
    phi = rng.uniform(0.0, 2 * np.pi)
    return np.array([sin_t * np.cos(phi), sin_t * np.sin(phi), cos_t])
