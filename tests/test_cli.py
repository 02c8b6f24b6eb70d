"""The ``bids_qsmnet`` argument parser: validation while parsing, cross-option checks, and an
instant ``--help``/``--version`` that never imports torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bids_qsmnet.__about__ import __version__
from bids_qsmnet.cli.parser import parse_args

os.environ.setdefault("OMP_NUM_THREADS", "1")

CONSOLE_SCRIPT = Path(sys.executable).with_name("bids_qsmnet")


@pytest.fixture
def bids(tmp_path):
    """An (empty) raw dataset folder and an output folder outside it."""
    root = tmp_path / "ds"
    root.mkdir()
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "x", "BIDSVersion": "1.10.0"})
    )
    return root, tmp_path / "out"


def _exit_code(argv, capsys):
    """Exit code of ``parse_args(argv)`` and the last line it wrote to stderr."""
    with pytest.raises(SystemExit) as info:
        parse_args([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    return info.value.code, (err[-1] if err else "")


# --------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (["01"], ["01"]),
        (["sub-01"], ["01"]),
        (["sub-01", "02", "sub-A1"], ["01", "02", "A1"]),
        ([" sub-07 "], ["07"]),
    ],
)
def test_participant_labels_with_and_without_prefix(bids, labels, expected):
    root, out = bids
    opts = parse_args([str(root), str(out), "participant", "--participant-label", *labels])
    assert opts.participant_label == expected


@pytest.mark.parametrize(
    ("labels", "expected"), [(["pre"], ["pre"]), (["ses-pre", "post"], ["pre", "post"])]
)
def test_session_labels_with_and_without_prefix(bids, labels, expected):
    root, out = bids
    opts = parse_args([str(root), str(out), "participant", "--session-label", *labels])
    assert opts.session_label == expected


@pytest.mark.parametrize("label", ["../x", "sub-", "01/02", "sub-01_ses-1", "a b", ".."])
def test_invalid_participant_label_exits_2(bids, capsys, label):
    root, out = bids
    code, err = _exit_code([root, out, "participant", "--participant-label", label], capsys)
    assert code == 2
    assert "invalid label" in err and err.startswith("bids_qsmnet: error:")


def test_invalid_session_label_exits_2(bids, capsys):
    root, out = bids
    code, err = _exit_code([root, out, "participant", "--session-label", "ses-../a"], capsys)
    assert code == 2 and "invalid label" in err


# --------------------------------------------------------------------------- folders


def test_defaults_are_resolved(bids):
    root, out = bids
    opts = parse_args([str(root), str(out), "participant"])
    assert opts.output_dir == out.resolve() and opts.output_dir.is_absolute()
    assert opts.bids_dir.is_absolute()
    assert opts.participant_label is None and opts.bids_filter_file is None
    assert opts.plugin == "MultiProc" and opts.work_dir is None
    assert opts.omp_nthreads == min(opts.nprocs, 8)


def test_threads_per_process_stay_within_the_cpus_of_a_local_run(bids):
    """MultiProc: ``--nprocs`` bounds every node's threads (no node demands more than the
    plugin has); a cluster plugin's jobs get the threads asked for."""
    root, out = bids
    args = [str(root), str(out), "participant", "--nprocs", "1", "--omp-nthreads", "2"]
    assert parse_args(args).omp_nthreads == 1
    assert parse_args([*args, "--plugin", "SLURM"]).omp_nthreads == 2


def test_nonexistent_bids_dir_exits_2(tmp_path, capsys):
    code, err = _exit_code([tmp_path / "missing", tmp_path / "out", "participant"], capsys)
    assert code == 2 and "does not exist" in err


@pytest.mark.parametrize("spelling", ["same", "trailing-slash", "dot-dot", "symlink"])
def test_output_dir_equal_to_bids_dir_exits_2(bids, capsys, spelling):
    root, _ = bids
    out = {
        "same": str(root),
        "trailing-slash": f"{root}/",
        "dot-dot": f"{root}/sub/..",
        "symlink": str(root.parent / "link"),
    }[spelling]
    if spelling == "symlink":
        os.symlink(root, out)
    code, err = _exit_code([root, out, "participant"], capsys)
    assert code == 2 and "must differ from bids_dir" in err


