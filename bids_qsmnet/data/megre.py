"""Raw multi-echo GRE simulation: magnitude and wrapped phase of a head with a background field.

:func:`simulate_megre` puts a brain susceptibility map into a head — a CSF gap, a skull, a
scalp, a neck and an air cavity (sinus) under the front of the brain, in air — and returns what
a scanner would write: per-echo magnitude with T2* decay and wrapped phase with a spatially
varying offset and complex noise, together with the ground truth (total, local and background
field, phase offset).

Conventions
-----------
* Arrays ``(i, j, k)``, ``voxel_size`` in mm, ``b0_dir`` in voxel space, as in
  :mod:`bids_qsmnet.physics.dipole`.  The head model assumes the anatomical axes of
  :func:`~bids_qsmnet.data.synthetic.make_brain_phantom`: left→right, posterior→anterior,
  inferior→superior along ``(i, j, k)`` (the neck and the sinus are placed along −k and +j).
* **Susceptibility reference: water.**  Brain ``chi`` is given in ppm relative to water/CSF,
  soft tissue is 0, cortical bone −2.0 ppm, air +9.41 ppm (χ_air ≈ +0.36 ppm and χ_water ≈
  −9.05 ppm in SI volume units).  The fields are computed with air as the zero (the head sits
  in air; the zero padding of the FFT is air).
* **Local field** = field of the sources inside the brain mask only,
  ``forward_field(chi · brain_mask)``; **background field** = field of everything else (the
  head's tissue, bone and air cavity, with the brain as uniform water-like tissue); **total**
  = local + background.  All three in ppm (ΔB/B0), returned on the whole grid; the local
  field is the ground truth of background-field removal inside the brain mask.  Since the
  background sources lie outside the brain (the brain's share is uniform), the background
  field is harmonic — smooth — inside the brain.
* Hz = ppm · γ̄ · B0 (:func:`bids_qsmnet.physics.units.ppm_to_hz`); the phase of echo ``n`` is
  ``φ_n = wrap(2π f TE_n + φ0)`` with ``f`` the total field in Hz (positive field → phase
  growing with TE, the convention of :mod:`bids_qsmnet.phase.echo_fit`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import fft as sfft
from scipy import ndimage as ndi

from ..phase.scaling import wrap_phase
from ..physics.dipole import dipole_kernel, forward_field, normalise_b0_dir
from ..physics.units import check_echo_times, ppm_to_hz

log = logging.getLogger(__name__)

__all__ = [
    "AIR_CHI_PPM",
    "BONE_CHI_PPM",
    "DEFAULT_ECHO_TIMES",
    "MegreSimulation",
    "simulate_megre",
]

#: susceptibility of air relative to water, ppm (0.36 − (−9.05), SI volume susceptibilities)
AIR_CHI_PPM = 9.41
#: susceptibility of cortical bone relative to water, ppm
BONE_CHI_PPM = -2.0
#: six echoes, 4 ms to 29 ms, 5 ms apart — seconds
DEFAULT_ECHO_TIMES = (0.004, 0.009, 0.014, 0.019, 0.024, 0.029)

# head layers, mm from the brain surface: CSF/meninges, skull, scalp
_GAP_MM, _SKULL_MM, _SCALP_MM = 3.0, 10.0, 15.0
# the sinus: smallest distance from the brain and thickness of its tissue walls, mm
_CAVITY_GAP_MM, _CAVITY_WALL_MM = 4.0, 6.0
#: air simulated around the field of view on each side, mm (the head continues outside it)
_MARGIN_MM = 20.0
#: extra zero (air) padding of the FFT convolutions, voxels
_FFT_PAD = 12
# compartments: relative proton density and R2* (1/s) at 3 T (the field strength is ignored)
_BRAIN_PD, _CSF_PD, _BONE_PD, _SCALP_PD = 0.8, 1.0, 0.1, 0.7
_BRAIN_R2S, _CSF_R2S, _BONE_R2S, _SCALP_R2S = 20.0, 10.0, 300.0, 35.0
#: increase of brain R2* per ppm of |chi| (iron and myelin), 1/s/ppm
_R2S_PER_PPM = 120.0


@dataclass(eq=False)
class MegreSimulation:
    """A simulated multi-echo GRE acquisition and its ground truth.

    Attributes
    ----------
    magnitude : (E, X, Y, Z) float32 ndarray — magnitude (relative proton density units; the
        brain is about 0.8 at TE = 0), noise included
    phase : (E, X, Y, Z) ndarray — wrapped phase: float32 radians in [−π, π), or int16 scanner
        units −4096…4095 (``integer_phase``)
    echo_times : (E,) float64 ndarray — seconds
    b0_tesla : float — tesla
    voxel_size : (3,) tuple of float — mm
    b0_dir : (3,) tuple of float — unit main-field direction in voxel space
    total_field_hz : (X, Y, Z) float32 ndarray — noise-free total field, Hz
    local_field_ppm : (X, Y, Z) float32 ndarray — field of ``chi · brain_mask``, ppm
    background_field_ppm : (X, Y, Z) float32 ndarray — field of the rest of the head, ppm
    offset_rad : (X, Y, Z) float32 ndarray — phase at TE = 0, radians
    brain_mask : (X, Y, Z) bool ndarray
    head_mask : (X, Y, Z) bool ndarray — voxels at least half tissue (brain, CSF, bone, scalp,
        neck), air cavity excluded
    noise_std : float — standard deviation of the real and of the imaginary noise, magnitude
        units (0 when noise-free)
    """

    magnitude: np.ndarray
    phase: np.ndarray
    echo_times: np.ndarray
    b0_tesla: float
    voxel_size: tuple[float, float, float]
    b0_dir: tuple[float, float, float]
    total_field_hz: np.ndarray
    local_field_ppm: np.ndarray
    background_field_ppm: np.ndarray
    offset_rad: np.ndarray
    brain_mask: np.ndarray
    head_mask: np.ndarray
    noise_std: float


def _ramp(signed_mm: np.ndarray, width_mm: float) -> np.ndarray:
    """Partial-volume fraction (0…1) of a boundary: ``signed_mm`` > 0 inside, one voxel wide.

    Soft edges keep the discretised sources free of staircase ringing in the field.
    """
    return np.clip(signed_mm / width_mm + 0.5, 0.0, 1.0).astype(np.float32)


def _upsample_linear(coarse: np.ndarray, factor: int, shape: Sequence[int]) -> np.ndarray:
    """Separable linear interpolation of a ``factor``-times coarser grid onto the fine grid."""
    out = coarse
    for axis, n in enumerate(shape):
        pos = (np.arange(n) + 0.5) / factor - 0.5  # fine voxel centres in coarse index units
        m = out.shape[axis]
        pos = np.clip(pos, 0.0, m - 1.0)
        i0 = np.minimum(np.floor(pos).astype(int), max(m - 2, 0))
        t = (pos - i0).astype(np.float32)
        i1 = np.minimum(i0 + 1, m - 1)
        bshape = [1, 1, 1]
        bshape[axis] = n
        t = t.reshape(bshape)
        out = np.take(out, i0, axis=axis) * (1 - t) + np.take(out, i1, axis=axis) * t
    return out


def _distance_outside(mask: np.ndarray, voxel_size: np.ndarray, *, factor: int = 2):
    """Distance (mm) from ``mask``, on a grid ``factor`` times coarser, interpolated back.

    A full-resolution Euclidean distance transform of a padded head grid takes seconds; the
    layers only need millimetre accuracy.  The coarse mask is the block-wise *any*, so the
    distance is underestimated by at most about one coarse voxel.
    """
    pads = [(0, (-n) % factor) for n in mask.shape]
    m = np.pad(mask, pads)
    cs = [n // factor for n in m.shape]
    coarse = m.reshape(cs[0], factor, cs[1], factor, cs[2], factor).any(axis=(1, 3, 5))
    d = ndi.distance_transform_edt(~coarse, sampling=voxel_size * factor).astype(np.float32)
    return _upsample_linear(d, factor, mask.shape)


def _smooth_offset(shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """A receiver/coil phase offset: a random quadratic over the grid, a few radians of range."""
    axes = [np.linspace(-1.0, 1.0, n) for n in shape]
    x = np.meshgrid(*axes, indexing="ij", sparse=True)
    off = rng.uniform(-np.pi, np.pi) + sum(rng.normal(0.0, 1.0) * xi for xi in x)
    for a in range(3):
        for b in range(a, 3):
            off = off + rng.normal(0.0, 0.5) * x[a] * x[b]
    return np.broadcast_to(off, tuple(shape)).astype(np.float32)


def _margins(shape: Sequence[int], vs: np.ndarray) -> np.ndarray:
    """Margin (voxels, at least ``_MARGIN_MM``) per axis that makes the padded FFT length fast."""
    margin = []
    for n, h in zip(shape, vs):
        length = sfft.next_fast_len(int(n + 2 * np.ceil(_MARGIN_MM / h) + 2 * _FFT_PAD))
        while (length - n) % 2:
            length = sfft.next_fast_len(length + 1)
        margin.append((length - n) // 2 - _FFT_PAD)
    return np.asarray(margin, dtype=int)


def _shim(field: np.ndarray, brain: np.ndarray, vs: np.ndarray) -> np.ndarray:
    """Remove the mean and the linear gradients of ``field`` over the brain (first-order shim).

    Shim coils lie outside the head and make harmonic fields (a constant and linear ramps are
    harmonic), so the shimmed background field stays harmonic inside the brain.
    """
    grid = np.meshgrid(
        *[np.arange(n) * h for n, h in zip(field.shape, vs)], indexing="ij", sparse=True
    )
    idx = np.nonzero(brain)
    design = np.column_stack([np.ones(len(idx[0]))] + [idx[a] * vs[a] for a in range(3)])
    coef, *_ = np.linalg.lstsq(design, field[idx], rcond=None)
    return field - (coef[0] + sum(c * g for c, g in zip(coef[1:], grid)))


def _head_model(brain: np.ndarray, vs: np.ndarray, margin: np.ndarray, cavity: bool):
    """Tissue and bone fractions and the distance from the brain (mm), enlarged grid.

    ``head`` is the tissue fraction (brain included, the air cavity cut out), ``bone`` the
    skull's fraction; both float32 on the grid enlarged by ``margin`` voxels on every side.
    """
    big = tuple(int(n + 2 * m) for n, m in zip(brain.shape, margin))
    fov = tuple(slice(int(m), int(m + n)) for m, n in zip(margin, brain.shape))
    brain_big = np.zeros(big, dtype=bool)
    brain_big[fov] = brain
    w = float(vs.min())
    d = _distance_outside(brain_big, vs)
    d[brain_big] = 0.0

    head = _ramp(_SCALP_MM - d, w)
    # the neck: the horizontal section a quarter of the brain's height above its base,
    # extended down to the bottom of the grid
    ks = np.flatnonzero(brain_big.any(axis=(0, 1)))
    k_ref = int(ks[0] + 0.25 * (ks[-1] - ks[0]))
    head[:, :, :k_ref] = np.maximum(head[:, :, :k_ref], head[:, :, k_ref : k_ref + 1])

    air = np.zeros(big, dtype=np.float32)
    if cavity:
        # an ellipsoidal sinus under the front of the brain, a few mm from it
        idx = np.argwhere(brain_big)
        lo, hi = idx.min(axis=0), idx.max(axis=0)
        size_mm = (hi - lo + 1) * vs
        semi = np.clip(size_mm * np.array([0.1, 0.08, 0.07]), 3.0 * vs, None)  # mm
        centre = np.array([(lo[0] + hi[0]) / 2.0, lo[1] + 0.7 * (hi[1] - lo[1]), 0.0])
        near = np.abs(idx[:, 1] - centre[1]) * vs[1] <= semi[1]
        base = idx[near, 2].min() if near.any() else lo[2]
        centre[2] = base - (_CAVITY_GAP_MM + semi[2]) / vs[2]
        q = np.meshgrid(
            *[(np.arange(n) - c) * h for n, c, h in zip(big, centre, vs)],
            indexing="ij",
            sparse=True,
        )
        rho = np.sqrt(sum((qi / s) ** 2 for qi, s in zip(q, semi)))
        air = _ramp((1.0 - rho) * semi.min(), w) * _ramp(d - _CAVITY_GAP_MM, w)
        # tissue walls around the cavity, so it is closed inside the head
        wall = semi + _CAVITY_WALL_MM
        rho_w = np.sqrt(sum((qi / s) ** 2 for qi, s in zip(q, wall)))
        head = np.maximum(head, _ramp((1.0 - rho_w) * wall.min(), w))
    head = np.maximum(head - air, 0.0)
    bone = _ramp(d - _GAP_MM, w) * _ramp(_SKULL_MM - d, w) * head
    return head, bone, d


def _simulated_fields(chi_brain, brain, vs, b0_dir, *, background, shim: bool):
    """``(local field, background field, head fraction, tissue fractions)`` on the brain's
    grid: the fields in ppm from one enlarged grid (air margin, fast FFT lengths) and one
    dipole kernel; the fractions of CSF, bone and scalp (none without a head)."""
    shape = chi_brain.shape
    margin = _margins(shape, vs)
    big = tuple(int(n + 2 * m) for n, m in zip(shape, margin))
    fov = tuple(slice(int(m), int(m + n)) for m, n in zip(margin, shape))
    kernel = dipole_kernel(tuple(n + 2 * _FFT_PAD for n in big), vs, b0_dir)
    chi_big = np.zeros(big, dtype=np.float32)
    chi_big[fov] = chi_brain
    local = forward_field(chi_big, vs, b0_dir, pad=_FFT_PAD, kernel=kernel)[fov]
    del chi_big
    if background is None:
        return local, np.zeros(shape, dtype=np.float64), brain.astype(np.float32), {}
    head, bone, d = _head_model(brain, vs, margin, background == "head")
    # air is the zero: tissue −9.41 ppm, bone a further −2 ppm; the brain is uniform
    # tissue here (its own chi is the local field's source)
    chi_bg = head * np.float32(-AIR_CHI_PPM) + bone * np.float32(BONE_CHI_PPM)
    background_ppm = forward_field(chi_bg, vs, b0_dir, pad=_FFT_PAD, kernel=kernel)[fov]
    del chi_bg, kernel
    if shim:
        background_ppm = _shim(background_ppm, brain, vs)
    d_fov, head_fov, bone_fov = d[fov], head[fov], bone[fov]
    del head, bone, d
    csf = np.where(brain, 0.0, _ramp(_GAP_MM - d_fov, float(vs.min()))) * head_fov
    scalp = np.clip(head_fov - brain - csf - bone_fov, 0.0, 1.0)
    return local, background_ppm, head_fov, {"csf": csf, "bone": bone_fov, "scalp": scalp}


def _signal_model(brain, chi_brain, fractions: dict):
    """The magnitude at echo time ``t`` (seconds): ``Σ_c v_c ρ_c exp(−R2*_c t)`` over brain,
    CSF, bone and scalp."""
    r2s_brain = np.clip(_BRAIN_R2S + _R2S_PER_PPM * np.abs(chi_brain), 0.0, 200.0)
    compartments = [(brain.astype(np.float32) * _BRAIN_PD, r2s_brain)]
    if fractions:
        compartments += [
            (fractions["csf"] * _CSF_PD, _CSF_R2S),
            (fractions["bone"] * _BONE_PD, _BONE_R2S),
            (fractions["scalp"] * _SCALP_PD, _SCALP_R2S),
        ]

    def signal(t):
        return sum(pd * np.exp(np.float32(-t) * r2s) for pd, r2s in compartments)

    return signal


def _echo_images(signal, total_hz, offset, te, noise_std: float, rng, *,
                 integer_phase: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(magnitude, wrapped phase)`` of each echo, with complex Gaussian noise of
    ``noise_std``; the phase as Siemens integers with ``integer_phase``."""
    shape = total_hz.shape
    magnitude = np.empty((len(te), *shape), dtype=np.float32)
    phase = np.empty((len(te), *shape), dtype=np.int16 if integer_phase else np.float32)
    for n, t in enumerate(te):
        # the model phase in float64 (up to ~100 rad), wrapped, then float32 arithmetic
        model = wrap_phase(2.0 * np.pi * t * total_hz + offset).astype(np.float32)
        amp = signal(t).astype(np.float32)
        if noise_std > 0:
            re = amp * np.cos(model) + np.float32(noise_std) * rng.standard_normal(
                shape, dtype=np.float32
            )
            im = amp * np.sin(model) + np.float32(noise_std) * rng.standard_normal(
                shape, dtype=np.float32
            )
            magnitude[n] = np.hypot(re, im)
            ph = wrap_phase(np.arctan2(im, re))
        else:
            magnitude[n] = amp
            ph = model  # noise-free: the model phase everywhere, air included
        if integer_phase:
            # [−π, π) → −4096…4095, the inverse of phase_to_radians on the Siemens range
            v = np.round(ph.astype(np.float64) * (4096.0 / np.pi)).astype(np.int32)
            phase[n] = np.where(v >= 4096, v - 8192, v)
        else:
            phase[n] = ph
    return magnitude, phase


