"""Crashes and reruns: a participant run killed with SIGKILL and run again completes, reuses the
Nipype nodes that had finished, and writes the same bytes as an uninterrupted run; two runs on
one output folder do not corrupt each other; training killed mid-epoch and resumed reaches
the same weights as an uninterrupted seeded run.

The BIDS-App runs use the shipped example dataset (two subjects, 112×128×96) and a small
random model, each in a subprocess (``python -m bids_qsmnet``) that is killed at a chosen
point.  Every run of the module uses the same output and work paths (one after the other), so
that even the HTML reports, which record the command line and the work folder, compare equal
byte for byte except for their "elapsed (s)" row.  These runs are marked slow (each test about
20-60 s on two cores); the checks of the pieces (the training lock, leftovers of killed runs,
sinks of a cached workflow) are fast.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _bidsapp_fixtures import make_model_file

os.environ.setdefault("OMP_NUM_THREADS", "1")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ds-synthetic"
TIMEOUT = 600  # seconds for one run: the CI machine has two cores shared with other jobs

#: hidden temporaries of atomic writes (``.name.tmp<pid>[.ext]``), matched more loosely than
#: bids_qsmnet.io.atomic.TMP_PATTERN so that a change of naming cannot hide a leftover
LEFTOVER = re.compile(r"^\..+\.tmp[0-9a-f-]*(\.[a-z]+)*$")
#: the one report row that differs between two runs of the same command
ELAPSED_ROW = re.compile(rb"<tr><th>elapsed \(s\)</th><td>[^<]*</td></tr>")


# --------------------------------------------------------------------------- helpers


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cmd(out: Path, work: Path, model: str, *extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bids_qsmnet",
        str(EXAMPLE),
        str(out),
        "participant",
        "--model",
        model,
        "-w",
        str(work),
        "--omp-nthreads",
        "1",
        "--device",
        "cpu",
        *map(str, extra),
    ]


def _linear(out, work, model, *extra):
    return _cmd(out, work, model, "--plugin", "Linear", *extra)


def _start(cmd, log: Path) -> subprocess.Popen:
    # a session of its own: os.killpg reaches the run and every process it started
    return subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=open(log, "w"), start_new_session=True
    )


def _run(cmd, log: Path) -> int:
    proc = _start(cmd, log)
    try:
        return proc.wait(timeout=TIMEOUT)
    finally:
        _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _kill_when(proc: subprocess.Popen, ready, *, group: bool = True) -> float:
    """SIGKILL the run (its process group, or with ``group=False`` the main process alone) as
    soon as ``ready()`` is true; returns the seconds it ran.  Fails when the run ended
    before."""
    t0 = time.monotonic()
    while not ready():
        assert proc.poll() is None, "the run ended before the crash point"
        assert time.monotonic() - t0 < TIMEOUT, "the crash point was never reached"
        time.sleep(0.01)
    if group:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return time.monotonic() - t0


def _alive_in_group(pgid: int, *, wait: float = 5.0) -> list[str]:
    """Processes (not zombies) left in a process group after up to ``wait`` seconds."""
    t0 = time.monotonic()
    while True:
        res = subprocess.run(
            ["ps", "-o", "pid=,stat=", "-g", str(pgid)], capture_output=True, text=True, check=False
        )
        alive = [line for line in res.stdout.splitlines() if line.split()[1:2] != ["Z"]]
        if not alive or time.monotonic() - t0 > wait:
            return alive
        time.sleep(0.1)


def _files(out: Path) -> dict[str, bytes]:
    """Every file under ``out`` (relative POSIX path → bytes), leftovers of killed writes
    excluded (they are hidden and checked separately)."""
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and not LEFTOVER.match(p.name)
    }


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob("*") if p.is_file() and LEFTOVER.match(p.name))


def _assert_same_outputs(got: dict, expected: dict, *, provenance: bool = True) -> int:
    """Byte-identical outputs (HTML reports: but for the elapsed time, or with
    ``provenance=False`` but for the whole provenance table); returns the bytes compared."""
    assert sorted(got) == sorted(expected)
    compared = 0
    for rel, data in expected.items():
        mine = got[rel]
        if rel.endswith(".html"):
            if provenance:
                data, mine = ELAPSED_ROW.sub(b"", data), ELAPSED_ROW.sub(b"", mine)
            else:
                cut = re.compile(rb"<h2>Provenance</h2>\s*<table[^>]*>.*?</table>", re.S)
                data, mine = cut.sub(b"", data), cut.sub(b"", mine)
        assert mine == data, f"{rel} differs"
        compared += len(data)
    return compared


def _results(work: Path) -> dict[str, tuple[int, bytes]]:
    """The result file of every finished Nipype node, by node folder (mtime, content)."""
    return {
        str(p.parent.relative_to(work)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in work.rglob("result_*.pklz")
    }


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model_file(tmp_path_factory.mktemp("model") / "lite.safetensors", seed=2)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("crash")


@pytest.fixture
def paths(base):
    """The output and work folders every run of this module uses, emptied for each test."""
    out, work = base / "derivatives" / "bids_qsmnet", base / "work"
    for d in (out, work):
        shutil.rmtree(d, ignore_errors=True)
    yield out, work
    for d in (out, work):
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(base, model):
    """The outputs of an uninterrupted run (Linear plugin) at the module's paths."""
    out, work = base / "derivatives" / "bids_qsmnet", base / "work"
    code = _run(_linear(out, work, model), base / "reference.log")
    assert code == 0, (base / "reference.log").read_text()[-3000:]
    files = _files(out)
    assert not _leftovers(out)
    shutil.rmtree(out)
    shutil.rmtree(work)
    assert "sub-01/anat/sub-01_Chimap.nii.gz" in files and "sub-02.html" in files
    return files


