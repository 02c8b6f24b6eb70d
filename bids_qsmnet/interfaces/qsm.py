"""Small Nipype helpers of the QSM chain: units, masking, the network frame.

Each interface is a thin adapter over a plain function of this module (tested without
Nipype); outputs are named from the input (``fname_presuffix``) inside the node's folder.
"""

from __future__ import annotations

import json
import os

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)
from nipype.utils.filemanip import fname_presuffix

__all__ = [
    "convert_to_ppm", "ConvertToPPM",
    "check_inputs", "prepare_mask", "BrainMask",
    "frame_affine", "resample_to_frame", "ToNetworkFrame",
    "resample_from_frame", "FromNetworkFrame",
]


# --------------------------------------------------------------------------- units


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
    from ..io.nifti import InputError, load_volume, save_volume
    from ..physics.units import field_to_ppm, normalise_units

    if not units:
        raise InputError(f"{in_file}: the sidecar has no 'Units' (ppm, Hz or rad)")
    data, img = load_volume(in_file, what="local field")  # its errors name the file already
    try:
        ppm = field_to_ppm(data, normalise_units(units), b0=b0, te=te)
    except ValueError as exc:
        raise InputError(f"{in_file}: {exc}") from None
    if not np.any(ppm):
        raise InputError(f"{in_file}: the local field is zero everywhere")
    out = fname_presuffix(in_file, suffix="_ppm", newpath=newpath or os.getcwd(),
                          use_ext=False) + ".nii.gz"
    return save_volume(ppm.astype(np.float32), img, out)


class _ConvertToPPMInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="local field NIfTI in `units`")
    units = traits.Str(mandatory=True, desc="units of in_file: ppm, Hz or rad")
    b0_strength = traits.Either(None, traits.Float, desc="main field strength, tesla (Hz, rad)")
    echo_time = traits.Either(None, traits.Float, desc="echo time, seconds (rad)")


class _ConvertToPPMOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="local field, ppm")


class ConvertToPPM(SimpleInterface):
    """Convert a local field from ppm, Hz or rad to ppm (γ̄ = 42.57747892 MHz/T)."""

    input_spec = _ConvertToPPMInputSpec
    output_spec = _ConvertToPPMOutputSpec

    def _run_interface(self, runtime):
        i = self.inputs
        self._results["out_file"] = convert_to_ppm(
            i.in_file, i.units, b0=i.b0_strength if isdefined(i.b0_strength) else None,
            te=i.echo_time if isdefined(i.echo_time) else None, newpath=runtime.cwd)
        return runtime


# --------------------------------------------------------------------------- masking


def _check_same_grid(field_file: str, shape, affine, mask_file: str, mshape, maffine) -> None:
    from ..io.nifti import InputError

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
    must share the field's grid (shape and affine).  Voxel-level problems (NaN, an empty mask,
    a damaged compressed body) are found when the data are read.

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
    from ..io.nifti import inspect_volume

    img = inspect_volume(field_file, what=what)
    if mask_file:
        mimg = inspect_volume(mask_file, what="brain mask")
        _check_same_grid(field_file, img.shape[:3], img.affine, mask_file, mimg.shape[:3],
                         mimg.affine)


def prepare_mask(field_file: str, mask_file: str | None = None, *,
                 newpath: str | None = None) -> tuple[str, str]:
    """Check (or derive) the brain mask of a field and zero the field outside it.

    Without ``mask_file`` the mask is the nonzero voxels of the field (a local field is zero
    outside the brain after background-field removal).  Returns ``(masked_field, mask)``.
    """
    from ..io.nifti import InputError, load_volume, save_volume

    field, img = load_volume(field_file, what="local field")
    if mask_file:
        mdata, mimg = load_volume(mask_file, what="brain mask")
        _check_same_grid(field_file, field.shape, img.affine, mask_file, mdata.shape,
                         mimg.affine)
        mask = mdata > 0
    else:
        mask = field != 0
    if not mask.any():
        raise InputError(f"{mask_file or field_file}: the brain mask is empty")
    if not np.any(field[mask]):
        # a mask of another subject or space: nothing of the field is left to invert
        raise InputError(f"{mask_file}: the local field {field_file} is zero everywhere inside "
                         "this brain mask")
    newpath = newpath or os.getcwd()
    base = fname_presuffix(field_file, newpath=newpath, use_ext=False)
    out_field = save_volume(np.where(mask, field, 0).astype(np.float32), img,
                            base + "_masked.nii.gz")
    out_mask = save_volume(mask.astype(np.uint8), img, base + "_mask.nii.gz", dtype=np.uint8)
    return out_field, out_mask


