"""Measured-like local fields: the parts of a real local field that no χ in the brain explains.

A local field from an acquisition is not the dipole field of an isotropic susceptibility
map: background-field removal leaves part of the field of sources outside the brain (air,
bone), white matter adds a frequency offset that depends on the fibres' angle to B0
(microstructure and susceptibility anisotropy; Wharton & Bowtell 2012), and the phase has
noise.  Reconstructions judged against a multi-orientation reference meet all three.  This
module adds them to an exact simulated field so that methods, and the choice of how much to
trust the data, can be tested on fields with realistic non-dipolar content.

* **Background residue**: the field of a few strong sources (±1 ppm spheres of 6–14 mm)
  placed at least 12 mm outside the brain mask — harmonic inside the brain, like what
  V-SHARP or PDF leave behind — demeaned in the mask.
* **White-matter offset**: a smooth random field (8 mm correlation length, ±1) times the
  white-matter indicator, standing for ``κ (sin²θ − 2/3)`` with a fibre angle θ that changes
  smoothly across the brain.

References
----------
.. [1] Wharton S, Bowtell R. Fiber orientation-dependent white matter contrast in gradient echo
   MRI. PNAS 2012;109:18559–18564. doi:10.1073/pnas.1211075109
"""

from __future__ import annotations

import numpy as np

__all__ = ["background_residue", "nondipolar_component", "white_matter_offset"]


def background_residue(mask: np.ndarray, rng: np.random.Generator, *, n_sources: int = 6,
                       margin: int = 40, gap: int = 12) -> np.ndarray:
    """A field (arbitrary scale, unit norm in the mask) of ``n_sources`` spheres of ±1 ppm
    outside the brain: harmonic inside ``mask``, zero outside it.

    The spheres lie in a shell ``margin`` voxels wide around the grid, at least ``gap``
    voxels from the mask."""
    from scipy import ndimage as ndi

    from ..physics.dipole import forward_field

    mask = np.asarray(mask, bool)
    big = tuple(n + 2 * margin for n in mask.shape)
    inner = np.zeros(big, bool)
    inner[margin:-margin, margin:-margin, margin:-margin] = mask
    allowed = ~ndi.binary_dilation(inner, iterations=gap)
    g = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in big], indexing="ij", sparse=True)
    src = np.zeros(big, np.float32)
    placed = 0
    while placed < n_sources:
        c = rng.uniform(0, 1, 3) * np.asarray(big)
        r = rng.uniform(6, 14)
        ball = sum((gi - ci) ** 2 for gi, ci in zip(g, c)) < r * r
        if not (ball & allowed).sum() > 0.5 * ball.sum():
            continue
        src += rng.choice([-1.0, 1.0]) * (ball & allowed)
        placed += 1
    field = forward_field(src)[margin:-margin, margin:-margin, margin:-margin]
    field = np.where(mask, field - field[mask].mean(), 0.0)
    return field / (np.linalg.norm(field[mask]) or 1.0)


def white_matter_offset(mask: np.ndarray, white_matter: np.ndarray,
                        rng: np.random.Generator, *, length_vox: float = 8.0) -> np.ndarray:
    """A smooth ±1 field times the white-matter indicator (unit norm in the mask)."""
    from scipy import ndimage as ndi

    s = ndi.gaussian_filter(rng.normal(size=mask.shape), length_vox)
    s /= np.abs(s[mask]).max() or 1.0
    out = np.where(mask, np.asarray(white_matter, np.float64) * s, 0.0)
    return out / (np.linalg.norm(out[mask]) or 1.0)


def nondipolar_component(mask: np.ndarray, white_matter: np.ndarray, reference: np.ndarray,
                         rng: np.random.Generator, *, fraction: float,
                         background_share: float = 0.7) -> np.ndarray:
    """The non-dipolar part of a measured-like field, ppm.

    Parameters
    ----------
    mask : (X, Y, Z) bool ndarray — brain mask
    white_matter : (X, Y, Z) ndarray — white-matter indicator or fraction in [0, 1]
    reference : (X, Y, Z) ndarray — the exact (dipole) local field, ppm: sets the scale
    rng : numpy Generator
    fraction : float — rms of the result over the rms of ``reference`` in the mask
    background_share : float — share of the background residue (the rest: the white-matter
        offset), by amplitude before the two are summed

    Returns
    -------
    (X, Y, Z) float64 ndarray — ppm, zero outside the mask
    """
    mask = np.asarray(mask, bool)
    nd = (background_share * background_residue(mask, rng)
          + (1 - background_share) * white_matter_offset(mask, white_matter, rng))
    rms_ref = float(np.sqrt(np.mean(np.asarray(reference)[mask] ** 2)))
    rms_nd = float(np.sqrt(np.mean(nd[mask] ** 2))) or 1.0
    return nd * (fraction * rms_ref / rms_nd)
