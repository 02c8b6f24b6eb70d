"""``bids_qsmnet`` entry point: parse → find inputs → build the workflow → run it → in
``finally:`` write ``dataset_description.json``, citations and reports.  Exit code 0 when every
run succeeded, 1 when any failed (with a one-line cause), 2 for bad arguments."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

LOGGER = logging.getLogger("bids_qsmnet")

__all__ = ["main", "build_participant_workflow", "build_group_workflow"]


class CLIError(RuntimeError):
    """A failure reported to the user as one line (exit code 1)."""


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose >= 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        datefmt="%H:%M:%S")
    # Nipype's own loggers are chatty at INFO; keep them at WARNING unless -vv
    for name in ("nipype.workflow", "nipype.interface", "nipype.utils", "bidsschematools"):
        logging.getLogger(name).setLevel(logging.INFO if verbose > 1 else logging.WARNING)


@contextmanager
def _output_lock(out_dir: Path, subjects=None):
    """One run per output folder and subject at a time (advisory locks, released on exit or
    crash).

    A run of every subject holds the folder's lock exclusively; a run restricted with
    ``--participant-label`` shares it and holds one exclusive lock per subject, so that the
    tasks of a SLURM job array (one participant each) can write into one output folder.  The
    lock files stay (hidden): removing a lock file that another run has opened breaks locking.
    """
    import fcntl

    out_dir.mkdir(parents=True, exist_ok=True)
    held = []

    def take(path: Path, mode: int, what: str) -> None:
        fh = open(path, "a")
        try:
            fcntl.flock(fh, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise CLIError(f"another bids_qsmnet run is writing {what} in {out_dir}; wait for "
                           "it to finish or choose another output folder") from None
        except OSError as exc:  # a file system without flock (e.g. Lustre mounted noflock)
            fh.close()
            LOGGER.warning("cannot lock %s (%s): concurrent runs are not detected", path, exc)
            return
        held.append(fh)

    try:
        take(out_dir / ".bids_qsmnet.lock", fcntl.LOCK_SH if subjects else fcntl.LOCK_EX,
             "this output folder")
        if subjects:
            (out_dir / ".bids_qsmnet.locks").mkdir(exist_ok=True)
        for subject in sorted(set(subjects or ())):
            take(out_dir / ".bids_qsmnet.locks" / f"sub-{subject}.lock", fcntl.LOCK_EX,
                 f"sub-{subject}")
        yield
    finally:
        for fh in reversed(held):
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()


def _remove_stale_temporaries(out_dir: Path, subjects=None) -> None:
    """Remove the hidden temporaries of atomic writes that killed runs left in the part of
    ``out_dir`` this run holds the lock of: the whole folder, or the selected subjects' folders
    and reports (the shared top-level files may be being written by a concurrent run)."""
    from ..io.atomic import remove_stale_temporaries

    if subjects:
        for subject in sorted(set(subjects)):
            remove_stale_temporaries(out_dir / f"sub-{subject}")
            remove_stale_temporaries(out_dir, recursive=False, prefix=f"sub-{subject}.")
        return
    remove_stale_temporaries(out_dir, recursive=False)
    for folder in sorted(out_dir.iterdir()):
        if folder.is_dir() and not folder.is_symlink() and (
                folder.name.startswith("sub-") or folder.name in ("logs", "models")):
            remove_stale_temporaries(folder)


def _default_work_dir(out_dir: Path) -> Path:
    digest = hashlib.sha1(str(out_dir).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"bids_qsmnet_work_{digest}"


def _validate_dataset(bids_dir: Path) -> None:
    """Warn about files whose names are not BIDS (raw datasets only; derivatives pass)."""
    import json

    try:
        with open(bids_dir / "dataset_description.json", encoding="utf-8") as fh:
            info = json.load(fh)
    except FileNotFoundError:
        raise CLIError(f"{bids_dir}: not a BIDS dataset (no dataset_description.json)") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise CLIError(f"{bids_dir}/dataset_description.json: not valid JSON ({exc})") from None
    if not isinstance(info, dict):
        raise CLIError(f"{bids_dir}/dataset_description.json: must hold a JSON object")
    if str(info.get("DatasetType", "raw")).lower() == "derivative":
        return
    from bids_validator import BIDSValidator

    validator = BIDSValidator()
    bad = []
    for root, dirs, files in os.walk(bids_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in
                   ("derivatives", "sourcedata", "code")]
        for f in files:
            rel = "/" + os.path.relpath(os.path.join(root, f), bids_dir)
            if not f.startswith(".") and not validator.is_bids(rel):
                bad.append(rel)
    if bad:
        LOGGER.warning("%d file(s) in %s are not named as BIDS expects (e.g. %s); they may be "
                       "ignored (--skip-bids-validation silences this check)", len(bad),
                       bids_dir, ", ".join(bad[:3]))


def _subjects(layout, requested) -> list[str]:
    available = sorted(layout.get_subjects())
    if not available:
        raise CLIError(f"{layout.root}: no subjects (sub-*) found")
    if not requested:
        return available
    missing = [s for s in requested if s not in available]
    if missing:
        raise CLIError(f"participant label(s) not found in {layout.root}: "
                       + ", ".join(f"sub-{s}" for s in missing)
                       + f" (available: {', '.join('sub-' + s for s in available)})")
    return list(dict.fromkeys(requested))


def _run_workflow(workflow, opts, work_dir: Path) -> None:
    from nipype import config as ncfg

    settings = {
        "execution": {"crashdump_dir": str(work_dir / "crashes"), "crashfile_format": "txt",
                      "hash_method": "content", "stop_on_first_crash": False,
                      "remove_unnecessary_outputs": False, "check_version": False},
        "monitoring": {"enabled": False},
        "logging": {level: "INFO" if opts.verbose > 0 else "WARNING"
                    for level in ("workflow_level", "interface_level", "utils_level")}}
    ncfg.update_config(settings)
    # a workflow copies Nipype's config when it is built, and that copy wins at run time:
    # without this, crash files land as .pklz in the current directory
    workflow.config["execution"].update(settings["execution"])
    from nipype import logging as nlogging

    nlogging.update_logging(ncfg)
    logging.getLogger("nipype").propagate = False  # Nipype has its own handler
    workflow.base_dir = str(work_dir)
    plugin_args = dict(opts.plugin_args or {})
    if opts.plugin == "MultiProc":
        plugin_args.setdefault("n_procs", opts.nprocs)
        plugin_args.setdefault("raise_insufficient", False)
        plugin_args.setdefault("maxtasksperchild", 1)
        # Workers start from a clean forkserver, never forked from this process: torch's
        # OpenMP thread pool (started here by the model check) does not survive a fork, and a
        # forked worker running the network would hang.
        plugin_args.setdefault("mp_context", "forkserver")
        if plugin_args["mp_context"] == "forkserver":
            import multiprocessing

            # the forkserver and its workers end with this process, even when it is killed
            multiprocessing.set_forkserver_preload(["__main__", "bids_qsmnet.cli.workers"])
    if opts.plugin == "SLURM":
        os.environ.setdefault("LOGNAME", os.environ.get("USER", "bids_qsmnet"))
    if opts.plugin == "SLURMGraph":
        # Nipype 1.11 sets this attribute only when plugin_args is non-empty (AttributeError
        # otherwise); False is its documented default
        plugin_args.setdefault("dont_resubmit_completed_jobs", False)
    LOGGER.info("running %s with the %s plugin (work dir %s)", workflow.name, opts.plugin,
                work_dir)
    workflow.run(plugin=opts.plugin, plugin_args=plugin_args)
    if opts.plugin == "SLURMGraph":
        _wait_for_slurm_graph(work_dir / workflow.name / "batch")


def _wait_for_slurm_graph(batch_dir: Path, *, poll: float = 3.0) -> None:
    """Wait until the jobs that SLURMGraph queued have left the queue.

    SLURMGraph's ``run()`` returns once the whole graph is submitted (with ``afterok``
    dependencies), before any output exists.  The job names come from the ``submit_jobs.sh``
    that Nipype wrote into ``batch_dir``; jobs whose dependency failed would stay pending for
    ever, so they are cancelled (their runs then lack outputs and are reported as failed).
    """
    import getpass
    import re
    import subprocess

    script = batch_dir / "submit_jobs.sh"
    names = sorted(set(re.findall(r" -J (\S+) ", script.read_text()))) if script.exists() \
        else []
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


# --------------------------------------------------------------------------- participant


def build_participant_workflow(opts, layout, errors: dict):
    """Collect every run of the selected subjects and build the participant workflow.

    Subjects or runs that cannot be processed are recorded in ``errors`` (subject → messages)
    and skipped; :class:`CLIError` when nothing is left.
    """
    from ..bids.discovery import DiscoveryError, collect_runs
    from ..device import DeviceError, select_device
    from ..interfaces.qsm import check_inputs
    from ..io.nifti import InputError
    from ..models.modelfile import ModelFileError, load_model, resolve_model
    from ..workflows.base import SettingsError, init_participant_wf, run_outputs, run_settings

    try:
        model = str(resolve_model(opts.model))
        # refused once, before any subject, rather than in every inference node: a device
        # that is absent, a model file that is corrupt, newer or of another architecture
        select_device(opts.device)
        load_model(model, device="cpu")
    except (ModelFileError, DeviceError, FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    runs = []
    for subject in _subjects(layout, opts.participant_label):
        try:
            found = collect_runs(layout, subject, sessions=opts.session_label,
                                 filters=opts.bids_filter_file)
        except DiscoveryError as exc:
            errors.setdefault(subject, []).append(str(exc))
            LOGGER.error("%s", exc)
            continue
        for run in found:
            try:
                run_settings(run, b0_strength=opts.b0_strength)
                # header-only checks (no voxel data read): shape, affine, size, mask grid
                if run.is_raw:
                    for echo in run.echoes:
                        check_inputs(echo.phase, run.mask, what="GRE phase")
                        if echo.magnitude:
                            check_inputs(echo.magnitude, None, what="GRE magnitude")
                else:
                    check_inputs(run.field, run.mask)
            except (SettingsError, InputError) as exc:
                errors.setdefault(subject, []).append(str(exc))
                LOGGER.error("%s: skipped: %s", run.key, exc)
                continue
            outputs = run_outputs(run, str(opts.output_dir))
            present = [p for p in outputs if os.path.exists(p)]
            if len(present) == len(outputs) and not opts.overwrite:
                LOGGER.info("%s: %s exists, skipped (--overwrite recomputes it)", run.key,
                            os.path.relpath(outputs[0], opts.output_dir))
                continue
            if present and not opts.overwrite:  # a run killed after its χ map: finish it
                LOGGER.info("%s: completing the outputs of an interrupted run (%d of %d "
                            "present)", run.key, len(present), len(outputs))
            runs.append(run)
    if not runs:
        if errors:
            raise CLIError("nothing to process: " + "; ".join(m for v in errors.values()
                                                               for m in v))
        return None, model, []
    LOGGER.info("found %d run(s) to process in %d subject(s); model %s", len(runs),
                len({r.subject for r in runs}), model)
    wf = init_participant_wf(runs, bids_root=str(layout.root), out_dir=str(opts.output_dir),
                             model=model, device=opts.device, tile=opts.tile,
                             dc_lambda=opts.dc_lambda, omp_nthreads=opts.omp_nthreads,
                             overwrite=opts.overwrite, b0_strength=opts.b0_strength,
                             unwrapping=opts.unwrapping, bgremoval=opts.bgremoval,
                             flip_axes=opts.flip_axes, residual_passes=opts.residual_passes)
    return wf, model, runs


# exceptions whose message is meant for the user as it is (it names the file and the problem)
_USER_ERRORS = ("InputError", "SettingsError", "ModelFileError", "DeviceError",
                "OutputExistsError", "MemoryError")
_EXCEPTION_LINE = re.compile(r"^\s*(?:\w+\.)*(\w+(?:Error|Exception|Exit)): (.+)$")


def _crash_causes(crash_dir: Path, *, since: float) -> list[tuple[str, str, str]]:
    """``(node, message, crash file)`` of each text crash file written since ``since``.

    The message is the innermost exception of the traceback (Nipype wraps it in a
    ``NodeExecutionError``), without its class when it is one of ours.
    """
    out = []
    for path in sorted(crash_dir.glob("crash-*.txt"), key=lambda p: p.stat().st_mtime):
        if path.stat().st_mtime < since - 1:  # crash files of earlier runs stay in the work dir
            continue
        node, cause = None, None
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("Node: ") and node is None:
                node = line[6:].strip()
            m = _EXCEPTION_LINE.match(line)
            if m and m.group(1) != "NodeExecutionError":
                cls, msg = m.groups()
                cause = msg.strip() if cls in _USER_ERRORS else f"{cls}: {msg.strip()}"
        if node and cause:
            out.append((node, cause, str(path)))
    return out


def _run_cause(causes, key: str) -> tuple[str, str, str] | None:
    """The first crash of the run ``key`` (its nodes live in ``run_<key>_wf``)."""
    from ..workflows.base import _safe_name

    tag = f".run_{_safe_name(key)}_wf."
    for node, cause, path in causes:
        if tag in f".{node}.":
            return cause, node.rsplit(".", 1)[-1], path
    return None


def _participant(opts, layout, work_dir: Path) -> int:
    from ..bids.derivatives import derivative_path, write_dataset_description
    from ..reports.html import write_citations, write_subject_report

    errors: dict = {}
    subjects = _subjects(layout, opts.participant_label)
    t0 = time.time()
    runs, failed = [], []
    try:
        wf, model, runs = build_participant_workflow(opts, layout, errors)
        if wf is not None:
            try:
                _run_workflow(wf, opts, work_dir)
            except RuntimeError as exc:  # Nipype: some nodes crashed; others completed
                LOGGER.debug("Nipype: %s", exc)
                LOGGER.error("some nodes failed; crash files in %s", work_dir / "crashes")
        causes = _crash_causes(work_dir / "crashes", since=t0)
        for run in runs:
            chimap = derivative_path(str(opts.output_dir), run.entities, suffix="Chimap")
            if not os.path.exists(chimap):
                failed.append(run.key)
                cause = _run_cause(causes, run.key)
                if cause:
                    LOGGER.error("%s failed in node %s (crash file %s)", run.key, cause[1],
                                 cause[2])
                errors.setdefault(run.subject, []).append(
                    f"{run.key}: {cause[0]}" if cause else
                    f"{run.key}: processing failed; see the crash files in {work_dir}/crashes")
    finally:
        write_dataset_description(str(opts.output_dir), bids_dir=str(opts.bids_dir),
                                  container=opts.container)
        write_citations(str(opts.output_dir))
        prov = {"bids_qsmnet command": " ".join(sys.argv), "work dir": str(work_dir),
                "plugin": opts.plugin, "device": opts.device,
                "elapsed (s)": round(time.time() - t0, 1)}
        for subject in subjects:
            write_subject_report(str(opts.output_dir), subject, errors=errors.get(subject, []),
                                 provenance=prov)
    LOGGER.info("wrote %d χ map(s) to %s in %.0f s", len(runs) - len(failed), opts.output_dir,
                time.time() - t0)
    if errors:
        n = sum(len(v) for v in errors.values())
        print(f"bids_qsmnet: {n} problem(s); first: {next(iter(errors.values()))[0]}",
              file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- group


def build_group_workflow(opts, layout):
    """Collect runs with labels, split off validation subjects, build ``init_training_wf``."""
    import numpy as np

    from ..bids.discovery import DiscoveryError, collect_runs
    from ..device import DeviceError, select_device
    from ..models.registry import list_architectures
    from ..workflows.base import SettingsError, run_settings
    from ..workflows.training import init_training_wf

    arch = opts.model or "qsmnet"
    if arch not in list_architectures():
        raise CLIError(f"--model {arch!r}: group level trains an architecture; choose one of "
                       + ", ".join(list_architectures()))
    try:  # refused before any patch is extracted, not in the training node
        select_device(opts.device)
    except DeviceError as exc:
        raise CLIError(str(exc)) from None
    runs = []
    for subject in _subjects(layout, opts.participant_label):
        try:
            found = collect_runs(layout, subject, sessions=opts.session_label,
                                 filters=opts.bids_filter_file, require_label=True)
        except DiscoveryError as exc:
            LOGGER.warning("%s", exc)
            continue
        for run in found:
            if run.is_raw:  # training pairs a local field with its label
                LOGGER.warning("%s: only raw GRE phase; run the participant level first and "
                               "train on its desc-localfield maps", run.key)
            else:
                runs.append(run)
    if not runs:
        raise CLIError(f"no subject in {layout.root} has both a local field and a Chimap label")
    for run in runs:
        units = str(run.label_metadata.get("Units", "ppm"))
        if units.lower() != "ppm":
            raise CLIError(f"{run.label}: Chimap Units must be ppm, got {units!r}")
    subjects = sorted({r.subject for r in runs})
    if opts.validation_participant:
        val_subjects = set(opts.validation_participant)
        unknown = val_subjects - set(subjects)
        if unknown:
            raise CLIError("--validation-participant without labelled data: "
                           + ", ".join(f"sub-{s}" for s in sorted(unknown)))
    elif opts.validation_fraction > 0 and len(subjects) > 1:
        n_val = max(1, int(round(opts.validation_fraction * len(subjects))))
        rng = np.random.default_rng(opts.seed)
        val_subjects = set(rng.choice(subjects, size=min(n_val, len(subjects) - 1),
                                      replace=False).tolist())
    else:
        val_subjects = set()
    train_runs = [r for r in runs if r.subject not in val_subjects]
    val_runs = [r for r in runs if r.subject in val_subjects]
    if not train_runs:
        raise CLIError("every labelled subject is held out for validation: nothing to train on")
    LOGGER.info("training on %d run(s) of %s; validating on %s", len(train_runs),
                ", ".join(sorted({f"sub-{r.subject}" for r in train_runs})),
                ", ".join(sorted(f"sub-{s}" for s in val_subjects)) or "none")
    patch = opts.patch_size or (32 if arch == "toy" else 64)
    name = opts.model_name or arch
    wf = init_training_wf(architecture=arch, model_name=name, patch_size=patch,
                          linearity_factor=opts.linearity_factor, sign_flip=opts.sign_flip,
                          batch_size=opts.batch_size, epochs=opts.epochs,
                          learning_rate=opts.learning_rate, save_step=opts.save_step,
                          ema_decay=opts.ema_decay, seed=opts.seed, device=opts.device,
                          max_steps=opts.max_steps,
                          omp_nthreads=opts.omp_nthreads, with_validation=bool(val_runs),
                          name=f"training_{''.join(c if c.isalnum() else '_' for c in name)}_wf")

    def settings(rs):
        try:
            return [run_settings(r, b0_strength=opts.b0_strength) for r in rs]
        except SettingsError as exc:
            raise CLIError(str(exc)) from None

    inp = wf.inputs.inputnode
    st = settings(train_runs)
    inp.field_files = [r.field for r in train_runs]
    inp.units = [s["units"] for s in st]
    inp.b0_strengths = [s["b0_strength"] for s in st]
    inp.echo_times = [s["echo_time"] for s in st]
    inp.mask_files = [r.mask for r in train_runs]
    inp.label_files = [r.label for r in train_runs]
    inp.subject_ids = [r.key for r in train_runs]
    if val_runs:
        sv = settings(val_runs)
        inp.val_field_files = [r.field for r in val_runs]
        inp.val_units = [s["units"] for s in sv]
        inp.val_b0_strengths = [s["b0_strength"] for s in sv]
        inp.val_echo_times = [s["echo_time"] for s in sv]
        inp.val_mask_files = [r.mask for r in val_runs]
        inp.val_label_files = [r.label for r in val_runs]
    return wf, name


def _group(opts, layout, work_dir: Path) -> int:
    import glob
    import shutil

    from ..bids.derivatives import copy_atomic, write_dataset_description

    wf, name = build_group_workflow(opts, layout)
    try:
        _run_workflow(wf, opts, work_dir)
    except RuntimeError as exc:
        raise CLIError(f"training failed ({exc}); crash files in {work_dir / 'crashes'}") \
            from None
    finally:
        write_dataset_description(str(opts.output_dir), bids_dir=str(opts.bids_dir),
                                  container=opts.container)
    train_dirs = glob.glob(str(work_dir / wf.name / "train" / "training"))
    if not train_dirs:
        raise CLIError(f"training produced no output in {work_dir / wf.name}")
    src = Path(train_dirs[0])
    dest = opts.output_dir / "models" / name
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("model.safetensors", "training_log.csv", "loss_curves.png",
              "training_summary.json"):
        if (src / f).exists():
            copy_atomic(str(src / f), str(dest / f), overwrite=True)
    if (src / "validation").is_dir():
        shutil.copytree(src / "validation", dest / "validation", dirs_exist_ok=True)
    LOGGER.info("trained model written to %s (use: bids_qsmnet BIDS OUT participant --model "
                "%s)", dest / "model.safetensors", dest)
    return 0


def main(argv=None) -> int:
    from .parser import parse_args

    opts = parse_args(argv)
    _setup_logging(opts.verbose)
    work_dir = opts.work_dir or _default_work_dir(opts.output_dir)
    # matplotlib keeps a font cache in ~/.cache (in a temporary folder when HOME is read-only,
    # as in containers): the app writes into its output and work folders only
    os.environ.setdefault("MPLCONFIGDIR", str(Path(work_dir) / "matplotlib"))
    try:
        if not opts.skip_bids_validation:
            _validate_dataset(opts.bids_dir)
        from ..bids.discovery import DiscoveryError, build_layout

        with _output_lock(opts.output_dir, opts.participant_label):
            _remove_stale_temporaries(opts.output_dir, opts.participant_label)
            try:
                layout = build_layout(opts.bids_dir, exclude=[opts.output_dir])
            except DiscoveryError as exc:
                raise CLIError(str(exc)) from None
            if opts.analysis_level == "participant":
                return _participant(opts, layout, work_dir)
            return _group(opts, layout, work_dir)
    except CLIError as exc:
        print(f"bids_qsmnet: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bids_qsmnet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
