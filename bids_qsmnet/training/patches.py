"""Patch extraction: pairs of local field and χ label volumes → one HDF5 patch store.

QSMnet trains on cubic patches cut on a regular, overlapping grid from each (cropped) volume
(Yoon et al. 2018: 7×8×6 positions of 64³ in a 172×176×159 volume).  This module cuts such
patches, optionally adds augmented copies (QSMnet+ linearity scaling, sign flip, tilted B0),
and streams them subject by subject into an HDF5 file, so no more than one subject is held in
memory.

HDF5 layout (``format`` attribute ``bids_qsmnet-patches``, ``format_version`` 1)
-------------------------------------------------------------------------------
``input``      (N, 1, P, P, P) float32 — local field, ppm (not normalised)
``label``      (N, 1, P, P, P) float32 — χ, ppm (not normalised)
``mask``       (N, 1, P, P, P) uint8   — brain mask
``b0_dir``     (N, 3) float64          — B0 direction in voxel space used for this patch's field
``voxel_size`` (N, 3) float64          — mm
``subject``    (N,) int32              — index into the ``subjects`` attribute
``origin``     (N, 3) int32            — corner of the patch in the cropped volume (voxels)
``augmentation`` (N,) int8             — index into the ``augmentations`` attribute

The dipole kernel of each patch follows from ``(P, voxel_size, b0_dir)``; the trainer builds
(and caches) it from these rather than storing P³ kernel values per patch.  Attributes hold the
normalisation constants (in-mask mean/std of input and label over the whole store), the grid
and augmentation settings and the provenance (subjects and their files) as JSON strings, and
``complete = True``, written last.  The file is written under a temporary name and renamed on
success, so an interrupted run never leaves a file that looks valid.

Each patch is stored as one HDF5 chunk, so the trainer reads random batches without loading
the file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..io.atomic import tmp_sibling
from ..physics.dipole import forward_field, normalise_b0_dir

LOGGER = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "AUGMENTATIONS",
    "TrainingVolume",
    "PatchStoreInfo",
    "RunningStats",
    "grid_positions",
    "patch_grid",
    "crop_to_mask",
    "linearity_augment",
    "tilted_b0_dirs",
    "extract_patches",
    "read_store_info",
]

FORMAT = "bids_qsmnet-patches"
FORMAT_VERSION = 1
#: codes stored in the ``augmentation`` dataset
AUGMENTATIONS = ("none", "linearity", "sign_flip", "linearity+sign_flip", "b0_tilt",
                 "b0_tilt+sign_flip")


@dataclass
class TrainingVolume:
    """One training pair: local field and χ label on the same grid.

    Attributes
    ----------
    field : (X, Y, Z) ndarray — local field, ppm
    chi : (X, Y, Z) ndarray — susceptibility label, ppm
    mask : (X, Y, Z) bool ndarray — brain mask
    voxel_size : (3,) float — mm
    b0_dir : (3,) float — B0 direction in voxel space of ``field``
    subject : str — identifier recorded in the store's provenance
    sources : dict — file names the volumes came from (provenance only)
    """

    field: np.ndarray
    chi: np.ndarray
    mask: np.ndarray
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0)
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0)
    subject: str = "unknown"
    sources: dict = field(default_factory=dict)

    def __post_init__(self):
        self.field = np.asarray(self.field, dtype=np.float32)
        self.chi = np.asarray(self.chi, dtype=np.float32)
        self.mask = np.asarray(self.mask).astype(bool)
        for name in ("field", "chi", "mask"):
            arr = getattr(self, name)
            if arr.ndim != 3:
                raise ValueError(f"{self.subject}: {name} must be 3-D, got shape {arr.shape}")
        if not (self.field.shape == self.chi.shape == self.mask.shape):
            raise ValueError(
                f"{self.subject}: field {self.field.shape}, chi {self.chi.shape} and mask "
                f"{self.mask.shape} must have the same shape"
            )
        for name in ("field", "chi"):
            if not np.all(np.isfinite(getattr(self, name))):
                raise ValueError(f"{self.subject}: {name} contains NaN or Inf values")
        if not self.mask.any():
            raise ValueError(f"{self.subject}: the mask is empty")
        self.voxel_size = tuple(float(v) for v in self.voxel_size)
        self.b0_dir = tuple(normalise_b0_dir(self.b0_dir))


@dataclass
class PatchStoreInfo:
    """Summary of a patch store (what :func:`extract_patches` wrote)."""

    path: str
    n_patches: int
    patch_size: int
    normalization: dict
    subjects: list
    grid: dict
    augmentation: dict
    seconds: float = 0.0


class RunningStats:
    """Streaming mean / standard deviation (Chan et al. parallel update, float64)."""

    def __init__(self):
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0

    def update(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64).ravel()
        if values.size == 0:
            return
        n_b = values.size
        mean_b = float(values.mean())
        m2_b = float(((values - mean_b) ** 2).sum())
        delta = mean_b - self.mean
        n = self.n + n_b
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta**2 * self.n * n_b / n
        self.n = n

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n else float("nan")


def grid_positions(length: int, patch_size: int, *, count: int | None = None,
                   max_stride: int | None = None) -> np.ndarray:
    """Start indices of patches along one axis, evenly spaced from 0 to ``length − patch_size``.

    Parameters
    ----------
    length : int — voxels along the axis (after cropping)
    patch_size : int — voxels
    count : int, optional — number of positions (QSMnet's 7/8/6); overrides ``max_stride``
    max_stride : int, optional — largest allowed step between neighbours; default
        ``patch_size // 3`` (about 2/3 overlap, which gives QSMnet's 7×…×6 grid)

    Examples
    --------
    >>> grid_positions(172, 64, count=7).tolist()
    [0, 18, 36, 54, 72, 90, 108]
    >>> grid_positions(64, 64).tolist()
    [0]
    """
    if patch_size < 1:
        raise ValueError(f"patch size must be positive, got {patch_size}")
    if length < patch_size:
        raise ValueError(f"an axis of {length} voxels is shorter than the {patch_size}³ patch")
    span = length - patch_size
    if count is None:
        step = max(1, patch_size // 3 if max_stride is None else int(max_stride))
        count = math.ceil(span / step) + 1
    if count < 1:
        raise ValueError(f"need at least one patch per axis, got {count}")
    if count == 1:
        return np.array([span // 2], dtype=np.int64)
    return np.round(np.linspace(0, span, count)).astype(np.int64)


def patch_grid(shape: Sequence[int], patch_size: int, *, counts: Sequence[int] | None = None,
               max_stride: int | None = None) -> np.ndarray:
    """All patch corners of the regular grid over a volume of ``shape``.

    Returns
    -------
    corners : (N, 3) int ndarray — voxel index of each patch's first corner, C order
    """
    counts = counts or (None, None, None)
    axes = [grid_positions(n, patch_size, count=c, max_stride=max_stride)
            for n, c in zip(shape, counts)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    return grid.reshape(-1, 3)


def crop_to_mask(mask: np.ndarray, patch_size: int, *, margin: int = 4) -> tuple[slice, ...]:
    """Bounding box of the mask plus ``margin`` voxels, widened to at least ``patch_size``.

    The crop keeps the patches where the brain is (QSMnet cut its grid from the cropped
    volume); axes shorter than the patch are later zero-padded.
    """
    idx = np.nonzero(mask)
    slices = []
    for axis, n in enumerate(mask.shape):
        lo = max(int(idx[axis].min()) - margin, 0)
        hi = min(int(idx[axis].max()) + 1 + margin, n)
        if hi - lo < patch_size:  # widen symmetrically, within the volume where possible
            extra = patch_size - (hi - lo)
            lo = max(lo - extra // 2, 0)
            hi = min(lo + patch_size, n)
            lo = max(hi - patch_size, 0)
        slices.append(slice(lo, hi))
    return tuple(slices)


def _pad_to(x: np.ndarray, patch_size: int) -> np.ndarray:
    pads = [(0, max(0, patch_size - n)) for n in x.shape]
    return np.pad(x, pads) if any(p for _, p in pads) else x


def linearity_augment(chi: np.ndarray, mask: np.ndarray, *, factor: float,
                      voxel_size: Sequence[float], b0_dir: Sequence[float],
                      pad: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """QSMnet+ linearity augmentation: scale positive χ and re-simulate the field.

    Returns ``(field, chi_scaled)`` in ppm: ``chi_scaled = chi`` where ``chi ≤ 0`` and
    ``factor · chi`` elsewhere; ``field = M · (D ⊛ chi_scaled)``.  Because the dipole model is
    linear, the pair is physically consistent, and the network sees stronger sources than the
    original data hold (Jung et al. 2020 used ``factor = 4``).
    """
    chi_scaled = np.where(chi > 0, chi * factor, chi).astype(np.float32)
    field = forward_field(chi_scaled, voxel_size, b0_dir, pad=pad) * mask
    return field.astype(np.float32), chi_scaled


def tilted_b0_dirs(n: int, max_angle_deg: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` B0 directions tilted from the third axis by angles uniform in (0, max] degrees,
    with uniformly random azimuth.  Returns an (n, 3) array of unit vectors."""
    theta = np.deg2rad(rng.uniform(0, max_angle_deg, size=n))
    phi = rng.uniform(0, 2 * np.pi, size=n)
    return np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi),
                     np.cos(theta)], axis=1)


