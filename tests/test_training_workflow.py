"""Nipype: ConvertToPPM, ExtractPatches and TrainQSMnet as nodes, and ``init_training_wf``."""

from __future__ import annotations

import json
import math

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SMALL_SHAPE, sphere_phantom, write_nifti
from nipype.pipeline import engine as pe

from bids_qsmnet.interfaces.qsm import ConvertToPPM
from bids_qsmnet.interfaces.training import ExtractPatches, TrainQSMnet
from bids_qsmnet.models.modelfile import load_model
from bids_qsmnet.training.patches import read_store_info
from bids_qsmnet.workflows.training import init_training_wf

torch.set_num_threads(1)

GAMMA_BAR = 42.57747892  # MHz/T


def _data(path):
    return np.asarray(nib.load(path).dataobj, dtype=np.float64)


# --------------------------------------------------------------------------- ConvertToPPM


@pytest.mark.parametrize(
    "units, b0, te, scale",
    [
        ("Hz", 3.0, None, 1 / (GAMMA_BAR * 3.0)),
        ("Hz", 7.0, None, 1 / (GAMMA_BAR * 7.0)),
        ("rad", 3.0, 0.02, 1 / (2 * math.pi * 0.02) / (GAMMA_BAR * 3.0)),
        ("ppm", None, None, 1.0),
    ],
)
def test_convert_to_ppm_node(tmp_path, units, b0, te, scale):
    rng = np.random.default_rng(0)
    data = rng.normal(0, 5.0, (6, 7, 8)).astype(np.float32)
    src = write_nifti(data, tmp_path / "field.nii.gz", voxel_size=(1.0, 1.0, 2.0))
    node = pe.Node(
        ConvertToPPM(in_file=src, units=units, b0_strength=b0, echo_time=te),
        name="to_ppm",
        base_dir=str(tmp_path / "work"),
    )
    out = node.run().outputs.out_file
    np.testing.assert_allclose(_data(out), data.astype(np.float64) * scale, rtol=1e-6)
    assert np.allclose(nib.load(out).affine, nib.load(src).affine)


def test_convert_to_ppm_needs_b0(tmp_path):
    src = write_nifti(np.ones((4, 4, 4)), tmp_path / "field.nii.gz")
    node = pe.Node(
        ConvertToPPM(in_file=src, units="Hz"), name="to_ppm", base_dir=str(tmp_path / "work")
    )
    with pytest.raises(Exception, match="field.nii.gz"):
        node.run()


# --------------------------------------------------------------------------- nodes


def test_extract_patches_node(tmp_path, nifti_triplets, patch_store):
    node = pe.Node(
        ExtractPatches(
            field_files=[t["field"] for t in nifti_triplets],
            label_files=[t["chi"] for t in nifti_triplets],
            mask_files=[t["mask"] for t in nifti_triplets],
            subject_ids=["sub-01_run-1", "sub-02_run-1"],
            patch_size=32,
        ),
        name="extract_patches",
        base_dir=str(tmp_path / "work"),
    )
    res = node.run()
    assert res.outputs.n_patches == 16
    assert res.outputs.out_file.startswith(str(tmp_path / "work" / "extract_patches"))
    info = read_store_info(res.outputs.out_file)
    assert [s["subject"] for s in info.subjects] == ["sub-01_run-1", "sub-02_run-1"]
    assert info.subjects[0]["sources"] == {
        "field": "sub-01_desc-localfield_ppm.nii.gz",
        "label": "sub-01_Chimap.nii.gz",
        "mask": "sub-01_desc-brain_mask.nii.gz",
    }
    # the same volumes as the in-memory store, so the same patches and statistics
    for k, v in patch_store.normalization.items():
        assert res.outputs.normalization[k] == pytest.approx(v, rel=1e-9, abs=1e-15)
    with h5py.File(res.outputs.out_file) as a, h5py.File(patch_store.path) as b:
        np.testing.assert_array_equal(a["input"][:], b["input"][:])
        np.testing.assert_array_equal(a["label"][:], b["label"][:])


