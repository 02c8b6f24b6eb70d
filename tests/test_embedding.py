"""Using bids_qsmnet inside one's own Nipype workflow: ``QSMnetInference`` after an upstream
node, and ``init_qsmnet_wf`` as a sub-workflow between upstream and downstream nodes."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
from _bidsapp_fixtures import make_model_file
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from bids_qsmnet.interfaces.inference import QSMnetInference
from bids_qsmnet.physics.orientation import b0_dir_from_affine
from bids_qsmnet.workflows.qsmnet import init_qsmnet_wf

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model_file(tmp_path_factory.mktemp("model") / "lite.safetensors", seed=3)


def make_sphere_field(tilt_deg, units):
    """A user's upstream step: the local field (ppm or Hz at 3 T) of a 0.1 ppm sphere, 1 mm,
    acquired ``tilt_deg`` oblique about x, written in the node's folder."""
    import os

    import nibabel as nib
    import numpy as np

    from bids_qsmnet.physics.dipole import forward_field

    n = 32
    t = np.deg2rad(tilt_deg)
    rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = rot, [-16.0, -16.0, -16.0]
    b0 = rot.T @ [0.0, 0.0, 1.0]  # scanner z in this grid's voxel space
    g = np.meshgrid(*[np.arange(n) - (n - 1) / 2] * 3, indexing="ij")
    r2 = sum(x**2 for x in g)
    brain = r2 <= 12.0**2
    chi = np.where(r2 <= 5.0**2, 0.1, 0.0)
    field = forward_field(chi, (1.0, 1.0, 1.0), b0, pad=16) * brain
    if units == "Hz":
        field = field * 42.57747892 * 3.0
    out_field = os.path.abspath(f"field_{units}.nii.gz")
    out_mask = os.path.abspath("brain_mask.nii.gz")
    nib.save(nib.Nifti1Image(field.astype(np.float32), affine), out_field)
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), out_mask)
    return out_field, out_mask


def chi_summary(chi_file, mask_file, b0_dir, field_ppm):
    """A user's downstream step: mean χ in the mask and the grid (and what it was given)."""
    import nibabel as nib
    import numpy as np

    chi, mask = nib.load(chi_file), nib.load(mask_file).get_fdata() > 0
    return (
        float(np.mean(chi.get_fdata()[mask])),
        list(chi.shape),
        {"chi_file": chi_file, "mask_file": mask_file, "b0_dir": b0_dir, "field_ppm": field_ppm},
    )


def _node(graph, name):
    return next(n for n in graph.nodes() if n.fullname.endswith(name))


def test_inference_node_after_an_upstream_node(tmp_path, model):
    wf = pe.Workflow(name="my_qsm", base_dir=str(tmp_path))
    source = pe.Node(
        niu.Function(
            function=make_sphere_field,
            input_names=["tilt_deg", "units"],
            output_names=["field", "mask"],
        ),
        name="source",
    )
    source.inputs.tilt_deg, source.inputs.units = 0.0, "ppm"
    qsm = pe.Node(QSMnetInference(model=model, device="cpu", num_threads=1), name="qsmnet")
    wf.connect([(source, qsm, [("field", "in_file"), ("mask", "mask_file")])])
    graph = wf.run(plugin="Linear")
    out = _node(graph, "qsmnet").result.outputs
    chi = nib.load(out.out_file)
    src = nib.load(_node(graph, "source").result.outputs.field)
    assert chi.shape == src.shape == (32, 32, 32)
    np.testing.assert_allclose(chi.affine, src.affine, atol=1e-6)
    data = chi.get_fdata()
    mask = nib.load(_node(graph, "source").result.outputs.mask).get_fdata() > 0
    assert np.all(np.isfinite(data)) and np.all(data[~mask] == 0) and np.any(data[mask] != 0)
    assert out.model_name == "test-lite" and len(out.model_sha256) == 64


def test_qsmnet_wf_as_a_subworkflow(tmp_path, model):
    """Hz field of a 20°-oblique acquisition → init_qsmnet_wf (units, derived mask, network
    frame from the affine) → a downstream node."""
    wf = pe.Workflow(name="my_pipeline", base_dir=str(tmp_path))
    source = pe.Node(
        niu.Function(
            function=make_sphere_field,
            input_names=["tilt_deg", "units"],
            output_names=["field", "mask"],
        ),
        name="source",
    )
    source.inputs.tilt_deg, source.inputs.units = 20.0, "Hz"
    qsm_wf = init_qsmnet_wf(model=model, device="cpu", omp_nthreads=1)
    inp = qsm_wf.inputs.inputnode
    inp.units, inp.b0_strength, inp.echo_time, inp.mask_file, inp.b0_dir = (
        "Hz",
        3.0,
        None,
        None,
        None,
    )
    summary = pe.Node(
        niu.Function(
            function=chi_summary,
            input_names=["chi_file", "mask_file", "b0_dir", "field_ppm"],
            output_names=["mean_chi", "shape", "received"],
        ),
        name="summary",
    )
    wf.connect(
        [
            (source, qsm_wf, [("field", "inputnode.in_file")]),
            (
                qsm_wf,
                summary,
                [
                    ("outputnode.chi_file", "chi_file"),
                    ("outputnode.mask_file", "mask_file"),
                    ("outputnode.b0_dir", "b0_dir"),
                    ("outputnode.field_ppm", "field_ppm"),
                ],
            ),
        ]
    )
    graph = wf.run(plugin="Linear")
    field_file = _node(graph, "source").result.outputs.field
    src = nib.load(field_file)
    summary_out = _node(graph, "summary").result.outputs
    out = summary_out.received  # the sub-workflow's outputnode, as the downstream node saw it
    chi = nib.load(out["chi_file"])
    assert chi.shape == src.shape and summary_out.shape == [32, 32, 32]
    np.testing.assert_allclose(chi.affine, src.affine, atol=1e-6)
    assert np.isfinite(summary_out.mean_chi)
    np.testing.assert_allclose(out["b0_dir"], b0_dir_from_affine(src.affine), atol=1e-6)
    assert abs(out["b0_dir"][2]) == pytest.approx(np.cos(np.deg2rad(20.0)))
    # the derived mask is the nonzero field; the frame was resampled (oblique)
    np.testing.assert_array_equal(nib.load(out["mask_file"]).get_fdata() > 0, src.get_fdata() != 0)
    frame = nib.load(_node(graph, "qsmnet_wf.to_frame").result.outputs.out_file)
    assert frame.shape != src.shape
    np.testing.assert_allclose(b0_dir_from_affine(frame.affine), [0, 0, 1], atol=1e-9)
    # the field reached the network in ppm: the masked ppm field equals Hz / (γ̄ · 3 T)
    ppm = nib.load(out["field_ppm"]).get_fdata()
    np.testing.assert_allclose(ppm, src.get_fdata() / (42.57747892 * 3.0), rtol=1e-5, atol=1e-9)
    data = chi.get_fdata()
    assert np.all(data[src.get_fdata() == 0] == 0) and np.any(data != 0)
