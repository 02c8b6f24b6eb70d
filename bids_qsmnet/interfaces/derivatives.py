"""Writing BIDS derivatives from a workflow: ``DerivativesSink`` and ``ReportMosaics``
(adapters over :func:`bids_qsmnet.bids.derivatives.sink_derivative` and
:func:`bids_qsmnet.reports.figures.make_mosaics`)."""

from __future__ import annotations

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..bids.derivatives import sink_derivative

__all__ = ["DerivativesSink", "ReportMosaics"]


class _SinkInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="file to store")
    out_dir = traits.Str(mandatory=True, desc="root of the derivatives dataset")
    entities = traits.Dict(mandatory=True, desc="BIDS entities of the source file")
    suffix = traits.Str(mandatory=True, desc="BIDS suffix of the output (e.g. Chimap)")
    desc = traits.Str(desc="desc entity of the output")
    metadata = traits.Dict(desc="sidecar content (written when given)")
    extra_metadata = traits.Dict(desc="more sidecar content, merged over metadata")
    overwrite = traits.Bool(False, usedefault=True, desc="replace outputs with other content")


class _SinkOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the stored derivative")
    out_meta = File(desc="its sidecar")


class DerivativesSink(SimpleInterface):
    """Store a file in the BIDS-Derivatives tree, named from the source's entities.

    The node runs on every workflow run, even when Nipype holds its result: the result says
    the output was written, not that it is still there (it may have been deleted since, or a
    killed run may have left it unwritten), and copying an identical file again is cheap.
    """

    input_spec = _SinkInputSpec
    output_spec = _SinkOutputSpec
    _always_run = True

    def _run_interface(self, runtime):
        i = self.inputs
        meta = dict(i.metadata) if isdefined(i.metadata) else {}
        if isdefined(i.extra_metadata):
            meta.update(i.extra_metadata)
        out, sc = sink_derivative(i.in_file, i.out_dir, dict(i.entities), suffix=i.suffix,
                                  desc=i.desc if isdefined(i.desc) else None,
                                  metadata=meta or None, overwrite=i.overwrite)
        self._results["out_file"] = out
        if sc:
            self._results["out_meta"] = sc
        return runtime


class _MosaicInputSpec(BaseInterfaceInputSpec):
    field_file = File(exists=True, mandatory=True, desc="local field, ppm (input grid)")
    chi_file = File(exists=True, mandatory=True, desc="χ map, ppm (input grid)")
    mask_file = File(exists=True, mandatory=True, desc="brain mask")
    out_dir = traits.Str(mandatory=True, desc="root of the derivatives dataset")
    entities = traits.Dict(mandatory=True, desc="BIDS entities of the source field")
    r2star_file = File(exists=True, desc="R2* map, 1/s (raw GRE runs; optional)")
    out_pngs = traits.List(traits.Str, desc="the mosaics' paths, one per kind (default: "
                           "named from out_dir and entities; the workflow names them when it "
                           "is built, so that the workers need no pybids)")


class _MosaicOutputSpec(TraitedSpec):
    out_files = traits.List(File(exists=True), desc="mosaic PNGs")


class ReportMosaics(SimpleInterface):
    """Axial/coronal/sagittal mosaics of the field, χ and (given) R2* for the subject's HTML
    report.

    Like :class:`DerivativesSink`, it writes into the output folder and so runs on every
    workflow run (a cached result does not prove the figures are still there).
    """

    input_spec = _MosaicInputSpec
    output_spec = _MosaicOutputSpec
    _always_run = True

    def _run_interface(self, runtime):
        from ..reports.figures import make_mosaics

        i = self.inputs
        self._results["out_files"] = make_mosaics(
            i.field_file, i.chi_file, i.mask_file, i.out_dir, dict(i.entities),
            r2star_file=i.r2star_file if isdefined(i.r2star_file) else None,
            paths=list(i.out_pngs) if isdefined(i.out_pngs) else None)
        return runtime
