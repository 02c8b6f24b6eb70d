"""CPU inference is deterministic: the same input gives the same bytes out.

``run_qsmnet`` (the function behind the ``inference`` node) is run twice in this process and
once in a fresh interpreter (another hash seed, another working folder) on the same field, for
whole-volume, tiled and data-consistency-refined inference; the χ files must be identical byte
for byte, gzip header included.  The whole BIDS-App run is compared byte for byte with an
uninterrupted run in ``test_crash_rerun.py``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _bidsapp_fixtures import make_model_file, sphere_field, write_nifti

os.environ.setdefault("OMP_NUM_THREADS", "1")

#: inference settings compared: whole volume, overlapping tiles, refinement by CG
CASES = {
    "whole": {},
    "tiled": {"tile": 16, "overlap": 0.25},
    "refined": {"dc_lambda": 0.05, "dc_iterations": 5},
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 32×32×24 field with two spheres of opposite χ, its mask and a small random model."""
    d = tmp_path_factory.mktemp("determinism")
    field, mask, _ = sphere_field((32, 32, 24), radius=5.0, chi=0.1)
    other, _, _ = sphere_field((32, 32, 24), radius=3.0, chi=-0.05)
    field = field + np.roll(other, 7, axis=0) * mask
    return {
        "field": write_nifti(d / "sub-01_desc-localfield_ppm.nii.gz", field),
        "mask": write_nifti(d / "sub-01_desc-brain_mask.nii.gz", mask, dtype=np.uint8),
        "model": make_model_file(d / "lite.safetensors", seed=4),
        "dir": d,
    }


def _run(inputs, out_dir, case: str) -> str:
    from bids_qsmnet.inference.run import run_qsmnet

    os.makedirs(out_dir, exist_ok=True)
    out, _ = run_qsmnet(
        inputs["field"],
        inputs["mask"],
        model=inputs["model"],
        device="cpu",
        num_threads=1,
        newpath=str(out_dir),
        **CASES[case],
    )
    return out


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.parametrize("case", list(CASES))
def test_same_input_same_bytes_in_one_process(inputs, tmp_path, case):
    first = _run(inputs, tmp_path / "a", case)
    second = _run(inputs, tmp_path / "b", case)
    a, b = Path(first).read_bytes(), Path(second).read_bytes()
    assert a == b, f"{case}: {len(a)} vs {len(b)} bytes differ"
    chi = nib.load(first).get_fdata()
    mask = nib.load(inputs["mask"]).get_fdata() > 0
    # a real map, not a constant that would compare equal trivially
    assert np.all(np.isfinite(chi)) and np.all(chi[~mask] == 0)
    assert np.count_nonzero(chi[mask]) > 0.99 * mask.sum() and np.ptp(chi[mask]) > 0


def test_same_bytes_in_a_fresh_interpreter(inputs, tmp_path):
    """Another process (another hash seed, another working folder) writes the same bytes."""
    here = {case: _sha(_run(inputs, tmp_path / f"here_{case}", case)) for case in CASES}
    script = (
        "import json, sys, hashlib\n"
        "from bids_qsmnet.inference.run import run_qsmnet\n"
        "args = json.loads(sys.argv[1])\n"
        "out = {}\n"
        "for case, kw in args['cases'].items():\n"
        "    f, _ = run_qsmnet(args['field'], args['mask'], model=args['model'], device='cpu',\n"
        "                      num_threads=1, newpath='.', **kw)\n"
        "    out[case] = hashlib.sha256(open(f, 'rb').read()).hexdigest()\n"
        "print(json.dumps(out))\n"
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    args = {k: str(inputs[k]) for k in ("field", "mask", "model")}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "12345"}
    res = subprocess.run(
        [sys.executable, "-c", script, json.dumps({**args, "cases": CASES})],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    there = json.loads(res.stdout.strip().splitlines()[-1])
    assert there == here


def test_written_bytes_depend_on_the_data_alone(tmp_path, monkeypatch):
    """``save_volume`` writes no time stamp or file name into the gzip header: the same data
    written later under another name are the same bytes."""
    import time

    from bids_qsmnet.io.nifti import save_volume

    data = np.arange(60, dtype=np.float32).reshape(3, 4, 5) / 7
    ref = nib.Nifti1Image(data, np.diag([0.8, 0.9, 1.1, 1.0]))
    first = save_volume(data, ref, tmp_path / "one" / "sub-01_Chimap.nii.gz")
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 86400.0)  # a day later
    second = save_volume(data, ref, tmp_path / "two" / "sub-02_other.nii.gz")
    a, b = Path(first).read_bytes(), Path(second).read_bytes()
    assert a == b
    # gzip header (RFC 1952): no FNAME flag, MTIME zero
    assert a[:2] == b"\x1f\x8b" and a[3] & 0x08 == 0 and a[4:8] == b"\x00\x00\x00\x00"
    np.testing.assert_array_equal(np.frombuffer(gzip.decompress(a)[352:], "<f4"), data.ravel("F"))
