"""``bids_qsmnet`` entry point: parse → find inputs → build the workflow → run it → in
``finally:`` write ``dataset_description.json``, citations and reports.  Exit code 0 when every
run succeeded, 1 when any failed (with a one-line cause), 2 for bad arguments.

The steps live in their own modules: :mod:`~bids_qsmnet.cli.parser` (arguments),
:mod:`~bids_qsmnet.cli.folders` (output and work folders this user can write),
:mod:`~bids_qsmnet.cli.build` (inputs and workflows), :mod:`~bids_qsmnet.cli.execution`
(Nipype plugins, SLURM), :mod:`~bids_qsmnet.cli.crashes` (what failed) and
:mod:`bids_qsmnet.io.locks` (one run per output folder).
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import time
from pathlib import Path

from ..errors import CLIError, UserError
from .build import build_group_workflow, build_participant_workflow

LOGGER = logging.getLogger("bids_qsmnet")

__all__ = ["main", "build_participant_workflow", "build_group_workflow", "CLIError"]


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose >= 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        datefmt="%H:%M:%S")
    # Nipype's own loggers are chatty at INFO; keep them at WARNING unless -vv
    for name in ("nipype.workflow", "nipype.interface", "nipype.utils", "bidsschematools"):
        logging.getLogger(name).setLevel(logging.INFO if verbose > 1 else logging.WARNING)


#: exit code when some subjects failed or were skipped and the others have their χ maps
EXIT_PARTIAL = 3


def _write_participant_outputs(opts, subjects, reported, errors: dict, warnings: dict,
                               work_dir: Path, t0: float, steps=None) -> None:
    """``dataset_description.json``, citations and the reports of the subjects in
    ``reported`` (with their problems and warnings), whatever happened to the runs."""
    from ..bids.derivatives import write_dataset_description
    from ..reports.html import write_citations, write_subject_report

    write_dataset_description(str(opts.output_dir), bids_dir=str(opts.bids_dir),
                              container=opts.container)
    write_citations(str(opts.output_dir), steps)
    prov = {"bids_qsmnet command": " ".join(sys.argv), "work dir": str(work_dir),
            "plugin": opts.plugin, "device": opts.device,
            "elapsed (s)": round(time.time() - t0, 1)}
    for subject in subjects:
        if subject in reported:
            write_subject_report(str(opts.output_dir), subject, errors=errors.get(subject, []),
                                 warnings=warnings.get(subject, []), provenance=prov,
                                 steps=steps)


def _reported(out_dir: Path, subjects, runs, errors: dict, warnings: dict) -> set[str]:
    """The subjects whose report is (re)written: those processed now, those with problems
    and those without a report; a complete subject's report is left untouched."""
    touched = {r.subject for r in runs} | set(errors) | set(warnings)
    return {s for s in subjects if s in touched or not (out_dir / f"sub-{s}.html").exists()}


def _summary(errors: dict, subjects) -> int:
    """Log every subject that failed or was skipped, print the one console line and return
    the exit code (0; :data:`EXIT_PARTIAL` when others completed; 1 when none did)."""
    if not errors:
        return 0
    for subject, messages in errors.items():
        LOGGER.warning("sub-%s: not processed: %s", subject, "; ".join(messages))
    n = sum(len(v) for v in errors.values())
    ok = [s for s in subjects if s not in errors]
    print(f"bids_qsmnet: {n} problem(s) in {len(errors)} of {len(subjects)} subject(s); "
          f"first: {next(iter(errors.values()))[0]}", file=sys.stderr)
    return EXIT_PARTIAL if ok else 1


