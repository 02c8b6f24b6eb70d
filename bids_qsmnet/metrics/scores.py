"""Image-quality metrics of susceptibility maps, as the 2016 QSM reconstruction challenge scored.

All metrics compare a reconstruction ``pred`` with a reference ``ref`` (both χ in ppm, same
grid) inside a boolean ``mask``; ``mask=None`` means the whole volume.

* :func:`nrmse` — ``100 · ‖pred − ref‖₂ / ‖ref‖₂`` over mask voxels, in %.
* :func:`hfen`  — the same ratio after a Laplacian-of-Gaussian filter (15³ kernel,
  σ = 1.5 voxels), in % — the error in edges and fine detail.
* :func:`ssim`  — structural similarity (Wang et al. 2004) averaged in the mask.
* :func:`psnr`  — peak signal-to-noise ratio in dB, the peak being the reference's range.
* :func:`region_means` — mean χ per label (e.g. deep grey nuclei), ppm.
* :func:`slope` — least-squares slope of ``pred`` against ``ref`` (1: contrast kept; below 1:
  the reconstruction shrinks contrast).

Mean removal (``demean=True``)
------------------------------
The dipole kernel is zero at k = 0, so a QSM is only defined up to an additive constant and
methods reference it differently.  QSM-CI therefore removes the in-mask mean from both maps
before NRMSE.  With ``demean=True`` every metric here subtracts from each map the mean of its
own in-mask voxels (from the in-mask voxels only; values outside the mask are left alone).

Filters and the mask
--------------------
HFEN and SSIM filter the arrays *as given* (values outside the mask enter through the filter
support near the mask edge) and average the result over the mask.  The challenge scored maps
that were zero outside the mask; pass ``pred * mask`` and ``ref * mask`` to reproduce that.

References
----------
Langkammer C, et al. Quantitative susceptibility mapping: report from the 2016 reconstruction
challenge. Magn Reson Med 2018;79:1661-1673.  Ravishankar S, Bresler Y. MR image
reconstruction from highly undersampled k-space data by dictionary learning. IEEE Trans Med
Imaging 2011;30:1028-1041 (HFEN).  Wang Z, Bovik AC, Sheikh HR, Simoncelli EP. Image quality
assessment: from error visibility to structural similarity. IEEE Trans Image Process
2004;13:600-612 (SSIM).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from scipy.signal import fftconvolve

__all__ = [
    "nrmse",
    "hfen",
    "ssim",
    "psnr",
    "region_means",
    "score_all",
    "slope",
    "log_kernel",
]


def _prepare(pred, ref, mask, demean):
    pred = np.asarray(pred, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if pred.shape != ref.shape:
        raise ValueError(f"pred shape {pred.shape} does not match ref shape {ref.shape}")
    if mask is None:
        mask = np.ones(ref.shape, bool)
    else:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != ref.shape:
            raise ValueError(f"mask shape {mask.shape} does not match ref shape {ref.shape}")
    if not mask.any():
        raise ValueError("the mask is empty")
    if demean:
        pred = pred.copy()
        ref = ref.copy()
        pred[mask] -= pred[mask].mean()
        ref[mask] -= ref[mask].mean()
    return pred, ref, mask


def _ratio_percent(err, ref):
    norm_ref = float(np.linalg.norm(ref))
    if norm_ref == 0:
        raise ValueError("the reference is zero in the mask: the normalised error is undefined")
    return 100.0 * float(np.linalg.norm(err)) / norm_ref


def nrmse(
    pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None, *, demean: bool = False
) -> float:
    """Normalised root-mean-square error, %.

    .. math:: \\mathrm{NRMSE} = 100 \\cdot \\frac{\\lVert M(\\chi - \\chi_{ref})\\rVert_2}
              {\\lVert M\\chi_{ref}\\rVert_2}

    Parameters
    ----------
    pred, ref : (X, Y, Z) ndarray — ppm
    mask : (X, Y, Z) bool ndarray, optional — voxels scored (default: all)
    demean : bool — subtract each map's in-mask mean first (QSM-CI's convention)

    Returns
    -------
    float — percent of the reference's norm (0 = perfect, 100 = predicting zeros)

    Examples
    --------
    >>> ref = np.array([1.0, 2.0, 2.0])
    >>> round(nrmse(1.1 * ref, ref), 6)
    10.0
    """
    pred, ref, mask = _prepare(pred, ref, mask, demean)
    return _ratio_percent(pred[mask] - ref[mask], ref[mask])


def log_kernel(sigma: float = 1.5, size: int = 15) -> np.ndarray:
    """The challenge's 3-D Laplacian-of-Gaussian kernel (``size``³, voxel units).

    Built as the challenge's evaluation code builds it: a normalised Gaussian ``g`` on the
    ``size``³ grid, ``h = g · (r² − 3σ²) / σ⁴``, then ``h − mean(h)`` so that the kernel sums
    to zero (a constant image filters to exactly zero).

    Parameters
    ----------
    sigma : float — voxels
    size : int — odd kernel edge in voxels

    Returns
    -------
    (size, size, size) float64 ndarray
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"size must be a positive odd number of voxels, got {size}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    r2 = x[:, None, None] ** 2 + x[None, :, None] ** 2 + x[None, None, :] ** 2
    g = np.exp(-r2 / (2 * sigma**2))
    g /= g.sum()
    h = g * (r2 - 3 * sigma**2) / sigma**4
    return h - h.mean()