class _BrainMaskInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="local field, ppm")
    mask_file = traits.Either(None, File(exists=True),
                              desc="brain mask (None/unset: nonzero voxels of in_file)")


class _BrainMaskOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="local field zeroed outside the mask, ppm")
    out_mask = File(exists=True, desc="binary brain mask (uint8)")


class BrainMask(SimpleInterface):
    """Check a brain mask against the field (shape, affine, non-empty) and apply it."""

    input_spec = _BrainMaskInputSpec
    output_spec = _BrainMaskOutputSpec

    def _run_interface(self, runtime):
        mask = self.inputs.mask_file if isdefined(self.inputs.mask_file) else None
        out, m = prepare_mask(self.inputs.in_file, mask, newpath=runtime.cwd)
        self._results.update(out_file=out, out_mask=m)
        return runtime


# --------------------------------------------------------------------------- network frame


def frame_affine(affine: np.ndarray, frame) -> np.ndarray:
    """World affine of the network-frame grid, given the input's affine.

    world = L·S⁻¹·(c0 + Q·h·u) + t, with L and t the input affine's linear part and offset.
    """
    A = np.asarray(affine, dtype=np.float64)
    LS = A[:3, :3] / np.asarray(frame.voxel_size)[None, :]
    out = np.eye(4)
    out[:3, :3] = LS @ frame.basis * frame.target_voxel
    out[:3, 3] = LS @ frame.origin + A[:3, 3]
    return out


def _frame_to_json(frame) -> dict:
    return {"input_shape": list(frame.input_shape), "voxel_size": list(frame.voxel_size),
            "b0_dir": list(frame.b0_dir), "target_voxel": frame.target_voxel,
            "basis": frame.basis.tolist(), "origin": frame.origin.tolist(),
            "shape": list(frame.shape), "identity": frame.identity}


def _frame_from_json(d: dict):
    from ..inference.frame import NetworkFrame

    return NetworkFrame(tuple(d["input_shape"]), tuple(d["voxel_size"]), tuple(d["b0_dir"]),
                        float(d["target_voxel"]), np.asarray(d["basis"]),
                        np.asarray(d["origin"]), tuple(d["shape"]), bool(d["identity"]))


def resample_to_frame(field_file: str, mask_file: str, *, b0_dir=None, target_voxel: float = 1.0,
                      newpath: str | None = None) -> tuple[str, str, str, list]:
    """Field and mask in the network frame, plus a JSON file describing the frame.

    ``b0_dir`` overrides the direction derived from the affine (e.g. a sidecar ``B0_dir``).
    Returns ``(field_in_frame, mask_in_frame, frame_json, b0_dir_used)``.
    """
    import nibabel as nib

    from ..inference.frame import network_frame, to_frame
    from ..io.nifti import load_volume, save_volume
    from ..physics.orientation import b0_dir_from_affine, voxel_sizes_from_affine

    field, img = load_volume(field_file, what="local field")
    mask, _ = load_volume(mask_file, what="brain mask")
    b0 = (np.asarray(b0_dir, float) if b0_dir is not None else b0_dir_from_affine(img.affine))
    frame = network_frame(field.shape, voxel_sizes_from_affine(img.affine), b0,
                          target_voxel=target_voxel)
    f_frame = to_frame(field, frame, order=3)
    m_frame = to_frame(mask.astype(np.float32), frame, order=1) > 0.5
    aff = frame_affine(img.affine, frame)
    newpath = newpath or os.getcwd()
    base = fname_presuffix(field_file, newpath=newpath, use_ext=False)
    ref = nib.Nifti1Image(np.zeros((1, 1, 1), np.float32), aff)
    out_f = save_volume(np.where(m_frame, f_frame, 0).astype(np.float32), ref,
                        base + "_frame.nii.gz")
    out_m = save_volume(m_frame.astype(np.uint8), ref, base + "_framemask.nii.gz",
                        dtype=np.uint8)
    out_j = base + "_frame.json"
    with open(out_j, "w") as fh:
        json.dump(_frame_to_json(frame), fh, indent=1)
    return out_f, out_m, out_j, [float(v) for v in frame.b0_dir]