@pytest.mark.parametrize(
    "inside",
    ["out", "sub-01/out", "derivatives", "sub-01/derivatives/bids_qsmnet", "code/derivatives/x"],
)
def test_output_dir_inside_bids_dir_exits_2(bids, capsys, inside):
    root, _ = bids
    code, err = _exit_code([root, root / inside, "participant"], capsys)
    assert code == 2 and "is inside bids_dir" in err


@pytest.mark.parametrize("under", ["derivatives/bids_qsmnet", "derivatives/qsm/run1"])
def test_output_dir_under_derivatives_is_accepted(bids, under):
    root, _ = bids
    opts = parse_args([str(root), str(root / under), "participant"])
    assert opts.output_dir == (root / under).resolve()


@pytest.mark.parametrize("work", ["", "work", "derivatives/work"])
def test_work_dir_inside_bids_dir_exits_2(bids, capsys, work):
    root, out = bids
    code, err = _exit_code([root, out, "participant", "-w", root / work], capsys)
    assert code == 2 and "must not be inside bids_dir" in err


def test_work_dir_outside_bids_dir_is_accepted(bids, tmp_path):
    root, out = bids
    opts = parse_args([str(root), str(out), "participant", "--work-dir", str(tmp_path / "w")])
    assert opts.work_dir == (tmp_path / "w").resolve()


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ("'x'", "not valid JSON"),
    ],
)
def test_bad_plugin_args_exit_2(bids, capsys, value, message):
    root, out = bids
    code, err = _exit_code([root, out, "participant", "--plugin-args", value], capsys)
    assert code == 2 and "--plugin-args" in err and message in err


def test_plugin_args_parsed(bids):
    root, out = bids
    opts = parse_args(
        [
            str(root),
            str(out),
            "participant",
            "--plugin",
            "SLURM",
            "--plugin-args",
            '{"sbatch_args": "-p gpu", "max_jobs": 4}',
        ]
    )
    assert opts.plugin == "SLURM"
    assert opts.plugin_args == {"sbatch_args": "-p gpu", "max_jobs": 4}


def test_unknown_plugin_exits_2(bids, capsys):
    root, out = bids
    code, _ = _exit_code([root, out, "participant", "--plugin", "Dask"], capsys)
    assert code == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"localfield": ', "not valid JSON"),
        ('[{"suffix": "localfield"}]', "must hold a JSON object"),
        ('{"fieldmap": {"suffix": "phasediff"}}', "unknown input kind(s) fieldmap"),
        ('{"localfield": "localfield"}', "must be a filter object or a list of them"),
        ('{"mask": []}', "must be a filter object or a list of them"),
    ],
)
def test_bad_bids_filter_file_exits_2(bids, tmp_path, capsys, content, message):
    root, out = bids
    f = tmp_path / "filters.json"
    f.write_text(content)
    code, err = _exit_code([root, out, "participant", "--bids-filter-file", f], capsys)
    assert code == 2 and message in err and str(f) in err


def test_missing_bids_filter_file_exits_2(bids, tmp_path, capsys):
    root, out = bids
    code, err = _exit_code(
        [root, out, "participant", "--bids-filter-file", tmp_path / "nope.json"], capsys
    )
    assert code == 2 and "does not exist" in err


def test_bids_filter_file_loaded_as_lists(bids, tmp_path):
    root, out = bids
    f = tmp_path / "filters.json"
    f.write_text(
        json.dumps(
            {
                "localfield": {"suffix": "tissuefield"},
                "mask": [{"desc": "brain", "suffix": "mask"}, {"suffix": "mask"}],
            }
        )
    )
    opts = parse_args([str(root), str(out), "participant", "--bids-filter-file", str(f)])
    assert opts.bids_filter_file == {
        "localfield": [{"suffix": "tissuefield"}],
        "mask": [{"desc": "brain", "suffix": "mask"}, {"suffix": "mask"}],
    }


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--b0-strength", "0"),
        ("--b0-strength", "-3"),
        ("--b0-strength", "three"),
        ("--tile", "0"),
        ("--tile", "6.5"),
        ("--nprocs", "0"),
        ("--epochs", "-1"),
        ("--validation-fraction", "1.0"),
        ("--device", "tpu"),
        ("--learning-rate", "0"),
        ("--ema-decay", "1"),
        ("--ema-decay", "-0.5"),
    ],
)
def test_bad_numbers_exit_2(bids, capsys, option, value):
    root, out = bids
    code, _ = _exit_code([root, out, "participant", option, value], capsys)
    assert code == 2