# --------------------------------------------------------------------------- participant runs


def _inference_started(work: Path, subject: str):
    node = work / "bids_qsmnet_wf" / f"run_sub_{subject}_wf" / "qsmnet_wf" / "inference"
    return node.is_dir


def _chimap_written(out: Path, subject: str):
    return (out / f"sub-{subject}" / "anat" / f"sub-{subject}_Chimap.json").exists




@pytest.mark.slow
@pytest.mark.parametrize(
    "point",
    [
        "inference of sub-01 started",
        "χ map of sub-01 written",
        "χ map of sub-03 (raw GRE) written",
    ],
)
def test_sigkill_then_rerun_gives_the_uninterrupted_bytes(paths, model, reference, point):
    out, work = paths
    cmd = _linear(out, work, model)
    proc = _start(cmd, work.parent / "killed.log")
    subject = "03" if "sub-03" in point else "01"
    ready = (
        _inference_started(work, subject)
        if point.startswith("inference")
        else _chimap_written(out, subject)
    )
    _kill_when(proc, ready)
    assert not _alive_in_group(proc.pid)
    partial = _files(out) if out.exists() else {}
    # no complete-looking file is a partial one: what exists is the uninterrupted output
    assert partial and set(partial) < set(reference)
    for rel, data in partial.items():
        assert data == reference[rel], rel
    finished = _results(work)
    assert len(finished) >= 4, f"{point}: too few nodes had finished ({sorted(finished)})"

    code = _run(cmd, work.parent / "rerun.log")
    assert code == 0, (work.parent / "rerun.log").read_text()[-3000:]
    compared = _assert_same_outputs(_files(out), reference)
    assert compared > 1_000_000
    assert not _leftovers(out)
    # the nodes that had finished were reused, not run again (the sinks, which write into the
    # output folder, run every time by design)
    after = _results(work)
    reused = [k for k, v in finished.items() if not k.rsplit("/", 1)[-1].startswith("ds_")]
    assert reused and all(after[k] == finished[k] for k in reused), reused