def _participant(opts, layout, work_dir: Path) -> int:
    from .build import dataset_runs, run_steps, select_subjects
    from .crashes import failed_runs
    from .execution import run_workflow

    if opts.boilerplate_only or opts.reports_only:
        return _documents_only(opts, layout, work_dir)
    errors: dict = {}
    warnings: dict = {}
    subjects = select_subjects(layout, opts.participant_label)
    t0 = time.time()
    runs, failed = [], []
    try:
        wf, _model, runs = build_participant_workflow(opts, layout, errors, warnings)
        if wf is not None:
            try:
                run_workflow(wf, opts, work_dir)
            except RuntimeError as exc:  # Nipype: some nodes crashed; others completed
                LOGGER.debug("Nipype: %s", exc)
                LOGGER.error("some nodes failed; crash files in %s", work_dir / "crashes")
        failed = failed_runs(runs, str(opts.output_dir), work_dir, since=t0)
        for run, message in failed:
            errors.setdefault(run.subject, []).append(message)
    finally:
        reported = _reported(Path(opts.output_dir), subjects, runs, errors, warnings)
        # the methods text covers the whole dataset: runs of other participants that share
        # this output folder write the same text
        steps = run_steps(opts, dataset_runs(opts, layout))
        _write_participant_outputs(opts, subjects, reported, errors, warnings, work_dir, t0,
                                   steps)
    LOGGER.info("wrote %d χ map(s) to %s in %.0f s", len(runs) - len(failed), opts.output_dir,
                time.time() - t0)
    if failed and opts.stop_on_first_crash:
        print(f"bids_qsmnet: error: {failed[0][1]} (stopped there: --stop-on-first-crash)",
              file=sys.stderr)
        return 1
    return _summary(errors, subjects)


def _documents_only(opts, layout, work_dir: Path) -> int:
    """``--boilerplate-only``: the methods text and references of the selected subjects'
    runs; ``--reports-only``: every selected subject's report from its outputs, and the
    methods text a participant run writes (every run of the dataset)."""
    from .build import dataset_runs, discover_runs, run_steps, select_subjects

    errors: dict = {}
    subjects = select_subjects(layout, opts.participant_label)
    if opts.reports_only and not (Path(opts.output_dir) / "dataset_description.json").exists():
        raise CLIError(f"{opts.output_dir}: no bids_qsmnet outputs to report on (no "
                       "dataset_description.json); run without --reports-only first")
    if opts.boilerplate_only:
        from ..reports.html import write_citations

        steps = run_steps(opts, discover_runs(opts, layout, errors))
        md, bib = write_citations(str(opts.output_dir), steps)
        LOGGER.info("wrote the methods text to %s and its references to %s", md, bib)
        return 0
    # the same methods text as the participant runs that wrote these outputs
    steps = run_steps(opts, dataset_runs(opts, layout))
    _write_participant_outputs(opts, subjects, set(subjects), errors, {}, work_dir,
                               time.time(), steps)
    LOGGER.info("rebuilt %d report(s) in %s from its outputs", len(subjects), opts.output_dir)
    return 0


def _copy_trained_model(train_dir: Path, dest: Path) -> None:
    """The model file, log, curves, summary and validation figures of a training folder
    into ``dest``."""
    import shutil

    from ..bids.derivatives import copy_atomic

    dest.mkdir(parents=True, exist_ok=True)
    for f in ("model.safetensors", "training_log.csv", "loss_curves.png",
              "training_summary.json"):
        if (train_dir / f).exists():
            copy_atomic(str(train_dir / f), str(dest / f), overwrite=True)
    if (train_dir / "validation").is_dir():
        shutil.copytree(train_dir / "validation", dest / "validation", dirs_exist_ok=True)


def _group(opts, layout, work_dir: Path) -> int:
    import glob

    from ..bids.derivatives import write_dataset_description
    from .execution import run_workflow

    wf, name = build_group_workflow(opts, layout)
    try:
        run_workflow(wf, opts, work_dir)
    except RuntimeError as exc:
        raise CLIError(f"training failed ({exc}); crash files in {work_dir / 'crashes'}") \
            from None
    finally:
        write_dataset_description(str(opts.output_dir), bids_dir=str(opts.bids_dir),
                                  container=opts.container)
    train_dirs = glob.glob(str(work_dir / wf.name / "train" / "training"))
    if not train_dirs:
        raise CLIError(f"training produced no output in {work_dir / wf.name}")
    dest = opts.output_dir / "models" / name
    _copy_trained_model(Path(train_dirs[0]), dest)
    LOGGER.info("trained model written to %s (use: bids_qsmnet BIDS OUT participant --model "
                "%s)", dest / "model.safetensors", dest)
    return 0


