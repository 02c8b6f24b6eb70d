"""Training χ maps with the texture of a real brain image: the INIA19 macaque template.

Procedural phantoms (:mod:`bids_qsmnet.data.synthetic`) are built from shapes; real tissue
susceptibility varies at every scale with the anatomy.  This generator takes its structure from
a real anatomical image that no evaluation uses — the INIA19 rhesus-macaque T1 template and its
NeuroMaps parcellation (Rohlfing et al. 2012), which Debian's ``mricron-data`` package installs
under ``/usr/share/mricron/templates`` — and randomises everything else, so the network sees
real cortical folding, nuclei and white-matter texture without memorising one head:

* the 0.5 mm template is read as a 1 mm grid (a brain of about 168 × 206 × 128 mm, close to
  a human's), randomly rotated (±20°), scaled (0.9–1.1) and smoothly deformed (up to ~4 mm);
* χ is a random piecewise-linear map of the normalised T1 intensity (random sign and slopes,
  0.03–0.1 ppm between CSF-like and white-matter-like intensities), plus a random offset
  (σ 0.015 ppm) for a random quarter of the NeuroMaps regions, plus a random-amplitude copy of
  the T1's fine texture (its deviation from a 3 mm smoothing), so that contrast, spatial
  spectrum and region values all vary between volumes.

The human test anatomies (:mod:`bids_qsmnet.data.anatomy`: MNI152, Colin27) are never used.

References
----------
.. [1] Rohlfing T et al. The INIA19 template and NeuroMaps atlas for primate brain image
   parcellation and spatial normalization. Front Neuroinform 2012;6:27.
   doi:10.3389/fninf.2012.00027
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

from .anatomy import AnatomyUnavailable, mricron_templates

__all__ = ["texture_phantom"]


@lru_cache(maxsize=1)
def _template():
    import nibabel as nib

    d = mricron_templates()
    path = os.path.join(d, "inia19-t1-brain.nii.gz")
    if not os.path.isfile(path):
        raise AnatomyUnavailable(f"{path} not found: install Debian's mricron-data package")
    t1 = np.asarray(nib.load(path).dataobj, np.float32)
    labels = np.asarray(nib.load(os.path.join(d, "inia19-NeuroMaps.nii.gz")).dataobj, np.int32)
    brain = t1 > 0
    t1 = t1 / float(np.percentile(t1[brain], 99))
    return t1, labels, brain


def _warp(arrays, shape, rng, orders):
    """Resample ``arrays`` onto ``shape`` through one random rotation, scaling and smooth
    deformation (the same for all)."""
    from scipy import ndimage as ndi
    from scipy.spatial.transform import Rotation

    src = arrays[0].shape
    rot = Rotation.from_rotvec(np.radians(rng.uniform(-20, 20, 3))).as_matrix()
    scale = rng.uniform(0.9, 1.1) * rng.uniform(0.95, 1.05, 3)
    matrix = rot / scale[None, :]
    centre_out = (np.asarray(shape) - 1) / 2
    centre_in = (np.asarray(src) - 1) / 2 + rng.uniform(-4, 4, 3)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape],
                                indexing="ij"))
    coords = np.tensordot(matrix, grid - centre_out[:, None, None, None], axes=1) \
        + centre_in[:, None, None, None]
    amp = rng.uniform(0, 4)
    for axis in range(3):
        disp = ndi.gaussian_filter(rng.normal(size=[max(n // 8, 2) for n in shape]), 1.0)
        disp = ndi.zoom(disp, [n / m for n, m in zip(shape, disp.shape)], order=1)
        coords[axis] += (amp / (np.abs(disp).max() + 1e-9)) * disp
    return [ndi.map_coordinates(a, coords, order=o, mode="constant", cval=0)
            for a, o in zip(arrays, orders)]


def _intensity_map(t1, rng):
    """A random piecewise-linear map of intensity (0 CSF-like … 1 WM-like) to ppm."""
    knots = np.sort(rng.uniform(0.1, 0.95, 3))
    x = np.concatenate([[0.0], knots, [1.2]])
    span = rng.uniform(0.03, 0.1) * rng.choice([-1.0, 1.0], p=[0.75, 0.25])
    y = np.concatenate([[0.0], np.sort(rng.uniform(0, 1, 3)), [1.0]])
    y = y + rng.normal(0, 0.15, y.size)  # non-monotone maps too
    return span * np.interp(t1, x, y - y[0])


def texture_phantom(shape, rng: np.random.Generator):
    """One training χ map (ppm) and brain mask on ``shape`` (1 mm voxels) from the INIA19
    template (see the module docstring).

    Returns
    -------
    chi : (X, Y, Z) float32 ndarray — ppm, zero outside the mask
    mask : (X, Y, Z) bool ndarray
    """
    from scipy import ndimage as ndi

    t1, labels, brain = _template()
    t1w, lab, inside = _warp([t1, labels.astype(np.float32), brain.astype(np.float32)],
                             tuple(shape), rng, (1, 0, 1))
    mask = ndi.binary_fill_holes(inside > 0.5)
    lab = np.rint(lab).astype(np.int32)
    chi = _intensity_map(t1w, rng)
    ids = np.unique(lab[mask])
    chosen = ids[rng.uniform(size=ids.size) < 0.25]
    offsets = np.zeros(int(lab.max()) + 1, np.float32)
    offsets[chosen] = rng.normal(0, 0.015, chosen.size)
    chi = chi + ndi.gaussian_filter(offsets[lab], 0.7)  # partial volume at region borders
    fine = t1w - ndi.gaussian_filter(t1w, 3.0)
    chi = chi + rng.uniform(-0.1, 0.1) * fine
    chi = np.where(mask, chi - np.median(chi[mask]), 0)
    return chi.astype(np.float32), mask
