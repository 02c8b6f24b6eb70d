"""Training χ maps with the structure of a real brain image: the INIA19 primate template.

The procedural brains of :mod:`bids_qsmnet.data.synthetic` are built from shapes; their
energy lies in veins, nuclei and haemorrhages, and their cortex is a thin ribbon around
radial sulci.  A real brain's susceptibility is mostly the contrast of large, folded grey-
and white-matter regions (tenths of a ppm at most, across the whole brain) with texture at
every scale.  A network that learned only the procedural brains shrinks that contrast: on
the MNI152 anatomy (never used in training) the network alone keeps 42 % of the truth at
spatial frequencies below 0.02 /mm and 60 % between 0.02 and 0.05 /mm.

This generator takes its anatomy from a real image that no evaluation uses — the INIA19
rhesus-macaque T1 template and its NeuroMaps parcellation (Rohlfing et al. 2012), which
Debian's ``mricron-data`` package installs under ``/usr/share/mricron/templates`` — and draws
everything else at random, so the network sees real cortical folding, white-matter bulk and
deep nuclei without memorising one head:

* geometry: the 0.5 mm template read as a 1 mm grid (a brain of about 84 × 103 × 64 voxels
  becomes 168 × 206 × 128 mm, close to a human's), randomly rotated (±15°), scaled
  (0.85–1.1, ±5 % per axis) and smoothly deformed (up to 4 mm);
* tissue: grey- and white-matter fractions from the T1's histogram modes (as for the Colin27
  test anatomy, :func:`bids_qsmnet.data.anatomy.tissue_fractions`), with this volume's
  χ_GM in 0…+0.04 ppm and χ_WM in −0.06…−0.01 ppm (CSF 0);
* regions: a random offset (σ 0.008 ppm) for a random third of the NeuroMaps regions, and
  "iron" (+0.03…+0.18 ppm, scaled by the grey-matter fraction) in 3–8 compact regions deep
  inside the brain (regions of 0.1–4 mL whose centre lies 15 mm or more inside the mask);
* texture: the T1's fine structure (its deviation from a 3 mm smoothing) at a random
  amplitude of up to ±0.012 ppm, bright = diamagnetic in white matter.

The human anatomies of the evaluation (:mod:`bids_qsmnet.data.anatomy`: MNI152, Colin27)
are never read here.

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

__all__ = ["TEMPLATE_FILES", "texture_phantom"]

#: the template's T1 and parcellation in ``mricron-data``'s folder
TEMPLATE_FILES = ("inia19-t1-brain.nii.gz", "inia19-NeuroMaps.nii.gz")

GM_RANGE, WM_RANGE = (0.0, 0.04), (-0.06, -0.01)
REGION_SD = 0.008
IRON_RANGE = (0.03, 0.18)
TEXTURE_MAX = 0.012


@lru_cache(maxsize=1)
def _template():
    """(T1 scaled to its 99th percentile, NeuroMaps labels, brain mask) of INIA19."""
    import nibabel as nib

    from .anatomy import AnatomyUnavailable, mricron_templates

    d = mricron_templates()
    paths = [os.path.join(d, f) for f in TEMPLATE_FILES]
    for p in paths:
        if not os.path.isfile(p):
            raise AnatomyUnavailable(f"{p} not found: install Debian's mricron-data package")
    t1 = np.asarray(nib.load(paths[0]).dataobj, np.float32)
    labels = np.asarray(nib.load(paths[1]).dataobj, np.int32)
    brain = t1 > 0
    t1 = t1 / float(np.percentile(t1[brain], 99))
    return t1, labels, brain


def _warp_coords(src_shape, shape, rng):
    """Sampling coordinates (3, *shape) into the template: a random rotation, scaling and
    smooth deformation about the grid centres."""
    from scipy import ndimage as ndi
    from scipy.spatial.transform import Rotation

    rot = Rotation.from_rotvec(np.radians(rng.uniform(-15, 15, 3))).as_matrix()
    scale = rng.uniform(0.85, 1.1) * rng.uniform(0.95, 1.05, 3)
    matrix = rot / scale[None, :]
    centre_out = (np.asarray(shape) - 1) / 2
    centre_in = (np.asarray(src_shape) - 1) / 2 + rng.uniform(-3, 3, 3)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape],
                                indexing="ij"))
    coords = np.tensordot(matrix.astype(np.float32), grid - centre_out[:, None, None, None],
                          axes=1) + centre_in[:, None, None, None]
    amp = rng.uniform(0, 4)
    for axis in range(3):
        disp = ndi.gaussian_filter(rng.normal(size=[max(n // 8, 2) for n in shape]), 1.0)
        disp = ndi.zoom(disp, [n / m for n, m in zip(shape, disp.shape)], order=1)
        coords[axis] += np.float32(amp / (np.abs(disp).max() + 1e-9)) * disp
    return coords


def _iron_regions(lab, mask, rng, depth):
    """3–8 compact deep regions: label ids of 100–4000 voxels whose centre lies ≥ 15 mm
    inside the mask."""
    from scipy import ndimage as ndi

    ids = np.unique(lab[mask])
    ids = ids[ids > 0]
    if not ids.size:
        return ids
    sizes = ndi.sum_labels(mask, lab, ids)
    centres = ndi.center_of_mass(mask, lab, ids)
    deep = [i for i, n, c in zip(ids, sizes, centres)
            if 100 <= n <= 4000 and depth[tuple(int(round(x)) for x in c)] >= 15]
    if not deep:
        return np.zeros(0, int)
    k = min(len(deep), int(rng.integers(3, 9)))
    return rng.choice(np.asarray(deep), size=k, replace=False)


def texture_phantom(shape, rng: np.random.Generator):
    """One training χ map (ppm) and brain mask on ``shape`` (1 mm voxels) from the INIA19
    template (see the module docstring).

    Returns
    -------
    chi : (X, Y, Z) float32 ndarray — ppm relative to CSF, zero outside the mask
    mask : (X, Y, Z) bool ndarray
    """
    from scipy import ndimage as ndi

    from .anatomy import tissue_fractions

    t1, labels, brain = _template()
    coords = _warp_coords(t1.shape, tuple(shape), rng)
    t1w = ndi.map_coordinates(t1, coords, order=1, mode="constant", cval=0)
    lab = ndi.map_coordinates(labels, coords, order=0, mode="constant", cval=0)
    inside = ndi.map_coordinates(brain.astype(np.float32), coords, order=1, mode="constant")
    del coords
    mask = ndi.binary_fill_holes(inside > 0.5)
    gm, wm = tissue_fractions(t1w, mask)
    chi = (rng.uniform(*GM_RANGE) * gm + rng.uniform(*WM_RANGE) * wm).astype(np.float32)
    offsets = np.zeros(int(lab.max()) + 1, np.float32)
    ids = np.unique(lab[mask])
    chosen = ids[rng.uniform(size=ids.size) < 1 / 3]
    offsets[chosen] = rng.normal(0, REGION_SD, chosen.size)
    depth = ndi.distance_transform_edt(mask)
    iron = _iron_regions(lab, mask, rng, depth)
    offsets[iron] = rng.uniform(*IRON_RANGE, iron.size)
    region = ndi.gaussian_filter(offsets[lab], 0.7)  # partial volume at region borders
    chi += region * np.where(np.isin(lab, iron), 0.4 + 0.6 * np.clip(1.5 * gm, 0, 1), 1.0)
    fine = t1w - ndi.gaussian_filter(t1w, 3.0)
    scale = float(np.std(fine[mask])) or 1.0
    chi += np.float32(rng.uniform(0.2, 1.0) * TEXTURE_MAX) * np.clip(fine / (2 * scale), -1, 1) \
        * np.where(wm > 0.5, -1.0, 1.0).astype(np.float32)
    return np.where(mask, chi, 0).astype(np.float32), mask
