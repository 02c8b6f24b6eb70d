"""Participant level: the QSM chain's helpers and graph, and whole BIDS-App runs on a copy of
the shipped example dataset with a small random model.

The whole runs share one module fixture (three command-line runs, about 25 s together on two
cores): the first with sub-02's sidecar lacking MagneticFieldStrength (sub-02 fails, sub-01
completes, exit 1), the second with ``--b0-strength 3`` (sub-01 skipped, sub-02 done, exit 0),
the third without ``--overwrite`` (everything skipped, exit 0).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _bidsapp_fixtures import GAMMA_BAR_MHZ_PER_T, make_model_file, write_nifti

from bids_qsmnet.bids.discovery import build_layout, collect_runs
from bids_qsmnet.io.fields import convert_to_ppm, prepare_mask
from bids_qsmnet.io.nifti import InputError
from bids_qsmnet.workflows.base import init_participant_wf
from bids_qsmnet.workflows.qsmnet import init_qsmnet_wf

os.environ.setdefault("OMP_NUM_THREADS", "1")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ds-synthetic"
CONSOLE_SCRIPT = Path(sys.executable).with_name("bids_qsmnet")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model_file(tmp_path_factory.mktemp("model") / "lite.safetensors", seed=2)


# --------------------------------------------------------------------------- helpers


def test_convert_to_ppm_hz_and_rad(tmp_path):
    data = np.linspace(-20.0, 20.0, 64).reshape(4, 4, 4)
    f = write_nifti(tmp_path / "f.nii.gz", data)
    hz = nib.load(convert_to_ppm(f, "Hz", b0=3.0, newpath=str(tmp_path))).get_fdata()
    np.testing.assert_allclose(hz, data / (GAMMA_BAR_MHZ_PER_T * 3.0), rtol=1e-6)
    rad = nib.load(convert_to_ppm(f, "rad", b0=7.0, te=0.02, newpath=str(tmp_path)))
    np.testing.assert_allclose(
        rad.get_fdata(), data / (2 * np.pi * 0.02) / (GAMMA_BAR_MHZ_PER_T * 7.0), rtol=1e-6
    )
    with pytest.raises(InputError, match="f.nii.gz"):
        convert_to_ppm(f, "Hz", newpath=str(tmp_path))  # no field strength
    with pytest.raises(InputError, match="zero everywhere"):
        convert_to_ppm(
            write_nifti(tmp_path / "z.nii.gz", np.zeros((4, 4, 4))), "ppm", newpath=str(tmp_path)
        )


def test_brain_mask_checks_and_derives(tmp_path):
    field = np.zeros((6, 6, 6))
    field[1:5, 1:5, 1:5] = 0.01
    field[2, 2, 2] = 0.0  # a zero inside the brain stays inside a given mask
    f = write_nifti(tmp_path / "f.nii.gz", field)
    given = np.zeros((6, 6, 6), np.uint8)
    given[1:4, 1:5, 1:5] = 1
    m = write_nifti(tmp_path / "m.nii.gz", given, dtype=np.uint8)
    masked, mask = prepare_mask(f, m, newpath=str(tmp_path))
    np.testing.assert_array_equal(nib.load(mask).get_fdata(), given)
    np.testing.assert_allclose(nib.load(masked).get_fdata(), field * given, atol=1e-9)
    _, derived = prepare_mask(f, None, newpath=str(tmp_path))
    np.testing.assert_array_equal(nib.load(derived).get_fdata() > 0, field != 0)
    bad = write_nifti(tmp_path / "bad.nii.gz", np.ones((6, 6, 5)), dtype=np.uint8)
    with pytest.raises(InputError, match=r"bad.nii.gz: mask shape \(6, 6, 5\)"):
        prepare_mask(f, bad, newpath=str(tmp_path))
    shifted = write_nifti(
        tmp_path / "shift.nii.gz", given, np.diag([1.0, 1.0, 2.0, 1.0]), dtype=np.uint8
    )
    with pytest.raises(InputError, match="affine differs"):
        prepare_mask(f, shifted, newpath=str(tmp_path))


# --------------------------------------------------------------------------- graphs


def _edges(wf):
    return {(u.name, v.name) for u, v in wf._graph.edges()}


def test_qsmnet_wf_graph():
    wf = init_qsmnet_wf(model="/models/m.safetensors", device="cpu", tile=64, dc_lambda=0.0)
    assert wf.name == "qsmnet_wf"
    assert set(wf.list_node_names()) == {
        "inputnode",
        "to_ppm",
        "mask",
        "to_frame",
        "inference",
        "from_frame",
        "outputnode",
    }
    chain = [
        ("inputnode", "to_ppm"),
        ("to_ppm", "mask"),
        ("mask", "to_frame"),
        ("to_frame", "inference"),
        ("inference", "from_frame"),
        ("from_frame", "outputnode"),
    ]
    assert set(chain) <= _edges(wf)
    inference = wf.get_node("inference")
    assert inference.inputs.model == "/models/m.safetensors"
    assert (inference.inputs.tile, inference.inputs.dc_lambda) == (64, 0.0)
    assert inference.inputs.use_cuda is False
    assert init_qsmnet_wf(device="cuda").get_node("inference").inputs.use_cuda is True


def test_participant_wf_one_subworkflow_per_run(tmp_path):
    runs = collect_runs(build_layout(EXAMPLE), "01") + collect_runs(build_layout(EXAMPLE), "02")
    wf = init_participant_wf(
        runs,
        bids_root=str(EXAMPLE),
        out_dir=str(tmp_path / "out"),
        model="/models/m.safetensors",
        b0_strength=None,
        flip_axes=[0, 1],
        residual_passes=2,
    )
    names = wf.list_node_names()
    for sub in ("sub_01", "sub_02"):
        for node in ("qsmnet_wf.inference", "ds_chimap", "ds_mask", "ds_report_chimap"):
            assert f"run_{sub}_wf.{node}" in names
    inputs = wf.get_node("run_sub_02_wf").get_node("qsmnet_wf").get_node("inputnode").inputs
    assert (inputs.units, inputs.b0_strength) == ("Hz", 3.0)
    assert inputs.in_file == runs[1].field and inputs.mask_file == runs[1].mask
    for sub in ("sub_01", "sub_02"):  # the inference options reach every run's node
        node = wf.get_node(f"run_{sub}_wf").get_node("qsmnet_wf").get_node("inference")
        assert (node.inputs.flip_axes, node.inputs.residual_passes) == ([0, 1], 2)
    assert not (tmp_path / "out").exists()  # building writes nothing
    with pytest.raises(ValueError, match="no runs"):
        init_participant_wf([], bids_root=str(EXAMPLE), out_dir=str(tmp_path / "out"))


def test_absent_participant_exits_1_with_one_line(tmp_path, capsys):
    from bids_qsmnet.cli.run import main

    code = main(
        [
            str(EXAMPLE),
            str(tmp_path / "out"),
            "participant",
            "--participant-label",
            "09",
            "-w",
            str(tmp_path / "work"),
        ]
    )
    assert code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bids_qsmnet:")]
    assert len(err) == 1
    assert "sub-09" in err[0] and "available: sub-01, sub-02, sub-03" in err[0]
    # only the hidden, empty lock file of the output folder (kept on purpose: see
    # cli.run._output_lock) may exist after a refused run
    out = tmp_path / "out"
    left = [p for p in out.rglob("*") if p.is_file()]
    assert all(
        p.relative_to(out).parts[0].startswith(".bids_qsmnet") and p.stat().st_size == 0
        for p in left
    )


# --------------------------------------------------------------------------- whole runs


def _cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [str(CONSOLE_SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=400, env=env
    )


def _digest(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def _outputs(out):
    return {str(p.relative_to(out)): _digest(p) for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def example_runs(tmp_path_factory, model):
    base = tmp_path_factory.mktemp("e2e")
    ds = base / "ds-synthetic"
    shutil.copytree(EXAMPLE, ds)
    sidecar1 = ds / "sub-01/anat/sub-01_localfield.json"
    meta1 = json.loads(sidecar1.read_text())
    sidecar1.write_text(json.dumps({**meta1, "B0_dir": [0, 0, 1]}))  # wins over the affine
    sidecar2 = ds / "sub-02/anat/sub-02_localfield.json"
    meta2 = json.loads(sidecar2.read_text())
    del meta2["MagneticFieldStrength"]
    sidecar2.write_text(json.dumps(meta2))
    out = base / "derivatives" / "bids_qsmnet"
    common = [
        ds,
        out,
        "participant",
        "--model",
        model,
        "-w",
        base / "work",
        "--plugin",
        "Linear",
        "--nprocs",
        "1",
        "--omp-nthreads",
        "1",
        "--device",
        "cpu",
    ]
    first = _cli(*common)
    after_first = _outputs(out)
    report_after_first = (out / "sub-02.html").read_text()
    second = _cli(*common, "--b0-strength", "3")
    after_second = _outputs(out)
    third = _cli(*common, "--b0-strength", "3")
    return {
        "ds": ds,
        "out": out,
        "model": model,
        "runs": (first, second, third),
        "after": (after_first, after_second, _outputs(out)),
        "report_after_first": report_after_first,
    }


def test_bad_subject_reported_other_completes(example_runs):
    first, _, _ = example_runs["runs"]
    assert first.returncode == 3, first.stderr[-3000:]  # some subjects failed, others done
    last = first.stderr.strip().splitlines()[-1]
    assert last.startswith("bids_qsmnet: 1 problem(s) in 1 of 3 subject(s); first: ")
    assert "sub-02_localfield.nii.gz" in last and "MagneticFieldStrength" in last
    assert "--b0-strength" in last
    files = example_runs["after"][0]
    assert "sub-01/anat/sub-01_Chimap.nii.gz" in files
    assert not any(f.startswith("sub-02/") for f in files)
    assert "dataset_description.json" in files and "sub-02.html" in files  # `finally:`
    assert "MagneticFieldStrength" in example_runs["report_after_first"]


def test_second_fixed_run_completes_and_skips_done_work(example_runs):
    _, second, _ = example_runs["runs"]
    assert second.returncode == 0, second.stderr[-3000:]
    assert re.search(r"sub-01: sub-01/anat/sub-01_Chimap.nii.gz exists, skipped", second.stderr)
    before, after = example_runs["after"][:2]
    assert after["sub-01/anat/sub-01_Chimap.nii.gz"] == before["sub-01/anat/sub-01_Chimap.nii.gz"]
    assert "sub-02/anat/sub-02_Chimap.nii.gz" in after


def test_rerun_without_overwrite_skips_everything(example_runs):
    _, _, third = example_runs["runs"]
    assert third.returncode == 0, third.stderr[-3000:]
    for sub in ("01", "02", "03"):
        assert f"sub-{sub}/anat/sub-{sub}_Chimap.nii.gz exists, skipped" in third.stderr
    second, after = example_runs["after"][1:]
    changed = {k for k in after if after[k] != second.get(k)}
    # nothing was processed: no file changes, not even the reports and the description
    assert changed == set(), changed
    assert {k for k in after if k.endswith((".nii.gz", ".png"))} == {
        k for k in second if k.endswith((".nii.gz", ".png"))
    }


@pytest.mark.parametrize("sub", ["01", "02"])
def test_chimap_on_the_input_grid(example_runs, sub):
    ds, out = example_runs["ds"], example_runs["out"]
    src = nib.load(ds / f"sub-{sub}/anat/sub-{sub}_localfield.nii.gz")
    chi = nib.load(out / f"sub-{sub}/anat/sub-{sub}_Chimap.nii.gz")
    assert chi.shape == src.shape
    np.testing.assert_allclose(chi.affine, src.affine, atol=1e-6)
    assert chi.get_data_dtype() == np.float32
    for code in ("qform_code", "sform_code"):
        assert int(chi.header[code]) == int(src.header[code]) == 1
    np.testing.assert_allclose(chi.header.get_sform(), src.header.get_sform(), atol=1e-6)
    mask = nib.load(ds / f"sub-{sub}/anat/sub-{sub}_desc-brain_mask.nii.gz").get_fdata() > 0
    data = chi.get_fdata()
    assert np.all(np.isfinite(data)) and np.all(data[~mask] == 0)
    assert np.count_nonzero(data[mask]) > 0.99 * mask.sum()
    out_mask = nib.load(out / f"sub-{sub}/anat/sub-{sub}_desc-brain_mask.nii.gz")
    np.testing.assert_array_equal(out_mask.get_fdata() > 0, mask)


def test_hz_input_converted_before_the_network(example_runs):
    """sub-02's χ equals the model applied to its field divided by γ̄·B0 (3 T)."""
    from bids_qsmnet.inference.predict import predict_chi
    from bids_qsmnet.models.modelfile import load_model

    ds, out = example_runs["ds"], example_runs["out"]
    hz = nib.load(ds / "sub-02/anat/sub-02_localfield.nii.gz").get_fdata()
    mask = nib.load(ds / "sub-02/anat/sub-02_desc-brain_mask.nii.gz").get_fdata() > 0
    ppm = (hz / (GAMMA_BAR_MHZ_PER_T * 3.0)).astype(np.float32)
    expected = predict_chi(load_model(example_runs["model"]), np.where(mask, ppm, 0), mask)
    got = nib.load(out / "sub-02/anat/sub-02_Chimap.nii.gz").get_fdata()
    assert np.abs(got - expected).max() < 1e-5 * max(1.0, np.abs(expected).max())


