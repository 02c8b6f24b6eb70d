"""Nipype adapters of the phase chain: raw GRE echoes → total field (Hz) → local field (ppm),
and the R2*/T2* maps of the magnitude echoes.

Each interface wraps a function of :mod:`bids_qsmnet.phase.files` (tested without Nipype);
files are written inside the node's folder, named from the first input.
"""

from __future__ import annotations

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..phase.chain import BACKGROUND_METHODS, UNWRAP_METHODS
from ..phase.files import (
    echo_brain_mask,
    fit_field,
    fit_relaxation,
    remove_background,
    stack_echoes,
)

__all__ = ["StackEchoes", "EchoBrainMask", "FitTotalField", "RemoveBackground", "FitR2Star"]


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


class _FitR2StarInputSpec(BaseInterfaceInputSpec):
    magnitude_file = File(exists=True, mandatory=True, desc="4-D magnitude, two or more echoes")
    mask_file = File(exists=True, mandatory=True, desc="brain mask")
    echo_times = traits.List(traits.Float, mandatory=True, minlen=2, desc="echo times, seconds")


class _FitR2StarOutputSpec(TraitedSpec):
    r2star_file = File(exists=True, desc="R2* map, 1/s, 0 outside the mask")
    t2star_file = File(exists=True, desc="T2* map, seconds, 0 outside the mask")


class FitR2Star(SimpleInterface):
    """Fit R2* and T2* to the magnitude echoes (magnitude-weighted log-linear fit)."""

    input_spec = _FitR2StarInputSpec
    output_spec = _FitR2StarOutputSpec

    def _run_interface(self, runtime):
        i = self.inputs
        r2star, t2star = fit_relaxation(i.magnitude_file, i.mask_file, list(i.echo_times),
                                        newpath=runtime.cwd)
        self._results.update(r2star_file=r2star, t2star_file=t2star)
        return runtime
