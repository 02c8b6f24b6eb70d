"""The participant-level workflow: one ``init_qsmnet_wf`` per local field, plus derivatives."""

from __future__ import annotations

import os
from collections.abc import Sequence

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..__about__ import __version__
from ..bids.derivatives import bids_uri, mosaic_paths
from ..bids.discovery import FieldRun
from ..bids.settings import run_settings
from ..interfaces.derivatives import DerivativesSink, ReportMosaics
from .phase import init_phase_wf
from .qsmnet import init_qsmnet_wf

__all__ = ["init_participant_wf", "init_single_run_wf", "run_outputs", "run_workflow_name"]


def _sidecar_extras(model_info, b0_dir, frame_file):
    """Sidecar entries known only after inference (a Nipype Function: self-contained)."""
    import json
    import math

    with open(frame_file) as fh:
        frame = json.load(fh)
    resampled = (
        "no (B0 along the third axis at the model's voxel size already)" if frame["identity"]
        else f"yes: {frame['target_voxel']} mm isotropic grid {frame['shape']} with B0 along "
             "its third axis, then back onto the input grid (cubic B-splines)")

    z = abs(float(b0_dir[2])) / math.sqrt(sum(float(v) ** 2 for v in b0_dir))
    return {
        "Model": {"Name": model_info["name"], "SHA256": model_info["sha256"],
                  "FormatVersion": model_info["format_version"]},
        "B0Direction": [round(float(v), 6) for v in b0_dir],
        "ObliquityDeg": round(math.degrees(math.acos(min(1.0, z))), 3),
        "DataConsistency": model_info["data_consistency"],
        "FlipEnsembleAxes": model_info.get("flip_axes", []),
        "ResidualPasses": model_info.get("residual_passes", 0),
        "ResampledToNetworkFrame": resampled,
        "Device": model_info["device"],
    }


def _run_sources(run: FieldRun, bids_root: str) -> list[str]:
    """BIDS URIs of the run's inputs: its local field (or echoes) and its mask."""
    if run.is_raw:
        inputs = [e.phase for e in run.echoes] + [e.magnitude for e in run.echoes if e.magnitude]
    else:
        inputs = [run.field]
    return [bids_uri(p, bids_root) for p in inputs + ([run.mask] if run.mask else [])]


def _chimap_metadata(settings: dict, sources: list[str], chain: dict | None) -> dict:
    """The χ map's sidecar (before what only inference knows, :func:`_sidecar_extras`)."""
    metadata = {
        "Units": "ppm", "SkullStripped": True, "Sources": sources,
        "InputUnits": settings["units"], "B0DirectionSource": settings["b0_dir_source"],
        "SoftwareName": "bids_qsmnet", "SoftwareVersion": __version__,
        "Description": "Magnetic susceptibility (χ, ppm) by a QSMnet-family network",
    }
    if settings["b0_strength"] is not None:
        metadata["MagneticFieldStrength"] = settings["b0_strength"]
    if chain is not None:
        metadata["InputUnits"] = "rad (raw GRE phase)"
        metadata["PhasePreprocessing"] = chain
    return metadata


def _after_chimap(workflow, ds_chimap, src, field: str, ds) -> None:
    """``src.field`` into ``ds`` once the χ map is stored: a run that fails leaves no partial
    derivatives (a mask or field map without its χ map)."""
    gate = pe.Node(niu.Function(function=_pass_after, input_names=["value", "ready"],
                                output_names=["value"]),
                   name=f"{ds.name}_after_chimap", run_without_submitting=True)
    workflow.connect([(src, gate, [(field, "value")]),
                      (ds_chimap, gate, [("out_file", "ready")]),
                      (gate, ds, [("value", "in_file")])])


def _relaxometry_metadata(settings: dict, sources: list[str]) -> dict:
    """The common sidecar entries of the R2* and T2* maps."""
    from ..phase.relaxometry import R2STAR_MAX

    return {
        "EstimationAlgorithm": (
            "magnitude-weighted (|S|²) log-linear least-squares fit of ln|S| over echo time, "
            f"mono-exponential decay; R2* clipped to [0, {R2STAR_MAX:g}] 1/s"),
        "EchoTime": settings["echo_times"], "SkullStripped": True,
        "MagneticFieldStrength": settings["b0_strength"], "Sources": sources,
        "SoftwareName": "bids_qsmnet", "SoftwareVersion": __version__,
    }


