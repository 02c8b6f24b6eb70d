"""The NiPreps-style flags through the command line: ``--boilerplate-only``,
``--reports-only``, ``--stop-on-first-crash``, ``--clean-workdir`` and ``--mem-mb``.

Each test runs ``bids_qsmnet.cli.run.main`` in-process on small datasets (24³ spheres and a toy
network, or the example dataset's sidecars for the methods text) with the Linear plugin.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from _bidsapp_fixtures import make_many_subjects, make_model_file

from bids_qsmnet.cli.execution import plugin_arguments
from bids_qsmnet.cli.run import main
from bids_qsmnet.io.nifti import MEMORY_BUDGET_ENV, available_memory

os.environ.setdefault("OMP_NUM_THREADS", "1")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ds-synthetic"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model_file(tmp_path_factory.mktemp("model") / "toy.safetensors",
                           architecture="toy")


def _run(argv, capsys):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    return code, [ln for ln in err.splitlines() if ln.startswith("bids_qsmnet:")], err


def _argv(ds, out, work, model, *extra):
    return [ds, out, "participant", "--model", model, "-w", work, "--plugin", "Linear",
            "--skip-bids-validation", *extra]


def _bib_keys(text: str) -> list[str]:
    return re.findall(r"^@article\{([^,]+),", text, flags=re.M)


# --------------------------------------------------------------------------- boilerplate


def test_boilerplate_only_describes_the_steps_a_run_would_perform(tmp_path, capsys):
    """The example dataset holds local fields (sub-01, sub-02) and raw GRE (sub-03): the text
    names the raw chain's steps with their references, the BibTeX holds exactly the
    references the text numbers, and nothing else is written."""
    out, work = tmp_path / "out", tmp_path / "work"
    code, lines, err = _run([EXAMPLE, out, "participant", "-w", work, "--boilerplate-only"],
                            capsys)
    assert code == 0 and not lines, err[-3000:]
    md = (out / "logs" / "CITATION.md").read_text()
    bib = (out / "logs" / "CITATION.bib").read_text()
    assert "Laplacian-based phase unwrapping" in md and "V-SHARP" in md
    assert "converted to ppm of B0" in md and "QSMnet+" in md
    assert "doi:10.1364/OL.28.001194" in md and "doi:10.1016/j.neuroimage.2010.11.088" in md
    n_refs = len(re.findall(r"^\[\d+\] ", md, flags=re.M))
    keys = _bib_keys(bib)
    assert len(keys) == n_refs == len(set(keys)) and "vsharp" in keys and "laplacian" in keys
    assert bib.count("{") == bib.count("}")
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert [w for w in written if not w.startswith(".bids_qsmnet")] == [
        "logs/CITATION.bib", "logs/CITATION.md"]
    assert not work.exists()


def test_boilerplate_follows_the_options_and_the_selected_subjects(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = _run([EXAMPLE, out, "participant", "--boilerplate-only", "--bgremoval",
                         "pdf", "--unwrapping", "path", "--dc-lambda", "0"], capsys)
    assert code == 0, err[-3000:]
    md = (out / "logs" / "CITATION.md").read_text()
    assert "projection onto dipole fields (PDF)" in md and "V-SHARP" not in md
    assert "path-following" in md and "refined towards" not in md
    assert "pdf" in _bib_keys((out / "logs" / "CITATION.bib").read_text())
    out2 = tmp_path / "out2"
    code, _, err = _run([EXAMPLE, out2, "participant", "--boilerplate-only",
                         "--participant-label", "01", "--dc-lambda", "0.05"], capsys)
    assert code == 0, err[-3000:]
    md = (out2 / "logs" / "CITATION.md").read_text()
    assert "phase unwrapping" not in md and "with weight λ = 0.05" in md


# --------------------------------------------------------------------------- reports only


def test_reports_only_rebuilds_reports_without_computing(tmp_path, model, capsys):
    ds = make_many_subjects(tmp_path / "ds", 2, {})
    out, work = tmp_path / "out", tmp_path / "work"
    code, _, err = _run(_argv(ds, out, work, model), capsys)
    assert code == 0, err[-3000:]
    chi = out / "sub-01/anat/sub-01_Chimap.nii.gz"
    stamp = chi.stat().st_mtime_ns
    (out / "sub-01.html").unlink()
    (out / "logs" / "CITATION.md").unlink()
    work2 = tmp_path / "work2"
    code, lines, err = _run(_argv(ds, out, work2, model, "--reports-only"), capsys)
    assert code == 0 and not lines, err[-3000:]
    report = (out / "sub-01.html").read_text()
    assert "sub-01_Chimap.nii.gz" in report and "sub-01_desc-chimap_mosaic.png" in report
    assert (out / "logs" / "CITATION.md").is_file()
    assert chi.stat().st_mtime_ns == stamp and not work2.exists()


def test_reports_only_on_an_empty_output_folder_is_one_line(tmp_path, model, capsys):
    ds = make_many_subjects(tmp_path / "ds", 1, {})
    code, lines, err = _run(_argv(ds, tmp_path / "out", tmp_path / "w", model,
                                  "--reports-only"), capsys)
    assert code == 1 and len(lines) == 1, err[-3000:]
    assert "no bids_qsmnet outputs to report on" in lines[0]


def test_documents_only_flags_need_the_participant_level(tmp_path, capsys):
    code, _, err = _run([EXAMPLE, tmp_path / "out", "group", "--reports-only"], capsys)
    assert code == 2 and "apply to the participant level" in err


# --------------------------------------------------------------------------- stop on first crash


def test_stop_on_first_crash_stops_at_the_first_bad_subject(tmp_path, model, capsys):
    """sub-02 of four is truncated: without the flag the other three complete (exit 3); with
    it the run stops there (exit 1) before any subject is processed."""
    ds = make_many_subjects(tmp_path / "ds", 4, {"02": "truncated"})
    out = tmp_path / "out"
    code, lines, err = _run(_argv(ds, out, tmp_path / "w", model, "--stop-on-first-crash"),
                            capsys)
    assert code == 1 and len(lines) == 1, err[-3000:]
    assert "sub-02_localfield.nii.gz" in lines[0] and "--stop-on-first-crash" in lines[0]
    assert not list(out.glob("sub-*/anat/*_Chimap.nii.gz"))
    assert "truncated" in (out / "sub-02.html").read_text()
    out2 = tmp_path / "out2"
    code, lines, err = _run(_argv(ds, out2, tmp_path / "w2", model), capsys)
    assert code == 3 and len(list(out2.glob("sub-*/anat/*_Chimap.nii.gz"))) == 3, err[-3000:]


def test_stop_on_first_crash_reaches_nipype():
    from bids_qsmnet.cli.execution import nipype_settings

    on = nipype_settings(Path("/tmp/c"), 0, stop_on_first_crash=True)
    off = nipype_settings(Path("/tmp/c"), 0)
    assert on["execution"]["stop_on_first_crash"] is True
    assert off["execution"]["stop_on_first_crash"] is False


# --------------------------------------------------------------------------- clean workdir


def test_clean_workdir_empties_only_a_work_dir_of_ours(tmp_path, model, capsys):
    ds = make_many_subjects(tmp_path / "ds", 1, {})
    out, work = tmp_path / "out", tmp_path / "work"
    code, _, err = _run(_argv(ds, out, work, model), capsys)
    assert code == 0, err[-3000:]
    stale = work / "bids_qsmnet_wf" / "stale.txt"
    stale.write_text("left by an earlier run")
    (out / "sub-01/anat/sub-01_Chimap.nii.gz").unlink()  # so that the rerun has work to do
    code, _, err = _run(_argv(ds, out, work, model, "--clean-workdir"), capsys)
    assert code == 0, err[-3000:]
    assert not stale.exists() and (out / "sub-01/anat/sub-01_Chimap.nii.gz").is_file()
    mine = work / "notes.txt"
    mine.write_text("not bids_qsmnet's")
    code, lines, err = _run(_argv(ds, out, work, model, "--clean-workdir", "--overwrite"),
                            capsys)
    assert code == 1 and len(lines) == 1, err[-3000:]
    assert "--clean-workdir refuses" in lines[0] and "notes.txt" in lines[0]
    assert mine.read_text() == "not bids_qsmnet's"


# --------------------------------------------------------------------------- memory budget


def test_mem_mb_is_the_budget_of_tiling_and_multiproc(monkeypatch):
    monkeypatch.delenv(MEMORY_BUDGET_ENV, raising=False)
    measured = available_memory()
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "1500")
    assert available_memory() == 1500 * 2**20 or available_memory() < 1500 * 2**20 <= measured
    assert plugin_arguments("MultiProc", None, 2, 3072)["memory_gb"] == 3.0
    assert "memory_gb" not in plugin_arguments("MultiProc", None, 2)
    assert plugin_arguments("MultiProc", {"memory_gb": 1}, 2, 3072)["memory_gb"] == 1


def test_mem_mb_reaches_the_inference_node(tmp_path, model, capsys, caplog):
    """With a 1 MB budget, whole-volume inference of the toy on 24³ (about 0.9 MB at its
    peak, more than half the budget) is tiled: the inference node saw the budget, not the
    machine's free memory; the run completes with finite χ."""
    import nibabel as nib

    ds = make_many_subjects(tmp_path / "ds", 1, {})
    out = tmp_path / "out"
    try:
        code, lines, err = _run(_argv(ds, out, tmp_path / "w", model, "--mem-mb", "1"),
                                capsys)
    finally:
        os.environ.pop(MEMORY_BUDGET_ENV, None)
    assert code == 0 and not lines, err[-3000:]
    assert "0.0 GiB is available: tiling, at most 8192 voxels per tile" in caplog.text
    chi = nib.load(out / "sub-01/anat/sub-01_Chimap.nii.gz").get_fdata()
    assert chi.any() and not (chi != chi).any()
