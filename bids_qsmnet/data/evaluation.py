"""Evaluation cases: a known χ map and the local field a dipole inversion must invert.

Each case is a dict with ``name``, ``chi`` (truth, ppm), ``mask``, ``field`` (ppm),
``labels`` / ``label_names`` (deep grey nuclei), ``voxel_size`` (mm), ``b0_dir`` (voxel space),
``noise_ppm`` and ``kind``:

* ``exact`` — the dipole field of χ (:func:`~bids_qsmnet.data.synthetic.simulate_local_field`,
  zero-padded FFT convolution) plus white noise of ``noise_ppm``;
* ``tilted`` — the same with B0 tilted by ``tilt_deg`` from the third axis (in the y–z
  plane), so the app's resampling into the network frame is part of the test;
* ``anisotropic`` — χ resampled (trilinear) onto 0.75 × 0.75 × 2 mm voxels and simulated
  there, as a clinical 2-D-like acquisition;
* ``measured`` — the exact field plus a non-dipolar part (:mod:`bids_qsmnet.data.measured`:
  background residue and a white-matter offset) of ``nondipolar`` times its rms;
* ``raw`` — a 4-echo 3 T GRE acquisition of the brain in a simulated head
  (:func:`~bids_qsmnet.data.megre.simulate_megre`, first-echo SNR 40) taken through the app's
  own chain (magnitude mask, Laplacian unwrapping and echo fit, V-SHARP); scored inside the
  V-SHARP mask, where the truth is χ (0 in CSF the magnitude mask includes).
"""

from __future__ import annotations

import numpy as np

__all__ = ["KINDS", "make_case", "with_strong_sources"]

KINDS = ("exact", "tilted", "anisotropic", "measured", "raw")
ANISO_VOXEL = (0.75, 0.75, 2.0)


def _tilt(deg: float) -> tuple[float, float, float]:
    t = np.radians(deg)
    return (0.0, float(np.sin(t)), float(np.cos(t)))


def _resample(a: np.ndarray, voxel_size, order: int) -> np.ndarray:
    from scipy import ndimage as ndi

    shape = tuple(int(round(n / v)) for n, v in zip(a.shape, voxel_size))
    return ndi.zoom(a, [m / n for m, n in zip(shape, a.shape)], order=order, grid_mode=True,
                    mode="grid-constant")


def _raw_chain(chi, brain, labels, rng):
    from ..data.megre import simulate_megre
    from ..phase.chain import run_phase_chain

    vs = (1.0, 1.0, 1.0)
    pad = lambda a: np.pad(a, 16)  # noqa: E731 — room for the head around the brain
    chi, brain, labels = pad(chi), pad(brain), pad(labels)
    sim = simulate_megre(chi, brain, voxel_size=vs, b0_tesla=3.0,
                         echo_times=(0.004, 0.012, 0.020, 0.028), snr=40.0, rng=rng)
    out = run_phase_chain(sim.phase, sim.magnitude, sim.echo_times, b0_strength=3.0,
                          voxel_size=vs)
    m = out.mask
    return (np.where(m & brain, chi, 0), m, np.where(m, out.local_field, 0),
            np.where(m, labels, 0))


