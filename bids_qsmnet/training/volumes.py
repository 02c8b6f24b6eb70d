"""Training and validation volumes read from NIfTI files (fields and labels in ppm).

Voxel size and B0 direction come from the field's affine; a mask absent is the field's
nonzero voxels.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["ValidationVolume", "iter_training_volumes", "load_validation_volume",
           "validation_volumes"]


@dataclass
class ValidationVolume:
    """A whole volume for validation, in the network frame (B0 along the third axis).

    field, chi : (X, Y, Z) ndarray — ppm; mask : bool ndarray; voxel_size (mm); b0_dir.
    """

    name: str
    field: np.ndarray
    chi: np.ndarray
    mask: np.ndarray
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0)
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0)


def iter_training_volumes(field_files: Sequence[str], label_files: Sequence[str],
                          mask_files: Sequence[str | None] | None = None,
                          subject_ids: Sequence[str] | None = None) -> Iterator:
    """Yield :class:`~bids_qsmnet.training.patches.TrainingVolume` s from NIfTI triplets, one
    subject at a time.

    Parameters
    ----------
    field_files : local fields, ppm
    label_files : χ labels, ppm, on the fields' grids
    mask_files : brain masks (None: the nonzero voxels of each field)
    subject_ids : identifiers recorded as provenance (None: the first entity of each name)

    Raises
    ------
    InputError
        when the lists differ in length or a label or mask is on another grid.
    """
    from ..io.nifti import InputError, load_volume
    from ..physics.orientation import b0_dir_from_affine, voxel_sizes_from_affine
    from .patches import TrainingVolume

    if len(label_files) != len(field_files):
        raise InputError(f"{len(field_files)} field files but {len(label_files)} labels")
    masks = list(mask_files) if mask_files else [None] * len(field_files)
    ids = list(subject_ids) if subject_ids else [
        os.path.basename(f).split("_")[0] for f in field_files]
    for f, c, m, sid in zip(field_files, label_files, masks, ids):
        field, img = load_volume(f, what="local field")
        chi, cimg = load_volume(c, what="χ label")
        if chi.shape != field.shape or not np.allclose(cimg.affine, img.affine, atol=1e-3):
            raise InputError(f"{c}: label grid {chi.shape} differs from the field's ({f})")
        if m:
            mask, mimg = load_volume(m, what="mask")
            if mask.shape != field.shape or not np.allclose(mimg.affine, img.affine, atol=1e-3):
                raise InputError(f"{m}: mask grid {mask.shape} differs from the field's ({f})")
            mask = mask > 0
        else:
            mask = field != 0
        yield TrainingVolume(field, chi, mask, voxel_size=voxel_sizes_from_affine(img.affine),
                             b0_dir=b0_dir_from_affine(img.affine), subject=sid,
                             sources={"field": os.path.basename(f), "label": os.path.basename(c),
                                      "mask": os.path.basename(m) if m else None})


def load_validation_volume(spec: str) -> ValidationVolume:
    """``FIELD,CHI[,MASK]`` NIfTI paths (ppm, network frame) → :class:`ValidationVolume`.

    Without a mask, the mask is the nonzero voxels of the field.
    """
    import nibabel as nib

    from ..physics.orientation import b0_dir_from_affine, voxel_sizes_from_affine

    parts = [p for p in spec.split(",") if p]
    if len(parts) not in (2, 3):
        raise ValueError(f"--val expects FIELD,CHI[,MASK], got {spec!r}")
    imgs = [nib.load(p) for p in parts]
    arrs = [np.asarray(img.dataobj, dtype=np.float32) for img in imgs]
    for p, a in zip(parts, arrs):
        if a.shape != arrs[0].shape:
            raise ValueError(f"{p}: shape {a.shape} differs from {parts[0]}'s {arrs[0].shape}")
    mask = arrs[2] > 0 if len(arrs) == 3 else arrs[0] != 0
    name = os.path.basename(parts[0]).split(".")[0]
    return ValidationVolume(name, arrs[0], arrs[1], mask,
                            voxel_size=tuple(voxel_sizes_from_affine(imgs[0].affine)),
                            b0_dir=tuple(b0_dir_from_affine(imgs[0].affine)))


def validation_volumes(field_files: Sequence[str], label_files: Sequence[str],
                       mask_files: Sequence[str | None] | None = None) -> list[ValidationVolume]:
    """:class:`ValidationVolume` s of parallel lists of fields, labels and masks (NIfTI, ppm).

    Raises
    ------
    ValueError
        when there are not as many labels as fields.
    """
    masks = list(mask_files) if mask_files else [None] * len(field_files)
    if len(label_files) != len(field_files):
        raise ValueError("val_fields and val_labels must have the same length")
    return [load_validation_volume(",".join(p for p in t if p))
            for t in zip(field_files, label_files, masks)]
