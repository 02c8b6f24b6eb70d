"""``init_qsmnet_wf``: local field (ppm, Hz or rad) → χ (ppm) on the input grid."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces.inference import QSMnetInference
from ..interfaces.qsm import BrainMask, ConvertToPPM, FromNetworkFrame, ToNetworkFrame

__all__ = ["init_qsmnet_wf"]


def init_qsmnet_wf(*, model: str | None = None, device: str = "auto", tile: int | None = None,
                   overlap: float | None = None, dc_lambda: float | str | None = None,
                   flip_axes: list[int] | None = None, residual_passes: int | None = None,
                   target_voxel: float = 1.0, omp_nthreads: int = 1,
                   name: str = "qsmnet_wf"):
    """Build the inference workflow of one local field.

    Nodes: ``to_ppm`` (units) → ``mask`` (check or derive the brain mask, apply it) →
    ``to_frame`` (B0 along the third axis at ``target_voxel`` mm) → ``inference``
    (QSMnetInference) → ``from_frame`` (back onto the input grid).

    Parameters
    ----------
    model : model file, folder or shipped name (None: the shipped default model)
    device : ``auto``, ``cpu`` or ``cuda[:N]``; with a GPU the inference node is marked
        ``use_cuda`` so that MultiProc's ``n_gpu_procs`` schedules it
    tile : tile edge (voxels) for bounded-memory inference (None: whole volume)
    overlap : tile overlap fraction (None: the overlap that makes tiles exact)
    dc_lambda : data-consistency prior weight (``"auto"``: chosen per input by the model's
        rule; None: the model's default; 0: off)
    flip_axes : axes of the flip ensemble in the network frame (None: the model's default;
        []: off), see :func:`bids_qsmnet.inference.predict.predict_chi`
    residual_passes : residual-field passes before the refinement (None: the model's
        default), see :func:`bids_qsmnet.inference.refine.residual_passes`
    target_voxel : the network's voxel size, mm (should be the model's)
    omp_nthreads : CPU threads of the inference node
    name : workflow name

    Inputs
    ------
    in_file : local field NIfTI
    units : ``ppm``, ``Hz`` or ``rad``
    b0_strength : tesla (Hz, rad) or None
    echo_time : seconds (rad) or None
    mask_file : brain mask or None (default: nonzero voxels of the field)
    b0_dir : B0 direction in voxel space, or None (from the affine)

    Outputs
    -------
    chi_file : χ map, ppm, on the input grid
    mask_file : brain mask used (input grid)
    field_ppm : masked local field, ppm (input grid)
    b0_dir : B0 direction used (voxel space)
    frame_file : JSON description of the network frame (identity when nothing was resampled)
    model_info : model name, sha256, path, device, refinement
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(
        fields=["in_file", "units", "b0_strength", "echo_time", "mask_file", "b0_dir"]),
        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(
        fields=["chi_file", "mask_file", "field_ppm", "b0_dir", "frame_file", "model_info"]),
        name="outputnode")

    to_ppm = pe.Node(ConvertToPPM(), name="to_ppm")
    mask = pe.Node(BrainMask(), name="mask")
    to_frame = pe.Node(ToNetworkFrame(target_voxel=target_voxel), name="to_frame")
    inference = pe.Node(
        QSMnetInference(device=device, num_threads=omp_nthreads,
                        use_cuda=device.startswith("cuda")),
        name="inference", n_procs=omp_nthreads)
    if model is not None:
        inference.inputs.model = str(model)
    if tile:
        inference.inputs.tile = int(tile)
    if overlap is not None:
        inference.inputs.overlap = float(overlap)
    if dc_lambda is not None:
        inference.inputs.dc_lambda = dc_lambda if dc_lambda == "auto" else float(dc_lambda)
    if flip_axes is not None:
        inference.inputs.flip_axes = [int(a) for a in flip_axes]
    if residual_passes is not None:
        inference.inputs.residual_passes = int(residual_passes)
    from_frame = pe.Node(FromNetworkFrame(), name="from_frame")

    workflow.connect([
        (inputnode, to_ppm, [("in_file", "in_file"), ("units", "units"),
                             ("b0_strength", "b0_strength"), ("echo_time", "echo_time")]),
        (inputnode, mask, [("mask_file", "mask_file")]),
        (to_ppm, mask, [("out_file", "in_file")]),
        (inputnode, to_frame, [("b0_dir", "b0_dir")]),
        (mask, to_frame, [("out_file", "in_file"), ("out_mask", "mask_file")]),
        (to_frame, inference, [("out_file", "in_file"), ("out_mask", "mask_file")]),
        (inference, from_frame, [("out_file", "in_file")]),
        (to_frame, from_frame, [("frame_file", "frame_file")]),
        (mask, from_frame, [("out_file", "reference"), ("out_mask", "mask_file")]),
        (from_frame, outputnode, [("out_file", "chi_file")]),
        (mask, outputnode, [("out_mask", "mask_file"), ("out_file", "field_ppm")]),
        (to_frame, outputnode, [("b0_dir", "b0_dir"), ("frame_file", "frame_file")]),
        (inference, outputnode, [("model_info", "model_info")]),
    ])
    return workflow