@pytest.mark.slow
def test_two_runs_on_one_output_folder(paths, model, reference):
    """While a run writes a folder, a second run of the folder and a run of one of its
    participants are refused at once with one line; the first run completes unharmed."""
    out, work = paths
    logs = work.parent
    first = _start(_linear(out, work, model), logs / "first.log")
    try:
        t0 = time.monotonic()
        while not (work / "bids_qsmnet_wf").is_dir():  # the lock is taken before the graph
            assert first.poll() is None, (logs / "first.log").read_text()[-3000:]
            assert time.monotonic() - t0 < TIMEOUT
            time.sleep(0.05)
        for extra in ((), ("--participant-label", "02")):
            other_work = logs / "other_work"
            res = subprocess.run(
                _linear(out, other_work, model, *extra),
                env=_env(),
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
            )
            assert res.returncode == 1, res.stderr[-2000:]
            last = res.stderr.strip().splitlines()[-1]
            assert last.startswith("bids_qsmnet: error: another bids_qsmnet run is writing")
            assert not other_work.exists()  # refused before anything was run
        assert first.poll() is None, "the first run ended before the second was refused"
        assert first.wait(timeout=TIMEOUT) == 0, (logs / "first.log").read_text()[-3000:]
    finally:
        _kill_group(first)
    _assert_same_outputs(_files(out), reference)


@pytest.mark.slow
def test_participant_runs_share_a_folder(paths, model, reference):
    """Runs of different participants (the tasks of a SLURM job array) write one folder at
    the same time; every subject's outputs are the uninterrupted run's bytes."""
    out, work = paths
    groups = {"a": ["01"], "b": ["02", "03"]}
    procs = {
        name: _start(
            _linear(out, work.parent / f"work_{name}", model, "--participant-label", *labels),
            work.parent / f"{name}.log",
        )
        for name, labels in groups.items()
    }
    try:
        for name, proc in procs.items():
            assert proc.wait(timeout=TIMEOUT) == 0, (work.parent / f"{name}.log").read_text()
    finally:
        for proc in procs.values():
            _kill_group(proc)
    for name in groups:
        shutil.rmtree(work.parent / f"work_{name}")
    # each report comes from the run of its subject: its provenance names that run; the runs
    # of some participants also hold those participants' lock files
    files = {k: v for k, v in _files(out).items() if not k.startswith(".bids_qsmnet.locks/")}
    locks = sorted(p.name for p in (out / ".bids_qsmnet.locks").iterdir())
    assert locks == ["sub-01.lock", "sub-02.lock", "sub-03.lock"]
    _assert_same_outputs(files, reference, provenance=False)


@pytest.mark.slow
def test_main_process_killed_alone(paths, model, reference):
    """``kill -9`` of the main process only (MultiProc): its forkserver and workers end with
    it, the output folder is not left locked, and the rerun completes with the uninterrupted
    bytes."""
    out, work = paths
    cmd = _cmd(out, work, model, "--nprocs", "2")
    proc = _start(cmd, work.parent / "killed.log")
    try:
        _kill_when(proc, _inference_started(work, "01"), group=False)
        left = _alive_in_group(proc.pid, wait=10.0)
        res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    finally:
        _kill_group(proc)
    assert res.returncode == 0, res.stderr[-2000:]
    assert not left, f"workers outlived the killed run: {left}"
    _assert_same_outputs(_files(out), reference, provenance=False)


@pytest.mark.slow
def test_deleted_outputs_come_back(paths, model, reference):
    """Outputs deleted after a run come back on the next run with the same work folder,
    although Nipype holds the results of their nodes."""
    out, work = paths
    cmd = _linear(out, work, model, "--participant-label", "01")
    assert _run(cmd, work.parent / "first.log") == 0
    gone = [
        "sub-01/anat/sub-01_Chimap.nii.gz",
        "sub-01/figures/sub-01_desc-field_mosaic.png",
        "sub-01/anat/sub-01_desc-brain_mask.json",
    ]
    for rel in gone:
        (out / rel).unlink()
    code = _run(cmd, work.parent / "second.log")
    assert code == 0, (work.parent / "second.log").read_text()[-3000:]
    for rel in gone:
        assert (out / rel).read_bytes() == reference[rel], rel


# --------------------------------------------------------------------------- sinks, in-process


