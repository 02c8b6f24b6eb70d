"""Running a built workflow: Nipype's configuration, the plugin's arguments, and waiting for
the jobs that SLURMGraph queued."""

from __future__ import annotations

import gc
import logging
import os
import time
from pathlib import Path

from ..errors import CLIError

LOGGER = logging.getLogger("bids_qsmnet")

__all__ = ["run_workflow", "nipype_settings", "plugin_arguments", "start_worker_server",
           "uses_forkserver", "wait_for_slurm_graph"]


#: seconds between two looks of a local scheduler (MultiProc) at its workers; Nipype's 2 s
#: default adds up to 2 s after every node of a chain.  Cluster plugins keep Nipype's default,
#: each look queries the queue.
LOCAL_POLL_S = 0.05


#: modules the MultiProc workers' forkserver imports once for all of them
WORKER_PRELOAD = ("numpy", "scipy.ndimage", "nibabel", "torch", "nipype.pipeline.engine",
                  "bids_qsmnet.interfaces.inference", "bids_qsmnet.interfaces.phase",
                  "bids_qsmnet.interfaces.derivatives", "bids_qsmnet.inference.run",
                  "bids_qsmnet.reports.agg", "bids_qsmnet.reports.figures")


#: glibc's malloc in the workers: blocks up to 4 GiB come from the heap instead of a fresh
#: ``mmap`` each, and freed memory stays with the process (a worker runs one node and ends).
#: By default every array above 32 MiB is mapped anew and its pages are faulted in and zeroed
#: on first touch, which costs a third of an elementwise operation on a 262 MB activation
#: (63 against 35–43 ms, ``x * 2`` on 16×160³ float32) and about 1 s of a 160³ inference
#: node (network and refinement: 10.6 → 9.4 s).  Values the user's environment sets win;
#: other C libraries ignore these variables.
WORKER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(4 << 30), "MALLOC_TRIM_THRESHOLD_": str(16 << 30)}


def nipype_settings(crash_dir: Path, verbose: int, plugin: str = "MultiProc", *,
                    stop_on_first_crash: bool = False) -> dict:
    """Nipype configuration of a run: text crash files in ``crash_dir``, content hashes, no
    stop on the first crash (unless asked), quiet logs unless ``-v``; a fast poll for
    MultiProc."""
    execution = {"crashdump_dir": str(crash_dir), "crashfile_format": "txt",
                 "hash_method": "content", "stop_on_first_crash": bool(stop_on_first_crash),
                 "remove_unnecessary_outputs": False, "check_version": False}
    if plugin == "MultiProc":
        execution["poll_sleep_duration"] = LOCAL_POLL_S
    return {
        "execution": execution,
        "monitoring": {"enabled": False},
        "logging": {level: "INFO" if verbose > 0 else "WARNING"
                    for level in ("workflow_level", "interface_level", "utils_level")}}


def plugin_arguments(plugin: str, plugin_args: dict | None, nprocs: int,
                     mem_mb: int | None = None) -> dict:
    """The arguments given to ``plugin``: the user's ``--plugin-args`` and this app's
    defaults (MultiProc: ``nprocs`` workers from a forkserver, within ``mem_mb`` when given;
    SLURM: a ``LOGNAME``)."""
    args = dict(plugin_args or {})
    if plugin == "MultiProc":
        args.setdefault("n_procs", nprocs)
        if mem_mb:
            args.setdefault("memory_gb", mem_mb / 1024)
        args.setdefault("raise_insufficient", False)
        args.setdefault("maxtasksperchild", 1)
        # Workers start from a forkserver that imported torch, Nipype and the interfaces once
        # (WORKER_PRELOAD), never forked from this process: a process that has run torch
        # (e.g. without a forkserver, the model check) holds an OpenMP thread pool that does
        # not survive a fork, and a forked worker running the network would hang.
        args.setdefault("mp_context", "forkserver")
        if uses_forkserver(plugin, args):
            start_worker_server()
    if plugin == "SLURM":
        os.environ.setdefault("LOGNAME", os.environ.get("USER", "bids_qsmnet"))
    if plugin == "SLURMGraph":
        # Nipype 1.11 sets this attribute only when plugin_args is non-empty (AttributeError
        # otherwise); False is its documented default
        args.setdefault("dont_resubmit_completed_jobs", False)
    return args


def set_memory_budget(mem_mb: int | None) -> None:
    """Make ``--mem-mb`` the memory budget of this process and of every worker it starts
    (:func:`bids_qsmnet.io.nifti.available_memory` reads :data:`MEMORY_BUDGET_ENV`)."""
    from ..io.nifti import MEMORY_BUDGET_ENV

    if mem_mb:
        os.environ[MEMORY_BUDGET_ENV] = str(int(mem_mb))


def clean_work_dir(work_dir: Path) -> None:
    """``--clean-workdir``: remove what earlier runs left in ``work_dir``.  Only a folder that
    holds nothing but this app's work (its workflow folders, crash files, matplotlib cache) is
    emptied; anything else is refused, so a mistyped ``-w`` cannot delete a user's files."""
    import shutil

    from ..errors import CLIError

    if not work_dir.exists():
        return
    ours = {"bids_qsmnet_wf", "training_wf", "crashes", "matplotlib"}
    entries = list(work_dir.iterdir())
    foreign = sorted(p.name for p in entries if p.name not in ours)
    if foreign:
        raise CLIError(f"{work_dir}: --clean-workdir refuses to empty a folder with files "
                       f"bids_qsmnet did not write ({', '.join(foreign[:3])}"
                       f"{', …' if len(foreign) > 3 else ''}); give a work dir of its own")
    for p in entries:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    LOGGER.info("emptied the work dir %s (--clean-workdir)", work_dir)


