"""Susceptibility maps built from real anatomical images that install offline.

The app's training data come from :mod:`bids_qsmnet.data.synthetic`; this module makes test
brains whose anatomy that generator never drew, for validation and reporting only:

* ``"mni152"`` — the ICBM 2009a nonlinear symmetric template (T1 and grey/white-matter
  probability maps) that ships inside the ``nilearn`` wheel (``pip install nilearn``);
* ``"colin27"`` — the Colin27 single-subject average T1 (``ch2.nii.gz`` with its brain mask
  ``ch2bet.nii.gz``) that Debian's ``mricron-data`` package installs under
  ``/usr/share/mricron/templates`` (``apt-get install mricron-data``).

Both are on 1 mm grids in MNI space, so the atlases of ``mricron-data`` (AAL for the deep
grey nuclei, JHU for white-matter tracts) are resampled onto them by their affines.

How χ is made (ppm, relative to CSF)
------------------------------------
Tissue fractions come from the template's probability maps (MNI152) or from the T1
intensities between the CSF, grey- and white-matter modes (Colin27).  Then

* χ = 0.015 · GM − 0.030 · WM (CSF 0), the cortical ribbon and the white-matter contrast
  of healthy adults at 3 T;
* white-matter tracts of the JHU atlas get their own offsets (optic radiation, splenium and
  other heavily myelinated tracts down to −0.06 ppm);
* the deep grey nuclei of AAL — caudate +0.06, putamen +0.05, pallidum +0.14, thalamus
  +0.01 ppm — plus red nucleus (+0.10), substantia nigra (+0.13) and dentate (+0.09) at
  their MNI coordinates, each scaled by the local grey-matter fraction;
* texture at every scale from the anatomy itself: the T1 intensity's deviation from its
  smoothed tissue mean, mapped to ±0.01 ppm (brighter white matter = more myelin = more
  diamagnetic).

These values follow the ranges reported for healthy brains (Deistung et al. 2013, Lim et al.
2013); they are a benchmark definition, not a claim about any subject.

References
----------
.. [1] Fonov V et al. Unbiased average age-appropriate atlases for pediatric studies.
   NeuroImage 2011;54:313–327. doi:10.1016/j.neuroimage.2010.07.033
.. [2] Holmes CJ et al. Enhancement of MR images using registration for signal averaging.
   J Comput Assist Tomogr 1998;22:324–333. doi:10.1097/00004728-199803000-00032
.. [3] Tzourio-Mazoyer N et al. Automated anatomical labeling of activations in SPM.
   NeuroImage 2002;15:273–289. doi:10.1006/nimg.2001.0978
.. [4] Deistung A et al. Toward in vivo histology: a comparison of quantitative susceptibility
   mapping (QSM) with magnitude-, phase-, and R2*-imaging at ultra-high magnetic field
   strength. NeuroImage 2013;65:299–314. doi:10.1016/j.neuroimage.2012.09.055
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

__all__ = ["ANATOMIES", "AnatomyPhantom", "AnatomyUnavailable", "anatomy_phantom",
           "mricron_templates", "tissue_fractions"]

#: anatomies this module can build
ANATOMIES = ("mni152", "colin27")

MRICRON_DIR = "/usr/share/mricron/templates"

GM_CHI, WM_CHI = 0.015, -0.030
TEXTURE_PPM = 0.010

#: AAL labels of the deep grey nuclei (left, right) and their χ, ppm
AAL_NUCLEI = {"caudate": ((71, 72), 0.06), "putamen": ((73, 74), 0.05),
              "globus_pallidus": ((75, 76), 0.14), "thalamus": ((77, 78), 0.01)}
#: small brainstem/cerebellar nuclei AAL lacks: MNI centre (left, mm), semi-axes (mm), χ
SMALL_NUCLEI = {"red_nucleus": ((-5, -20, -8), (3, 3, 3), 0.10),
                "substantia_nigra": ((-10, -17, -12), (3, 6, 3), 0.13),
                "dentate_nucleus": ((-15, -57, -35), (6, 8, 5), 0.09)}
#: JHU white-matter labels with their own χ (ppm): heavily myelinated tracts
JHU_TRACTS = {(3, 4, 5): -0.045, (29, 30): -0.060, (31, 32): -0.050, (47, 48): -0.050,
              (19, 20, 21, 22): -0.040, (15, 16, 7, 8): -0.035}


class AnatomyUnavailable(RuntimeError):
    """The package holding an anatomy's images is not installed."""


