"""The steps of the phase chain on NIfTI files, one per workflow node: echoes stacked, brain
mask, total field (Hz), local field (ppm), R2* and T2* maps (1/s, s).

Each reads its inputs, checks what only files can get wrong (grids, echo counts), runs its
step of :mod:`bids_qsmnet.phase.chain` and writes the result into ``newpath`` (default: the
current folder), named after its first input.  Problems are
:class:`~bids_qsmnet.io.nifti.InputError` s that name the file.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..io.nifti import InputError, derived_path, load_volume, save_volume
from . import chain

__all__ = ["check_echoes", "stack_echoes", "echo_brain_mask", "fit_field", "remove_background",
           "fit_relaxation"]


def _same_grid(path, img, shape, ref_path, ref_img) -> None:
    if tuple(shape) != tuple(ref_img.shape[:3]):
        raise InputError(f"{path}: shape {tuple(shape)} differs from {ref_path} "
                         f"{tuple(ref_img.shape[:3])}; all echoes must share one grid")
    if not np.allclose(img.affine, ref_img.affine, atol=1e-3):
        raise InputError(f"{path}: affine differs from {ref_path}; all echoes must share one grid")


def _load_echoes(path: str) -> np.ndarray:
    """A 4-D echo file as (E, X, Y, Z) float32 (a 3-D file is one echo)."""
    import nibabel as nib

    data = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    return np.moveaxis(data, -1, 0) if data.ndim == 4 else data[None]


def _first_volume(img):
    """The 3-D reference of a 3-D or 4-D image (its first echo)."""
    return img.slicer[..., 0] if len(img.shape) == 4 else img


def _phase_echoes(phase_files: Sequence[str]) -> tuple[list[np.ndarray], object]:
    """Each phase echo in radians (float32), and the first echo's image."""
    from .scaling import phase_to_radians

    ref_img, phases = None, []
    for n, path in enumerate(phase_files, start=1):
        data, img = load_volume(path, what=f"phase of echo {n}")
        if ref_img is None:
            ref_img = img
        _same_grid(path, img, data.shape, phase_files[0], ref_img)
        try:
            phases.append(phase_to_radians(data, name=path).astype(np.float32))
        except ValueError as exc:
            raise InputError(str(exc)) from None
    return phases, ref_img


def _magnitude_echoes(magnitude_files: Sequence[str], ref_path: str,
                      ref_img) -> list[np.ndarray]:
    """Each magnitude echo, checked: on the phase's grid, not negative, not all zero."""
    magnitudes = []
    for n, path in enumerate(magnitude_files, start=1):
        data, img = load_volume(path, what=f"magnitude of echo {n}")
        _same_grid(path, img, data.shape, ref_path, ref_img)
        if data.min() < 0:
            raise InputError(f"{path}: the magnitude has negative values (is it a phase "
                             "image, or a real/imaginary part?)")
        magnitudes.append(data)
    if magnitude_files and not any(np.any(m) for m in magnitudes):
        raise InputError(f"{magnitude_files[0]}: the magnitude is zero everywhere")
    return magnitudes


def check_echoes(phase_files: Sequence[str], magnitude_files: Sequence[str] | None = None,
                 mask_file: str | None = None) -> None:
    """Read a raw GRE run's echoes (and its brain mask) and check their voxels as
    :func:`stack_echoes` and the chain would, before any processing: damaged bodies, NaN/Inf,
    phase ranges, negative or all-zero magnitudes, an empty mask; each problem an
    :class:`InputError` naming the file."""
    mags = list(magnitude_files or [])
    if mags and len(mags) != len(phase_files):
        raise InputError(f"{phase_files[0]}: {len(phase_files)} phase echoes but "
                         f"{len(mags)} magnitude images")
    _, ref_img = _phase_echoes(phase_files)
    _magnitude_echoes(mags, phase_files[0], ref_img)
    if mask_file:
        mask, _ = load_volume(mask_file, what="brain mask", allow_nonfinite=True)
        if not np.any(np.nan_to_num(mask) > 0):
            raise InputError(f"{mask_file}: the brain mask is empty (no voxel > 0); give the "
                             "subject's brain mask, or none (it is found in the magnitude)")


def stack_echoes(phase_files: Sequence[str], magnitude_files: Sequence[str] | None = None, *,
                 newpath: str | None = None) -> tuple[str, str | None]:
    """Load the echoes, check they share one grid, and stack them as 4-D volumes.

    Phase is converted to radians in [-π, π) (scanner integer ranges such as −4096…4095 are
    recognised, :func:`bids_qsmnet.phase.scaling.phase_to_radians`).  Returns
    ``(phase_rad_4d, magnitude_4d or None)``, echoes along the fourth axis.
    """
    if not phase_files:
        raise InputError("no phase echo given")
    mags = list(magnitude_files or [])
    if mags and len(mags) != len(phase_files):
        raise InputError(f"{phase_files[0]}: {len(phase_files)} phase echoes but "
                         f"{len(mags)} magnitude images")
    phases, ref_img = _phase_echoes(phase_files)
    magnitudes = _magnitude_echoes(mags, phase_files[0], ref_img)
    out_phase = save_volume(np.stack(phases, axis=-1), ref_img,
                            derived_path(phase_files[0], "_echoes-rad", newpath))
    out_mag = None
    if mags:
        out_mag = save_volume(np.stack(magnitudes, axis=-1), ref_img,
                              derived_path(mags[0], "_echoes", newpath))
    return out_phase, out_mag


