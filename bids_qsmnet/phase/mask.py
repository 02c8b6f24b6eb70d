"""Brain mask from GRE magnitude, without an atlas or an external tool.

:func:`brain_mask_from_magnitude` separates the brain from the scalp and the background of a
gradient-echo magnitude image (the first echo, or the root-sum-of-squares of all echoes from
:func:`combine_echoes`).  It relies on three properties of such images: the brain is bright
and large, the skull and the CSF around it are dark, and the background is noise.  The steps
are all morphological and histogram-based, with sizes in mm so that they mean the same at any
resolution and with anisotropic voxels:

1. noise smoothing (Gaussian, ``smooth_mm``);
2. a first automatic threshold, then a slowly varying intensity (bias) estimate by normalised
   convolution over the foreground (Gaussian, ``bias_mm``), by which the image is divided so
   that a receive-coil shading does not move the brain edge;
3. the automatic threshold of the flattened image (Otsu, or Li's minimum cross-entropy);
4. a morphological opening (``open_mm``) that cuts thin bridges between brain and scalp,
   then the largest connected component;
5. a closing (``close_mm``), hole filling (dark ventricles, vessels) and an optional erosion
   (``erode_mm``) to stay clear of the brain edge, where the phase is least reliable.

Erosions and dilations are Euclidean distance transforms with the voxel size as sampling, so
they are exact balls in mm and cost O(N) whatever the radius.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["brain_mask_from_magnitude", "combine_echoes"]

logger = logging.getLogger(__name__)

_METHODS = ("threshold", "li")


def combine_echoes(magnitudes, *, axis: int = -1) -> np.ndarray:
    """Root-sum-of-squares combination of multi-echo magnitude images.

    Parameters
    ----------
    magnitudes : (X, Y, Z, E) ndarray, or a sequence of E (X, Y, Z) arrays — magnitude in any
        (common) unit; a single 3-D volume is returned as it is (as float64)
    axis : int — echo axis of an array input

    Returns
    -------
    rss : (X, Y, Z) float64 ndarray — ``sqrt(Σ_e m_e²)``, in the unit of the input

    Examples
    --------
    >>> float(combine_echoes([np.full((2, 2, 2), 3.0), np.full((2, 2, 2), 4.0)])[0, 0, 0])
    5.0
    """
    if isinstance(magnitudes, (list, tuple)):
        shapes = {np.shape(m) for m in magnitudes}
        if len(magnitudes) == 0 or len(shapes) != 1:
            raise ValueError(f"echo magnitudes must be one or more volumes of one shape: {shapes}")
        arr = np.stack([np.asarray(m, dtype=np.float64) for m in magnitudes], axis=-1)
        axis = -1
    else:
        arr = np.asarray(magnitudes, dtype=np.float64)
    if arr.ndim == 3:
        out = arr.copy()
        if not np.all(np.isfinite(out)):
            raise ValueError("magnitude contains NaN or infinite values")
        return np.abs(out)
    if arr.ndim != 4:
        raise ValueError(f"magnitudes must be 3-D or 4-D (echoes along `axis`), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("magnitudes contain NaN or infinite values")
    return np.sqrt(np.sum(arr * arr, axis=axis))


def _ball_erode(mask: np.ndarray, radius_mm: float, vs: tuple) -> np.ndarray:
    """Voxels farther than ``radius_mm`` from the outside of ``mask``."""
    if radius_mm <= 0:
        return mask
    # Pad by one voxel so that the image border counts as outside.
    dist = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=vs)[1:-1, 1:-1, 1:-1]
    return dist > radius_mm


def _ball_dilate(mask: np.ndarray, radius_mm: float, vs: tuple) -> np.ndarray:
    """Voxels within ``radius_mm`` of ``mask``."""
    if radius_mm <= 0 or not mask.any():
        return mask
    return ndimage.distance_transform_edt(~mask, sampling=vs) <= radius_mm


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)  # 6-connectivity: diagonal contacts do not join
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _auto_threshold(values: np.ndarray, method: str) -> float:
    from skimage.filters import threshold_li, threshold_otsu

    return float(threshold_otsu(values) if method == "threshold" else threshold_li(values))


def _to_mm_sigma(sigma_mm: float, vs: tuple) -> tuple:
    return tuple(sigma_mm / h for h in vs)


def brain_mask_from_magnitude(
    magnitude: np.ndarray,
    voxel_size: Sequence[float],
    *,
    method: str = "threshold",
    fill_holes: bool = True,
    erode_mm: float = 0.0,
    smooth_mm: float = 1.0,
    bias_mm: float | None = 20.0,
    open_mm: float = 4.0,
    close_mm: float = 4.0,
) -> np.ndarray:
    """Brain mask from a gradient-echo magnitude image (no atlas).

    Parameters
    ----------
    magnitude : (X, Y, Z) ndarray — magnitude (first echo or :func:`combine_echoes` of all
        echoes), any unit; non-negative
    voxel_size : (3,) float — mm
    method : {"threshold", "li"} — automatic intensity threshold: ``"threshold"`` is Otsu's
        (maximum between-class variance), ``"li"`` Li's minimum cross-entropy
        (``skimage.filters``), which sits lower when the brain is dim relative to the scalp
    fill_holes : bool — fill cavities enclosed by the mask (dark ventricles, veins)
    erode_mm : float — final erosion, mm (0: none)
    smooth_mm : float — standard deviation of the Gaussian noise smoothing, mm (0: none)
    bias_mm : float or None — standard deviation of the Gaussian used to estimate the slowly
        varying intensity (coil shading), mm; ``None`` or 0 skips the correction
    open_mm : float — radius of the opening that cuts brain–scalp bridges, mm (0: none).  It
        must exceed half the thickness of the bridges and stay well below the brain's size.
    close_mm : float — radius of the closing that smooths the final outline, mm (0: none)

    Returns
    -------
    mask : (X, Y, Z) bool ndarray

    Raises
    ------
    ValueError
        for a non-3-D, non-finite, negative, empty or constant image, invalid options, or when
        no brain is left after the morphological steps.

    Notes
    -----
    The bias estimate is a normalised convolution over the first foreground ``F``:
    ``b = G ⊛ (m F) / G ⊛ F``, so that the dark gap and the background do not pull it down; the
    image is divided by ``b`` and thresholded again.  The opening erodes by ``open_mm`` before
    the largest component is taken, so that components joined by bridges thinner than
    ``2 · open_mm`` separate, and dilates the kept component back.
    """
    mag = np.asarray(magnitude)
    if mag.ndim != 3:
        raise ValueError(f"magnitude must be a 3-D volume, got shape {mag.shape}")
    if not np.issubdtype(mag.dtype, np.number) or np.iscomplexobj(mag):
        raise ValueError(f"magnitude must be real-valued, got dtype {mag.dtype}")
    mag = mag.astype(np.float64)
    if not np.all(np.isfinite(mag)):
        raise ValueError("magnitude contains NaN or infinite values")
    if np.any(mag < 0):
        raise ValueError("magnitude must be non-negative")
    vs_arr = np.asarray(voxel_size, dtype=np.float64).reshape(-1)
    if vs_arr.shape != (3,) or not np.all(np.isfinite(vs_arr)) or np.any(vs_arr <= 0):
        raise ValueError(f"voxel_size must be three positive numbers in mm, got {voxel_size!r}")
    vs = tuple(float(v) for v in vs_arr)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    sizes = {
        "erode_mm": erode_mm,
        "smooth_mm": smooth_mm,
        "bias_mm": 0.0 if bias_mm is None else bias_mm,
        "open_mm": open_mm,
        "close_mm": close_mm,
    }
    for name, value in sizes.items():
        if not (np.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a non-negative number of mm, got {value!r}")
    if mag.max() == mag.min():
        raise ValueError("magnitude image is constant (or empty): no brain to separate")

    # Unit-free working copy: the robust maximum is 1 (the scanner scale is irrelevant here).
    scale = float(np.percentile(mag, 99.9))
    img = mag / (scale if scale > 0 else float(mag.max()))
    if smooth_mm > 0:
        img = ndimage.gaussian_filter(img, _to_mm_sigma(smooth_mm, vs), mode="nearest")

    foreground = img > _auto_threshold(img, method)
    if sizes["bias_mm"] > 0 and foreground.any():
        sigma = _to_mm_sigma(sizes["bias_mm"], vs)
        num = ndimage.gaussian_filter(img * foreground, sigma, mode="constant")
        den = ndimage.gaussian_filter(foreground.astype(np.float64), sigma, mode="constant")
        # Far from any tissue the estimate is undefined; use the typical tissue level there.
        level = float(np.median(img[foreground]))
        valid = den > 1e-3
        bias = np.full(img.shape, level)
        bias[valid] = num[valid] / den[valid]
        bias = np.maximum(bias, 1e-3 * level)
        img = img / bias
        foreground = img > _auto_threshold(img, method)

    mask = _ball_erode(foreground, open_mm, vs)
    if not mask.any():
        raise ValueError(
            f"nothing survives the {open_mm} mm opening: the foreground is too thin "
            "(lower open_mm, or check the image)"
        )
    mask = _largest_component(mask)
    # Dilating the kept core back restores its outline, but never beyond the foreground.
    mask = _ball_dilate(mask, open_mm, vs) & foreground
    mask = _largest_component(mask)
    if close_mm > 0:
        # Pad so the closing does not stick to the image border.
        pad = int(np.ceil(close_mm / min(vs))) + 1
        grown = _ball_dilate(np.pad(mask, pad), close_mm, vs)
        mask = _ball_erode(grown, close_mm, vs)[pad:-pad, pad:-pad, pad:-pad] | mask
    if fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    if erode_mm > 0:
        mask = _ball_erode(mask, erode_mm, vs)
    if not mask.any():
        raise ValueError("the brain mask is empty after erosion: lower erode_mm")
    logger.info(
        "brain mask: %d voxels (%.0f mL)", int(mask.sum()), mask.sum() * np.prod(vs) / 1000.0
    )
    return mask