@dataclass(eq=False)
class AnatomyPhantom:
    """A χ map (ppm) on a real anatomy, cropped to the brain with a margin.

    ``labels`` numbers the deep grey nuclei (``label_names`` maps number → name); ``affine``
    is the cropped grid's voxel-to-MNI-mm transform.
    """

    name: str
    chi: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    label_names: dict = field(default_factory=dict)
    voxel_size: tuple = (1.0, 1.0, 1.0)
    affine: np.ndarray | None = None


def mricron_templates() -> str:
    """The folder of ``mricron-data``'s templates, or :class:`AnatomyUnavailable`."""
    if not os.path.isfile(os.path.join(MRICRON_DIR, "aal.nii.gz")):
        raise AnatomyUnavailable(f"{MRICRON_DIR}/aal.nii.gz not found: install Debian's "
                                 "mricron-data package (apt-get install mricron-data)")
    return MRICRON_DIR


def _nilearn_dir() -> str:
    try:
        import nilearn
    except ImportError:
        raise AnatomyUnavailable("the MNI152 anatomy needs nilearn (pip install nilearn)") \
            from None
    return os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data")


def _load(path):
    import nibabel as nib

    img = nib.load(path)
    return np.asarray(img.dataobj, dtype=np.float32), img.affine


def _resample_labels(path, affine, shape) -> np.ndarray:
    """An atlas (integer labels) resampled by nearest neighbour onto the grid
    ``(affine, shape)`` through both images' affines (both in MNI mm)."""
    from scipy import ndimage as ndi

    data, src_affine = _load(path)
    m = np.linalg.inv(src_affine) @ affine
    out = ndi.affine_transform(data, m[:3, :3], offset=m[:3, 3], output_shape=shape, order=0,
                               mode="constant", cval=0)
    return np.rint(out).astype(np.int16)


def tissue_fractions(t1: np.ndarray, brain: np.ndarray):
    """Grey/white-matter fractions ``(p_gm, p_wm)`` of a T1-weighted image from its intensity
    modes in the brain mask: linear between the CSF, GM and WM peaks of the histogram (the
    Colin27 anatomy; the INIA19 training anatomy of :mod:`bids_qsmnet.data.texture`)."""
    from scipy import ndimage as ndi

    v = t1[brain]
    hist, edges = np.histogram(v, bins=128)
    hist = ndi.gaussian_filter1d(hist.astype(float), 2)
    centres = 0.5 * (edges[1:] + edges[:-1])
    wm = centres[np.argmax(np.where(centres > np.percentile(v, 50), hist, 0))]
    gm = centres[np.argmax(np.where((centres < wm - 0.12 * wm) &
                                    (centres > np.percentile(v, 10)), hist, 0))]
    csf = float(np.percentile(v, 2))
    p_wm = np.clip((t1 - gm) / (wm - gm), 0, 1)
    p_gm = np.where(t1 >= gm, 1 - p_wm, np.clip((t1 - csf) / (gm - csf), 0, 1))
    return np.where(brain, p_gm, 0), np.where(brain, p_wm, 0)


def _images(name: str):
    """(t1, p_gm, p_wm, brain mask, affine) of an anatomy."""
    from scipy import ndimage as ndi

    if name == "mni152":
        d = _nilearn_dir()
        t1, affine = _load(os.path.join(d, "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"))
        gm = _load(os.path.join(d, "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"))[0]
        wm = _load(os.path.join(d, "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"))[0]
        gm, wm = gm / 255.0, wm / 255.0
        brain = ndi.binary_fill_holes(ndi.binary_closing(gm + wm > 0.3, iterations=2))
        brain = ndi.binary_erosion(brain, iterations=1)
        return t1, gm, wm, brain, affine
    if name == "colin27":
        d = mricron_templates()
        t1, affine = _load(os.path.join(d, "ch2.nii.gz"))
        bet = _load(os.path.join(d, "ch2bet.nii.gz"))[0]
        brain = ndi.binary_fill_holes(ndi.binary_opening(bet > 0, iterations=1))
        brain = ndi.binary_erosion(brain, iterations=2)
        gm, wm = tissue_fractions(t1, brain)
        return t1, gm, wm, brain, affine
    raise ValueError(f"unknown anatomy {name!r}; choose one of {', '.join(ANATOMIES)}")