def test_bad_analysis_level_exits_2(bids, capsys):
    root, out = bids
    code, _ = _exit_code([root, out, "session"], capsys)
    assert code == 2


# --------------------------------------------------------------------------- instant help


_PROBE = """
import sys, time
t0 = time.perf_counter()
from bids_qsmnet.cli.run import main
try:
    main([{arg!r}])
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("torch", "nipype", "bids", "scipy", "nibabel", "matplotlib")
               if m in sys.modules)
sys.stderr.write("PROBE %s %s %.3f\\n" % (code, ",".join(heavy) or "-", time.perf_counter() - t0))
"""


@pytest.mark.parametrize("arg", ["--version", "--help"])
def test_help_and_version_import_nothing_heavy(arg):
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE.format(arg=arg)], capture_output=True, text=True, timeout=60
    )
    probe = [line for line in proc.stderr.splitlines() if line.startswith("PROBE")]
    assert probe, proc.stderr
    _, code, heavy, _seconds = probe[0].split()
    assert code == "0"
    assert heavy == "-", f"{arg} imported {heavy}"
    if arg == "--version":
        assert proc.stdout.strip() == f"bids_qsmnet {__version__}"
    else:
        assert "usage: bids_qsmnet" in proc.stdout and "--participant-label" in proc.stdout


@pytest.mark.parametrize("arg", ["--version", "--help"])
def test_console_script_is_fast(arg):
    assert CONSOLE_SCRIPT.exists(), f"{CONSOLE_SCRIPT} (the package is installed editable)"
    t0 = time.perf_counter()
    proc = subprocess.run([str(CONSOLE_SCRIPT), arg], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0
    assert elapsed < 1.5, f"bids_qsmnet {arg} took {elapsed:.2f} s"


def test_flip_axes_option(bids, capsys):
    """--flip-axes: absent → the model's default (None), bare → off ([]), axes → those."""
    root, out = bids
    base = [str(root), str(out), "participant"]
    assert parse_args(base).flip_axes is None
    assert parse_args([*base, "--flip-axes"]).flip_axes == []
    assert parse_args([*base, "--flip-axes", "0", "1"]).flip_axes == [0, 1]
    code, msg = _exit_code([*base, "--flip-axes", "3"], capsys)
    assert code == 2 and "--flip-axes" in msg


def test_residual_passes_option(bids, capsys):
    """--residual-passes: absent → the model's default (None), N ≥ 0 → N, else exit code 2."""
    root, out = bids
    base = [str(root), str(out), "participant"]
    assert parse_args(base).residual_passes is None
    assert parse_args([*base, "--residual-passes", "0"]).residual_passes == 0
    assert parse_args([*base, "--residual-passes", "2"]).residual_passes == 2
    for bad in ("-1", "two"):
        code, msg = _exit_code([*base, "--residual-passes", bad], capsys)
        assert code == 2 and "--residual-passes" in msg


def test_dc_lambda_option(bids, capsys):
    """--dc-lambda: absent → the model's choice (None), 'auto' → the model's per-input rule,
    a non-negative number → that fixed weight, anything else → exit code 2."""
    root, out = bids
    base = [str(root), str(out), "participant"]
    assert parse_args(base).dc_lambda is None
    assert parse_args([*base, "--dc-lambda", "auto"]).dc_lambda == "auto"
    assert parse_args([*base, "--dc-lambda", "AUTO"]).dc_lambda == "auto"
    assert parse_args([*base, "--dc-lambda", "0.03"]).dc_lambda == 0.03
    assert parse_args([*base, "--dc-lambda", "0"]).dc_lambda == 0.0
    for bad in ("-0.1", "much", "nan"):
        code, msg = _exit_code([*base, "--dc-lambda", bad], capsys)
        assert code == 2 and "--dc-lambda" in msg
