"""The derivatives against the official BIDS validator (``bids-validator-deno``, PyPI).

Two participant runs are validated: the example dataset (local fields in ppm and Hz, and the
raw multi-echo GRE subject sub-03 with its phase chain's maps) with the shipped default model,
and a dataset with sessions whose description lists two authors, with a toy network.  Both must
have no error; the only warning allowed is ``TOO_FEW_AUTHORS`` where the source dataset itself
lists fewer than two authors (the derivatives take the source's ``Authors``: the app cannot
name the people behind a dataset).  Skipped where the validator is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _bidsapp_fixtures import add_volume, make_model_file, sphere_field, write_json

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ds-synthetic"
CONSOLE_SCRIPT = Path(sys.executable).with_name("bids_qsmnet")
VALIDATOR = shutil.which("bids-validator-deno") or str(
    Path(sys.executable).with_name("bids-validator-deno"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(VALIDATOR).exists(), reason="bids-validator-deno not "
                       "installed (pip install bids-validator-deno)"),
]


def _participant(bids: Path, out: Path, work: Path, *extra: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([str(CONSOLE_SCRIPT), str(bids), str(out), "participant", "-w",
                          str(work), "--nprocs", "2", *extra], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


def _issues(out: Path) -> list[dict]:
    res = subprocess.run([VALIDATOR, str(out), "--format", "json"], capture_output=True,
                         text=True, timeout=300)
    report = json.loads(res.stdout)
    return report["issues"]["issues"]


def _summary(issues) -> dict:
    counts: dict = {}
    for i in issues:
        key = f"{i['severity']} {i['code']}" + (f" {i['subCode']}" if i.get("subCode") else "")
        counts[key] = counts.get(key, 0) + 1
    return counts


def test_example_dataset_output_is_validator_clean(tmp_path):
    out = tmp_path / "out"
    _participant(EXAMPLE, out, tmp_path / "work")
    assert (out / "sub-03/anat/sub-03_desc-localfield_fieldmap.nii.gz").is_file()
    issues = _issues(out)
    summary = _summary(issues)
    print("\nexample dataset:", summary or "no issue")
    assert not [i for i in issues if i["severity"] == "error"], summary
    # the example dataset's description lists no authors, so the derivatives cannot either
    assert set(summary) <= {"warning TOO_FEW_AUTHORS"}, summary
    assert (out / "README.md").is_file() and "*.html" in (out / ".bidsignore").read_text()


def test_sessions_dataset_output_has_no_issue_at_all(tmp_path):
    ds = tmp_path / "ds"
    write_json(ds / "dataset_description.json", {
        "Name": "two sessions", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "test-pipeline"}], "License": "CC0",
        "Authors": ["Ada Lovelace", "Charles Babbage"]})
    (ds / "README.md").write_text("test data\n")
    field, mask, _ = sphere_field((24, 24, 24), radius=4.0)
    for sub in ("01", "02"):
        for ses in ("pre", "post"):
            stem = f"sub-{sub}/ses-{ses}/anat/sub-{sub}_ses-{ses}"
            add_volume(ds, f"{stem}_localfield.nii.gz", {"Units": "ppm"},
                       data=field * (1.5 if ses == "post" else 1.0))
            add_volume(ds, f"{stem}_desc-brain_mask.nii.gz", {}, data=mask.astype(np.uint8),
                       dtype=np.uint8)
    model = make_model_file(tmp_path / "toy.safetensors", architecture="toy")
    out = tmp_path / "out"
    _participant(ds, out, tmp_path / "work", "--model", model, "--skip-bids-validation")
    assert len(list(out.glob("sub-*/ses-*/anat/*_Chimap.nii.gz"))) == 4
    issues = _issues(out)
    print("\nsessions dataset:", _summary(issues) or "no issue")
    assert issues == [], _summary(issues)
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["Authors"] == ["Ada Lovelace", "Charles Babbage"] and desc["License"] == "CC0"