def _texture(t1, gm, wm, brain) -> np.ndarray:
    """±``TEXTURE_PPM`` ppm from the T1's deviation from its smoothed per-tissue mean."""
    from scipy import ndimage as ndi

    out = np.zeros(t1.shape, np.float32)
    for frac, sign in ((wm, -1.0), (gm, 1.0)):
        w = np.where(brain, frac, 0).astype(np.float32)
        mean = ndi.gaussian_filter(t1 * w, 6) / np.maximum(ndi.gaussian_filter(w, 6), 1e-3)
        dev = np.where(w > 0.5, t1 - mean, 0)
        scale = float(np.std(dev[w > 0.5])) or 1.0
        out += sign * TEXTURE_PPM * w * np.clip(dev / (2 * scale), -1, 1)
    return out


def _nuclei(chi, labels, gm, brain, affine, shape) -> dict:
    """Paint the deep grey nuclei into ``chi`` and ``labels``; returns number → name."""
    names = {}
    aal = _resample_labels(os.path.join(mricron_templates(), "aal.nii.gz"), affine, shape)
    k = 0
    for k, (name, (codes, value)) in enumerate(AAL_NUCLEI.items(), start=1):
        inside = np.isin(aal, codes) & brain
        chi[inside] = value * (0.4 + 0.6 * np.clip(gm[inside] * 1.5, 0, 1))
        labels[inside] = k
        names[k] = name
    inv = np.linalg.inv(affine)
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij", sparse=True)
    for j, (name, (centre, axes, value)) in enumerate(SMALL_NUCLEI.items(), start=k + 1):
        names[j] = name
        for side in (-1, 1):
            c = inv @ np.array([centre[0] * -side, centre[1], centre[2], 1.0])
            r2 = sum(((g - ci) / a) ** 2 for g, ci, a in zip(grid, c[:3], axes))
            inside = (r2 <= 1.0) & brain
            chi[inside] = value
            labels[inside] = j
    return names


def _tracts(chi, wm, affine, shape) -> None:
    jhu = _resample_labels(os.path.join(mricron_templates(),
                                        "JHU-WhiteMatter-labels-1mm.nii.gz"), affine, shape)
    for codes, value in JHU_TRACTS.items():
        inside = np.isin(jhu, codes)
        chi[inside] += (value - WM_CHI) * wm[inside]


def anatomy_phantom(name: str, *, margin: int = 6) -> AnatomyPhantom:
    """χ (ppm) on the real anatomy ``name`` (one of :data:`ANATOMIES`), 1 mm isotropic,
    cropped to the brain plus ``margin`` voxels (see the module docstring for the recipe).

    Raises
    ------
    AnatomyUnavailable
        when the package that holds the images is not installed.
    """
    t1, gm, wm, brain, affine = _images(name)
    shape = t1.shape
    chi = (GM_CHI * gm + WM_CHI * wm).astype(np.float32)
    _tracts(chi, wm, affine, shape)
    chi += _texture(t1, gm, wm, brain)
    labels = np.zeros(shape, np.int16)
    names = _nuclei(chi, labels, gm, brain, affine, shape)
    chi = np.where(brain, chi, 0).astype(np.float32)
    idx = np.nonzero(brain)
    sl = tuple(slice(max(int(i.min()) - margin, 0), int(i.max()) + margin + 1) for i in idx)
    crop_affine = affine.copy()
    crop_affine[:3, 3] = affine[:3, :3] @ [s.start for s in sl] + affine[:3, 3]
    return AnatomyPhantom(name, chi[sl], brain[sl], labels[sl], names, (1.0, 1.0, 1.0),
                          crop_affine)
