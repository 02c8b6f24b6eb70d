"""The participant-level workflow: one ``init_qsmnet_wf`` per local field, plus derivatives."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..__about__ import __version__
from ..bids.derivatives import bids_uri
from ..bids.discovery import FieldRun
from ..interfaces.derivatives import DerivativesSink, ReportMosaics
from .qsmnet import init_qsmnet_wf

__all__ = ["init_participant_wf", "init_single_run_wf", "run_settings"]


class SettingsError(ValueError):
    """A run cannot be processed with the metadata it has (names the file)."""


def run_settings(run: FieldRun, *, b0_strength: float | None = None) -> dict:
    """Units, field strength, echo time and B0 direction of a run, from its sidecar.

    ``b0_strength`` (``--b0-strength``) replaces a missing ``MagneticFieldStrength``.  A sidecar
    ``B0_dir`` (as qsm-forward writes it) wins over the affine.
    """
    meta = run.metadata
    units = run.units
    if not units:
        raise SettingsError(f"{run.field}: the sidecar has no 'Units' (ppm, Hz or rad)")
    from ..physics.units import normalise_units

    try:
        units = normalise_units(units)
    except ValueError as exc:
        raise SettingsError(f"{run.field}: {exc}") from None
    b0 = meta.get("MagneticFieldStrength", b0_strength)
    te = meta.get("EchoTime")
    if units in ("Hz", "rad") and b0 is None:
        raise SettingsError(f"{run.field}: Units '{units}' needs MagneticFieldStrength (tesla) "
                            "in the sidecar; give it with --b0-strength")
    if units == "rad" and te is None:
        raise SettingsError(f"{run.field}: Units 'rad' needs EchoTime (seconds) in the sidecar")
    if isinstance(te, list):
        raise SettingsError(f"{run.field}: EchoTime is a list; a local field in rad needs the "
                            "single effective echo time")
    b0_dir = meta.get("B0_dir")
    if b0_dir is not None:
        b0_dir = np.asarray(b0_dir, dtype=float).ravel()
        if b0_dir.shape != (3,) or not np.all(np.isfinite(b0_dir)) or not np.any(b0_dir):
            raise SettingsError(f"{run.field}: sidecar B0_dir must be three numbers, not zero")
        b0_dir = [float(v) for v in b0_dir / np.linalg.norm(b0_dir)]
    return {"units": units, "b0_strength": float(b0) if b0 is not None else None,
            "echo_time": float(te) if te is not None else None, "b0_dir": b0_dir,
            "b0_dir_source": "sidecar B0_dir" if b0_dir is not None else "affine"}


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
        "ResampledToNetworkFrame": resampled,
        "Device": model_info["device"],
    }


def init_single_run_wf(run: FieldRun, *, bids_root: str, out_dir: str, model: str | None,
                       device: str, tile: int | None, dc_lambda: float | None,
                       omp_nthreads: int, overwrite: bool, b0_strength: float | None,
                       name: str):
    """Inference of one run and its derivatives (χ map + sidecar, mask, report figures)."""
    settings = run_settings(run, b0_strength=b0_strength)
    workflow = pe.Workflow(name=name)
    qsm_wf = init_qsmnet_wf(model=model, device=device, tile=tile, dc_lambda=dc_lambda,
                            omp_nthreads=omp_nthreads)
    for key in ("units", "b0_strength", "echo_time", "b0_dir"):
        setattr(qsm_wf.inputs.inputnode, key, settings[key])
    qsm_wf.inputs.inputnode.in_file = run.field
    qsm_wf.inputs.inputnode.mask_file = run.mask

    sources = [bids_uri(run.field, bids_root)] + ([bids_uri(run.mask, bids_root)]
                                                  if run.mask else [])
    metadata = {
        "Units": "ppm", "SkullStripped": True, "Sources": sources,
        "InputUnits": settings["units"], "B0DirectionSource": settings["b0_dir_source"],
        "SoftwareName": "bids_qsmnet", "SoftwareVersion": __version__,
        "Description": "Magnetic susceptibility (χ, ppm) by a QSMnet-family network",
    }
    if settings["b0_strength"] is not None:
        metadata["MagneticFieldStrength"] = settings["b0_strength"]
    entities = {k: v for k, v in run.entities.items() if v is not None}
    extras = pe.Node(niu.Function(function=_sidecar_extras,
                                  input_names=["model_info", "b0_dir", "frame_file"],
                                  output_names=["extras"]), name="sidecar_extras")
    ds_chimap = pe.Node(DerivativesSink(out_dir=out_dir, entities=entities, suffix="Chimap",
                                        metadata=metadata, overwrite=overwrite),
                        name="ds_chimap", run_without_submitting=True)
    ds_mask = pe.Node(DerivativesSink(out_dir=out_dir, entities=entities, suffix="mask",
                                      desc="brain", overwrite=overwrite,
                                      metadata={"Type": "Brain", "Sources": sources}),
                      name="ds_mask", run_without_submitting=True)
    ds_report = pe.Node(ReportMosaics(out_dir=out_dir, entities=entities),
                        name="ds_report_chimap")
    workflow.connect([
        (qsm_wf, extras, [("outputnode.model_info", "model_info"),
                          ("outputnode.b0_dir", "b0_dir"),
                          ("outputnode.frame_file", "frame_file")]),
        (qsm_wf, ds_chimap, [("outputnode.chi_file", "in_file")]),
        (extras, ds_chimap, [("extras", "extra_metadata")]),
        (qsm_wf, ds_mask, [("outputnode.mask_file", "in_file")]),
        (qsm_wf, ds_report, [("outputnode.field_ppm", "field_file"),
                             ("outputnode.chi_file", "chi_file"),
                             ("outputnode.mask_file", "mask_file")]),
    ])
    return workflow


def _safe_name(key: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in key)


def init_participant_wf(runs: Sequence[FieldRun], *, bids_root: str, out_dir: str,
                        work_dir: str | None = None, model: str | None = None,
                        device: str = "auto", tile: int | None = None,
                        dc_lambda: float | None = None, omp_nthreads: int = 1,
                        overwrite: bool = False, b0_strength: float | None = None,
                        name: str = "bids_qsmnet_wf"):
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
                           name=f"run_{_safe_name(run.key)}_wf")
        for run in runs])
    return workflow
