"""The app writes nothing outside ``output_dir`` and ``work_dir``, whatever the labels, filters
or sidecars say.

The command line runs in a sandbox: the BIDS dataset, a filter file, HOME, TMPDIR, the
working directory and a sibling folder all sit in one temporary folder, and sidecars, the
dataset description and the filter file hold hostile values (``../../x``, absolute paths,
path-like keys).  Everything in the sandbox outside the output and work folders is listed with
sizes, times and contents before and after the run, and must be unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _bidsapp_fixtures import add_volume, make_dataset, make_model_file, sphere_field, write_json

os.environ.setdefault("OMP_NUM_THREADS", "1")

HOSTILE = "../../../escaped"


def _snapshot(root: Path, skip: tuple[Path, ...]) -> dict[str, tuple]:
    """Every entry under ``root`` except the ``skip`` folders: type, size, mtime, sha256."""
    found = {}
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = [d for d in dirs if here / d not in skip]
        for name in dirs + files:
            p = here / name
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            kind = "link" if p.is_symlink() else "dir" if p.is_dir() else "file"
            found[str(p.relative_to(root))] = (
                kind,
                st.st_size if kind == "file" else 0,
                st.st_mtime_ns if kind == "file" else 0,
                digest,
            )
    return found


def _hostile_dataset(root: Path) -> Path:
    """Two subjects of 32³ sphere fields; sub-02's Units is a path, the sidecars and the
    dataset description are full of path-like values and keys."""
    ds = make_dataset(root, derivative=True, name=HOSTILE)
    desc = json.loads((ds / "dataset_description.json").read_text())
    desc["GeneratedBy"] = [{"Name": HOSTILE, "CodeURL": "file:///etc/passwd"}]
    write_json(ds / "dataset_description.json", desc)
    field, mask, _ = sphere_field((32, 32, 32))
    hostile_meta = {
        "Sources": [f"bids::{HOSTILE}.nii.gz", "/etc/passwd"],
        "Description": HOSTILE,
        "SeriesDescription": "/tmp/escaped",
        "OutputDir": HOSTILE,
        HOSTILE: "key as a path",
        "B0_dir": [0, 0, 1],
    }
    for sub, units in (("01", "ppm"), ("02", HOSTILE)):
        add_volume(
            ds,
            f"sub-{sub}/anat/sub-{sub}_localfield.nii.gz",
            {"Units": units, "MagneticFieldStrength": 3.0, **hostile_meta},
            data=field,
        )
        add_volume(
            ds,
            f"sub-{sub}/anat/sub-{sub}_desc-brain_mask.nii.gz",
            {"Type": HOSTILE, "Sources": [HOSTILE]},
            data=mask,
            dtype=np.uint8,
        )
    return ds


@pytest.fixture(scope="module")
def sandboxed_run(tmp_path_factory):
    box = tmp_path_factory.mktemp("sandbox")
    ds = _hostile_dataset(box / "bids")
    out, work = box / "out", box / "work"
    home, tmp, cwd, sibling = (box / n for n in ("home", "tmp", "cwd", "sibling"))
    for d in (home, tmp, cwd, sibling):
        d.mkdir()
    (sibling / "keep.txt").write_text("untouched\n")
    filters = write_json(
        box / "filters.json",
        {
            "localfield": [{"suffix": "localfield"}, {"desc": HOSTILE, "suffix": "localfield"}],
            "mask": [{"desc": "brain", "suffix": "mask"}, {"space": HOSTILE}],
            "chimap": {"suffix": "Chimap", "acquisition": HOSTILE},
        },
    )
    (box / "model").mkdir()
    model = make_model_file(box / "model" / "lite.safetensors", seed=5)
    before = _snapshot(box, skip=(out, work))
    neighbours = sorted(p.name for p in box.parent.iterdir())
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("XDG_", "MPLCONFIGDIR", "NIPYPE", "BIDS_QSMNET"))
    }
    env.update(HOME=str(home), TMPDIR=str(tmp), OMP_NUM_THREADS="1")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "bids_qsmnet",
            str(ds),
            str(out),
            "participant",
            "--model",
            model,
            "-w",
            str(work),
            "--bids-filter-file",
            filters,
            "--plugin",
            "Linear",
            "--omp-nthreads",
            "1",
            "--device",
            "cpu",
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return {
        "box": box,
        "ds": ds,
        "out": out,
        "work": work,
        "home": home,
        "tmp": tmp,
        "cwd": cwd,
        "before": before,
        "after": _snapshot(box, skip=(out, work)),
        "neighbours": (neighbours, sorted(p.name for p in box.parent.iterdir())),
        "res": res,
    }


def _changes(before: dict, after: dict) -> list[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def test_hostile_run_processes_what_it_can(sandboxed_run):
    r = sandboxed_run
    res, out = r["res"], r["out"]
    # sub-02's Units is a path: refused with one line naming the file; sub-01 is done
    assert res.returncode == 3, res.stderr[-3000:]  # some subjects failed, others done
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("bids_qsmnet: 1 problem(s) in 1 of ") and "sub-02_localfield" in last
    meta = json.loads((out / "sub-01/anat/sub-01_Chimap.json").read_text())
    # the output sidecar names the real inputs, never what the input sidecar claimed
    assert meta["Sources"] == [
        "bids:raw:sub-01/anat/sub-01_localfield.nii.gz",
        "bids:raw:sub-01/anat/sub-01_desc-brain_mask.nii.gz",
    ]
    assert HOSTILE not in json.dumps(meta)
    assert not (out / "sub-02" / "anat").exists()
    assert not any(p.is_symlink() for p in out.rglob("*"))


def test_nothing_written_outside_output_and_work(sandboxed_run):
    r = sandboxed_run
    box = r["box"]
    outside = {k: v for k, v in r["after"].items() if not k.startswith(("home", "tmp", "cwd"))}
    outside_before = {
        k: v for k, v in r["before"].items() if not k.startswith(("home", "tmp", "cwd"))
    }
    assert _changes(outside_before, outside) == []  # dataset, filters, model, sibling
    assert r["neighbours"][0] == r["neighbours"][1]  # the sandbox's own neighbours
    assert not (box.parent / "escaped").exists() and not (box / "escaped").exists()
    assert not list(r["ds"].rglob("*.lock"))


def test_home_tmp_and_cwd_untouched(sandboxed_run):
    r = sandboxed_run
    changed = [k for k in _changes(r["before"], r["after"]) if k.startswith(("home", "tmp", "cwd"))]
    assert changed == []


@pytest.mark.parametrize(
    "option",
    [
        ["--participant-label", HOSTILE],
        ["--participant-label", "01", "/tmp/x"],
        ["--session-label", "../a"],
    ],
)
def test_hostile_labels_are_refused_before_anything_is_written(tmp_path, option):
    box = tmp_path / "box"
    ds = _hostile_dataset(box / "bids")
    before = _snapshot(tmp_path, skip=())
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "bids_qsmnet",
            str(ds),
            str(box / "out"),
            "participant",
            "-w",
            str(box / "work"),
            *option,
        ],
        cwd=box,
        env={**os.environ, "HOME": str(box)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert "invalid" in res.stderr.strip().splitlines()[-1]
    assert _changes(before, _snapshot(tmp_path, skip=())) == []