class _StoreWriter:
    """Appends patches to resizable, chunked HDF5 datasets and tracks statistics."""

    def __init__(self, h5, patch_size: int, compression: str | None):
        p = patch_size
        shape5 = (0, 1, p, p, p)
        max5 = (None, 1, p, p, p)
        chunk5 = (1, 1, p, p, p)
        kw = {"compression": compression} if compression else {}
        self.ds = {
            "input": h5.create_dataset("input", shape5, "f4", maxshape=max5, chunks=chunk5, **kw),
            "label": h5.create_dataset("label", shape5, "f4", maxshape=max5, chunks=chunk5, **kw),
            "mask": h5.create_dataset("mask", shape5, "u1", maxshape=max5, chunks=chunk5, **kw),
            "b0_dir": h5.create_dataset("b0_dir", (0, 3), "f8", maxshape=(None, 3)),
            "voxel_size": h5.create_dataset("voxel_size", (0, 3), "f8", maxshape=(None, 3)),
            "subject": h5.create_dataset("subject", (0,), "i4", maxshape=(None,)),
            "origin": h5.create_dataset("origin", (0, 3), "i4", maxshape=(None, 3)),
            "augmentation": h5.create_dataset("augmentation", (0,), "i1", maxshape=(None,)),
        }
        self.n = 0
        self.input_stats = RunningStats()
        self.label_stats = RunningStats()

    def append(self, field, chi, mask, corners, patch_size, *, b0_dir, voxel_size, subject,
               augmentation):
        p = patch_size
        k = len(corners)
        if k == 0:
            return 0
        fields = np.empty((k, 1, p, p, p), np.float32)
        labels = np.empty_like(fields)
        masks = np.empty((k, 1, p, p, p), np.uint8)
        for n, (i, j, l) in enumerate(corners):
            sl = (slice(i, i + p), slice(j, j + p), slice(l, l + p))
            fields[n, 0] = field[sl]
            labels[n, 0] = chi[sl]
            masks[n, 0] = mask[sl]
        lo, hi = self.n, self.n + k
        for name in self.ds:
            self.ds[name].resize(hi, axis=0)
        self.ds["input"][lo:hi] = fields
        self.ds["label"][lo:hi] = labels
        self.ds["mask"][lo:hi] = masks
        self.ds["b0_dir"][lo:hi] = np.broadcast_to(b0_dir, (k, 3))
        self.ds["voxel_size"][lo:hi] = np.broadcast_to(voxel_size, (k, 3))
        self.ds["subject"][lo:hi] = subject
        self.ds["origin"][lo:hi] = corners
        self.ds["augmentation"][lo:hi] = augmentation
        m = masks.astype(bool)
        self.input_stats.update(fields[m])
        self.label_stats.update(labels[m])
        self.n = hi
        return k


