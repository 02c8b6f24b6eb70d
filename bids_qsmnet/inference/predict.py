"""Run a QSMnet-family network on a local field: normalise, pad, predict, crop, de-normalise.

The network expects a field in ppm in its training frame (B0 along the third axis, the
model's voxel size); bringing a volume into that frame is the job of
:mod:`bids_qsmnet.inference.frame`.  Here the volume is already in that frame.

Large volumes are predicted in overlapping tiles whose outputs are blended with a separable
weight that is zero on the outer quarter of each overlap (where a tile's prediction sees its
zero padding instead of the neighbouring data) and rises as a raised cosine over the middle
half, so peak memory is bounded by the tile size instead of the volume, and a network whose
receptive field fits in that margin gives exactly its whole-volume prediction.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

LOGGER = logging.getLogger(__name__)

__all__ = [
    "pad_to_multiple", "predict_chi", "predict_normalised", "tile_starts", "blend_weights",
]


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


def tile_starts(length: int, tile: int, overlap: float, *, multiple: int = 1) -> list[int]:
    """Start indices of tiles of size ``tile`` covering ``length`` with the given overlap
    fraction; the last tile ends exactly at ``length``.

    The step ``tile · (1 − overlap)`` is rounded down to a multiple of ``multiple`` (a U-Net
    with ``d`` poolings sees the same pooling grid in every tile only when the tiles start at
    multiples of ``2**d``).

    >>> tile_starts(160, 96, 0.25)
    [0, 64]
    >>> tile_starts(96, 32, 0.3, multiple=16)
    [0, 16, 32, 48, 64]
    """
    if tile >= length:
        return [0]
    step = max(multiple, int(tile * (1.0 - overlap)) // multiple * multiple)
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)
    return sorted(set(starts))


def _rising_edge(overlap_vox: int, tile: int) -> np.ndarray:
    """Weight of a tile along one axis near a side shared with a neighbour overlapping it by
    ``overlap_vox`` voxels: 0 on the outer quarter of the overlap, a raised cosine over its
    middle half, 1 beyond."""
    w = np.ones(tile)
    zero = overlap_vox // 4
    ramp = overlap_vox - 2 * zero
    w[:zero] = 0.0
    w[zero:zero + ramp] = 0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp) + 0.5) / ramp)
    return w


def blend_weights(tile: int, starts: Sequence[int]) -> list[np.ndarray]:
    """1-D blending weights along one axis: one array of length ``tile`` per tile start.

    Where a tile overlaps a neighbour by ``o`` voxels its weight is 0 on the outer ``o // 4``
    voxels, rises as a raised cosine over the middle half of the overlap and is 1 inside; on a
    side at the volume border it stays 1 (no other tile covers those voxels).  Every voxel is
    at least ``o / 2`` voxels inside the tile nearest to it, where the weight is positive, so the
    summed weight never vanishes; and a network whose receptive-field radius is at most
    ``o // 4`` voxels reproduces its whole-volume output exactly.

    >>> [np.round(w, 2).tolist() for w in blend_weights(8, [0, 4])]
    [[1.0, 1.0, 1.0, 1.0, 1.0, 0.85, 0.15, 0.0], [0.0, 0.15, 0.85, 1.0, 1.0, 1.0, 1.0, 1.0]]
    """
    out = []
    for n, s in enumerate(starts):
        w = np.ones(tile)
        if n > 0:
            w = np.minimum(w, _rising_edge(starts[n - 1] + tile - s, tile))
        if n + 1 < len(starts):
            w = np.minimum(w, _rising_edge(s + tile - starts[n + 1], tile)[::-1])
        out.append(w)
    return out


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
    out = np.zeros(xp.shape, np.float32)
    weight = np.zeros(xp.shape, np.float32)
    starts = [tile_starts(n, s, overlap, multiple=multiple) for n, s in zip(xp.shape, sizes)]
    weights = [blend_weights(s, st) for s, st in zip(sizes, starts)]
    n_tiles = math.prod(len(s) for s in starts)
    LOGGER.debug("tiled inference: %d tiles of %s over %s", n_tiles, sizes, xp.shape)
    for i, wi in zip(starts[0], weights[0]):
        for j, wj in zip(starts[1], weights[1]):
            for k, wk in zip(starts[2], weights[2]):
                sl = (slice(i, i + sizes[0]), slice(j, j + sizes[1]), slice(k, k + sizes[2]))
                window = np.einsum("i,j,k->ijk", wi, wj, wk).astype(np.float32)
                out[sl] += _run(network, xp[sl], device) * window
                weight[sl] += window
    return (out / weight)[crop]


def predict_chi(loaded, field_ppm: np.ndarray, mask: np.ndarray | None = None, *,
                device="cpu", tile: int | None = None, overlap: float = 0.25,
                optimise: bool = True) -> np.ndarray:
    """χ (ppm) from a local field (ppm) already in the model's frame.

    Parameters
    ----------
    loaded : :class:`bids_qsmnet.models.modelfile.LoadedModel` — network on ``device`` + spec
    field_ppm : (X, Y, Z) ndarray — local field, ppm, B0 along the third axis
    mask : (X, Y, Z) bool ndarray, optional — brain mask; the field is zeroed outside it and
        the output is masked (default: the nonzero voxels of the field)
    device : torch device the network lives on
    tile, overlap : see :func:`predict_normalised`
    optimise : run a copy of the network with batch norm folded and channels-last layout
        (:func:`bids_qsmnet.inference.optimize.optimise_for_inference`); same map to ~1e-5

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
    network = loaded.network
    if optimise:
        from .optimize import optimise_for_inference

        network = optimise_for_inference(network, device=device)
    y = predict_normalised(network, x, multiple=loaded.network.multiple, device=device,
                           tile=tile, overlap=overlap)
    chi = y * norm["label_std"] + norm["label_mean"]
    return np.where(mask, chi, 0.0).astype(np.float32)
