"""Run a QSMnet-family network on a local field: normalise, pad, predict, crop, de-normalise.

The network expects a field in ppm in its training frame (B0 along the third axis, the
model's voxel size); bringing a volume into that frame is the job of
:mod:`bids_qsmnet.inference.frame`.  Here the volume is already in that frame.

Large volumes are predicted in overlapping tiles whose outputs are blended with a separable
weight, so that peak memory is bounded by the tile instead of the volume.  Near a side it shares
with a neighbour, a tile's prediction sees the tile's zero padding instead of the neighbouring
data; every output voxel depends on the input only within the network's receptive-field
radius ``R`` (:func:`receptive_radius`, measured exactly by propagating a NaN), so a tile's
prediction is exact (equal to the whole-volume one up to float rounding) at ``R`` voxels or
more from its sides.  The blend weight is zero on the outer ``R`` voxels of each overlap and
rises as a raised cosine over the rest; with overlaps of at least ``2R + 2^depth`` voxels the
stitched map equals the whole-volume map.  :func:`plan_tiles` chooses such tiles (slabs first:
the fewest recomputed voxels) for a memory budget.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import product

import numpy as np

LOGGER = logging.getLogger(__name__)

__all__ = [
    "flip_sets", "predict_flip_ensemble",
    "pad_to_multiple", "predict_chi", "predict_normalised", "tile_starts", "blend_weights",
    "receptive_radius", "TilePlan", "plan_tiles", "tiles_of_edge", "choose_tiles",
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


def _rising_edge(overlap_vox: int, tile: int, radius: int | None = None) -> np.ndarray:
    """Weight of a tile along one axis near a side shared with a neighbour overlapping it by
    ``overlap_vox`` voxels: 0 on the outer ``radius`` voxels of the overlap (at most all but
    its middle voxel; the outer quarter when the radius is unknown), a raised cosine over the
    middle, 1 beyond."""
    w = np.ones(tile)
    zero = overlap_vox // 4 if radius is None else min(int(radius), (overlap_vox - 1) // 2)
    ramp = overlap_vox - 2 * zero
    w[:zero] = 0.0
    w[zero:zero + ramp] = 0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp) + 0.5) / ramp)
    return w


def blend_weights(tile: int, starts: Sequence[int], radius: int | None = None
                  ) -> list[np.ndarray]:
    """1-D blending weights along one axis: one array of length ``tile`` per tile start.

    Where a tile overlaps a neighbour by ``o`` voxels its weight is 0 on the outer ``z``
    voxels — ``z = min(radius, (o - 1) // 2)``, or ``o // 4`` when the receptive-field radius
    is not given — rises as a raised cosine over the middle of the overlap and is 1 inside; on
    a side at the volume border it stays 1 (no other tile covers those voxels).  Every voxel is
    at least ``o / 2`` voxels inside the tile nearest to it, where the weight is positive, so
    the summed weight never vanishes; and a network whose receptive-field radius is at most
    ``z`` reproduces its whole-volume output exactly.

    >>> [np.round(w, 2).tolist() for w in blend_weights(8, [0, 4])]
    [[1.0, 1.0, 1.0, 1.0, 1.0, 0.85, 0.15, 0.0], [0.0, 0.15, 0.85, 1.0, 1.0, 1.0, 1.0, 1.0]]
    """
    out = []
    for n, s in enumerate(starts):
        w = np.ones(tile)
        if n > 0:
            w = np.minimum(w, _rising_edge(starts[n - 1] + tile - s, tile, radius))
        if n + 1 < len(starts):
            w = np.minimum(w, _rising_edge(s + tile - starts[n + 1], tile, radius)[::-1])
        out.append(w)
    return out


def receptive_radius(network, multiple: int, *, device="cpu", limit: int = 1024) -> int | None:
    """The network's receptive-field radius in voxels: how far an input voxel reaches.

    Measured, not derived: a NaN placed in a zero volume reaches through every convolution,
    pooling, upsampling and activation exactly the output voxels that depend on it (``0·NaN``
    is NaN), for each of the ``multiple`` positions on the pooling grid and along each axis.
    Returns None when the NaN reaches the whole probe of ``limit`` voxels (a network with
    global operations, e.g. instance normalisation, whose tiles can never be exact).  The
    result is cached on the network object.
    """
    cached = getattr(network, "_bids_qsmnet_receptive_radius", False)
    if cached is not False:
        return cached
    import torch

    length, radius = max(8 * multiple, 64), None
    while length <= limit and radius is None:
        found = 0
        for axis in range(3):
            shape = [multiple] * 3
            shape[axis] = length
            x = torch.zeros((multiple, 1, *shape))
            centre = length // 2
            for p in range(multiple):
                idx = [multiple // 2] * 3
                idx[axis] = centre + p
                x[(p, 0, *idx)] = float("nan")
            with torch.inference_mode():
                y = network(x.to(device))[:, 0].float().cpu()
            other = tuple(a for a in range(3) if a != axis)
            reached = torch.isnan(y).any(dim=tuple(a + 1 for a in other))  # (multiple, length)
            for p in range(multiple):
                where = torch.nonzero(reached[p]).flatten()
                if where.numel() == 0:
                    continue
                lo, hi = int(where.min()), int(where.max())
                if lo == 0 or hi == length - 1:
                    found = None
                    break
                found = max(found, centre + p - lo, hi - centre - p)
            if found is None:
                break
        radius = found
        length *= 2
    try:
        network._bids_qsmnet_receptive_radius = radius
    except AttributeError:  # pragma: no cover - a module that refuses attributes
        pass
    return radius


def exact_overlap(radius: int | None, multiple: int) -> int | None:
    """The smallest tile overlap (a multiple of ``multiple``) that makes tiling exact: zero
    bands of ``radius`` on both sides and a blend of at least ``multiple`` voxels."""
    if radius is None:
        return None
    return -(-(2 * radius + multiple) // multiple) * multiple


@dataclass(frozen=True)
class TilePlan:
    """Tiles over a padded volume: the tile shape, the starts along each axis, whether the
    overlaps allow exact stitching, and the receptive-field radius the weights use."""

    sizes: tuple
    starts: tuple
    radius: int | None
    exact: bool

    @property
    def n_tiles(self) -> int:
        return math.prod(len(s) for s in self.starts)

    @property
    def tile_voxels(self) -> int:
        return math.prod(self.sizes)

    @property
    def computed_voxels(self) -> int:
        return self.n_tiles * self.tile_voxels


def _axis_options(length: int, multiple: int, overlap: int) -> list[tuple[int, list[int]]]:
    """(tile size, starts) along one axis for 1, 2, … tiles overlapping by ≥ ``overlap``."""
    options = [(length, [0])]
    for n in range(2, length // multiple + 1):
        size = -(-(length + (n - 1) * overlap) // n)  # n tiles cover the axis
        size = -(-size // multiple) * multiple
        if size >= length:
            continue
        if size <= overlap:
            break
        step = size - overlap
        starts = sorted({min(i * step, length - size) for i in range(n - 1)} | {length - size})
        if options[-1][0] != size:
            options.append((size, starts))
    return options


#: an exact tiling that recomputes more than this many volumes is not worth its time: the
#: planner then uses approximate tiles (cubes with half-tile overlaps)
MAX_RECOMPUTE = 8.0


def plan_tiles(shape: Sequence[int], multiple: int, radius: int | None,
               max_voxels: int) -> TilePlan:
    """Tiles of at most ``max_voxels`` voxels over a padded volume ``shape``, exact if possible.

    Among the tilings whose overlaps are :func:`exact_overlap`, the one that recomputes the
    fewest voxels (then: the fewest tiles) — usually slabs along one or two axes.  When no
    exact tiling fits (or every one recomputes more than :data:`MAX_RECOMPUTE` volumes), cubes
    of the largest edge that fits with half-tile overlaps (the zero bands then cover as much of
    the receptive field as they can; ``exact`` is False).

    Raises MemoryError when not even tiles of ``2 · multiple`` voxels fit.
    """
    shape = tuple(int(n) for n in shape)
    if math.prod(shape) <= max_voxels:
        return TilePlan(shape, tuple((0,) for _ in shape), radius, True)
    overlap = exact_overlap(radius, multiple)
    best = None
    if overlap is not None:
        per_axis = [_axis_options(n, multiple, overlap) for n in shape]
        max_computed = MAX_RECOMPUTE * math.prod(shape)
        for combo in product(*per_axis):
            sizes = tuple(c[0] for c in combo)
            tile_voxels = math.prod(sizes)
            n_tiles = math.prod(len(c[1]) for c in combo)
            if tile_voxels > max_voxels or n_tiles * tile_voxels > max_computed:
                continue
            key = (n_tiles * tile_voxels, n_tiles)
            if best is None or key < best[0]:
                best = (key, TilePlan(sizes, tuple(tuple(c[1]) for c in combo), radius, True))
    if best is not None:
        return best[1]
    edge = round(max_voxels ** (1 / 3))
    while edge**3 > max_voxels:  # the integer cube root (float roots can fall just short)
        edge -= 1
    edge = edge // multiple * multiple
    if edge < 2 * multiple:
        raise MemoryError(f"inference needs tiles of at least {2 * multiple}³ voxels; only "
                          f"{max_voxels:,} voxels fit in the memory available")
    return tiles_of_edge(shape, edge, 0.5, multiple, radius)


def tiles_of_edge(shape: Sequence[int], tile: int, overlap: float | None, multiple: int,
                  radius: int | None) -> TilePlan:
    """Cubic tiles of edge ``tile`` (cut to the volume); ``overlap`` a fraction of the edge,
    or None for the exact overlap when the tile is large enough for it (else half the tile)."""
    sizes = tuple(min(tile, int(n)) for n in shape)
    exact_o = exact_overlap(radius, multiple)
    starts = []
    for n, size in zip(shape, sizes):
        if overlap is None:
            o = exact_o if exact_o is not None and exact_o < size else size // 2
            frac = o / size
        else:
            frac = overlap
        starts.append(tuple(tile_starts(int(n), size, frac, multiple=multiple)))
    exact = exact_o is not None and all(
        b - a <= size - exact_o for st, size in zip(starts, sizes) for a, b in zip(st, st[1:]))
    return TilePlan(sizes, tuple(starts), radius, exact)


def choose_tiles(network, shape: Sequence[int], multiple: int, *, tile: int | None = None,
                 overlap: float | None = None, max_voxels: int | None = None,
                 device="cpu") -> TilePlan | None:
    """How :func:`predict_normalised` tiles a padded volume of ``shape`` (None: whole volume):
    cubic tiles of edge ``tile`` when given, else the :func:`plan_tiles` plan when the volume
    exceeds ``max_voxels``."""
    if tile is not None:
        if all(n <= tile for n in shape):
            return None
        if tile % multiple:
            raise ValueError(f"tile size {tile} must be a multiple of {multiple}")
        return tiles_of_edge(shape, tile, overlap, multiple,
                             receptive_radius(network, multiple, device=device))
    if max_voxels is not None and math.prod(shape) > max_voxels:
        return plan_tiles(shape, multiple, receptive_radius(network, multiple, device=device),
                          max_voxels)
    return None


def _run(network, x: np.ndarray, device) -> np.ndarray:
    import torch

    with torch.inference_mode():
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None].to(device)
        return network(t)[0, 0].float().cpu().numpy()


def predict_normalised(network, x: np.ndarray, *, multiple: int, device="cpu",
                       tile: int | None = None, overlap: float | None = None,
                       max_voxels: int | None = None) -> np.ndarray:
    """Network output for a normalised input volume (no unit handling).

    Parameters
    ----------
    network : torch.nn.Module — in eval mode, on ``device``
    x : (X, Y, Z) float ndarray — normalised input
    multiple : int — the network's size multiple (``2**depth``)
    tile : int, optional — tile edge in voxels (a multiple of ``multiple``); whole-volume
        prediction when None or when the padded volume fits in one tile
    overlap : float, optional — tile overlap fraction in [0, 0.9); None: the overlap that
        makes the tiles exact (:func:`exact_overlap`) when the tile is large enough for it
    max_voxels : int, optional — without ``tile``: the most voxels a tile may have; larger
        volumes are tiled by :func:`plan_tiles` (exactly, when that fits)
    """
    xp, crop = pad_to_multiple(x, multiple)
    if overlap is not None and not 0.0 <= overlap < 0.9:
        raise ValueError(f"overlap must be within [0, 0.9), got {overlap}")
    plan = choose_tiles(network, xp.shape, multiple, tile=tile, overlap=overlap,
                        max_voxels=max_voxels, device=device)
    if plan is None:
        return _run(network, xp, device)[crop]
    return _run_tiles(network, xp, plan, device)[crop]


def _run_tiles(network, xp: np.ndarray, plan: TilePlan, device) -> np.ndarray:
    sizes, starts = plan.sizes, plan.starts
    out = np.zeros(xp.shape, np.float32)
    weight = np.zeros(xp.shape, np.float32)
    weights = [blend_weights(s, st, plan.radius) for s, st in zip(sizes, starts)]
    LOGGER.info("tiled inference: %d tiles of %s over %s (receptive radius %s voxels; %s)",
                plan.n_tiles, "x".join(map(str, sizes)), "x".join(map(str, xp.shape)),
                plan.radius, "exact" if plan.exact else
                "overlaps narrower than the receptive field: not exactly the whole-volume map")
    for i, wi in zip(starts[0], weights[0]):
        for j, wj in zip(starts[1], weights[1]):
            for k, wk in zip(starts[2], weights[2]):
                sl = (slice(i, i + sizes[0]), slice(j, j + sizes[1]), slice(k, k + sizes[2]))
                window = np.einsum("i,j,k->ijk", wi, wj, wk).astype(np.float32)
                out[sl] += _run(network, xp[sl], device) * window
                weight[sl] += window
    return out / weight


def ensemble_axes(defaults: Mapping | None, axes: Sequence[int] | None = None) -> list[int]:
    """The flip-ensemble axes to run, sorted and unique: ``axes`` where given (``[]``: no
    ensemble), else the model file's ``flip_axes`` (none when it has none)."""
    return sorted(set(int(a) for a in ((defaults or {}).get("flip_axes", ())
                                       if axes is None else axes)))


def flip_sets(flip_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of ``flip_axes`` (the empty one first): the flips of a flip ensemble."""
    import itertools

    axes = sorted(set(int(a) for a in flip_axes))
    bad = [a for a in axes if a not in (0, 1, 2)]
    if bad:
        raise ValueError(f"flip axes must be 0, 1 or 2 (volume axes), got {bad}")
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def predict_flip_ensemble(network, x: np.ndarray, *, multiple: int,
                          flip_axes: Sequence[int] = (), device="cpu", tile: int | None = None,
                          overlap: float | None = None,
                          max_voxels: int | None = None) -> np.ndarray:
    """Mean network output over the flips of ``flip_axes`` (:func:`flip_sets`), each flipped
    back; one :func:`predict_normalised` pass without flips (see :func:`predict_chi`)."""
    flips = flip_sets(flip_axes)
    y = None
    for axes in flips:
        xi = np.ascontiguousarray(np.flip(x, axes)) if axes else x
        yi = predict_normalised(network, xi, multiple=multiple, device=device, tile=tile,
                                overlap=overlap, max_voxels=max_voxels)
        yi = np.flip(yi, axes) if axes else yi
        y = yi if y is None else y + yi
    if len(flips) > 1:
        LOGGER.info("flip ensemble: mean of %d maps (flips of axes %s)", len(flips),
                    list(flips[-1]))
    return y if len(flips) == 1 else y / len(flips)


def predict_chi(loaded, field_ppm: np.ndarray, mask: np.ndarray | None = None, *,
                device="cpu", tile: int | None = None, overlap: float | None = None,
                max_voxels: int | None = None, optimise: bool = True,
                flip_axes: Sequence[int] = ()) -> np.ndarray:
    """χ (ppm) from a local field (ppm) already in the model's frame.

    Parameters
    ----------
    loaded : :class:`bids_qsmnet.models.modelfile.LoadedModel` — network on ``device`` + spec
    field_ppm : (X, Y, Z) ndarray — local field, ppm, B0 along the third axis
    mask : (X, Y, Z) bool ndarray, optional — brain mask; the field is zeroed outside it and
        the output is masked (default: the nonzero voxels of the field)
    device : torch device the network lives on
    tile, overlap, max_voxels : see :func:`predict_normalised`
    optimise : run a copy of the network with batch norm folded and channels-last layout
        (:func:`bids_qsmnet.inference.optimize.optimise_for_inference`); same map to ~1e-5
    flip_axes : flip ensemble: the network also maps the field flipped along every subset of
        these axes, each map is flipped back, and the maps are averaged (2^n network passes).
        Exact physics: with B0 along the third axis the dipole kernel is even in every
        coordinate, so a flipped field is the field of the flipped χ.  The network itself is
        not flip-symmetric (it learned brain anatomy), so averaging reduces its error: on the
        accuracy benchmark's tuning brain, flips of the first two axes (in-plane) lowered
        the NRMSE of the networks measured by 0.4-2.6 points (``benchmarks/accuracy.py
        --tune-dc-only --flip-axes 0 1`` against a bare ``--flip-axes``; with the
        refinement); flipping the third axis (head-foot) made single maps worse.

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
    y = predict_flip_ensemble(network, x, multiple=loaded.network.multiple,
                              flip_axes=flip_axes, device=device, tile=tile, overlap=overlap,
                              max_voxels=max_voxels)
    chi = y * norm["label_std"] + norm["label_mean"]
    return np.where(mask, chi, 0.0).astype(np.float32)