def test_extract_patches_geometry_from_affine(tmp_path, phantoms):
    """Voxel size and B0 direction of the store come from the field's affine."""
    theta = np.deg2rad(20.0)
    rot = np.array(
        [[1, 0, 0], [0, np.cos(theta), -np.sin(theta)], [0, np.sin(theta), np.cos(theta)]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([1.0, 1.0, 1.5])
    ph = phantoms[0]
    files = {}
    for name, arr in (("field", ph["field"]), ("chi", ph["chi"])):
        files[name] = str(tmp_path / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(arr, affine), files[name])
    node = pe.Node(
        ExtractPatches(field_files=[files["field"]], label_files=[files["chi"]], patch_size=32),
        name="extract",
        base_dir=str(tmp_path / "w"),
    )
    res = node.run()
    with h5py.File(res.outputs.out_file) as h5:
        np.testing.assert_allclose(h5["voxel_size"][:], [[1.0, 1.0, 1.5]] * res.outputs.n_patches)
        # world z seen from the rotated voxel axes: (0, sin θ, cos θ)
        np.testing.assert_allclose(
            np.abs(h5["b0_dir"][0]), [0, np.sin(theta), np.cos(theta)], atol=1e-9
        )
        # without a mask file the mask is the nonzero field
        m = h5["mask"][:].astype(bool)
        assert np.all(h5["input"][:][~m] == 0)


def test_train_node(tmp_path, small_store):
    ph = sphere_phantom(SMALL_SHAPE, seed=7, n_spheres=4)
    val = [write_nifti(ph[k], tmp_path / f"val_{k}.nii.gz") for k in ("field", "chi", "mask")]
    node = pe.Node(
        TrainQSMnet(
            patches=small_store.path,
            architecture="toy",
            model_name="toy-n",
            batch_size=4,
            epochs=1,
            max_steps=3,
            device="cpu",
            num_threads=1,
            val_fields=[val[0]],
            val_labels=[val[1]],
            val_masks=[val[2]],
            val_every=1,
        ),
        name="train",
        base_dir=str(tmp_path / "work"),
    )
    out = node.run().outputs
    loaded = load_model(out.model_file)
    assert loaded.spec.name == "toy-n" and loaded.spec.training["steps_done"] == 3
    assert loaded.spec.normalization.input_std == pytest.approx(
        small_store.normalization["input_std"]
    )
    summary = json.loads(open(out.summary_file).read())
    assert summary["steps_done"] == 3 and summary["epochs_done"] == 0
    assert out.train_dir.endswith("training")
    rows = open(out.log_file).read().splitlines()
    # header, no training row (log_every is 10 and 3 steps ran), and the validation that
    # ends a run stopped by max_steps
    assert len(rows) == 1 + 3 // 10 + 1
    assert rows[-1].startswith("val,1,3,")


# --------------------------------------------------------------------------- workflow


def _set_inputs(wf, triplets, *, hz_first: bool, tmp_path, validation=None):
    """Training runs = the NIfTI triplets; the first field rewritten in Hz at 3 T if asked."""
    inp = wf.inputs.inputnode
    fields, units, b0s = [], [], []
    for i, t in enumerate(triplets):
        if hz_first and i == 0:
            hz = _data(t["field"]) * GAMMA_BAR * 3.0
            fields.append(write_nifti(hz, tmp_path / "sub-01_localfield_Hz.nii.gz"))
            units.append("Hz")
            b0s.append(3.0)
        else:
            fields.append(t["field"])
            units.append("ppm")
            b0s.append(None)
    inp.field_files = fields
    inp.units = units
    inp.b0_strengths = b0s
    inp.echo_times = [None] * len(triplets)
    inp.mask_files = [triplets[0]["mask"], None]  # the second mask from the nonzero field
    inp.label_files = [t["chi"] for t in triplets]
    inp.subject_ids = [t["subject"] for t in triplets]
    if validation:
        inp.val_field_files = [validation["field"]]
        inp.val_units = ["ppm"]
        inp.val_b0_strengths = [None]
        inp.val_echo_times = [None]
        inp.val_mask_files = [validation["mask"]]
        inp.val_label_files = [validation["chi"]]


def _outputs(result_graph, name):
    node = next(n for n in result_graph.nodes() if n.name == name)
    return node.result.outputs


@pytest.mark.parametrize("with_validation", [True, False])
def test_training_workflow_runs(tmp_path, nifti_triplets, phantoms, patch_store, with_validation):
    # 16 patches in batches of 8: the two steps end the epoch, which is then validated
    wf = init_training_wf(
        architecture="toy",
        patch_size=32,
        epochs=1,
        max_steps=2,
        batch_size=8,
        device="cpu",
        val_every=1,
        with_validation=with_validation,
    )
    names = set(wf.list_node_names())
    assert {"inputnode", "to_ppm", "mask", "extract_patches", "train", "outputnode"} <= names
    assert ({"val_to_ppm", "val_mask"} <= names) is with_validation
    wf.base_dir = str(tmp_path / "work")
    _set_inputs(
        wf,
        nifti_triplets,
        hz_first=with_validation,
        tmp_path=tmp_path,
        validation=nifti_triplets[1] if with_validation else None,
    )
    graph = wf.run(plugin="Linear")

    train = _outputs(graph, "train")
    loaded = load_model(train.model_file)
    assert loaded.spec.name == "toy" and loaded.spec.training["steps_done"] == 2
    x = torch.zeros(1, 1, 16, 16, 16)
    assert loaded.network(x).shape == x.shape
    patches = _outputs(graph, "extract_patches").out_file
    # the Hz field was converted to ppm on its way in: the store equals the all-ppm one
    with h5py.File(patches) as a, h5py.File(patch_store.path) as b:
        assert a["input"].shape == b["input"].shape
        np.testing.assert_allclose(a["input"][:], b["input"][:], rtol=1e-5, atol=1e-9)
        np.testing.assert_array_equal(a["label"][:], b["label"][:])
    if with_validation:
        ppm = _outputs(graph, "to_ppm").out_file[0]
        np.testing.assert_allclose(_data(ppm), phantoms[0]["field"], rtol=1e-5, atol=1e-9)
        png = list((tmp_path / "work").rglob("validation/epoch-001_*.png"))
        assert len(png) == 1
        val_rows = [r for r in open(train.log_file).read().splitlines() if r.startswith("val")]
        assert len(val_rows) == 1
    else:
        assert not list((tmp_path / "work").rglob("validation"))


def test_training_workflow_takes_the_patch_stride():
    """``patch_stride`` reaches the patch extraction as its largest step (unset: a third of
    the patch, the extraction's default)."""
    from nipype.interfaces.base import isdefined

    from bids_qsmnet.workflows.training import init_training_wf

    toy = init_training_wf(architecture="toy", patch_size=32, patch_stride=16)
    assert toy.get_node("extract_patches").inputs.max_stride == 16
    other = init_training_wf(architecture="toy", patch_size=32)
    assert not isdefined(other.get_node("extract_patches").inputs.max_stride)
