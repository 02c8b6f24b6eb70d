"""A real SLURM run: ``bids_qsmnet ... participant --plugin SLURM`` (and ``SLURMGraph``) on the
example dataset through a one-node cluster on this machine, compared with a MultiProc run.

The cluster is the one ``SLURM_CONF`` points to when ``sinfo`` answers there (CI starts it with
``eval "$(scripts/start_slurm_localhost.sh start)"``); otherwise the test starts its own with
that script (root only) and stops it afterwards.  Skipped where the SLURM and munge daemons are
not installed (``apt-get install -y --no-install-recommends slurm-wlm munge``).  A fast test
checks the per-participant output locks that let the tasks of a job array share one output
folder.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _bidsapp_fixtures import make_many_subjects, make_model_file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ds-synthetic"
START = ROOT / "scripts" / "start_slurm_localhost.sh"
CONSOLE_SCRIPT = Path(sys.executable).with_name("bids_qsmnet")
SUBJECTS = ("01", "02")

needs_slurm = pytest.mark.skipif(
    shutil.which("slurmctld") is None or shutil.which("munged") is None,
    reason="SLURM/munge daemons not installed (apt-get install slurm-wlm munge)",
)


def _sinfo_ok(env: dict) -> bool:
    try:
        res = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0 and any(
        s.startswith(("idle", "mix", "alloc")) for s in res.stdout.split()
    )


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    """Environment of a working one-node cluster (its ``SLURM_CONF``), started if needed."""
    env = dict(os.environ)
    if env.get("SLURM_CONF") and _sinfo_ok(env):
        yield env
        return
    if os.geteuid() != 0:
        pytest.skip("no running cluster (SLURM_CONF) and starting one needs root")
    state = tmp_path_factory.mktemp("slurm")
    res = subprocess.run(
        ["bash", str(START), "start", str(state)], capture_output=True, text=True, timeout=120
    )
    try:
        assert res.returncode == 0, res.stderr
        env["SLURM_CONF"] = str(state / "slurm.conf")
        assert res.stdout.strip() == f"export SLURM_CONF={env['SLURM_CONF']}"
        assert _sinfo_ok(env)
        yield env
    finally:
        subprocess.run(["bash", str(START), "stop", str(state)], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A copy of the example dataset's local-field subjects and a small random qsmnet-lite
    model (the raw GRE subject, sub-03, would only add phase jobs to every plugin run)."""
    base = tmp_path_factory.mktemp("slurm_inputs")
    bids = base / "ds-synthetic"
    shutil.copytree(EXAMPLE, bids, ignore=shutil.ignore_patterns("sub-03"))
    model = make_model_file(base / "lite.safetensors", seed=0, name="lite-test")
    return bids, Path(model)


def _run_app(bids: Path, model: Path, out: Path, work: Path, *extra: str, env=None):
    env = dict(env or os.environ)
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        str(CONSOLE_SCRIPT),
        str(bids),
        str(out),
        "participant",
        "--model",
        str(model),
        "-w",
        str(work),
        "--device",
        "cpu",
        "--omp-nthreads",
        "1",
        *extra,
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def multiproc_out(inputs, tmp_path_factory):
    bids, model = inputs
    base = tmp_path_factory.mktemp("multiproc")
    _run_app(bids, model, base / "out", base / "work", "--plugin", "MultiProc", "--nprocs", "2")
    return base / "out"


