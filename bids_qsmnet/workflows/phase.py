"""``init_phase_wf``: raw (multi-)echo GRE phase and magnitude → local field (ppm).

The chain replaces the MATLAB steps of the original QSMnet pipeline (STI Suite's Laplacian
unwrapping and V-SHARP, MEDI's BET) with :mod:`bids_qsmnet.phase`:

``stack`` (echoes → radians, one grid) → ``brain_mask`` (given, or found in the magnitude) →
``total_field`` (unwrapping + magnitude-weighted fit over echoes, Hz) → ``local_field``
(background-field removal, ppm, eroded mask); with ``relaxometry`` also ``r2star`` (R2* and
T2* maps fitted to the magnitude echoes inside the brain mask).
"""

from __future__ import annotations

from collections.abc import Sequence

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces.phase import (
    EchoBrainMask,
    FitR2Star,
    FitTotalField,
    RemoveBackground,
    StackEchoes,
)

__all__ = ["init_phase_wf"]


def init_phase_wf(*, echo_times: Sequence[float], b0_strength: float,
                  unwrap: str = "laplacian", background: str = "vsharp",
                  relaxometry: bool = False, name: str = "phase_wf"):
    """Build the phase-preprocessing workflow of one GRE run.

    Parameters
    ----------
    echo_times : seconds, one per echo, increasing
    b0_strength : main field, tesla
    unwrap : ``laplacian`` (default; robust to noise, not congruent) or ``path`` (congruent
        region-growing unwrapping)
    background : ``vsharp`` (default) or ``pdf``
    relaxometry : also fit R2* and T2* maps to the magnitude echoes (needs two or more echoes
        with magnitudes)
    name : workflow name

    Inputs
    ------
    phase_files : phase NIfTI per echo (radians or scanner integers), echo order
    magnitude_files : magnitude NIfTI per echo, or an empty list
    mask_file : given brain mask, or None (found in the magnitude)
    b0_dir : B0 direction in voxel space, or None (from the affine; PDF only)

    Outputs
    -------
    total_field : total field, Hz, zero outside the brain mask
    local_field : local field, ppm, zero outside ``mask_file``
    mask_file : mask of the local field (eroded by V-SHARP)
    brain_mask : brain mask before background removal
    r2star : R2* map, 1/s, zero outside the brain mask (``relaxometry`` only)
    t2star : T2* map, seconds, zero outside the brain mask (``relaxometry`` only)
    """
    if relaxometry and len(echo_times) < 2:
        raise ValueError(f"R2* needs two or more echoes, got {len(echo_times)}")
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(
        fields=["phase_files", "magnitude_files", "mask_file", "b0_dir"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(
        fields=["total_field", "local_field", "mask_file", "brain_mask"]
        + (["r2star", "t2star"] if relaxometry else [])), name="outputnode")

    stack = pe.Node(StackEchoes(), name="stack")
    brain_mask = pe.Node(EchoBrainMask(), name="brain_mask")
    total_field = pe.Node(FitTotalField(echo_times=[float(t) for t in echo_times],
                                        unwrap=unwrap), name="total_field")
    local_field = pe.Node(RemoveBackground(b0_strength=float(b0_strength), method=background),
                          name="local_field")

    workflow.connect([
        (inputnode, stack, [("phase_files", "phase_files"),
                            ("magnitude_files", "magnitude_files")]),
        (inputnode, brain_mask, [("mask_file", "mask_file")]),
        (stack, brain_mask, [("phase", "phase_file"), ("magnitude", "magnitude_file")]),
        (stack, total_field, [("phase", "phase_file"), ("magnitude", "magnitude_file")]),
        (brain_mask, total_field, [("out_mask", "mask_file")]),
        (inputnode, local_field, [("b0_dir", "b0_dir")]),
        (total_field, local_field, [("out_file", "in_file")]),
        (brain_mask, local_field, [("out_mask", "mask_file")]),
        (total_field, outputnode, [("out_file", "total_field")]),
        (local_field, outputnode, [("out_file", "local_field"), ("out_mask", "mask_file")]),
        (brain_mask, outputnode, [("out_mask", "brain_mask")]),
    ])
    if relaxometry:
        r2star = pe.Node(FitR2Star(echo_times=[float(t) for t in echo_times]), name="r2star")
        workflow.connect([
            (stack, r2star, [("magnitude", "magnitude_file")]),
            (brain_mask, r2star, [("out_mask", "mask_file")]),
            (r2star, outputnode, [("r2star_file", "r2star"), ("t2star_file", "t2star")]),
        ])
    return workflow