@pytest.mark.parametrize("sub", ["01", "02"])
def test_chimap_sidecar(example_runs, sub):
    out = example_runs["out"]
    meta = json.loads((out / f"sub-{sub}/anat/sub-{sub}_Chimap.json").read_text())
    assert meta["Units"] == "ppm" and meta["SkullStripped"] is True
    assert meta["Sources"] == [
        f"bids:raw:sub-{sub}/anat/sub-{sub}_localfield.nii.gz",
        f"bids:raw:sub-{sub}/anat/sub-{sub}_desc-brain_mask.nii.gz",
    ]
    assert meta["Model"]["Name"] == "test-lite"
    assert meta["Model"]["SHA256"] == _digest(example_runs["model"])
    assert meta["B0Direction"] == [0.0, 0.0, 1.0] and meta["ObliquityDeg"] == 0.0
    assert meta["B0DirectionSource"] == ("sidecar B0_dir" if sub == "01" else "affine")
    assert meta["InputUnits"] == ("ppm" if sub == "01" else "Hz")
    assert meta["MagneticFieldStrength"] == 3.0
    assert meta["ResampledToNetworkFrame"].startswith("no")
    assert meta["ResidualPasses"] == 0 and meta["FlipEnsembleAxes"] == []
    mask_meta = json.loads((out / f"sub-{sub}/anat/sub-{sub}_desc-brain_mask.json").read_text())
    assert mask_meta["Type"] == "Brain" and mask_meta["Sources"] == meta["Sources"]