def echo_brain_mask(phase_file: str, magnitude_file: str | None = None,
                    mask_file: str | None = None, *, newpath: str | None = None) -> str:
    """The brain mask of a GRE run: the given one (checked) or one found in the magnitude.

    With ``mask_file`` the mask must share the echoes' grid and be non-empty; otherwise the
    root-sum-of-squares of the magnitude echoes is segmented (:func:`chain.brain_mask`).
    Returns a uint8 mask file.
    """
    import nibabel as nib

    from ..io.fields import check_same_grid
    from ..physics.orientation import voxel_sizes_from_affine

    ref = nib.load(phase_file)
    if mask_file:
        data, img = load_volume(mask_file, what="brain mask")
        check_same_grid(phase_file, ref.shape[:3], ref.affine, mask_file, data.shape, img.affine)
        mask = data > 0
        if not mask.any():
            raise InputError(f"{mask_file}: the brain mask is empty")
    else:
        if not magnitude_file:
            raise InputError(f"{phase_file}: no magnitude and no brain mask to find the brain")
        try:
            mask = chain.brain_mask(_load_echoes(magnitude_file),
                                    voxel_sizes_from_affine(ref.affine))
        except ValueError as exc:
            raise InputError(f"{magnitude_file}: {exc}") from None
    return save_volume(mask.astype(np.uint8), _first_volume(ref),
                       derived_path(phase_file, "_brainmask", newpath), dtype=np.uint8)


def fit_field(phase_file: str, magnitude_file: str | None, mask_file: str,
              echo_times: Sequence[float], *, unwrap: str = "laplacian",
              newpath: str | None = None) -> str:
    """Unwrap the echoes and fit the total field, Hz (``*_totalfield.nii.gz``).

    The fit (:func:`chain.total_field`) is magnitude-weighted when magnitudes exist;
    ``unwrap`` is ``laplacian`` or ``path``.  The field is zero outside the mask.
    """
    import nibabel as nib

    from ..physics.orientation import voxel_sizes_from_affine

    if unwrap not in chain.UNWRAP_METHODS:
        raise ValueError(f"unknown unwrapping {unwrap!r}; choose one of {chain.UNWRAP_METHODS}")
    img = nib.load(phase_file)
    phase = _load_echoes(phase_file)
    if len(echo_times) != phase.shape[0]:
        raise InputError(f"{phase_file}: {phase.shape[0]} echoes but {len(echo_times)} echo "
                         "times")
    mag = _load_echoes(magnitude_file) if magnitude_file else np.ones_like(phase)
    mask = np.asarray(nib.load(mask_file).dataobj) > 0
    try:
        field = chain.total_field(phase, mag, echo_times, mask, unwrap=unwrap,
                                  voxel_size=voxel_sizes_from_affine(img.affine))
    except ValueError as exc:
        raise InputError(f"{phase_file}: {exc}") from None
    return save_volume(field, _first_volume(img), derived_path(phase_file, "_totalfield",
                                                               newpath))


def remove_background(total_file: str, mask_file: str, b0_strength: float, *,
                      method: str = "vsharp", b0_dir: Sequence[float] | None = None,
                      newpath: str | None = None) -> tuple[str, str]:
    """Total field (Hz) → local field (ppm) and the mask it is valid in
    (:func:`chain.local_field`).

    ``vsharp`` (default) erodes the mask by its largest sphere near the edge; ``pdf`` keeps it.
    ``b0_dir`` (voxel space; default from the affine) matters for PDF only.
    Returns ``(local_field_ppm, mask)``.
    """
    import nibabel as nib

    from ..physics.orientation import b0_dir_from_affine, voxel_sizes_from_affine

    if method not in chain.BACKGROUND_METHODS:
        raise ValueError(f"unknown background removal {method!r}; choose one of "
                         f"{chain.BACKGROUND_METHODS}")
    img = nib.load(total_file)
    mask = np.asarray(nib.load(mask_file).dataobj) > 0
    bdir = b0_dir if b0_dir is not None or method != "pdf" else b0_dir_from_affine(img.affine)
    try:
        local, local_mask = chain.local_field(
            np.asarray(img.dataobj, dtype=np.float64), mask, float(b0_strength), method=method,
            voxel_size=voxel_sizes_from_affine(img.affine),
            b0_dir=(0.0, 0.0, 1.0) if bdir is None else bdir)
    except ValueError as exc:
        raise InputError(f"{total_file}: {exc}") from None
    if not np.any(local_mask):
        raise InputError(f"{mask_file}: nothing is left of the brain mask after background "
                         "removal (is the brain smaller than the largest V-SHARP sphere?)")
    out = save_volume(local, img, derived_path(total_file, "_local-ppm", newpath))
    out_mask = save_volume(np.asarray(local_mask, dtype=np.uint8), img,
                           derived_path(total_file, "_localmask", newpath), dtype=np.uint8)
    return out, out_mask


def fit_relaxation(magnitude_file: str, mask_file: str, echo_times: Sequence[float], *,
                   newpath: str | None = None) -> tuple[str, str]:
    """R2* (1/s) and T2* (s) maps of a multi-echo magnitude inside the brain mask
    (:func:`bids_qsmnet.phase.relaxometry.fit_r2star`).

    Returns ``(r2star_file, t2star_file)``, both 0 outside the mask.
    """
    import nibabel as nib

    from .relaxometry import fit_r2star

    img = nib.load(magnitude_file)
    mags = _load_echoes(magnitude_file)
    mask = np.asarray(nib.load(mask_file).dataobj) > 0
    try:
        r2star, t2star = fit_r2star(mags, echo_times, mask)
    except ValueError as exc:
        raise InputError(f"{magnitude_file}: {exc}") from None
    ref = _first_volume(img)
    return (save_volume(r2star, ref, derived_path(magnitude_file, "_r2star", newpath)),
            save_volume(t2star, ref, derived_path(magnitude_file, "_t2star", newpath)))
