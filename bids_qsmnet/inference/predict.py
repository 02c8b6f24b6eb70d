"""Run a QSMnet-family network on a local field: normalise, pad, predict, crop, de-normalise.

The network expects a field in ppm in its training frame (B0 along the third axis, the
model's voxel size); bringing a volume into that frame is the job of
:mod:`bids_qsmnet.inference.frame`.  Here the volume is already in that frame.

Large volumes are predicted in overlapping tiles whose outputs are blended with a weight that
falls off towards the tile borders (a separable Hann-like window, computed once), so peak
memory is bounded by the tile size instead of the volume.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

LOGGER = logging.getLogger(__name__)

__all__ = ["pad_to_multiple", "predict_chi", "predict_normalised", "tile_starts", "blend_window"]


def pad_to_multiple(x: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Zero-pad every axis of a 3-D array to a multiple of ``multiple`` (centred).

    Returns the padded array and the slices that crop it back.

    >>> y, crop = pad_to_multiple(np.ones((5, 16, 17)), 16)
    >>> y.shape, y[crop].shape
    ((16, 16, 32), (5, 16, 17))
    """
    pads, crop = [], []
    for n in x.shape:
        total = (-n) % multiple
        before = total // 2
        pads.append((before, total - before))
        crop.append(slice(before, before + n))
    return np.pad(x, pads), tuple(crop)


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start indices of tiles of size ``tile`` covering ``length`` with the given overlap
    fraction; the last tile ends exactly at ``length``.

    >>> tile_starts(160, 96, 0.25)
    [0, 64]
    """
    if tile >= length:
        return [0]
    step = max(1, int(tile * (1.0 - overlap)))
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)
    return sorted(set(starts))


def blend_window(tile: Sequence[int], overlap: float) -> np.ndarray:
    """Separable blending weight for a tile: 1 in the centre, a raised-cosine ramp over the
    overlapping border (``overlap · tile`` voxels), never exactly 0 so that edge voxels of the
    volume, covered by a single tile, keep a finite weight."""
    axes = []
    for n in tile:
        ramp = max(1, int(round(n * overlap / 2)))
        w = np.ones(n)
        r = 0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp) + 0.5) / ramp)
        w[:ramp] = r
        w[n - ramp:] = np.minimum(w[n - ramp:], r[::-1])
        axes.append(np.maximum(w, 1e-3))
    return np.einsum("i,j,k->ijk", *axes).astype(np.float32)


def _run(network, x: np.ndarray, device) -> np.ndarray:
    import torch

    with torch.inference_mode():
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None].to(device)
        return network(t)[0, 0].float().cpu().numpy()


def predict_normalised(network, x: np.ndarray, *, multiple: int, device="cpu",
                       tile: int | None = None, overlap: float = 0.25) -> np.ndarray:
    """Network output for a normalised input volume (no unit handling).

    Parameters
    ----------
    network : torch.nn.Module — in eval mode, on ``device``
    x : (X, Y, Z) float ndarray — normalised input
    multiple : int — the network's size multiple (``2**depth``)
    tile : int, optional — tile edge in voxels (a multiple of ``multiple``); whole-volume
        prediction when None or when the padded volume fits in one tile
    overlap : float — tile overlap fraction in [0, 0.9]
    """
    xp, crop = pad_to_multiple(x, multiple)
    if tile is None or all(n <= tile for n in xp.shape):
        return _run(network, xp, device)[crop]
    if tile % multiple:
        raise ValueError(f"tile size {tile} must be a multiple of {multiple}")
    if not 0.0 <= overlap < 0.9:
        raise ValueError(f"overlap must be within [0, 0.9), got {overlap}")
    sizes = [min(tile, n) for n in xp.shape]
    window = blend_window(sizes, overlap)
    out = np.zeros(xp.shape, np.float32)
    weight = np.zeros(xp.shape, np.float32)
    starts = [tile_starts(n, s, overlap) for n, s in zip(xp.shape, sizes)]
    n_tiles = math.prod(len(s) for s in starts)
    LOGGER.debug("tiled inference: %d tiles of %s over %s", n_tiles, sizes, xp.shape)
    for i in starts[0]:
        for j in starts[1]:
            for k in starts[2]:
                sl = (slice(i, i + sizes[0]), slice(j, j + sizes[1]), slice(k, k + sizes[2]))
                out[sl] += _run(network, xp[sl], device) * window
                weight[sl] += window
    return (out / weight)[crop]


def predict_chi(loaded, field_ppm: np.ndarray, mask: np.ndarray | None = None, *,
                device="cpu", tile: int | None = None, overlap: float = 0.25) -> np.ndarray:
    """χ (ppm) from a local field (ppm) already in the model's frame.

    Parameters
    ----------
    loaded : :class:`bids_qsmnet.models.modelfile.LoadedModel` — network on ``device`` + spec
    field_ppm : (X, Y, Z) ndarray — local field, ppm, B0 along the third axis
    mask : (X, Y, Z) bool ndarray, optional — brain mask; the field is zeroed outside it and
        the output is masked (default: the nonzero voxels of the field)
    device : torch device the network lives on
    tile, overlap : see :func:`predict_normalised`

    Returns
    -------
    chi : (X, Y, Z) float32 ndarray — ppm, zero outside the mask
    """
    field_ppm = np.asarray(field_ppm, dtype=np.float32)
    if field_ppm.ndim != 3:
        raise ValueError(f"the field must be a 3-D volume, got shape {field_ppm.shape}")
    mask = (field_ppm != 0) if mask is None else np.asarray(mask).astype(bool)
    if mask.shape != field_ppm.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the field's {field_ppm.shape}")
    norm = loaded.spec.normalization
    norm = norm.to_dict() if hasattr(norm, "to_dict") else dict(norm)
    x = np.where(mask, (field_ppm - norm["input_mean"]) / norm["input_std"], 0.0)
    y = predict_normalised(loaded.network, x, multiple=loaded.network.multiple, device=device,
                           tile=tile, overlap=overlap)
    chi = y * norm["label_std"] + norm["label_mean"]
    return np.where(mask, chi, 0.0).astype(np.float32)