def _connect_relaxometry(workflow, phase_wf, ds_chimap, sink, *, settings: dict,
                         sources: list[str]):
    """Sinks of the R2* (1/s) and T2* (s) maps, stored after the χ map; returns the R2*
    sink (whose stored file the report's mosaic shows)."""
    common = _relaxometry_metadata(settings, sources)
    ds_r2star = sink("ds_r2starmap", suffix="R2starmap", metadata={
        **common, "Units": "1/s", "Description":
        "R2* (1/s) fitted to the magnitude echoes, zero outside the brain mask"})
    ds_t2star = sink("ds_t2starmap", suffix="T2starmap", metadata={
        **common, "Units": "s", "Description":
        "T2* = 1/R2* (s), zero where R2* is zero and outside the brain mask"})
    _after_chimap(workflow, ds_chimap, phase_wf, "outputnode.r2star", ds_r2star)
    _after_chimap(workflow, ds_chimap, phase_wf, "outputnode.t2star", ds_t2star)
    return ds_r2star


def _connect_phase_chain(workflow, run: FieldRun, settings: dict, qsm_wf, ds_chimap, sink, *,
                         sources: list[str], chain: dict, unwrapping: str,
                         bgremoval: str):
    """The phase workflow of a raw GRE run in front of ``qsm_wf``, and the sinks of its
    total field, local field, brain mask and eroded mask, and of its R2*/T2* maps when
    :attr:`FieldRun.fits_r2star` (then the R2* sink is returned, else None)."""
    phase_wf = init_phase_wf(echo_times=settings["echo_times"],
                             b0_strength=settings["b0_strength"], unwrap=unwrapping,
                             background=bgremoval, relaxometry=run.fits_r2star)
    phase_wf.inputs.inputnode.phase_files = [e.phase for e in run.echoes]
    phase_wf.inputs.inputnode.magnitude_files = (
        [e.magnitude for e in run.echoes] if settings["weighted"] else [])
    phase_wf.inputs.inputnode.mask_file = run.mask
    phase_wf.inputs.inputnode.b0_dir = settings["b0_dir"]
    qsm_wf.inputs.inputnode.units = "ppm"
    derived = {"SoftwareName": "bids_qsmnet", "SoftwareVersion": __version__,
               "Sources": sources, "PhasePreprocessing": chain,
               "MagneticFieldStrength": settings["b0_strength"]}
    ds_total = sink("ds_totalfield", suffix="fieldmap", desc="totalfield",
                    metadata={**derived, "Units": "Hz", "Description":
                              "Total field: unwrapped phase fitted over echoes, zero "
                              "outside the brain mask"})
    ds_local = sink("ds_localfield", suffix="fieldmap", desc="localfield",
                    metadata={**derived, "Units": "ppm", "Description":
                              "Local (tissue) field after background-field removal, zero "
                              "outside the eroded mask"})
    ds_brain = sink("ds_mask", suffix="mask", desc="brain",
                    metadata={"Type": "Brain", "Sources": sources,
                              "SpatialReference": sources[0],
                              "Description": "given brain mask" if run.mask else
                              "brain mask found in the magnitude"})
    ds_eroded = sink("ds_eroded_mask", suffix="mask", desc="eroded",
                     metadata={"Type": "Brain", "Sources": sources,
                               "SpatialReference": sources[0], "Description":
                               "brain mask after background-field removal: where the "
                               "local field and χ are defined"})
    workflow.connect([
        (phase_wf, qsm_wf, [("outputnode.local_field", "inputnode.in_file"),
                            ("outputnode.mask_file", "inputnode.mask_file")]),
    ])
    _after_chimap(workflow, ds_chimap, phase_wf, "outputnode.total_field", ds_total)
    _after_chimap(workflow, ds_chimap, phase_wf, "outputnode.local_field", ds_local)
    _after_chimap(workflow, ds_chimap, phase_wf, "outputnode.brain_mask", ds_brain)
    _after_chimap(workflow, ds_chimap, qsm_wf, "outputnode.mask_file", ds_eroded)
    if not run.fits_r2star:
        return None
    return _connect_relaxometry(workflow, phase_wf, ds_chimap, sink, settings=settings,
                                sources=sources)