def _log_filter(img, kernel):
    """Correlate with a symmetric kernel; edges continued by the nearest voxel."""
    h = kernel.shape[0] // 2
    return fftconvolve(np.pad(img, h, mode="edge"), kernel, mode="valid")


def hfen(
    pred: np.ndarray,
    ref: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    sigma: float = 1.5,
    kernel_size: int = 15,
    demean: bool = False,
) -> float:
    """High-frequency error norm, %: NRMSE of Laplacian-of-Gaussian-filtered maps.

    .. math:: \\mathrm{HFEN} = 100 \\cdot \\frac{\\lVert M\\,\\mathrm{LoG}(\\chi -
              \\chi_{ref})\\rVert_2}{\\lVert M\\,\\mathrm{LoG}(\\chi_{ref})\\rVert_2}

    The LoG kernel is the challenge's (15³ voxels, σ = 1.5 voxels; :func:`log_kernel`), applied
    by FFT convolution to the whole arrays.  The challenge's code padded with zeros; here the
    edges are replicated, which gives the same result for maps that are zero near the grid
    border and keeps a constant offset at an HFEN of exactly 0 (the kernel sums to zero).

    Parameters
    ----------
    pred, ref : (X, Y, Z) ndarray — ppm
    mask : (X, Y, Z) bool ndarray, optional — voxels scored (default: all)
    sigma : float — voxels
    kernel_size : int — voxels (odd)
    demean : bool — subtract each map's in-mask mean first

    Returns
    -------
    float — percent
    """
    pred, ref, mask = _prepare(pred, ref, mask, demean)
    k = log_kernel(sigma, kernel_size)
    err = _log_filter(pred - ref, k)
    lref = _log_filter(ref, k)
    return _ratio_percent(err[mask], lref[mask])


def _default_range(ref, mask, data_range):
    if data_range is None:
        vals = ref[mask]
        data_range = float(vals.max() - vals.min())
    if not data_range > 0:
        raise ValueError("data_range must be positive (the reference is constant in the mask)")
    return float(data_range)


def ssim(
    pred: np.ndarray,
    ref: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    data_range: float | None = None,
    sigma: float = 1.5,
    demean: bool = False,
) -> float:
    """Structural similarity, averaged over the mask (1 = identical).

    scikit-image's ``structural_similarity`` in 3-D with the settings of Wang et al. (2004):
    Gaussian window σ = 1.5 voxels (11³ support), population (co)variances, K₁ = 0.01,
    K₂ = 0.03.  The SSIM map is averaged over the mask voxels.

    Choices (documented because SSIM values depend on them):

    * ``data_range`` (L in the stabilising constants C₁ = (K₁L)², C₂ = (K₂L)²) defaults to
      the range (max − min) of the reference inside the mask, in ppm.
    * Maps are *not* clipped or rescaled to a grey-level window.  The 2016 challenge's code
      rescaled the maps before SSIM (its later XSIM revision keeps them in ppm); clipping would
      hide errors in strong sources (veins, haemorrhage), which matter for QSM.  Values are
      therefore comparable between methods scored against the same reference here, not with
      the numbers published by the challenge.

    Parameters
    ----------
    pred, ref : (X, Y, Z) ndarray — ppm; every edge at least 11 voxels
    mask : (X, Y, Z) bool ndarray, optional
    data_range : float, optional — ppm
    sigma : float — voxels, Gaussian window width
    demean : bool — subtract each map's in-mask mean first

    Returns
    -------
    float — dimensionless, in [−1, 1]
    """
    from skimage.metrics import structural_similarity

    pred, ref, mask = _prepare(pred, ref, mask, demean)
    win = 2 * int(3.5 * sigma + 0.5) + 1  # scikit-image's Gaussian window (truncate = 3.5)
    if min(ref.shape) < win:
        raise ValueError(f"SSIM needs every edge >= {win} voxels, got shape {ref.shape}")
    dr = _default_range(ref, mask, data_range)
    _, smap = structural_similarity(
        ref,
        pred,
        data_range=dr,
        gaussian_weights=True,
        sigma=sigma,
        use_sample_covariance=False,
        full=True,
    )
    return float(smap[mask].mean())