def _volume_variants(vol: TrainingVolume, field_c, chi_c, mask_c, *, linearity_factor,
                     b0_tilts: int, max_tilt_deg: float, sign_flip: bool, rng) -> list[tuple]:
    """``(augmentation name, field, χ, b0_dir)`` of the cropped volume and its augmented
    copies (linearity, tilted B0, then a sign-flipped copy of each)."""
    variants = [("none", field_c, chi_c, vol.b0_dir)]
    if linearity_factor:
        f_lin, c_lin = linearity_augment(
            chi_c, mask_c, factor=linearity_factor, voxel_size=vol.voxel_size,
            b0_dir=vol.b0_dir)
        variants.append(("linearity", f_lin, c_lin, vol.b0_dir))
    for b in tilted_b0_dirs(b0_tilts, max_tilt_deg, rng) if b0_tilts else []:
        f_t = (forward_field(chi_c, vol.voxel_size, b, pad=16) * mask_c)
        variants.append(("b0_tilt", f_t.astype(np.float32), chi_c, tuple(b)))
    if sign_flip:  # -χ makes -field under any B0: every variant gets a copy
        variants += [
            ("sign_flip" if name == "none" else f"{name}+sign_flip", -f, -c, b)
            for name, f, c, b in variants
        ]
    return variants


