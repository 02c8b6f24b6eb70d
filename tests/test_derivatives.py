"""BIDS-Derivatives output: names from the source's entities, confinement to the output folder,
atomic writes, the refusal to replace different content, and ``dataset_description.json``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from _bidsapp_fixtures import add_volume, make_dataset

from bids_qsmnet.__about__ import __version__
from bids_qsmnet.bids.derivatives import (
    OutputExistsError,
    bids_uri,
    copy_atomic,
    derivative_path,
    sink_derivative,
    write_dataset_description,
)
from bids_qsmnet.bids.derivatives import write_sidecar as write_json_atomic
from bids_qsmnet.interfaces.derivatives import DerivativesSink

OUT = "/out"
FIELD = {
    "subject": "01",
    "session": "pre",
    "acquisition": "gre",
    "run": "02",
    "desc": "localfield",
    "suffix": "unwrapped",
    "datatype": "anat",
    "extension": ".nii.gz",
}


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("entities", "kwargs", "expected"),
    [
        (
            FIELD,
            {"suffix": "Chimap"},
            "sub-01/ses-pre/anat/sub-01_ses-pre_acq-gre_run-02_Chimap.nii.gz",
        ),
        (
            FIELD,
            {"suffix": "Chimap", "extension": ".json"},
            "sub-01/ses-pre/anat/sub-01_ses-pre_acq-gre_run-02_Chimap.json",
        ),
        (
            FIELD,
            {"suffix": "mask", "desc": "brain"},
            "sub-01/ses-pre/anat/sub-01_ses-pre_acq-gre_run-02_desc-brain_mask.nii.gz",
        ),
        (
            {"subject": "01", "suffix": "localfield"},
            {"suffix": "Chimap"},
            "sub-01/anat/sub-01_Chimap.nii.gz",
        ),
        (
            {"subject": "A", "echo": 2, "part": "phase", "suffix": "MEGRE"},
            {"suffix": "Chimap"},
            "sub-A/anat/sub-A_Chimap.nii.gz",
        ),
        (
            {"subject": "01", "run": 3, "suffix": "localfield"},
            {"suffix": "mosaic", "desc": "chimap", "extension": ".png"},
            "sub-01/anat/sub-01_run-3_desc-chimap_mosaic.png",
        ),
    ],
)
def test_names_from_source_entities(entities, kwargs, expected):
    assert derivative_path(OUT, entities, **kwargs) == f"{OUT}/{expected}"


def test_names_from_discovered_entities(tmp_path):
    """Entities as pybids returns them (run as a padded integer) give the same name."""
    from bids_qsmnet.bids.discovery import build_layout, collect_runs

    root = make_dataset(tmp_path / "ds", derivative=True)
    add_volume(
        root,
        "sub-01/ses-pre/anat/sub-01_ses-pre_acq-gre_run-02_desc-localfield_unwrapped.nii.gz",
        {"Units": "ppm"},
    )
    (run,) = collect_runs(build_layout(root), "01")
    out = str(tmp_path / "out")
    assert derivative_path(out, run.entities, suffix="Chimap") == os.path.join(
        out, "sub-01/ses-pre/anat/sub-01_ses-pre_acq-gre_run-02_Chimap.nii.gz"
    )


@pytest.mark.parametrize(
    ("entity", "value"),
    [
        ("subject", "../x"),
        ("subject", ".."),
        ("session", "../../etc"),
        ("subject", "a/b"),
        ("acquisition", "x/../../y"),
        ("reconstruction", "/abs"),
    ],
)
def test_paths_never_leave_the_output_folder(tmp_path, entity, value):
    ents = {"subject": "01", "suffix": "localfield", entity: value}
    with pytest.raises(ValueError):
        derivative_path(str(tmp_path / "out"), ents, suffix="Chimap")
    assert not (tmp_path / "out").exists()


def test_bids_uri():
    assert (
        bids_uri("/data/ds/sub-01/anat/sub-01_localfield.nii.gz", "/data/ds")
        == "bids:raw:sub-01/anat/sub-01_localfield.nii.gz"
    )
    assert (
        bids_uri("/d/ds/derivatives/sepia/sub-01/anat/f.nii", "/d/ds", "sepia")
        == "bids:sepia:derivatives/sepia/sub-01/anat/f.nii"
    )


# --------------------------------------------------------------------------- atomic writes


def _listing(folder):
    return sorted(os.listdir(folder))


def test_copy_atomic_leaves_no_temporary_file(tmp_path):
    src = tmp_path / "src.nii.gz"
    src.write_bytes(os.urandom(100_000))
    dest = tmp_path / "out" / "sub-01" / "anat" / "x.nii.gz"
    copy_atomic(str(src), str(dest))
    assert dest.read_bytes() == src.read_bytes()
    assert _listing(dest.parent) == ["x.nii.gz"]
    with pytest.raises(OutputExistsError, match="--overwrite"):
        copy_atomic(str(src), str(dest))
    src.write_bytes(b"new")
    copy_atomic(str(src), str(dest), overwrite=True)
    assert dest.read_bytes() == b"new" and _listing(dest.parent) == ["x.nii.gz"]


def test_copy_atomic_failure_leaves_nothing(tmp_path):
    dest = tmp_path / "out" / "x.nii.gz"
    with pytest.raises(FileNotFoundError):
        copy_atomic(str(tmp_path / "missing.nii.gz"), str(dest))
    assert _listing(dest.parent) == []


def test_write_json_atomic(tmp_path):
    dest = tmp_path / "a" / "x.json"
    write_json_atomic({"b": 1, "a": [1, 2]}, str(dest))
    assert json.loads(dest.read_text()) == {"a": [1, 2], "b": 1}
    assert _listing(dest.parent) == ["x.json"]
    with pytest.raises(OutputExistsError):
        write_json_atomic({"c": 1}, str(dest), overwrite=False)
    assert json.loads(dest.read_text()) == {"a": [1, 2], "b": 1}


# --------------------------------------------------------------------------- the sink


@pytest.fixture
def chimap(tmp_path):
    return add_volume(tmp_path / "work", "chi.nii.gz", data=np.arange(64.0).reshape(4, 4, 4))


def test_sink_writes_named_file_and_sidecar(tmp_path, chimap):
    out = tmp_path / "out"
    dest, sidecar = sink_derivative(
        chimap, str(out), FIELD, suffix="Chimap", metadata={"Units": "ppm"}
    )
    assert dest == str(out / "sub-01/ses-pre/anat/sub-01_ses-pre_acq-gre_run-02_Chimap.nii.gz")
    assert sidecar == dest[:-7] + ".json"
    assert json.loads(open(sidecar).read()) == {"Units": "ppm"}
    assert open(dest, "rb").read() == open(chimap, "rb").read()
    assert _listing(os.path.dirname(dest)) == sorted(map(os.path.basename, (dest, sidecar)))


def test_sink_accepts_identical_refuses_different_content(tmp_path, chimap):
    out = str(tmp_path / "out")
    dest, _ = sink_derivative(chimap, out, FIELD, suffix="Chimap")
    before = open(dest, "rb").read()
    assert sink_derivative(chimap, out, FIELD, suffix="Chimap")[0] == dest  # a rerun
    other = add_volume(tmp_path / "work2", "chi.nii.gz", data=np.ones((4, 4, 4)))
    with pytest.raises(OutputExistsError, match="other content"):
        sink_derivative(other, out, FIELD, suffix="Chimap")
    assert open(dest, "rb").read() == before
    sink_derivative(other, out, FIELD, suffix="Chimap", overwrite=True)
    assert open(dest, "rb").read() == open(other, "rb").read()


def test_derivatives_sink_interface_merges_metadata(tmp_path, chimap, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    res = DerivativesSink(
        in_file=chimap,
        out_dir=str(out),
        entities=FIELD,
        suffix="Chimap",
        metadata={"Units": "ppm", "B0Direction": None},
        extra_metadata={"B0Direction": [0, 0, 1]},
    ).run()
    assert os.path.basename(res.outputs.out_file) == "sub-01_ses-pre_acq-gre_run-02_Chimap.nii.gz"
    assert json.loads(open(res.outputs.out_meta).read()) == {
        "Units": "ppm",
        "B0Direction": [0, 0, 1],
    }


# --------------------------------------------------------------------------- description


@pytest.mark.parametrize("folder", ["bids_qsmnet", "bids_qsmnet-0.1"])
def test_dataset_description(tmp_path, folder):
    src = make_dataset(tmp_path / "input", derivative=True)
    out = tmp_path / "derivatives" / folder
    path = write_dataset_description(str(out), bids_dir=str(src), container="docker")
    desc = json.loads(open(path).read())
    assert path == str(out / "dataset_description.json")
    assert desc["DatasetType"] == "derivative"
    assert desc["BIDSVersion"].startswith("1.")
    gen = desc["GeneratedBy"][0]
    assert gen["Name"] in out.name  # BIDS: the first GeneratedBy Name names the folder
    assert gen["Version"] == __version__
    assert gen["Container"] == {"Type": "docker"}
    assert desc["SourceDatasets"] == [{"URL": f"file://{src}"}]
    assert _listing(out) == [".bidsignore", "README.md", "dataset_description.json"]
    assert "*.html" in (out / ".bidsignore").read_text()
    assert "Chimap" in (out / "README.md").read_text()