def psnr(
    pred: np.ndarray,
    ref: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    data_range: float | None = None,
    demean: bool = False,
) -> float:
    """Peak signal-to-noise ratio in the mask, dB.

    ``20 · log10(L / RMSE)`` with ``RMSE`` over mask voxels and ``L = data_range``, by default
    the range (max − min) of the reference in the mask.  Identical maps give ``inf``.

    Parameters
    ----------
    pred, ref : (X, Y, Z) ndarray — ppm
    mask : (X, Y, Z) bool ndarray, optional
    data_range : float, optional — ppm
    demean : bool — subtract each map's in-mask mean first

    Returns
    -------
    float — dB
    """
    pred, ref, mask = _prepare(pred, ref, mask, demean)
    dr = _default_range(ref, mask, data_range)
    rmse = float(np.sqrt(np.mean((pred[mask] - ref[mask]) ** 2)))
    return math.inf if rmse == 0 else 20.0 * math.log10(dr / rmse)


def slope(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Least-squares slope ``cov(pred, ref) / var(ref)`` over the mask (dimensionless; both
    maps demeaned in the mask, so the slope does not depend on their offsets).

    >>> r = np.arange(10.0)
    >>> round(slope(0.5 * r + 3, r), 6)
    0.5
    """
    pred, ref, mask = _prepare(pred, ref, mask, True)
    p, r = pred[mask], ref[mask]
    den = float(np.dot(r, r))
    return float(np.dot(p, r) / den) if den > 0 else float("nan")


def region_means(
    chi: np.ndarray,
    labels: np.ndarray,
    label_names: Mapping[int, str] | None = None,
) -> dict[str, float]:
    """Mean susceptibility of every labelled region, ppm.

    Parameters
    ----------
    chi : (X, Y, Z) ndarray — ppm
    labels : (X, Y, Z) integer ndarray — 0 is background and skipped
    label_names : mapping int → str, optional — names of the labels; labels without a name
        are reported as ``str(label)``.  Named labels absent from ``labels`` are left out.

    Returns
    -------
    dict name → mean χ (ppm), in increasing label order

    Examples
    --------
    >>> region_means(np.array([0.0, 0.1, 0.1, 0.3]), np.array([0, 1, 1, 2]), {1: "gp"})
    {'gp': 0.1, '2': 0.3}
    """
    chi = np.asarray(chi, dtype=np.float64)
    labels = np.asarray(labels)
    if labels.shape != chi.shape:
        raise ValueError(f"labels shape {labels.shape} does not match chi shape {chi.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.mod(labels, 1) == 0):
            raise ValueError("labels must be integers")
        labels = labels.astype(np.int64)
    names = dict(label_names or {})
    out = {}
    for lab in np.unique(labels):
        if lab == 0:
            continue
        out[names.get(int(lab), str(int(lab)))] = float(np.mean(chi[labels == lab]))
    return out


def score_all(
    pred: np.ndarray,
    ref: np.ndarray,
    mask: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    *,
    label_names: Mapping[int, str] | None = None,
    demean: bool = False,
) -> dict:
    """Every metric at once (plain floats, ready for JSON).

    Parameters
    ----------
    pred, ref : (X, Y, Z) ndarray — ppm
    mask : (X, Y, Z) bool ndarray, optional
    labels : (X, Y, Z) integer ndarray, optional — tissue labels for region means (restricted
        to the mask)
    label_names : mapping int → str, optional
    demean : bool — subtract each map's in-mask mean first (applies to all metrics)

    Returns
    -------
    dict with ``nrmse`` (%), ``hfen`` (%), ``ssim``, ``psnr`` (dB) and, when ``labels`` is
    given, ``regions``: ``{name: {"pred": ppm, "ref": ppm, "error": pred − ref ppm}}``
    """
    pred, ref, mask = _prepare(pred, ref, mask, demean)
    out = {
        "nrmse": nrmse(pred, ref, mask),
        "hfen": hfen(pred, ref, mask),
        "ssim": ssim(pred, ref, mask),
        "psnr": psnr(pred, ref, mask),
    }
    if labels is not None:
        lab = np.where(mask, np.asarray(labels), 0)
        mp = region_means(pred, lab, label_names)
        mr = region_means(ref, lab, label_names)
        out["regions"] = {k: {"pred": mp[k], "ref": mr[k], "error": mp[k] - mr[k]} for k in mr}
    return out
