"""Local-field and brain-mask files: header checks, units, masking.

Each function reads NIfTI files, checks them (the errors are
:class:`~bids_qsmnet.io.nifti.InputError` s naming the file) and writes its result into
``newpath`` (default: the current folder), named after its input.
"""

from __future__ import annotations

import logging

import numpy as np

from ..physics.units import field_to_ppm, normalise_units
from .nifti import InputError, derived_path, inspect_volume, load_volume, save_volume

LOGGER = logging.getLogger(__name__)

__all__ = ["MAX_NONFINITE_FRACTION", "check_same_grid", "check_inputs", "check_data",
           "convert_to_ppm", "prepare_mask"]

#: NaN/Inf voxels of a local field are left out of the brain mask (with a warning) when they
#: are at most this fraction of the mask; more, and the field is refused (a broken upstream
#: step rather than a few bad voxels)
MAX_NONFINITE_FRACTION = 0.01


def check_same_grid(field_file: str, shape, affine, mask_file: str, mshape, maffine) -> None:
    """An :class:`InputError` unless the mask (shape ``mshape``, affine ``maffine``) is on
    the field's grid (affines equal within 1e-3 mm)."""

    if tuple(mshape) != tuple(shape):
        raise InputError(f"{mask_file}: mask shape {tuple(mshape)} differs from the field's "
                         f"{tuple(shape)} ({field_file})")
    if not np.allclose(maffine, affine, atol=1e-3):
        worst = float(np.max(np.abs(np.asarray(maffine) - np.asarray(affine))))
        raise InputError(f"{mask_file}: mask affine differs from the field's by up to "
                         f"{worst:.3g} mm ({field_file}); resample the mask onto the field")


def check_inputs(field_file: str, mask_file: str | None = None, *,
                 what: str = "local field") -> None:
    """Header-only checks of a local field and its brain mask, before any processing.

    Cheap (no voxel data is read), so a command line can refuse a bad run before building its
    workflow: each file must pass :func:`~bids_qsmnet.io.nifti.inspect_volume` and the mask
    must share the field's grid (shape and affine, :func:`check_same_grid`).  Voxel-level
    problems (NaN, an empty mask, a damaged compressed body) are found when the data are read.

    Parameters
    ----------
    field_file : local-field NIfTI (or another volume on the mask's grid)
    mask_file : brain-mask NIfTI, or None
    what : what ``field_file`` is, for error messages (e.g. "GRE phase")

    Raises
    ------
    InputError
        naming the offending file and the problem.
    """
    img = inspect_volume(field_file, what=what)
    if mask_file:
        mimg = inspect_volume(mask_file, what="brain mask")
        check_same_grid(field_file, img.shape[:3], img.affine, mask_file, mimg.shape[:3],
                         mimg.affine)


def convert_to_ppm(in_file: str, units: str | None, *, b0: float | None = None,
                   te: float | None = None, newpath: str | None = None) -> str:
    """Write the field of ``in_file`` in ppm (``*_ppm.nii.gz``).

    Parameters
    ----------
    in_file : local-field NIfTI
    units : ``ppm``, ``Hz`` or ``rad`` (the sidecar's ``Units``)
    b0 : tesla (needed for Hz and rad)
    te : seconds (needed for rad)
    """
    if not units:
        raise InputError(f"{in_file}: the sidecar has no 'Units' (ppm, Hz or rad)")
    # NaN/Inf voxels pass through: prepare_mask leaves them out of the mask
    data, img = load_volume(in_file, what="local field", allow_nonfinite=True)
    try:
        ppm = field_to_ppm(data, normalise_units(units), b0=b0, te=te)
    except ValueError as exc:
        raise InputError(f"{in_file}: {exc}") from None
    if not np.any(np.where(np.isfinite(ppm), ppm, 0)):
        raise InputError(f"{in_file}: the local field is zero everywhere; check the "
                         "background-field removal that made it")
    return save_volume(ppm.astype(np.float32), img, derived_path(in_file, "_ppm", newpath))


def _field_and_mask(field_file: str, mask_file: str | None):
    """The field (NaN/Inf set to 0), its image and its brain mask (without the NaN/Inf
    voxels), and how many NaN/Inf voxels were in the mask; the checks shared by
    :func:`check_data` and :func:`prepare_mask` (:class:`InputError` s name the file)."""
    field, img = load_volume(field_file, what="local field", allow_nonfinite=True)
    finite = np.isfinite(field)
    if mask_file:
        mdata, mimg = load_volume(mask_file, what="brain mask", allow_nonfinite=True)
        check_same_grid(field_file, field.shape, img.affine, mask_file, mdata.shape,
                         mimg.affine)
        mask = np.nan_to_num(mdata) > 0
        if not mask.any():
            raise InputError(f"{mask_file}: the brain mask is empty (no voxel > 0); give the "
                             "subject's brain mask, or none (the field's nonzero voxels are "
                             "used)")
    else:
        mask = field != 0  # NaN/Inf included: they count against MAX_NONFINITE_FRACTION
        if not (mask & finite).any():
            raise InputError(f"{field_file}: the brain mask is empty: the local field has no "
                             "nonzero voxel")
    bad = int(np.count_nonzero(mask & ~finite))
    if bad > MAX_NONFINITE_FRACTION * np.count_nonzero(mask):
        raise InputError(
            f"{field_file}: the local field contains {bad} NaN/Inf voxels inside the brain "
            f"mask ({100 * bad / np.count_nonzero(mask):.1f} %, more than "
            f"{100 * MAX_NONFINITE_FRACTION:g} %); fix the step that made it, or set them to "
            "0 outside the brain")
    mask &= finite
    field = np.where(finite, field, 0).astype(np.float32)
    if not np.any(field[mask]):
        # a mask of another subject or space: nothing of the field is left to invert
        raise InputError(f"{mask_file or field_file}: the local field {field_file} is zero "
                         "everywhere inside this brain mask; give the subject's own mask")
    return field, img, mask, bad


def check_data(field_file: str, mask_file: str | None = None) -> list[str]:
    """Read a local field and its mask and check their voxels, before any processing: a
    damaged body, an empty mask, a field that is zero inside the mask and NaN/Inf voxels
    (more than :data:`MAX_NONFINITE_FRACTION` of the mask) are :class:`InputError` s naming
    the file.  Returns warnings (NaN/Inf voxels that will be left out of the mask)."""
    _, _, mask, bad = _field_and_mask(field_file, mask_file)
    if not bad:
        return []
    return [f"{field_file}: {bad} NaN/Inf voxel(s) of the local field "
            f"({100 * bad / (bad + np.count_nonzero(mask)):.3f} % of the brain mask) are left "
            "out of the mask"]


def prepare_mask(field_file: str, mask_file: str | None = None, *,
                 newpath: str | None = None) -> tuple[str, str]:
    """Check (or derive) the brain mask of a field and zero the field outside it.

    Without ``mask_file`` the mask is the nonzero voxels of the field (a local field is zero
    outside the brain after background-field removal).  Returns ``(masked_field, mask)``.
    """
    field, img, mask, bad = _field_and_mask(field_file, mask_file)
    if bad:
        LOGGER.warning("%s: %d NaN/Inf voxel(s) left out of the brain mask", field_file, bad)
    out_field = save_volume(np.where(mask, field, 0).astype(np.float32), img,
                            derived_path(field_file, "_masked", newpath))
    out_mask = save_volume(mask.astype(np.uint8), img, derived_path(field_file, "_mask", newpath),
                           dtype=np.uint8)
    return out_field, out_mask