def test_sinks_write_again_from_a_cached_workflow(tmp_path):
    """A DerivativesSink node whose result Nipype holds still restores a deleted output."""
    import nibabel as nib
    import numpy as np
    from nipype.pipeline import engine as pe

    from bids_qsmnet.interfaces.derivatives import DerivativesSink

    src = tmp_path / "chi.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((2, 2, 2), np.float32), np.eye(4)), src)
    out = tmp_path / "out"
    wf = pe.Workflow(name="wf", base_dir=str(tmp_path / "work"))
    wf.add_nodes(
        [
            pe.Node(
                DerivativesSink(
                    in_file=str(src),
                    out_dir=str(out),
                    entities={"subject": "01"},
                    suffix="Chimap",
                    metadata={"Units": "ppm"},
                ),
                name="ds_chimap",
            )
        ]
    )
    wf.config["execution"]["crashdump_dir"] = str(tmp_path / "crashes")
    wf.run(plugin="Linear")
    written = out / "sub-01" / "anat" / "sub-01_Chimap.nii.gz"
    sidecar = written.with_name("sub-01_Chimap.json")
    expected = (written.read_bytes(), sidecar.read_bytes())
    written.unlink()
    sidecar.unlink()
    wf.run(plugin="Linear")
    assert (written.read_bytes(), sidecar.read_bytes()) == expected
    assert json.loads(sidecar.read_text()) == {"Units": "ppm"}


# --------------------------------------------------------------------------- training


def _train_cmd(store: str, out: Path, *extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bids_qsmnet.train",
        "--patches",
        store,
        "--out-dir",
        str(out),
        "--model",
        "toy",
        "--epochs",
        "3",
        "--batch-size",
        "2",
        "--log-every",
        "1",
        "--save-step",
        "1",
        "--val-every",
        "0",
        "--seed",
        "3",
        "--learning-rate",
        "0.01",
        "--device",
        "cpu",
        "--threads",
        "1",
        *map(str, extra),
    ]


