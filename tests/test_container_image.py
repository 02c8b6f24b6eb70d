"""The container image, built and run (slow; CI installs Podman and debootstrap as root).

``benchmarks/container.py`` does the work (the same steps as ``python benchmarks/container.py
all``): a Debian base made with debootstrap from this machine's own apt sources (no registry),
the CPU image built from the top-level ``Dockerfile`` on it with Podman, then runs with
``--network none``: ``--version``; the example dataset's participant level as the image's
user on folders it owns, and with ``--user`` on the caller's folders; a root-owned output
folder; and the image saved as the docker-archive that the ``Singularity`` recipe converts,
loaded back and run as Apptainer runs a SIF.  Every χ map must equal the native run's.

It skips only where Podman cannot run (not installed, or ``podman info`` fails), or where no
base can be made here (debootstrap needs root; ``BIDS_QSMNET_BASE_IMAGE`` names an existing
base instead, e.g. ``python:3.12.8-slim-bookworm``).  With ``BIDS_QSMNET_RECORD_BENCHMARKS=1``
it records its figures in ``docs/benchmarks.json`` and ``docs/benchmarks.md``, as
``benchmarks/container.py all --record`` does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bids_qsmnet.__about__ import __version__

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _load_bench():
    spec = importlib.util.spec_from_file_location(
        "container_bench", ROOT / "benchmarks" / "container.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    folder = tmp_path_factory.mktemp("container")
    yield folder
    bench.remove_tree(folder)  # what the containers wrote, rootless Podman's sub-uids too


@pytest.fixture(scope="module")
def env(work):
    env = bench.podman_conf(work / "conf")
    problem = bench.podman_problem(env)
    if problem:
        pytest.skip(f"podman cannot run here: {problem}")
    return env


@pytest.fixture(scope="module")
def base(work, env):
    """The base image: ``BIDS_QSMNET_BASE_IMAGE``, or Debian made with debootstrap."""
    given = os.environ.get("BIDS_QSMNET_BASE_IMAGE")
    if given:
        yield bench.given_base(given, env)
        return
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        pytest.skip("no base image: debootstrap (as root) makes one; or name one in "
                    "BIDS_QSMNET_BASE_IMAGE")
    tag = f"localhost/bids_qsmnet-test-base:{os.getpid()}"
    made = bench.make_base(tag, work, env)
    yield made
    subprocess.run(["podman", "rmi", "--force", tag], env=env, capture_output=True)


@pytest.fixture(scope="module")
def image(work, env, base):
    tag = f"localhost/bids_qsmnet:{__version__}-cpu"
    figures = bench.build_image(tag, base["base"], work, env)
    yield figures
    subprocess.run(["podman", "rmi", "--force", tag], env=env, capture_output=True)


@pytest.fixture(scope="module")
def checks(work, env, image):
    return bench.run_checks(image["image"], work, env)


def test_image_is_small_and_carries_no_cuda(image, env):
    print(json.dumps(image))
    assert image["image_mb"] * 1e6 <= bench.CPU_IMAGE_BUDGET, image
    # what runs, and nothing for building or testing
    listing = subprocess.run(
        ["podman", "run", "--rm", "--network", "none", "--entrypoint", "/bin/sh", image["image"],
         "-c", "ls /opt/venv/lib/python3*/site-packages; command -v gcc cc make pip || true"],
        env=env, capture_output=True, text=True, check=True).stdout.split()
    for absent in ("pytest", "hypothesis", "ruff", "pip", "/usr/bin/gcc", "/usr/bin/make"):
        assert absent not in listing, absent
    assert not [name for name in listing if name.lower().startswith(("nvidia", "triton"))]
    assert "torch" in listing and "bids_qsmnet" in listing


def test_byte_code_is_used(image, env):
    """The image's user loads the modules of a run from byte code (none is stale: the user
    could not rewrite it, every start would compile in memory)."""
    res = subprocess.run(
        ["podman", "run", "--rm", "--network", "none", "--entrypoint", "python3",
         image["image"], "-v", "-c", "import torch, nipype.pipeline.engine, bids, bids_qsmnet."
         "cli.build, bids_qsmnet.workflows.base, matplotlib.pyplot"],
        env=env, capture_output=True, text=True, check=True)
    loaded = [line for line in res.stderr.splitlines() if line.startswith("# code object from")]
    stale = [line for line in res.stderr.splitlines() if "bytecode is stale" in line]
    assert len(loaded) > 1000 and not stale, (len(loaded), stale[:5])


def test_runs_match_the_native_run(checks):
    runs = checks["runs"]
    print(json.dumps({k: {f: v for f, v in r.items() if f != "stderr"} for k, r in runs.items()}))
    assert checks["version"] == f"bids_qsmnet {__version__}"
    for name in ("image user", "--user", "apptainer-like"):
        assert runs[name]["max_abs_diff_ppm"] <= bench.CHI_TOLERANCE_PPM, (name, runs[name])
        # no message of podman (level=warning/error: e.g. about health checks without systemd)
        # and no warning of Python's warnings module on the console
        stderr = runs[name]["stderr"]
        assert "level=" not in stderr and "Warning:" not in stderr, stderr[-2000:]
    assert runs["apptainer-like"]["container"]["Type"] == "singularity"


def test_unwritable_output_is_one_line(checks):
    run = checks["runs"]["unwritable output"]
    assert run["exit"] == 1, run
    assert run["stdout"] == "" and len(run["stderr"].splitlines()) == 1, run["stderr"]
    line = run["stderr"].strip()
    assert line.startswith("bids_qsmnet: error: output_dir /out is not writable by uid 1000 "
                           "(owner uid "), line
    assert 'run --user "$(id -u):$(id -g)"' in line, line
    assert run["left"] == [], run


def test_record(base, image, checks, env):
    """Record the figures in docs/benchmarks.* when asked (BIDS_QSMNET_RECORD_BENCHMARKS=1);
    always print them."""
    row = bench.benchmark_row(base, image, checks, env)
    print(json.dumps(row))
    if os.environ.get("BIDS_QSMNET_RECORD_BENCHMARKS") == "1":
        bench.record(row, ROOT / "docs" / "benchmarks.json", ROOT / "docs" / "benchmarks.md",
                     ROOT / "benchmarks" / "notes.md")
