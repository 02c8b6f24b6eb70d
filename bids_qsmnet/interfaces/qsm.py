"""Small Nipype helpers of the QSM chain: units, masking, the network frame.

Each interface is a thin adapter over a function of :mod:`bids_qsmnet.io.fields` or
:mod:`bids_qsmnet.inference.resample` (tested without Nipype); outputs are named from the
input inside the node's folder.
"""

from __future__ import annotations

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..inference.resample import resample_from_frame, resample_to_frame
from ..io.fields import convert_to_ppm, prepare_mask

__all__ = ["ConvertToPPM", "BrainMask", "ToNetworkFrame", "FromNetworkFrame"]


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