def _connect_report(workflow, qsm_wf, ds_chimap, *, out_dir: str, entities: dict,
                    ds_r2star=None) -> None:
    """The χ map's sidecar entries known after inference, and the report's figures (only of
    a stored χ map, and of a stored R2* map when ``ds_r2star`` is its sink)."""
    extras = pe.Node(niu.Function(function=_sidecar_extras,
                                  input_names=["model_info", "b0_dir", "frame_file"],
                                  output_names=["extras"]), name="sidecar_extras",
                     run_without_submitting=True)  # reads a small JSON: no worker needed
    pngs = mosaic_paths(out_dir, entities, r2star=ds_r2star is not None)
    ds_report = pe.Node(ReportMosaics(out_dir=out_dir, entities=entities, out_pngs=pngs),
                        name="ds_report_chimap")
    workflow.connect([
        (qsm_wf, extras, [("outputnode.model_info", "model_info"),
                          ("outputnode.b0_dir", "b0_dir"),
                          ("outputnode.frame_file", "frame_file")]),
        (qsm_wf, ds_chimap, [("outputnode.chi_file", "in_file")]),
        (extras, ds_chimap, [("extras", "extra_metadata")]),
        (qsm_wf, ds_report, [("outputnode.field_ppm", "field_file"),
                             ("outputnode.mask_file", "mask_file")]),
        (ds_chimap, ds_report, [("out_file", "chi_file")]),
    ])
    if ds_r2star is not None:
        workflow.connect(ds_r2star, "out_file", ds_report, "r2star_file")


def init_single_run_wf(run: FieldRun, *, bids_root: str, out_dir: str, model: str | None,
                       device: str, tile: int | None, dc_lambda: float | str | None,
                       omp_nthreads: int, overwrite: bool, b0_strength: float | None,
                       unwrapping: str = "laplacian", bgremoval: str = "vsharp",
                       flip_axes: list[int] | None = None,
                       residual_passes: int | None = None, name: str):
    """Inference of one run and its derivatives (χ map + sidecar, mask, report figures).

    A raw GRE run (``run.echoes``) first goes through :func:`init_phase_wf`; its total field
    (Hz, ``desc-totalfield_fieldmap``), local field (ppm, ``desc-localfield_fieldmap``), brain
    mask (``desc-brain_mask``) and the eroded mask of the local field (``desc-eroded_mask``)
    are written as derivatives; with two or more magnitude echoes also its R2* (1/s,
    ``R2starmap``) and T2* (s, ``T2starmap``) maps.
    """
    settings = run_settings(run, b0_strength=b0_strength)
    workflow = pe.Workflow(name=name)
    qsm_wf = init_qsmnet_wf(model=model, device=device, tile=tile, dc_lambda=dc_lambda,
                            flip_axes=flip_axes, residual_passes=residual_passes,
                            omp_nthreads=omp_nthreads)
    for key in ("units", "b0_strength", "echo_time", "b0_dir"):
        setattr(qsm_wf.inputs.inputnode, key, settings[key])
    entities = {k: v for k, v in run.entities.items() if v is not None}
    sources = _run_sources(run, bids_root)
    chain = _phase_description(settings, unwrapping, bgremoval) if run.is_raw else None

    def sink(node_name, **kwargs):
        return pe.Node(DerivativesSink(out_dir=out_dir, entities=entities, overwrite=overwrite,
                                       **kwargs), name=node_name, run_without_submitting=True)

    ds_chimap = sink("ds_chimap", suffix="Chimap",
                     metadata=_chimap_metadata(settings, sources, chain))
    ds_r2star = None
    if run.is_raw:
        ds_r2star = _connect_phase_chain(workflow, run, settings, qsm_wf, ds_chimap, sink,
                                         sources=sources, chain=chain, unwrapping=unwrapping,
                                         bgremoval=bgremoval)
    else:
        qsm_wf.inputs.inputnode.in_file = run.field
        qsm_wf.inputs.inputnode.mask_file = run.mask
        ds_mask = sink("ds_mask", suffix="mask", desc="brain",
                       metadata={"Type": "Brain", "Sources": sources,
                                 "SpatialReference": sources[0],
                                 "Description": "the brain mask χ is defined on (the given "
                                 "mask, or the field's nonzero voxels), without NaN/Inf voxels"})
        _after_chimap(workflow, ds_chimap, qsm_wf, "outputnode.mask_file", ds_mask)
    _connect_report(workflow, qsm_wf, ds_chimap, out_dir=out_dir, entities=entities,
                    ds_r2star=ds_r2star)
    return workflow