def _permission_message(exc: OSError, opts, work_dir: Path) -> str:
    """``<file>: <reason> (uid N)``, with what to do when the file is one the run writes."""
    from .folders import write_hint

    path = Path(os.path.abspath(exc.filename))
    message = f"{path}: {exc.strerror.lower()} (uid {os.getuid()})"
    if any(folder == path or folder in path.parents
           for folder in (Path(opts.output_dir), Path(work_dir))):
        message += f"; {write_hint(opts.container)}"
    return message


def main(argv: list[str] | None = None) -> int:
    """Run ``bids_qsmnet`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    from .parser import parse_args

    opts = parse_args(argv)
    from .folders import check_writable_folder, default_work_dir

    work_dir = opts.work_dir or default_work_dir(opts.output_dir)
    # before anything is read or written: a folder this user cannot write is one line
    try:
        check_writable_folder(opts.output_dir, "output_dir", container=opts.container)
        if not opts.boilerplate_only:
            check_writable_folder(work_dir, "the work dir (-w)" if opts.work_dir else
                                  "the default work dir (give one with -w)",
                                  container=opts.container)
    except UserError as exc:
        print(f"bids_qsmnet: error: {exc}", file=sys.stderr)
        return 1
    from .build import finish_model_checks, start_model_check

    _setup_logging(opts.verbose)
    # matplotlib keeps a font cache in ~/.cache (in a temporary folder when HOME is read-only,
    # as in containers): the app writes into its output and work folders only
    os.environ.setdefault("MPLCONFIGDIR", str(Path(work_dir) / "matplotlib"))
    from .execution import clean_work_dir, set_memory_budget, start_worker_server, uses_forkserver
    from .workers import NIPYPE_LEVEL_ENV

    # before any worker starts: they inherit the budget and Nipype's log level
    set_memory_budget(opts.mem_mb)
    os.environ[NIPYPE_LEVEL_ENV] = "DEBUG" if opts.verbose > 1 else (
        "INFO" if opts.verbose > 0 else "WARNING")
    runs_nodes = not (opts.reports_only or opts.boilerplate_only)
    if uses_forkserver(opts.plugin, opts.plugin_args) and runs_nodes:
        start_worker_server()  # its imports overlap with the checks below
    # pybids (about 0.5 s to import) only once the forkserver's imports run beside it
    from ..bids.discovery import build_layout
    from ..io.locks import output_lock
    from .build import validate_dataset

    try:
        if not opts.skip_bids_validation:
            validate_dataset(opts.bids_dir)
        with output_lock(opts.output_dir, opts.participant_label):
            if opts.analysis_level == "participant" and runs_nodes:
                # once the run is known to go ahead: in a worker of the forkserver, beside
                # the indexing and the pre-flight below
                start_model_check(opts)
            if opts.clean_workdir:
                clean_work_dir(Path(work_dir))
            layout = build_layout(opts.bids_dir, exclude=[opts.output_dir])
            if opts.analysis_level == "participant":
                return _participant(opts, layout, work_dir)
            return _group(opts, layout, work_dir)
    except UserError as exc:
        print(f"bids_qsmnet: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        # e.g. a file that another user's run left in a shared output folder: one line, as
        # for the folders themselves
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS) or not exc.filename:
            raise
        print(f"bids_qsmnet: error: {_permission_message(exc, opts, work_dir)}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bids_qsmnet: interrupted", file=sys.stderr)
        return 130
    finally:
        finish_model_checks()


if __name__ == "__main__":
    sys.exit(main())