def _write_volume(writer, vol: TrainingVolume, s_idx: int, *, patch_size: int, counts,
                  max_stride, min_mask_fraction: float, crop_margin: int,
                  augment: dict, rng) -> dict:
    """Crop, grid and write the patches of one volume and its variants; returns the
    subject's record for the store's ``subjects`` attribute."""
    n_vox = patch_size**3
    crop = crop_to_mask(vol.mask, patch_size, margin=crop_margin)
    field_c = _pad_to(vol.field[crop], patch_size)
    chi_c = _pad_to(vol.chi[crop], patch_size)
    mask_c = _pad_to(vol.mask[crop], patch_size)
    corners = patch_grid(field_c.shape, patch_size, counts=counts, max_stride=max_stride)
    fractions = np.array([
        mask_c[i:i + patch_size, j:j + patch_size, k:k + patch_size].sum() / n_vox
        for i, j, k in corners
    ])
    keep = corners[fractions >= min_mask_fraction]
    variants = _volume_variants(vol, field_c, chi_c, mask_c, rng=rng, **augment)
    n_before = writer.n
    for name, f, c, b in variants:
        writer.append(f, c, mask_c, keep, patch_size, b0_dir=b, voxel_size=vol.voxel_size,
                      subject=s_idx, augmentation=AUGMENTATIONS.index(name))
    LOGGER.info("%s: %d of %d grid positions kept, %d patches written (%d variants)",
                vol.subject, len(keep), len(corners), writer.n - n_before, len(variants))
    return {
        "subject": vol.subject,
        "sources": vol.sources,
        "shape": list(vol.field.shape),
        "crop": [[s.start, s.stop] for s in crop],
        "grid_positions": int(len(corners)),
        "patches_kept": int(len(keep)),
        "patches_written": int(writer.n - n_before),
        "voxel_size": list(vol.voxel_size),
        "b0_dir": list(vol.b0_dir),
    }


def _write_store_attrs(h5, *, patch_size: int, normalization: dict, subjects: list,
                       grid: dict, augmentation: dict) -> None:
    """The store's attributes, ``complete`` last."""
    h5.attrs["format"] = FORMAT
    h5.attrs["format_version"] = FORMAT_VERSION
    h5.attrs["patch_size"] = patch_size
    h5.attrs["normalization"] = json.dumps(normalization)
    h5.attrs["subjects"] = json.dumps(subjects)
    h5.attrs["grid"] = json.dumps(grid)
    h5.attrs["augmentation"] = json.dumps(augmentation)
    h5.attrs["augmentations"] = json.dumps(list(AUGMENTATIONS))
    h5.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    h5.attrs["complete"] = True


