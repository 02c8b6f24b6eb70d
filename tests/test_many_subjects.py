"""Many subjects, a few bad: the pre-flight reports and skips them, the others run.

A dataset of 50 small local-field subjects (24³ spheres in ppm, a toy network) of which two
are broken (sub-07: an empty brain mask; sub-31: a truncated ``.nii.gz``) runs through the
console script with ``--nprocs 2`` (MultiProc).  The test checks that 48 χ maps are written, the
two are named in the console's one line, in the log and in their reports, no traceback reaches
the console, the exit code is 3 (some failed) and the peak memory of the whole process tree
stays bounded; then it repairs the two and reruns: only those two run, the 48 outputs keep
their bytes and modification times.  The same with ``--plugin SLURM`` (6 subjects, 1 corrupt)
lives in ``tests/test_slurm.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _bidsapp_fixtures import make_many_subjects, make_model_file, repair_subjects

CONSOLE_SCRIPT = Path(sys.executable).with_name("bids_qsmnet")
N_SUBJECTS = 50
EMPTY_MASK, TRUNCATED = "07", "31"
#: the bound on the summed resident memory of the app and its workers (2 MultiProc workers
#: with torch, 24³ volumes)
PEAK_LIMIT_MB = 3000
TIMEOUT = 1500


def _tree_rss_mb(root: int) -> float:
    """Summed resident memory (MB) of the processes in ``root``'s session."""
    total = 0
    page = os.sysconf("SC_PAGE_SIZE")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[3]) != root:  # session id
                continue
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue
    return total / 2**20


def run_measured(argv, *, env=None, timeout=TIMEOUT):
    """Run ``argv`` in its own session; (CompletedProcess-like result, seconds, peak MB)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    peak = [0.0]

    def watch():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss_mb(proc.pid))
            time.sleep(0.2)

    t0 = time.monotonic()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, err = proc.communicate(timeout=timeout)
    secs = time.monotonic() - t0
    watcher.join()
    return subprocess.CompletedProcess(argv, proc.returncode, out, err), secs, peak[0]


def _outputs(out: Path) -> dict:
    """Relative path → (bytes, mtime_ns) of every file of the derivatives."""
    return {p.relative_to(out).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(out.rglob("*")) if p.is_file()}


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


@pytest.mark.slow
def test_fifty_subjects_two_bad_then_rerun(tmp_path):
    ds = make_many_subjects(tmp_path / "ds", N_SUBJECTS,
                            {EMPTY_MASK: "empty-mask", TRUNCATED: "truncated"})
    model = make_model_file(tmp_path / "toy.safetensors", architecture="toy")
    out, work = tmp_path / "out", tmp_path / "work"
    argv = [str(CONSOLE_SCRIPT), str(ds), str(out), "participant", "--model", model,
            "-w", str(work), "--nprocs", "2", "--omp-nthreads", "1",
            "--skip-bids-validation"]
    res, secs, peak = run_measured(argv, env=_env())
    print(f"\n{N_SUBJECTS} subjects, 2 bad, --nprocs 2: {secs:.0f} s, peak RSS {peak:.0f} MB")
    assert res.returncode == 3, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    # MultiProc's workers log at the run's level: no Nipype node chatter on the console
    assert res.stdout == "" and "nipype.workflow INFO" not in res.stderr, res.stdout[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("bids_qsmnet:")]
    assert len(lines) == 1 and lines[0].startswith(
        f"bids_qsmnet: 2 problem(s) in 2 of {N_SUBJECTS} subject(s); first: "), lines
    for sub, says in ((EMPTY_MASK, "the brain mask is empty"),
                      (TRUNCATED, "truncated or corrupt")):
        assert f"sub-{sub}: not processed: " in res.stderr, res.stderr[-3000:]
        assert says in (out / f"sub-{sub}.html").read_text()
        assert not (out / f"sub-{sub}").exists()
    maps = sorted(out.glob("sub-*/anat/*_Chimap.nii.gz"))
    assert len(maps) == N_SUBJECTS - 2
    assert not (work / "crashes").exists() or not list((work / "crashes").iterdir())
    assert 0 < peak < PEAK_LIMIT_MB

    before = _outputs(out)
    repair_subjects(ds, (EMPTY_MASK, TRUNCATED))
    res2, secs2, peak2 = run_measured(argv, env=_env())
    print(f"rerun after repairing the two: {secs2:.0f} s, peak RSS {peak2:.0f} MB")
    assert res2.returncode == 0, res2.stderr[-3000:]
    after = _outputs(out)
    changed = sorted(k for k in before if after.get(k) != before[k])
    # only the two error reports change: the 48 subjects' files and reports are untouched
    assert changed == [f"sub-{EMPTY_MASK}.html", f"sub-{TRUNCATED}.html"], changed
    new = sorted(set(after) - set(before))
    assert new and all(k.startswith((f"sub-{EMPTY_MASK}", f"sub-{TRUNCATED}")) for k in new), new
    assert len(sorted(out.glob("sub-*/anat/*_Chimap.nii.gz"))) == N_SUBJECTS
    assert "found 2 run(s) to process in 2 subject(s)" in res2.stderr