def _pass_after(value, ready):
    """``value`` unchanged; ``ready`` only orders the node after another (a Nipype Function)."""
    return value


def _phase_description(settings: dict, unwrapping: str, bgremoval: str) -> dict:
    """What the phase chain did, for the sidecars."""
    return {
        "EchoTimes": settings["echo_times"],
        "Unwrapping": {"laplacian": "Laplacian (Schofield & Zhu 2003)",
                       "path": "path-following, reliability sorting (Herráez et al. 2002)"
                       }[unwrapping],
        "EchoCombination": ("magnitude-weighted least-squares fit of phase over echo time"
                            if settings["weighted"] else
                            "unweighted least-squares fit of phase over echo time"),
        "BackgroundFieldRemoval": {"vsharp": "V-SHARP (Wu et al. 2012)",
                                   "pdf": "PDF (Liu et al. 2011)"}[bgremoval],
    }


def run_outputs(run: FieldRun, out_dir: str) -> list[str]:
    """Every file :func:`init_single_run_wf` writes for ``run``, the χ map and its sidecar
    first.

    The χ map is stored before the other derivatives (a failed run leaves none of them
    without it), so a run killed in between has its χ map and misses some of these: a rerun
    skips a run only when all of them exist.  Keep in step with the sinks above.
    """
    from ..bids.derivatives import derivative_path, mosaic_paths

    entities = {k: v for k, v in run.entities.items() if v is not None}
    named = [("Chimap", None)] + ([("fieldmap", "totalfield"), ("fieldmap", "localfield"),
                                   ("mask", "brain"), ("mask", "eroded")] if run.is_raw
                                  else [("mask", "brain")])
    if run.fits_r2star:
        named += [("R2starmap", None), ("T2starmap", None)]
    return [derivative_path(out_dir, entities, suffix=suffix, desc=desc, extension=ext)
            for suffix, desc in named for ext in (".nii.gz", ".json")] \
        + mosaic_paths(out_dir, entities, r2star=run.fits_r2star)


def _safe_name(key: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in key)


def run_workflow_name(key: str) -> str:
    """Name of the workflow of the run ``key`` inside the participant workflow."""
    return f"run_{_safe_name(key)}_wf"


def init_participant_wf(runs: Sequence[FieldRun], *, bids_root: str, out_dir: str,
                        work_dir: str | None = None, model: str | None = None,
                        device: str = "auto", tile: int | None = None,
                        dc_lambda: float | str | None = None, omp_nthreads: int = 1,
                        overwrite: bool = False, b0_strength: float | None = None,
                        unwrapping: str = "laplacian", bgremoval: str = "vsharp",
                        flip_axes: list[int] | None = None,
                        residual_passes: int | None = None, name: str = "bids_qsmnet_wf"):
    """One workflow holding a :func:`init_single_run_wf` per run (runs in parallel).

    Raises
    ------
    ValueError
        when ``runs`` is empty (an empty selection never builds an empty workflow).
    """
    if not runs:
        raise ValueError("no runs to process")
    workflow = pe.Workflow(name=name)
    if work_dir:
        workflow.base_dir = os.path.abspath(work_dir)
    workflow.add_nodes([
        init_single_run_wf(run, bids_root=bids_root, out_dir=out_dir, model=model, device=device,
                           tile=tile, dc_lambda=dc_lambda, omp_nthreads=omp_nthreads,
                           overwrite=overwrite, b0_strength=b0_strength,
                           unwrapping=unwrapping, bgremoval=bgremoval, flip_axes=flip_axes,
                           residual_passes=residual_passes, name=run_workflow_name(run.key))
        for run in runs])
    return workflow