def _log_rows(out: Path) -> list[tuple[str, str, str]]:
    with open(out / "training_log.csv", newline="") as fh:
        return [(r["kind"], r["step"], r["loss"]) for r in csv.DictReader(fh)]


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def trained_uninterrupted(tmp_path_factory, small_store):
    """3 epochs × 8 steps of the toy network on 16 patches, never interrupted."""
    out = tmp_path_factory.mktemp("train_ref")
    res = subprocess.run(
        _train_cmd(small_store.path, out),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("every", [1, 0], ids=["checkpoint-every-step", "epoch-checkpoints"])
def test_training_killed_mid_epoch_resumes_exactly(
    tmp_path, small_store, trained_uninterrupted, every
):
    """SIGKILL inside an epoch (after step 11 of 24), then ``--resume``: the same weights,
    Adam moments, model files and log as the uninterrupted run, bit for bit."""
    import torch

    out = tmp_path / "run"
    cmd = _train_cmd(small_store.path, out, "--checkpoint-every-steps", every)

    def at_step_11():
        try:
            rows = _log_rows(out)
        except (FileNotFoundError, KeyError):  # not written yet
            return False
        return any(isinstance(r[1], str) and r[1].isdigit() and int(r[1]) >= 11 for r in rows)

    proc = _start(cmd, tmp_path / "killed.log")
    try:
        _kill_when(proc, at_step_11)
    finally:
        _kill_group(proc)
    last = max(int(r[1]) for r in _log_rows(out) if r[1] and r[1].isdigit())
    assert 11 <= last < 24 and last % 8, f"killed after step {last}: not inside an epoch"
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert not (out / "model.safetensors").exists()
    if every:  # the row of a step is logged just before its checkpoint is written
        assert last - 1 <= state["step"] <= last and state["batch_in_epoch"] > 0
    else:  # the checkpoint of the last finished epoch
        assert (state["epoch"], state["batch_in_epoch"], state["step"]) == (
            last // 8,
            0,
            last // 8 * 8,
        )

    res = subprocess.run(
        [*cmd, "--resume"], env=_env(), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stderr
    ref = trained_uninterrupted
    a = torch.load(out / "checkpoint.pt", weights_only=True)
    b = torch.load(ref / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 24 and a["scheduler"] == b["scheduler"]
    for k in b["network"]:
        assert torch.equal(a["network"][k], b["network"][k]), k
    for k, st in b["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(a["optimizer"]["state"][k][name], st[name])
    for name in ("model.safetensors", *(f"model_epoch-{e:03d}.safetensors" for e in (1, 2, 3))):
        ta, tb = _tensors(out / name), _tensors(ref / name)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in tb), name
    assert _log_rows(out) == _log_rows(ref)
    assert not [p.name for p in out.iterdir() if LEFTOVER.match(p.name)]



def _one_step_config(patches, out, **extra):
    """A one-step toy training configuration (CPU, one thread, no validation)."""
    from bids_qsmnet.training.trainer import TrainingConfig

    return TrainingConfig(patches=patches, out_dir=str(out), architecture="toy", batch_size=4,
                          epochs=1, max_steps=1, device="cpu", threads=1, val_every=0, **extra)

def test_second_training_run_in_a_folder_is_refused(tmp_path, small_store):
    """While one run holds a training folder's lock, another run of that folder stops at once
    (and writes nothing); the folder is free again afterwards."""
    import fcntl

    from bids_qsmnet.training.trainer import (
        LOCK_NAME,
        TrainingLockedError,
        train,
    )

    out = tmp_path / "run"
    out.mkdir()
    cfg = _one_step_config(small_store.path, out)
    with open(out / LOCK_NAME, "a") as other:  # as another process's run would
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(TrainingLockedError, match="another training run"):
            train(cfg)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    assert train(cfg).steps_done == 1
    assert not (out / LOCK_NAME).exists()  # a run that ends removes its lock file


def test_leftovers_of_killed_runs_are_removed(tmp_path, small_store):
    """Temporaries a killed run left (hidden) go when the next run takes the folder; a cut-off
    last log row is dropped on resume rather than ending it."""
    import torch

    from bids_qsmnet.training.trainer import TrainingConfig, train

    out = tmp_path / "run"
    cfg = dict(
        patches=small_store.path,
        out_dir=str(out),
        architecture="toy",
        batch_size=4,
        epochs=1,
        max_steps=2,
        device="cpu",
        threads=1,
        val_every=0,
        log_every=1,
    )
    train(TrainingConfig(**cfg))
    stale = [
        out / ".checkpoint.pt.tmp4242",
        out / ".model.safetensors.tmp77",
        out / "validation" / ".val_epoch-001.png.tmp123",
        out / ".training_log.csv.tmp99",
    ]
    for p in stale:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"half")
    with open(out / "training_log.csv", "a") as fh:
        fh.write("train,1,")  # a row cut short
    result = train(TrainingConfig(**{**cfg, "max_steps": 3, "resume": True}))
    assert result.steps_done == 3
    assert not any(p.exists() for p in stale)
    assert [r[1] for r in _log_rows(out)] == ["1", "2", "3"]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3


class _Payload:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_never_runs_code_from_a_checkpoint(tmp_path, small_store):
    """``checkpoint.pt`` is read with ``weights_only=True``: a pickled payload in it is refused
    with a ValueError naming the file, and never executed."""
    import torch

    from bids_qsmnet.training.trainer import train

    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "PWNED"
    torch.save({"network": {}, "payload": _Payload(str(marker))}, out / "checkpoint.pt")
    torch.load(out / "checkpoint.pt", weights_only=False)["payload"].close()  # it does work
    assert marker.exists()
    marker.unlink()
    cfg = _one_step_config(small_store.path, out, resume=True)
    with pytest.raises(ValueError, match="checkpoint.pt: not a bids_qsmnet checkpoint"):
        train(cfg)
    assert not marker.exists()
    truncated = out / "checkpoint.pt"
    truncated.write_bytes(truncated.read_bytes()[:50])
    with pytest.raises(ValueError, match="not a bids_qsmnet checkpoint"):
        train(cfg)
