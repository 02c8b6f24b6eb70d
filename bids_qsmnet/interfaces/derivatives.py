"""Writing BIDS derivatives from a workflow: ``DerivativesSink`` and ``ReportMosaics``."""

from __future__ import annotations

import filecmp
import os

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

__all__ = ["sink_derivative", "DerivativesSink", "ReportMosaics", "MOSAIC_KINDS",
           "mosaic_paths", "make_mosaics"]


def sink_derivative(in_file: str, out_dir: str, entities: dict, *, suffix: str,
                    desc: str | None = None, metadata: dict | None = None,
                    overwrite: bool = False) -> tuple[str, str | None]:
    """Copy ``in_file`` into the derivatives tree (name from ``entities``) with a sidecar.

    An existing output with identical content is left as it is (a rerun after a crash is
    idempotent); a different one is replaced only with ``overwrite``.
    Returns ``(out_file, sidecar or None)``.
    """
    from ..bids.derivatives import (
        OutputExistsError,
        copy_atomic,
        derivative_path,
        write_json_atomic,
    )

    ext = ".nii.gz" if in_file.endswith(".nii.gz") else os.path.splitext(in_file)[1]
    dest = derivative_path(out_dir, entities, suffix=suffix, desc=desc, extension=ext)
    if os.path.exists(dest) and not overwrite and not filecmp.cmp(in_file, dest, shallow=False):
        raise OutputExistsError(f"{dest} exists with other content; use --overwrite")
    copy_atomic(in_file, dest, overwrite=True)
    sidecar = None
    if metadata:
        sidecar = derivative_path(out_dir, entities, suffix=suffix, desc=desc, extension=".json")
        write_json_atomic(metadata, sidecar, overwrite=True)
    return dest, sidecar


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


#: the mosaics of a run, in the order :func:`make_mosaics` writes them
MOSAIC_KINDS = ("field", "chimap")


def mosaic_paths(out_dir: str, entities: dict) -> list[str]:
    """Paths of the run's mosaics, ``sub-<label>[/ses-<label>]/figures/<name>_mosaic.png``.

    >>> mosaic_paths("/out", {"subject": "01", "suffix": "localfield"})[1]
    '/out/sub-01/figures/sub-01_desc-chimap_mosaic.png'
    """
    from ..bids.derivatives import derivative_path

    paths = []
    for kind in MOSAIC_KINDS:
        png = derivative_path(out_dir, entities, suffix="mosaic", desc=kind, extension=".png")
        paths.append(os.path.join(os.path.dirname(os.path.dirname(png)), "figures",
                                  os.path.basename(png)))
    return paths


def make_mosaics(field_file: str, chi_file: str, mask_file: str, out_dir: str,
                 entities: dict) -> list[str]:
    """Slice mosaics (PNG) of the input field and the χ map under ``sub-*/figures/``."""
    import numpy as np

    from ..io.nifti import load_volume
    from ..reports.figures import plot_mosaic

    field, _ = load_volume(field_file, what="local field")
    chi, _ = load_volume(chi_file, what="χ map")
    mask, _ = load_volume(mask_file, what="brain mask")
    volumes = {"field": (field, "local field (ppm)", (None, None)),
               "chimap": (chi, "susceptibility χ (ppm)", (-0.1, 0.2))}
    outs = mosaic_paths(out_dir, entities)
    for kind, png in zip(MOSAIC_KINDS, outs):
        vol, title, window = volumes[kind]
        os.makedirs(os.path.dirname(png), exist_ok=True)
        # plot_mosaic writes through a hidden temporary file and a rename
        plot_mosaic(np.where(mask > 0, vol, 0), png, mask=mask > 0, vmin=window[0],
                    vmax=window[1], title=title)
    return outs


class _MosaicInputSpec(BaseInterfaceInputSpec):
    field_file = File(exists=True, mandatory=True, desc="local field, ppm (input grid)")
    chi_file = File(exists=True, mandatory=True, desc="χ map, ppm (input grid)")
    mask_file = File(exists=True, mandatory=True, desc="brain mask")
    out_dir = traits.Str(mandatory=True, desc="root of the derivatives dataset")
    entities = traits.Dict(mandatory=True, desc="BIDS entities of the source field")


class _MosaicOutputSpec(TraitedSpec):
    out_files = traits.List(File(exists=True), desc="mosaic PNGs")


class ReportMosaics(SimpleInterface):
    """Axial/coronal/sagittal mosaics of the field and χ for the subject's HTML report.

    Like :class:`DerivativesSink`, it writes into the output folder and so runs on every
    workflow run (a cached result does not prove the figures are still there).
    """

    input_spec = _MosaicInputSpec
    output_spec = _MosaicOutputSpec
    _always_run = True

    def _run_interface(self, runtime):
        i = self.inputs
        self._results["out_files"] = make_mosaics(i.field_file, i.chi_file, i.mask_file,
                                                  i.out_dir, dict(i.entities))
        return runtime