def uses_forkserver(plugin: str, plugin_args: dict | None) -> bool:
    """Whether ``plugin`` with these arguments starts its workers from a forkserver
    (MultiProc's default here, unless ``--plugin-args`` names another ``mp_context``)."""
    return plugin == "MultiProc" and (plugin_args or {}).get("mp_context",
                                                              "forkserver") == "forkserver"


def start_worker_server() -> None:
    """Start the forkserver of the MultiProc workers now (idempotent), so that its imports
    run beside the dataset indexing of this process (the model check runs in one of its
    processes: :func:`bids_qsmnet.cli.build.start_model_check`).

    The forkserver and its workers end with this process, even when it is killed
    (:mod:`bids_qsmnet.cli.workers`); the heavy imports (:data:`WORKER_PRELOAD`) happen once
    in the forkserver, not in every worker (importing torch starts no thread pool, so forking
    after it is safe).  The environment is the forkserver's from here on, with glibc's
    malloc set for large arrays (:data:`WORKER_MALLOC`).
    """
    import multiprocessing
    from multiprocessing import forkserver

    for key, value in WORKER_MALLOC.items():  # read by the forkserver's C library at start
        os.environ.setdefault(key, value)
    multiprocessing.set_forkserver_preload(["__main__", "bids_qsmnet.cli.workers",
                                            *WORKER_PRELOAD])
    forkserver.ensure_running()


def run_workflow(workflow, opts, work_dir: Path) -> None:
    """Run ``workflow`` in ``work_dir`` with the plugin of ``opts``; with SLURMGraph, return
    only once its jobs have left the queue.

    Raises
    ------
    RuntimeError
        (Nipype's) when some nodes crashed; their crash files are in ``work_dir/crashes``.
    """
    from nipype import config as ncfg
    from nipype import logging as nlogging

    settings = nipype_settings(work_dir / "crashes", opts.verbose, opts.plugin,
                               stop_on_first_crash=opts.stop_on_first_crash)
    ncfg.update_config(settings)
    # a workflow copies Nipype's config when it is built, and that copy wins at run time:
    # without this, crash files land as .pklz in the current directory
    workflow.config["execution"].update(settings["execution"])
    nlogging.update_logging(ncfg)
    logging.getLogger("nipype").propagate = False  # Nipype has its own handler
    workflow.base_dir = str(work_dir)
    plugin_args = plugin_arguments(opts.plugin, opts.plugin_args, opts.nprocs, opts.mem_mb)
    LOGGER.info("running %s with the %s plugin (work dir %s)", workflow.name, opts.plugin,
                work_dir)
    # MultiProc runs a full garbage collection each time it looks for jobs to submit: with
    # torch and Nipype loaded that is ~0.15 s of this process's CPU each time, taken from the
    # workers.  Objects that exist now live for the whole run; frozen, the collector skips them.
    gc.freeze()
    try:
        workflow.run(plugin=opts.plugin, plugin_args=plugin_args)
    finally:
        gc.unfreeze()
    if opts.plugin == "SLURMGraph":
        wait_for_slurm_graph(work_dir / workflow.name / "batch")


def _queued_job_names(batch_dir: Path) -> list[str]:
    """Names of the jobs in the ``submit_jobs.sh`` that SLURMGraph wrote into ``batch_dir``."""
    import re

    script = batch_dir / "submit_jobs.sh"
    if not script.exists():
        return []
    return sorted(set(re.findall(r" -J (\S+) ", script.read_text())))


def wait_for_slurm_graph(batch_dir: Path, *, poll: float = 3.0) -> None:
    """Wait until the jobs that SLURMGraph queued have left the queue.

    SLURMGraph's ``run()`` returns once the whole graph is submitted (with ``afterok``
    dependencies), before any output exists.  Jobs whose dependency failed would stay pending
    for ever, so they are cancelled (their runs then lack outputs and are reported as failed).

    Parameters
    ----------
    batch_dir : the ``batch`` folder of the workflow in the work folder
    poll : seconds between two ``squeue`` calls
    """
    import getpass
    import subprocess

    names = _queued_job_names(batch_dir)
    if not names:
        return
    LOGGER.info("waiting for the %d SLURM job(s) queued by SLURMGraph", len(names))
    cmd = ["squeue", "-h", "-u", getpass.getuser(), "--name", ",".join(names), "-o", "%i %r"]
    failures = 0
    while True:
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:  # the controller may be briefly unreachable: retry a while
            failures += 1
            if failures > 20:
                raise CLIError(f"squeue failed while waiting for SLURM jobs: "
                               f"{res.stderr.strip()}")
            time.sleep(poll)
            continue
        failures = 0
        rows = [line.split(None, 1) for line in res.stdout.splitlines() if line.strip()]
        if not rows:
            return
        doomed = [r[0] for r in rows if len(r) == 2 and "DependencyNeverSatisfied" in r[1]]
        if doomed:  # their dependants follow on the next polls
            LOGGER.error("cancelling SLURM job(s) %s: a job they depend on failed",
                         ", ".join(doomed))
            subprocess.run(["scancel", *doomed], check=False)
        time.sleep(poll)