def with_strong_sources(phantom, *, haemorrhage_ppm: float = 0.8,
                        haemorrhage_mm: float = 25.0, calcification_ppm: float = -0.3,
                        calcification_mm: float = 8.0):
    """A copy of ``phantom`` with a haemorrhage (a ball of ``haemorrhage_mm`` diameter at
    ``haemorrhage_ppm``) in the right hemisphere's white matter and a calcification (a ball
    of ``calcification_mm``) in the left, at fixed fractions of the brain's bounding box;
    labelled ``haemorrhage`` and ``calcification`` (added to ``label_names``)."""
    from dataclasses import replace

    chi = np.array(phantom.chi, np.float32)
    labels = np.array(phantom.labels, np.int16)
    names = dict(phantom.label_names)
    idx = np.nonzero(phantom.mask)
    lo = np.array([i.min() for i in idx])
    hi = np.array([i.max() for i in idx])
    g = np.meshgrid(*[np.arange(n) for n in chi.shape], indexing="ij", sparse=True)
    vs = np.asarray(phantom.voxel_size, float)
    for where, diameter, value, name in (((0.70, 0.42, 0.62), haemorrhage_mm,
                                          haemorrhage_ppm, "haemorrhage"),
                                         ((0.32, 0.60, 0.55), calcification_mm,
                                          calcification_ppm, "calcification")):
        c = lo + np.asarray(where) * (hi - lo)
        r2 = sum(((gi - ci) * v) ** 2 for gi, ci, v in zip(g, c, vs))
        ball = (r2 <= (diameter / 2) ** 2) & phantom.mask
        k = max(names, default=0) + 1
        chi[ball], labels[ball], names[k] = value, k, name
    return replace(phantom, name=f"{phantom.name} + strong sources", chi=chi, labels=labels,
                   label_names=names)


def make_case(phantom, kind: str, *, seed: int = 0, noise_ppm: float = 0.001,
              tilt_deg: float = 20.0, nondipolar: float = 0.4) -> dict:
    """One evaluation case of ``phantom`` (an object with ``name``, ``chi``, ``mask``,
    ``labels``, ``label_names``, ``voxel_size``: e.g.
    :func:`bids_qsmnet.data.anatomy.anatomy_phantom`) of the given ``kind`` (see the module
    docstring); ``seed`` seeds the noise and the non-dipolar part."""
    from ..data.measured import nondipolar_component
    from ..data.synthetic import simulate_local_field

    if kind not in KINDS:
        raise ValueError(f"unknown case kind {kind!r}; choose one of {', '.join(KINDS)}")
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    chi = np.asarray(phantom.chi, np.float64)
    mask, labels = np.asarray(phantom.mask, bool), phantom.labels
    vs, b0 = tuple(phantom.voxel_size), (0.0, 0.0, 1.0)
    label = {"exact": "exact field", "tilted": f"B0 {tilt_deg:g}°",
             "anisotropic": "×".join(f"{v:g}" for v in ANISO_VOXEL) + " mm",
             "measured": f"non-dipolar {100 * nondipolar:.0f} %", "raw": "raw GRE → V-SHARP"}
    name = f"{phantom.name} {label[kind]}"
    if kind == "raw":
        chi, mask, field, labels = _raw_chain(chi, mask, labels, rng)
        return {"name": name, "kind": kind, "chi": chi.astype(np.float32), "mask": mask,
                "field": field.astype(np.float32), "labels": labels,
                "label_names": phantom.label_names, "voxel_size": vs, "b0_dir": b0,
                "noise_ppm": float("nan")}
    if kind == "anisotropic":
        chi = _resample(chi, ANISO_VOXEL, 1)
        mask = _resample(mask.astype(np.float32), ANISO_VOXEL, 1) > 0.5
        labels = _resample(labels, ANISO_VOXEL, 0)
        vs = ANISO_VOXEL
    if kind == "tilted":
        b0 = _tilt(tilt_deg)
    chi = np.where(mask, chi, 0)
    clean = simulate_local_field(chi, mask, voxel_size=vs, b0_dir=b0)
    field = clean + rng.normal(0, noise_ppm, chi.shape)
    if kind == "measured":
        field = field + nondipolar_component(mask, chi < -0.02, clean, rng,
                                             fraction=nondipolar)
    return {"name": name, "kind": kind, "chi": chi.astype(np.float32), "mask": mask,
            "field": np.where(mask, field, 0).astype(np.float32), "labels": labels,
            "label_names": phantom.label_names, "voxel_size": vs, "b0_dir": b0,
            "noise_ppm": float(noise_ppm)}