class _ToFrameInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="local field on the input grid, ppm")
    mask_file = File(exists=True, mandatory=True, desc="brain mask on the input grid")
    b0_dir = traits.Either(None, traits.List(traits.Float, minlen=3, maxlen=3),
                           desc="B0 in voxel space (None/unset: scanner z through the affine)")
    target_voxel = traits.Float(1.0, usedefault=True, desc="network voxel size, mm")


class _ToFrameOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="field in the network frame, ppm")
    out_mask = File(exists=True, desc="mask in the network frame")
    frame_file = File(exists=True, desc="JSON description of the frame")
    b0_dir = traits.List(traits.Float, desc="B0 direction used, voxel space")


class ToNetworkFrame(SimpleInterface):
    """Resample a field so that B0 is the third axis at the model's isotropic voxel size."""

    input_spec = _ToFrameInputSpec
    output_spec = _ToFrameOutputSpec

    def _run_interface(self, runtime):
        i = self.inputs
        f, m, j, b0 = resample_to_frame(i.in_file, i.mask_file,
                                        b0_dir=i.b0_dir if isdefined(i.b0_dir) else None,
                                        target_voxel=i.target_voxel, newpath=runtime.cwd)
        self._results.update(out_file=f, out_mask=m, frame_file=j, b0_dir=b0)
        return runtime


def resample_from_frame(in_file: str, frame_file: str, reference: str, mask_file: str, *,
                        newpath: str | None = None) -> str:
    """Bring a network-frame map back onto the reference (input) grid, masked."""
    from ..inference.frame import from_frame
    from ..io.nifti import load_volume, save_volume

    with open(frame_file) as fh:
        frame = _frame_from_json(json.load(fh))
    data, _ = load_volume(in_file, what="χ map")
    _, ref = load_volume(reference, what="reference")
    mask, _ = load_volume(mask_file, what="brain mask")
    back = from_frame(data, frame, order=3)
    out = fname_presuffix(in_file, suffix="_native", newpath=newpath or os.getcwd(),
                          use_ext=False) + ".nii.gz"
    return save_volume(np.where(mask > 0, back, 0).astype(np.float32), ref, out)


class _FromFrameInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="map in the network frame (χ, ppm)")
    frame_file = File(exists=True, mandatory=True, desc="frame JSON from ToNetworkFrame")
    reference = File(exists=True, mandatory=True, desc="image on the input grid")
    mask_file = File(exists=True, mandatory=True, desc="brain mask on the input grid")


class _FromFrameOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="map on the input grid")


class FromNetworkFrame(SimpleInterface):
    """Resample a network-frame map back onto the input grid."""

    input_spec = _FromFrameInputSpec
    output_spec = _FromFrameOutputSpec

    def _run_interface(self, runtime):
        i = self.inputs
        self._results["out_file"] = resample_from_frame(i.in_file, i.frame_file, i.reference,
                                                        i.mask_file, newpath=runtime.cwd)
        return runtime