def test_reports_citations_and_description(example_runs):
    out = example_runs["out"]
    for sub in ("01", "02"):
        page = (out / f"sub-{sub}.html").read_text()
        images = re.findall(r"<img src='([^']+)'", page)
        assert sorted(images) == [
            f"sub-{sub}/figures/sub-{sub}_desc-chimap_mosaic.png",
            f"sub-{sub}/figures/sub-{sub}_desc-field_mosaic.png",
        ]
        for rel in images:
            png = out / rel
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "doi:10.1002/mrm.30006" in page and "Errors" not in page
    assert "doi:10.1002/mrm.30006" in (out / "logs" / "CITATION.md").read_text()
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"][0]["Name"] in out.name
    assert desc["SourceDatasets"] == [{"URL": f"file://{example_runs['ds']}"}]
    assert (out / ".bids_qsmnet.lock").stat().st_size == 0  # hidden advisory lock, kept
    assert not list(out.rglob("*.tmp*"))


def test_output_against_the_bids_validator(example_runs):
    """``bids_validator.BIDSValidator`` judges file names by the raw-data rules: it accepts
    the χ maps (``Chimap`` is a BIDS anat suffix) and the R2*/T2* maps, their sidecars, the
    description and ``logs/`` (a folder it does not look into), and rejects the
    derivative-only names it does not know: the ``desc-brain`` mask in ``anat``, the HTML
    reports and their figures."""
    from bids_validator import BIDSValidator

    validator = BIDSValidator()
    # hidden files (the advisory lock) are ignored by BIDS validators
    files = [f for f in example_runs["after"][2] if not Path(f).name.startswith(".")]
    verdict = {f: validator.is_bids("/" + f) for f in files}
    accepted = {f for f, ok in verdict.items() if ok}
    subs = ("01", "02", "03")
    assert accepted == {
        "dataset_description.json",
        "README.md",
        "logs/CITATION.md",
        "logs/CITATION.bib",
        *(f"sub-{s}/anat/sub-{s}_Chimap{e}" for s in subs for e in (".nii.gz", ".json")),
        # the raw GRE subject's relaxation maps (R2starmap and T2starmap are BIDS suffixes)
        *(f"sub-03/anat/sub-03_{k}{e}" for k in ("R2starmap", "T2starmap")
          for e in (".nii.gz", ".json")),
    }
    rejected = set(verdict) - accepted
    assert rejected == {
        *(f"sub-{s}.html" for s in subs),
        *(f"sub-{s}/anat/sub-{s}_desc-brain_mask{e}" for s in subs for e in (".nii.gz", ".json")),
        *(f"sub-{s}/figures/sub-{s}_desc-{k}_mosaic.png" for s in subs
          for k in ("field", "chimap")),
        "sub-03/figures/sub-03_desc-r2star_mosaic.png",
        # the raw GRE subject's phase-chain derivatives
        *(f"sub-03/anat/sub-03_desc-{d}{e}"
          for d in ("eroded_mask", "totalfield_fieldmap", "localfield_fieldmap")
          for e in (".nii.gz", ".json")),
    }


@pytest.mark.slow
def test_multiproc_run(tmp_path, model):
    """The default plugin (MultiProc, two processes) on one subject."""
    out = tmp_path / "bids_qsmnet"
    proc = _cli(
        EXAMPLE,
        out,
        "participant",
        "--participant-label",
        "sub-01",
        "--model",
        model,
        "-w",
        tmp_path / "work",
        "--nprocs",
        "2",
        "--omp-nthreads",
        "1",
        "--device",
        "cpu",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "sub-01/anat/sub-01_Chimap.nii.gz").is_file()
    assert not (out / "sub-02").exists()