def extract_patches(
    volumes: Iterable[TrainingVolume],
    out_file: str | os.PathLike,
    *,
    patch_size: int = 64,
    counts: Sequence[int] | None = None,
    max_stride: int | None = None,
    min_mask_fraction: float = 0.1,
    crop_margin: int = 4,
    linearity_factor: float | None = None,
    sign_flip: bool = False,
    b0_tilts: int = 0,
    max_tilt_deg: float = 30.0,
    seed: int = 0,
    compression: str | None = None,
    progress: bool = False,
) -> PatchStoreInfo:
    """Cut overlapping cubic patches from training volumes into an HDF5 patch store.

    Parameters
    ----------
    volumes : iterable of :class:`TrainingVolume` — consumed one at a time (may be a
        generator that loads each subject lazily)
    out_file : path of the ``.h5`` file to write (replaced atomically on success)
    patch_size : int — edge of the cubic patches, voxels (QSMnet: 64; tutorial toy: 32)
    counts : (3,) int, optional — patches per axis (QSMnet: 7, 8, 6); default from
        ``max_stride``
    max_stride : int, optional — largest step between neighbouring patches, voxels (default
        ``patch_size // 3``)
    min_mask_fraction : float — patches with a smaller fraction of brain voxels are skipped
    crop_margin : int — voxels kept around the mask's bounding box before gridding
    linearity_factor : float, optional — add a QSMnet+ copy of each volume with positive χ
        scaled by this factor and the field re-simulated (QSMnet+: 4)
    sign_flip : bool — add a copy of every (original and augmented) volume with field and χ
        negated, which doubles the set
    b0_tilts : int — add this many copies of each volume whose field is re-simulated with a
        B0 tilted by up to ``max_tilt_deg`` degrees (orientation augmentation)
    max_tilt_deg : float — degrees
    seed : int — seeds the tilt directions
    compression : str, optional — h5py compression filter (e.g. "gzip"; default none, which
        is fastest to read)
    progress : bool — show a tqdm progress bar over subjects

    Returns
    -------
    PatchStoreInfo
    """
    import h5py

    out_file = os.fspath(out_file)
    if patch_size < 4:
        raise ValueError(f"patch size {patch_size} is too small")
    if not 0.0 <= min_mask_fraction <= 1.0:
        raise ValueError("min_mask_fraction must be within [0, 1]")
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
    tmp = tmp_sibling(out_file)
    t0 = time.perf_counter()
    subjects: list[dict] = []
    grid = {"patch_size": patch_size, "counts": list(counts) if counts else None,
            "max_stride": max_stride or patch_size // 3,
            "min_mask_fraction": min_mask_fraction, "crop_margin": crop_margin}
    augmentation = {"linearity_factor": linearity_factor, "sign_flip": sign_flip,
                    "b0_tilts": b0_tilts, "max_tilt_deg": max_tilt_deg, "seed": seed}
    augment = {"linearity_factor": linearity_factor, "b0_tilts": b0_tilts,
               "max_tilt_deg": max_tilt_deg, "sign_flip": sign_flip}
    try:
        with h5py.File(tmp, "w") as h5:
            writer = _StoreWriter(h5, patch_size, compression)
            iterator = volumes
            if progress:
                from tqdm.auto import tqdm

                iterator = tqdm(volumes, desc="patch extraction", unit="subject")
            for s_idx, vol in enumerate(iterator):
                subjects.append(_write_volume(
                    writer, vol, s_idx, patch_size=patch_size, counts=counts,
                    max_stride=max_stride, min_mask_fraction=min_mask_fraction,
                    crop_margin=crop_margin, augment=augment, rng=rng))
            if writer.n == 0:
                raise ValueError(
                    "no patches were extracted: every grid position had less than "
                    f"{min_mask_fraction:.0%} brain (or no volumes were given)")
            normalization = {
                "input_mean": writer.input_stats.mean,
                "input_std": writer.input_stats.std,
                "label_mean": writer.label_stats.mean,
                "label_std": writer.label_stats.std,
            }
            _write_store_attrs(h5, patch_size=patch_size, normalization=normalization,
                               subjects=subjects, grid=grid, augmentation=augmentation)
            n_total = writer.n
        os.replace(tmp, out_file)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    seconds = time.perf_counter() - t0
    LOGGER.info("wrote %d patches of %d³ from %d subjects to %s in %.1f s", n_total,
                patch_size, len(subjects), out_file, seconds)
    return PatchStoreInfo(out_file, n_total, patch_size, normalization, subjects, grid,
                          augmentation, seconds)


def read_store_info(path: str | os.PathLike) -> PatchStoreInfo:
    """Open a patch store's attributes, refusing files that are not complete stores."""
    import h5py

    path = os.fspath(path)
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{path}: not a readable HDF5 patch store ({exc})") from exc
    with h5:
        attrs = h5.attrs
        if attrs.get("format") != FORMAT or not attrs.get("complete", False):
            raise ValueError(f"{path}: not a complete bids_qsmnet patch store")
        if int(attrs["format_version"]) > FORMAT_VERSION:
            raise ValueError(f"{path}: patch store format {int(attrs['format_version'])} is "
                             f"newer than this bids_qsmnet understands ({FORMAT_VERSION})")
        return PatchStoreInfo(
            path, int(h5["input"].shape[0]), int(attrs["patch_size"]),
            json.loads(attrs["normalization"]), json.loads(attrs["subjects"]),
            json.loads(attrs["grid"]), json.loads(attrs["augmentation"]))