def simulate_megre(
    chi: np.ndarray,
    brain_mask: np.ndarray,
    *,
    voxel_size: Sequence[float],
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    b0_tesla: float = 3.0,
    echo_times: Sequence[float] = DEFAULT_ECHO_TIMES,
    snr: float | None = 50.0,
    rng: np.random.Generator | int | None = None,
    background: str | None = "head",
    phase_offset: bool = True,
    integer_phase: bool = False,
    shim: bool = True,
) -> MegreSimulation:
    """Simulate a multi-echo GRE acquisition of a brain in a head.

    Parameters
    ----------
    chi : (X, Y, Z) ndarray — brain susceptibility, ppm relative to water (used inside
        ``brain_mask`` only), e.g. :func:`~bids_qsmnet.data.synthetic.make_brain_phantom`
    brain_mask : (X, Y, Z) bool ndarray — the brain
    voxel_size : (3,) float — mm
    b0_dir : (3,) float — main-field direction in voxel space
    b0_tesla : float — tesla
    echo_times : (E,) float — seconds, strictly increasing
    snr : float or None — mean first-echo magnitude in the brain divided by the standard
        deviation of the real (and of the imaginary) noise; None or inf: noise-free
    rng : numpy Generator or int seed — noise and phase offset (fresh unseeded when None)
    background : {"head", "head-no-cavity", None} — ``"head"``: CSF gap (3 mm), skull
        (7 mm, −2 ppm), scalp (5 mm), neck and an air sinus under the front of the brain, in
        air; ``"head-no-cavity"``: the same without the sinus; None: the brain alone, no
        background field (total = local), signal from the brain only
    phase_offset : bool — add a random smooth phase offset (a quadratic, a few radians)
    integer_phase : bool — return the phase as int16 −4096…4095 (Siemens) instead of radians
    shim : bool — remove the mean and linear gradients of the background field over the brain
        (a scanner's first-order shim; the shim field is part of the background field)

    Returns
    -------
    MegreSimulation

    Notes
    -----
    The head is built on a grid enlarged by at least 20 mm on every side (the head may
    extend beyond the field of view, as in a real scan); both fields are computed on it with
    a further 12 voxels of air padding against the wrap-around of the FFT, then cropped.
    Signal of echo ``n`` in a voxel: ``Σ_c v_c ρ_c exp(−R2*_c TE_n)`` over the compartments
    ``c`` (brain: ρ 0.8, R2* = 20 s⁻¹ + 120 s⁻¹/ppm · |chi|; CSF gap: 1.0, 10 s⁻¹; bone: 0.1,
    300 s⁻¹; scalp and neck: 0.7, 35 s⁻¹) with partial-volume fractions ``v_c``, times
    ``exp(i (2π f TE_n + φ0))``, plus complex Gaussian noise.  Intra-voxel dephasing is not
    modelled.  A 128 × 128 × 96 grid takes a few seconds.
    """
    chi = np.asarray(chi)
    brain = np.asarray(brain_mask, dtype=bool)
    if chi.ndim != 3 or brain.shape != chi.shape:
        raise ValueError(
            f"chi and brain_mask must be 3-D volumes of one shape, got {chi.shape} and "
            f"{brain.shape}"
        )
    if not brain.any():
        raise ValueError("the brain mask is empty")
    vs = np.asarray(voxel_size, dtype=np.float64).reshape(-1)
    if vs.shape != (3,) or not np.all(np.isfinite(vs)) or np.any(vs <= 0):
        raise ValueError(f"voxel_size must be three positive numbers in mm, got {voxel_size!r}")
    b0_dir = normalise_b0_dir(b0_dir)
    te = check_echo_times(echo_times)
    if not (np.isfinite(b0_tesla) and b0_tesla > 0):
        raise ValueError(f"b0_tesla must be a positive field strength in tesla, got {b0_tesla}")
    if background not in ("head", "head-no-cavity", None):
        raise ValueError(f"background must be 'head', 'head-no-cavity' or None, got {background!r}")
    if snr is not None and not snr > 0:
        raise ValueError(f"snr must be positive (or None for no noise), got {snr}")
    rng = np.random.default_rng(rng)
    shape = chi.shape
    chi_brain = np.where(brain, chi, 0.0).astype(np.float32)
    local, background_ppm, head_fov, fractions = _simulated_fields(
        chi_brain, brain, vs, b0_dir, background=background, shim=shim)
    total_hz = ppm_to_hz(local + background_ppm, b0_tesla)
    offset = _smooth_offset(shape, rng) if phase_offset else np.zeros(shape, dtype=np.float32)
    signal = _signal_model(brain, chi_brain, fractions)
    noiseless = snr is None or not np.isfinite(snr)
    noise_std = 0.0 if noiseless else float(np.mean(signal(te[0])[brain]) / snr)
    magnitude, phase = _echo_images(signal, total_hz, offset, te, noise_std, rng,
                                    integer_phase=integer_phase)

    return MegreSimulation(
        magnitude=magnitude,
        phase=phase,
        echo_times=te,
        b0_tesla=float(b0_tesla),
        voxel_size=tuple(float(v) for v in vs),
        b0_dir=tuple(float(v) for v in b0_dir),
        total_field_hz=total_hz.astype(np.float32),
        local_field_ppm=local.astype(np.float32),
        background_field_ppm=background_ppm.astype(np.float32),
        offset_rad=offset,
        brain_mask=brain,
        head_mask=head_fov >= 0.5,
        noise_std=noise_std,
    )