def _jobs(env: dict, work: Path) -> list[dict]:
    """``scontrol show job`` records of the batch jobs whose script lies under ``work``."""
    res = subprocess.run(
        ["scontrol", "show", "job", "-o"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    jobs = []
    for line in res.stdout.splitlines():
        rec = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if rec.get("Command", "").startswith(str(work) + os.sep):
            jobs.append(rec)
    return jobs


def _assert_same_chimaps(out: Path, reference: Path) -> None:
    for sub in SUBJECTS:
        stem = f"sub-{sub}/anat/sub-{sub}_Chimap"
        a, b = out / f"{stem}.nii.gz", reference / f"{stem}.nii.gz"
        # uncompressed NIfTI bytes: header and voxels identical (same CPU, one thread)
        assert gzip.decompress(a.read_bytes()) == gzip.decompress(b.read_bytes()), stem
        assert json.loads((out / f"{stem}.json").read_text()) == json.loads(
            (reference / f"{stem}.json").read_text()
        )


@pytest.mark.slow
@needs_slurm
def test_slurm_plugin_matches_multiproc(slurm_env, inputs, multiproc_out, tmp_path):
    bids, model = inputs
    env = dict(slurm_env)
    env.pop("LOGNAME", None)  # unset in a root non-login shell; the CLI must cope
    out, work = tmp_path / "out", tmp_path / "work"
    sbatch = {"sbatch_args": "--cpus-per-task=1 --time=30"}
    _run_app(
        bids, model, out, work, "--plugin", "SLURM", "--plugin-args", json.dumps(sbatch), env=env
    )
    _assert_same_chimaps(out, multiproc_out)

    jobs = _jobs(env, work)
    names = {j["JobName"] for j in jobs}
    # Nipype names jobs <node>.<workflow path>.<LOGNAME>: one inference job per subject
    for sub in SUBJECTS:
        assert any(n.startswith(f"inference.qsmnet_wf.run_sub_{sub}_wf.") for n in names), names
    assert all(j["JobState"] == "COMPLETED" and j["ExitCode"] == "0:0" for j in jobs), jobs
    # the --plugin-args reached sbatch
    assert {j["TimeLimit"] for j in jobs} == {"00:30:00"}
    assert {j["NumCPUs"] for j in jobs} == {"1"}
    # and each job's log (slurm-<id>.out beside the batch scripts) shows its node ran there
    batch = work / "bids_qsmnet_wf" / "batch"
    for j in jobs:
        if j["JobName"].startswith("inference."):
            log = (batch / f"slurm-{j['JobId']}.out").read_text()
            assert 'Finished "inference"' in log


@pytest.mark.slow
@needs_slurm
def test_slurmgraph_plugin_waits_for_its_jobs(slurm_env, inputs, multiproc_out, tmp_path):
    """SLURMGraph queues the whole graph and returns: the CLI waits for the jobs, so the
    outputs exist when it exits (and empty --plugin-args no longer crash Nipype)."""
    bids, model = inputs
    out, work = tmp_path / "out", tmp_path / "work"
    res = _run_app(bids, model, out, work, "--plugin", "SLURMGraph", env=slurm_env)
    assert "queued by SLURMGraph" in res.stderr
    _assert_same_chimaps(out, multiproc_out)
    jobs = _jobs(slurm_env, work)
    assert len(jobs) >= 2 * 4  # to_ppm, mask, to_frame, inference, ... per subject
    assert all(j["JobState"] == "COMPLETED" for j in jobs), jobs
    assert sum(j["JobName"].endswith("_inference") for j in jobs) == len(SUBJECTS)


@pytest.mark.slow
@needs_slurm
def test_slurm_six_subjects_one_corrupt(slurm_env, tmp_path):
    """Six subjects through SLURM, sub-04's field a truncated .nii.gz: the pre-flight skips
    it before any job is queued, the five others complete as jobs, exit 3, one console line
    and no traceback."""
    ds = make_many_subjects(tmp_path / "ds", 6, {"04": "truncated"})
    model = make_model_file(tmp_path / "toy.safetensors", architecture="toy")
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [str(CONSOLE_SCRIPT), str(ds), str(out), "participant", "--model", model, "-w",
           str(work), "--omp-nthreads", "1", "--skip-bids-validation", "--plugin", "SLURM"]
    res = subprocess.run(cmd, env=dict(slurm_env, OMP_NUM_THREADS="1"), capture_output=True,
                         text=True, timeout=540)
    assert res.returncode == 3, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("bids_qsmnet:")]
    assert len(lines) == 1 and "1 problem(s) in 1 of 6 subject(s)" in lines[0], lines
    assert "sub-04_localfield.nii.gz: the local field file is truncated" in lines[0]
    assert len(list(out.glob("sub-*/anat/*_Chimap.nii.gz"))) == 5
    assert not (out / "sub-04").exists()
    jobs = _jobs(slurm_env, work)
    assert jobs and all(j["JobState"] == "COMPLETED" for j in jobs), jobs
    # the SLURM plugin names a job <node>.<workflow path>: one inference job per good subject
    assert sum(j["JobName"].startswith("inference.") for j in jobs) == 5, jobs
    assert not any("run_sub_04_wf" in j["JobName"] for j in jobs)


def test_job_array_tasks_share_an_output_folder(tmp_path):
    """Runs for different participants may write one output folder at the same time (one
    SLURM array task each); the same participant twice, or an all-subjects run, may not."""
    from bids_qsmnet.errors import UserError as CLIError
    from bids_qsmnet.io.locks import output_lock as _output_lock

    out = tmp_path / "out"
    with _output_lock(out, ["01"]):
        with _output_lock(out, ["02", "03"]):
            for busy in (["01"], ["03", "04"], None):
                with pytest.raises(CLIError, match="another bids_qsmnet run is writing"):
                    with _output_lock(out, busy):
                        pass
    with _output_lock(out, None):  # all released
        with pytest.raises(CLIError, match="this output folder"):
            with _output_lock(out, ["05"]):
                pass
