"""Group level of the BIDS-App: train on every labelled subject of the example dataset."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bids_qsmnet.models.modelfile import load_model

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ds-synthetic"


def _run(*args, cwd=None, timeout=900):
    return subprocess.run([sys.executable, "-m", "bids_qsmnet", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)


@pytest.fixture(scope="module")
def group_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("group")
    bids = tmp / "ds"
    shutil.copytree(EXAMPLE, bids)
    out = tmp / "bids_qsmnet"
    proc = _run(bids, out, "group", "--model", "toy", "--validation-participant", "sub-02",
                "--epochs", "1", "--max-steps", "4", "--batch-size", "4", "--ema-decay", "0.9",
                "-w", tmp / "work",
                "--nprocs", "1", "--omp-nthreads", "2", "--plugin", "Linear")
    return bids, out, tmp, proc


def test_group_level_trains_a_loadable_model(group_run):
    bids, out, tmp, proc = group_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    model_dir = out / "models" / "toy"
    loaded = load_model(model_dir)  # a folder holding one model file is accepted
    assert loaded.spec.name == "toy"
    assert loaded.spec.architecture["channels"] == [2, 4]
    assert loaded.spec.training["steps_done"] == 4
    assert loaded.spec.training["ema_decay"] == 0.9  # the weight average was saved
    with open(model_dir / "training_log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["kind"] for r in rows].count("val") == 1  # sub-02 held out, validated once
    summary = json.loads((model_dir / "training_summary.json").read_text())
    assert summary["patches"] > 0
    # the patch store was cut from sub-01 only (sub-02 is the validation subject)
    assert (model_dir / "loss_curves.png").exists()
    assert list((model_dir / "validation").glob("epoch-001_*.png"))
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"


def test_trained_model_runs_at_participant_level(group_run):
    bids, out, tmp, _ = group_run
    proc = _run(bids, tmp / "part", "participant", "--participant-label", "01", "--model",
                out / "models" / "toy", "-w", tmp / "work2", "--nprocs", "1",
                "--plugin", "Linear")
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((tmp / "part/sub-01/anat/sub-01_Chimap.json").read_text())
    assert meta["Model"]["Name"] == "toy"


def test_group_level_refuses_an_unknown_architecture(tmp_path):
    proc = _run(EXAMPLE, tmp_path / "out", "group", "--model", "resnet")
    assert proc.returncode == 1
    assert "choose one of" in proc.stderr and "qsmnet" in proc.stderr


def test_group_level_without_labels_fails_clearly(tmp_path):
    bids = tmp_path / "ds"
    shutil.copytree(EXAMPLE, bids)
    for f in bids.rglob("*_Chimap.*"):
        f.unlink()
    proc = _run(bids, tmp_path / "out", "group", "--model", "toy", "-w", tmp_path / "w")
    assert proc.returncode == 1
    assert "no subject" in proc.stderr and "Chimap" in proc.stderr


@pytest.mark.parametrize("arch,given,expected", [
    ("toy", {}, {"patch_size": 32, "patch_stride": None, "batch_size": 20,
                 "learning_rate": 1e-3, "epochs": 25, "save_step": 5}),
    ("qsmnet", {}, {"patch_size": 64, "patch_stride": None, "batch_size": 12,
                    "learning_rate": 1e-3, "epochs": 25, "save_step": 5}),
    ("toy", {"batch_size": 4, "patch_size": 48, "patch_stride": 8},
     {"patch_size": 48, "patch_stride": 8, "batch_size": 4}),
])
def test_training_settings_default_per_architecture(arch, given, expected):
    """Group level: the toy trains as the tutorial does (32³ patches, batch 20), the QSMnet
    family as the paper does (64³, batch 12), both from patches at most a third of a patch
    apart; an option given on the command line wins."""
    from bids_qsmnet.cli.build import _training_settings
    from bids_qsmnet.cli.parser import parse_args

    argv = [str(EXAMPLE), "/tmp/bids_qsmnet_settings_out", "group", "--model", arch]
    for k, v in given.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    settings = _training_settings(parse_args(argv), arch)
    assert {k: settings[k] for k in expected} == expected
