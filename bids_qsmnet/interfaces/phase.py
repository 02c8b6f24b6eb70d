"""Nipype adapters of the phase chain: raw GRE echoes → total field (Hz) → local field (ppm).

Each interface wraps a plain function of this module (tested without Nipype); the physics
lives in :mod:`bids_qsmnet.phase`.  Files are written inside the node's folder, named from the
first input (``fname_presuffix``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)
from nipype.utils.filemanip import fname_presuffix

__all__ = [
    "stack_echoes", "StackEchoes",
    "echo_brain_mask", "EchoBrainMask",
    "fit_field", "FitTotalField",
    "remove_background", "RemoveBackground",
    "UNWRAP_METHODS", "BACKGROUND_METHODS",
]

UNWRAP_METHODS = ("laplacian", "path")
BACKGROUND_METHODS = ("vsharp", "pdf")


def _name(in_file: str, suffix: str, newpath: str | None) -> str:
    return fname_presuffix(in_file, suffix=suffix, newpath=newpath or os.getcwd(),
                           use_ext=False) + ".nii.gz"


# --------------------------------------------------------------------------- echoes


def stack_echoes(phase_files: Sequence[str], magnitude_files: Sequence[str] | None = None, *,
                 newpath: str | None = None) -> tuple[str, str | None]:
    """Load the echoes, check they share one grid, and stack them as 4-D volumes.

    Phase is converted to radians in [-π, π) (scanner integer ranges such as −4096…4095 are
    recognised, :func:`bids_qsmnet.phase.scaling.phase_to_radians`).  Returns
    ``(phase_rad_4d, magnitude_4d or None)``, echoes along the fourth axis.
    """
    from ..io.nifti import InputError, load_volume, save_volume
    from ..phase.scaling import phase_to_radians

    if not phase_files:
        raise InputError("no phase echo given")
    mags = list(magnitude_files or [])
    if mags and len(mags) != len(phase_files):
        raise InputError(f"{phase_files[0]}: {len(phase_files)} phase echoes but "
                         f"{len(mags)} magnitude images")
    ref_img, phases, magnitudes = None, [], []
    for n, path in enumerate(phase_files, start=1):
        data, img = load_volume(path, what=f"phase of echo {n}")
        if ref_img is None:
            ref_img = img
        _same_grid(path, img, data.shape, phase_files[0], ref_img)
        try:
            phases.append(phase_to_radians(data, name=path).astype(np.float32))
        except ValueError as exc:
            raise InputError(str(exc)) from None
    for n, path in enumerate(mags, start=1):
        data, img = load_volume(path, what=f"magnitude of echo {n}")
        _same_grid(path, img, data.shape, phase_files[0], ref_img)
        if data.min() < 0:
            raise InputError(f"{path}: the magnitude has negative values (is it a phase "
                             "image, or a real/imaginary part?)")
        magnitudes.append(data)
    if mags and not any(np.any(m) for m in magnitudes):
        raise InputError(f"{mags[0]}: the magnitude is zero everywhere")
    out_phase = save_volume(np.stack(phases, axis=-1), ref_img,
                            _name(phase_files[0], "_echoes-rad", newpath))
    out_mag = None
    if mags:
        out_mag = save_volume(np.stack(magnitudes, axis=-1), ref_img,
                              _name(mags[0], "_echoes", newpath))
    return out_phase, out_mag


def _same_grid(path, img, shape, ref_path, ref_img):
    from ..io.nifti import InputError

    if tuple(shape) != tuple(ref_img.shape[:3]):
        raise InputError(f"{path}: shape {tuple(shape)} differs from {ref_path} "
                         f"{tuple(ref_img.shape[:3])}; all echoes must share one grid")
    if not np.allclose(img.affine, ref_img.affine, atol=1e-3):
        raise InputError(f"{path}: affine differs from {ref_path}; all echoes must share one grid")


class _StackEchoesInputSpec(BaseInterfaceInputSpec):
    phase_files = InputMultiObject(File(exists=True), mandatory=True,
                                   desc="phase NIfTI of each echo, in echo order")
    magnitude_files = InputMultiObject(File(exists=True),
                                       desc="magnitude NIfTI of each echo (optional)")


class _StackEchoesOutputSpec(TraitedSpec):
    phase = File(exists=True, desc="4-D phase, radians, echoes along axis 4")
    magnitude = traits.Either(None, File(exists=True), desc="4-D magnitude or None")


class StackEchoes(SimpleInterface):
    """Check the echoes share one grid; phase to radians; stack as 4-D."""

    input_spec = _StackEchoesInputSpec
    output_spec = _StackEchoesOutputSpec

    def _run_interface(self, runtime):
        mags = self.inputs.magnitude_files if isdefined(self.inputs.magnitude_files) else None
        phase, mag = stack_echoes(self.inputs.phase_files, mags, newpath=runtime.cwd)
        self._results.update(phase=phase, magnitude=mag)
        return runtime


# --------------------------------------------------------------------------- brain mask


def echo_brain_mask(phase_file: str, magnitude_file: str | None = None,
                    mask_file: str | None = None, *, newpath: str | None = None) -> str:
    """The brain mask of a GRE run: the given one (checked) or one found in the magnitude.

    With ``mask_file`` the mask must share the echoes' grid and be non-empty; otherwise the
    root-sum-of-squares of the magnitude echoes is segmented by
    :func:`bids_qsmnet.phase.mask.brain_mask_from_magnitude`.  Returns a uint8 mask file.
    """
    import nibabel as nib

    from ..io.nifti import InputError, load_volume, save_volume
    from ..phase.mask import brain_mask_from_magnitude, combine_echoes
    from ..physics.orientation import voxel_sizes_from_affine
    from .qsm import _check_same_grid

    ref = nib.load(phase_file)
    shape = tuple(ref.shape[:3])
    if mask_file:
        data, img = load_volume(mask_file, what="brain mask")
        _check_same_grid(phase_file, shape, ref.affine, mask_file, data.shape, img.affine)
        mask = data > 0
        if not mask.any():
            raise InputError(f"{mask_file}: the brain mask is empty")
    else:
        if not magnitude_file:
            raise InputError(f"{phase_file}: no magnitude and no brain mask to find the brain")
        mag = np.asarray(nib.load(magnitude_file).dataobj, dtype=np.float32)
        mag = np.moveaxis(mag, -1, 0) if mag.ndim == 4 else mag[None]
        try:
            mask = brain_mask_from_magnitude(combine_echoes(mag, axis=0),
                                             voxel_sizes_from_affine(ref.affine))
        except ValueError as exc:
            raise InputError(f"{magnitude_file}: {exc}") from None
    return save_volume(mask.astype(np.uint8), ref.slicer[..., 0] if len(ref.shape) == 4 else ref,
                       _name(phase_file, "_brainmask", newpath), dtype=np.uint8)


class _EchoBrainMaskInputSpec(BaseInterfaceInputSpec):
    phase_file = File(exists=True, mandatory=True, desc="4-D phase (defines the grid)")
    magnitude_file = traits.Either(None, File(exists=True), desc="4-D magnitude or None")
    mask_file = traits.Either(None, File(exists=True), desc="given brain mask or None")


class _EchoBrainMaskOutputSpec(TraitedSpec):
    out_mask = File(exists=True, desc="brain mask (uint8)")


class EchoBrainMask(SimpleInterface):
    """Check the given brain mask, or find the brain in the magnitude."""

    input_spec = _EchoBrainMaskInputSpec
    output_spec = _EchoBrainMaskOutputSpec

    def _run_interface(self, runtime):
        i = self.inputs
        self._results["out_mask"] = echo_brain_mask(
            i.phase_file, i.magnitude_file if isdefined(i.magnitude_file) else None,
            i.mask_file if isdefined(i.mask_file) else None, newpath=runtime.cwd)
        return runtime


# --------------------------------------------------------------------------- total field


def fit_field(phase_file: str, magnitude_file: str | None, mask_file: str,
              echo_times: Sequence[float], *, unwrap: str = "laplacian",
              newpath: str | None = None) -> str:
    """Unwrap the echoes and fit the total field, Hz (``*_totalfield.nii.gz``).

    The fit (:func:`bids_qsmnet.phase.echo_fit.fit_total_field`) is magnitude-weighted when
    magnitudes exist; ``unwrap`` is ``laplacian`` or ``path``.  The field is zero outside the
    mask.
    """
    import nibabel as nib

    from ..io.nifti import InputError, save_volume
    from ..phase.echo_fit import fit_total_field
    from ..physics.orientation import voxel_sizes_from_affine

    if unwrap not in UNWRAP_METHODS:
        raise ValueError(f"unknown unwrapping {unwrap!r}; choose one of {UNWRAP_METHODS}")
    img = nib.load(phase_file)
    phase = np.asarray(img.dataobj, dtype=np.float32)
    phase = np.moveaxis(phase, -1, 0) if phase.ndim == 4 else phase[None]
    if len(echo_times) != phase.shape[0]:
        raise InputError(f"{phase_file}: {phase.shape[0]} echoes but {len(echo_times)} echo "
                         "times")
    if magnitude_file:
        mag = np.asarray(nib.load(magnitude_file).dataobj, dtype=np.float32)
        mag = np.moveaxis(mag, -1, 0) if mag.ndim == 4 else mag[None]
    else:
        mag = np.ones_like(phase)
    mask = np.asarray(nib.load(mask_file).dataobj) > 0
    try:
        fit = fit_total_field(phase, mag, np.asarray(echo_times, dtype=float), mask=mask,
                              unwrap=unwrap, voxel_size=voxel_sizes_from_affine(img.affine))
    except ValueError as exc:
        raise InputError(f"{phase_file}: {exc}") from None
    field = np.where(mask, fit.field_hz, 0).astype(np.float32)
    ref = img.slicer[..., 0] if phase.ndim == 4 and len(img.shape) == 4 else img
    return save_volume(field, ref, _name(phase_file, "_totalfield", newpath))


class _FitTotalFieldInputSpec(BaseInterfaceInputSpec):
    phase_file = File(exists=True, mandatory=True, desc="4-D phase, radians")
    magnitude_file = traits.Either(None, File(exists=True), desc="4-D magnitude or None")
    mask_file = File(exists=True, mandatory=True, desc="brain mask")
    echo_times = traits.List(traits.Float, mandatory=True, desc="echo times, seconds")
    unwrap = traits.Enum(*UNWRAP_METHODS, usedefault=True, desc="spatial unwrapping")


class _FitTotalFieldOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="total field, Hz")


class FitTotalField(SimpleInterface):
    """Unwrap and combine the echoes into a total field in Hz."""

    input_spec = _FitTotalFieldInputSpec
    output_spec = _FitTotalFieldOutputSpec

    def _run_interface(self, runtime):
        i = self.inputs
        self._results["out_file"] = fit_field(
            i.phase_file, i.magnitude_file if isdefined(i.magnitude_file) else None,
            i.mask_file, list(i.echo_times), unwrap=i.unwrap, newpath=runtime.cwd)
        return runtime


# --------------------------------------------------------------------------- local field


def remove_background(total_file: str, mask_file: str, b0_strength: float, *,
                      method: str = "vsharp", b0_dir: Sequence[float] | None = None,
                      newpath: str | None = None) -> tuple[str, str]:
    """Total field (Hz) → local field (ppm) and the mask it is valid in.

    ``vsharp`` (default) erodes the mask by its largest sphere near the edge; ``pdf`` keeps it.
    ``b0_dir`` (voxel space; default from the affine) matters for PDF only.
    Returns ``(local_field_ppm, mask)``.
    """
    import nibabel as nib

    from ..io.nifti import InputError, save_volume
    from ..phase.background import pdf, vsharp
    from ..physics.orientation import b0_dir_from_affine, voxel_sizes_from_affine
    from ..physics.units import hz_to_ppm

    if method not in BACKGROUND_METHODS:
        raise ValueError(f"unknown background removal {method!r}; choose one of "
                         f"{BACKGROUND_METHODS}")
    img = nib.load(total_file)
    total = hz_to_ppm(np.asarray(img.dataobj, dtype=np.float64), float(b0_strength))
    mask = np.asarray(nib.load(mask_file).dataobj) > 0
    vs = voxel_sizes_from_affine(img.affine)
    try:
        if method == "vsharp":
            res = vsharp(total, mask, vs)
        else:
            bdir = b0_dir if b0_dir is not None else b0_dir_from_affine(img.affine)
            res = pdf(total, mask, vs, b0_dir=bdir)
    except ValueError as exc:
        raise InputError(f"{total_file}: {exc}") from None
    if not np.any(res.mask):
        raise InputError(f"{mask_file}: nothing is left of the brain mask after background "
                         "removal (is the brain smaller than the largest V-SHARP sphere?)")
    local = np.where(res.mask, res.local_field, 0).astype(np.float32)
    out = save_volume(local, img, _name(total_file, "_local-ppm", newpath))
    out_mask = save_volume(np.asarray(res.mask, dtype=np.uint8), img,
                           _name(total_file, "_localmask", newpath), dtype=np.uint8)
    return out, out_mask


class _RemoveBackgroundInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="total field, Hz")
    mask_file = File(exists=True, mandatory=True, desc="brain mask")
    b0_strength = traits.Float(mandatory=True, desc="main field, tesla")
    method = traits.Enum(*BACKGROUND_METHODS, usedefault=True, desc="background removal")
    b0_dir = traits.Either(None, traits.List(traits.Float, minlen=3, maxlen=3),
                           desc="B0 direction in voxel space (PDF; None: from the affine)")


class _RemoveBackgroundOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="local field, ppm")
    out_mask = File(exists=True, desc="mask of the local field (uint8)")


class RemoveBackground(SimpleInterface):
    """Remove the background field (V-SHARP or PDF): local field in ppm."""

    input_spec = _RemoveBackgroundInputSpec
    output_spec = _RemoveBackgroundOutputSpec

    def _run_interface(self, runtime):
        i = self.inputs
        b0_dir = i.b0_dir if isdefined(i.b0_dir) and i.b0_dir is not None else None
        out, mask = remove_background(i.in_file, i.mask_file, i.b0_strength, method=i.method,
                                      b0_dir=b0_dir, newpath=runtime.cwd)
        self._results.update(out_file=out, out_mask=mask)
        return runtime
