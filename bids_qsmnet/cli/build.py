"""Building a run's workflow: the dataset checked, the subjects and runs selected, the
participant (inference) or group (training) workflow made.

Runs that cannot be processed are recorded and skipped; a :class:`~bids_qsmnet.errors.CLIError`
when nothing is left.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import CLIError

LOGGER = logging.getLogger("bids_qsmnet")

__all__ = ["validate_dataset", "select_subjects", "discover_runs", "dataset_runs", "run_steps",
           "build_participant_workflow", "build_group_workflow"]


def validate_dataset(bids_dir: Path) -> None:
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


def select_subjects(layout, requested) -> list[str]:
    from ..bids.discovery import subjects

    available = subjects(layout)
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


def model_problem(model: str, device: str) -> dict:
    """Load the model file ``model`` (on the CPU) and select ``device`` as an inference node
    would: ``{"error": message}`` when either cannot be used, else what was found
    (``device``, the model's ``name`` and ``sha256``).  Needs torch; the CLI runs it in a
    worker process (:func:`start_model_check`)."""
    from ..device import DeviceError, select_device
    from ..models.modelfile import ModelFileError, load_model

    try:
        dev = select_device(device)
        loaded = load_model(model, device="cpu")
    except (ModelFileError, DeviceError, FileNotFoundError, ValueError) as exc:
        return {"error": str(exc)}
    return {"device": str(dev), "name": loaded.spec.name, "sha256": loaded.sha256}


#: model checks running beside the main thread, by (model file, device): (thread, answer)
_PENDING: dict = {}


def _model_problem_into(conn, model: str, device: str) -> None:
    conn.send(model_problem(model, device))
    conn.close()


def _ask_forkserver(model: str, device: str, answer: list) -> None:
    """Run :func:`model_problem` in a process of the forkserver and put its answer into
    ``answer`` (nothing when the process died)."""
    import multiprocessing

    try:
        ctx = multiprocessing.get_context("forkserver")
        ours, theirs = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_model_problem_into, args=(theirs, model, device),
                           name="bids_qsmnet-model-check", daemon=True)
        proc.start()  # waits until the forkserver has its imports
        theirs.close()
        try:
            answer.append(ours.recv())
        finally:
            proc.join()
    except (OSError, EOFError) as exc:  # no forkserver, or the process died: check here
        LOGGER.debug("model check in a worker failed (%s); checking in this process", exc)


def start_model_check(opts) -> None:
    """Start the model check of ``opts`` (:func:`model_problem`) in a process of the MultiProc
    workers' forkserver, where torch is imported already: the main process never imports
    torch (1–1.5 s of start-up), and the check, with the forkserver's imports it waits for,
    runs beside the dataset indexing (a thread waits for it).  Without a forkserver (other
    plugins) the check runs in this process when the workflow is built."""
    import threading

    from ..models.modelfile import resolve_model
    from .execution import uses_forkserver

    if not uses_forkserver(opts.plugin, opts.plugin_args):
        return
    try:
        model = str(resolve_model(opts.model))
    except (FileNotFoundError, ValueError):
        return  # _check_model reports it
    answer: list = []
    thread = threading.Thread(target=_ask_forkserver, args=(model, opts.device, answer),
                              name="bids_qsmnet-model-check", daemon=True)
    thread.start()
    _PENDING[(model, opts.device)] = (thread, answer)


def finish_model_checks() -> None:
    """Wait for the model checks still running: a run that ends early (a bad dataset, a
    locked output folder) must not leave a thread inside multiprocessing while the
    interpreter exits (that prints warnings and tracebacks on the console)."""
    while _PENDING:
        thread, _answer = _PENDING.popitem()[1]
        thread.join()


def _pending_result(model: str, device: str) -> dict:
    """The answer of the check :func:`start_model_check` started, or of one run here."""
    thread, answer = _PENDING.pop((model, device), (None, []))
    if thread is not None:
        thread.join()
    return answer[0] if answer else model_problem(model, device)


def _check_model(opts) -> str:
    """The model file of ``--model``, loaded once, before any node runs, rather than in
    every inference node: a device that is absent, a model file that is corrupt, newer or of
    another architecture end the run here."""
    from ..models.modelfile import ModelFileError, resolve_model

    try:
        model = str(resolve_model(opts.model))
    except (ModelFileError, FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    found = _pending_result(model, opts.device)
    if "error" in found:
        raise CLIError(found["error"])
    LOGGER.info("model %r (sha256 %s…) on %s", found["name"], found["sha256"][:12],
                found["device"])
    return model


def _check_run(run, b0_strength: float | None) -> list[str]:
    """Pre-flight of one run: its sidecar settings, its NIfTI headers (shape, affine, size,
    mask grid) and then its voxels (damaged bodies, NaN/Inf, empty masks, zero fields), so
    that no input problem surfaces inside a workflow node.  A
    :class:`~bids_qsmnet.errors.UserError` names the problem; returns warnings."""
    from ..bids.settings import run_settings
    from ..io.fields import check_data, check_inputs
    from ..phase.files import check_echoes

    run_settings(run, b0_strength=b0_strength)
    if not run.is_raw:
        check_inputs(run.field, run.mask)
        return check_data(run.field, run.mask)
    for echo in run.echoes:  # headers of every echo first: cheap, and the common problems
        check_inputs(echo.phase, run.mask, what="GRE phase")
        if echo.magnitude:
            check_inputs(echo.magnitude, None, what="GRE magnitude")
    mags = [e.magnitude for e in run.echoes if e.magnitude]
    check_echoes([e.phase for e in run.echoes], mags, run.mask)
    return []


def dataset_runs(opts, layout) -> list:
    """Every run of every subject of the dataset (no file read; subjects whose inputs cannot
    be found are left out): what a participant run's methods text describes, so that runs of
    different participants sharing one output folder (a job array) write the same text."""
    from ..bids.discovery import DiscoveryError, collect_runs, subjects

    runs = []
    for subject in subjects(layout):
        try:
            runs += collect_runs(layout, subject, sessions=opts.session_label,
                                 filters=opts.bids_filter_file)
        except DiscoveryError:
            continue
    return runs


def run_steps(opts, runs: list) -> list:
    """The methods steps (:func:`~bids_qsmnet.reports.boilerplate.steps_for_run`) of a
    participant run over ``runs`` with the options and model of ``opts``."""
    from ..models.modelfile import ModelFileError, read_model_spec, resolve_model
    from ..reports.boilerplate import steps_for_run

    try:
        spec = read_model_spec(resolve_model(opts.model))
    except (ModelFileError, FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    return steps_for_run(runs, spec, unwrapping=opts.unwrapping, bgremoval=opts.bgremoval,
                         dc_lambda=opts.dc_lambda)


def _needs_processing(run, opts) -> bool:
    """False when every output of ``run`` exists (and ``--overwrite`` is not given)."""
    from ..workflows.base import run_outputs

    outputs = run_outputs(run, str(opts.output_dir))
    present = [p for p in outputs if os.path.exists(p)]
    if len(present) == len(outputs) and not opts.overwrite:
        LOGGER.info("%s: %s exists, skipped (--overwrite recomputes it)", run.key,
                    os.path.relpath(outputs[0], opts.output_dir))
        return False
    if present and not opts.overwrite:  # a run killed after its χ map: finish it
        LOGGER.info("%s: completing the outputs of an interrupted run (%d of %d present)",
                    run.key, len(present), len(outputs))
    return True


def discover_runs(opts, layout, errors: dict) -> list:
    """Every run of the selected subjects (no file read); a subject whose inputs cannot be
    found goes into ``errors``."""
    from ..bids.discovery import DiscoveryError, collect_runs

    runs = []
    for subject in select_subjects(layout, opts.participant_label):
        try:
            runs += collect_runs(layout, subject, sessions=opts.session_label,
                                 filters=opts.bids_filter_file)
        except DiscoveryError as exc:
            _refuse(opts, errors, subject, str(exc), str(exc))
    return runs


def _refuse(opts, errors: dict, subject: str, message: str, line: str) -> None:
    """Record a refused run or subject; with ``--stop-on-first-crash`` end the run here."""
    errors.setdefault(subject, []).append(message)
    LOGGER.error("%s", line)
    if getattr(opts, "stop_on_first_crash", False):
        raise CLIError(f"{message} (stopped there: --stop-on-first-crash)")


def _participant_runs(opts, layout, errors: dict, warnings: dict) -> list:
    """The runs of the selected subjects still to process, each through the pre-flight
    (:func:`_check_run`); the problems of the others go into ``errors`` and the pre-flight's
    warnings into ``warnings`` (subject → messages)."""
    from ..errors import UserError

    runs = []
    for run in discover_runs(opts, layout, errors):
        subject = run.subject
        if not _needs_processing(run, opts):
            continue
        try:
            notes = _check_run(run, opts.b0_strength)
        except UserError as exc:
            _refuse(opts, errors, subject, str(exc), f"{run.key}: skipped: {exc}")
            continue
        for note in notes:
            LOGGER.warning("%s: %s", run.key, note)
        warnings.setdefault(subject, []).extend(notes)
        runs.append(run)
    return runs


def build_participant_workflow(opts, layout, errors: dict, warnings: dict | None = None):
    """Collect every run of the selected subjects and build the participant workflow.

    Subjects or runs that cannot be processed are recorded in ``errors`` (subject → messages)
    and skipped; the pre-flight's warnings go into ``warnings``.  Returns ``(workflow or None,
    model file, runs)``: no workflow when every run is done already (or every remaining run
    of a subject whose others are complete was refused).

    Raises
    ------
    CLIError
        when the model cannot be used, or no run can be processed.
    """
    from ..workflows.base import init_participant_wf

    # the pre-flight of the runs overlaps with the model check when that runs in a worker
    # (start_model_check); its answer is awaited before anything is built or run
    runs = _participant_runs(opts, layout, errors, {} if warnings is None else warnings)
    model = _check_model(opts)
    if not runs:
        selected = select_subjects(layout, opts.participant_label)
        if errors and all(s in errors for s in selected):
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


def _labelled_runs(opts, layout) -> list:
    """The runs with a local field and a χ label (ppm) of the selected subjects."""
    from ..bids.discovery import DiscoveryError, collect_runs

    runs = []
    for subject in select_subjects(layout, opts.participant_label):
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
    return runs


def _validation_subjects(opts, subjects: list[str]) -> set[str]:
    """The subjects held out for validation: ``--validation-participant``, or a random
    ``--validation-fraction`` of them (seeded by ``--seed``; at least one is trained on)."""
    import numpy as np

    if opts.validation_participant:
        val_subjects = set(opts.validation_participant)
        unknown = val_subjects - set(subjects)
        if unknown:
            raise CLIError("--validation-participant without labelled data: "
                           + ", ".join(f"sub-{s}" for s in sorted(unknown)))
        return val_subjects
    if opts.validation_fraction > 0 and len(subjects) > 1:
        n_val = max(1, int(round(opts.validation_fraction * len(subjects))))
        rng = np.random.default_rng(opts.seed)
        return set(rng.choice(subjects, size=min(n_val, len(subjects) - 1),
                              replace=False).tolist())
    return set()


def _set_training_inputs(wf, train_runs: list, val_runs: list, b0_strength) -> None:
    """Fill the training workflow's input node with the runs' files and sidecar settings."""
    from ..bids.settings import SettingsError, run_settings

    def fill(prefix: str, runs: list) -> None:
        try:
            st = [run_settings(r, b0_strength=b0_strength) for r in runs]
        except SettingsError as exc:
            raise CLIError(str(exc)) from None
        inp = wf.inputs.inputnode
        setattr(inp, f"{prefix}field_files", [r.field for r in runs])
        setattr(inp, f"{prefix}units", [s["units"] for s in st])
        setattr(inp, f"{prefix}b0_strengths", [s["b0_strength"] for s in st])
        setattr(inp, f"{prefix}echo_times", [s["echo_time"] for s in st])
        setattr(inp, f"{prefix}mask_files", [r.mask for r in runs])
        setattr(inp, f"{prefix}label_files", [r.label for r in runs])

    fill("", train_runs)
    wf.inputs.inputnode.subject_ids = [r.key for r in train_runs]
    if val_runs:
        fill("val_", val_runs)


def _training_settings(opts, arch: str) -> dict:
    """Patch size and stride, batch size, learning rate, epochs and save step: the options
    given, else the architecture's defaults
    (:func:`bids_qsmnet.training.config.architecture_defaults`)."""
    from ..training.config import architecture_defaults

    settings = {k: (getattr(opts, k) if getattr(opts, k) is not None else v)
                for k, v in architecture_defaults(arch).items()}
    LOGGER.info("training %s: %s", arch, ", ".join(f"{k.replace('_', ' ')} {v}"
                                                   for k, v in settings.items()))
    return settings


def build_group_workflow(opts, layout):
    """Collect runs with labels, split off validation subjects, build ``init_training_wf``.

    Returns ``(workflow, model name)``.
    """
    from ..device import DeviceError, select_device
    from ..models.registry import list_architectures
    from ..training.config import TRAINING_DEFAULTS
    from ..workflows.training import init_training_wf

    arch = opts.model or TRAINING_DEFAULTS.architecture
    if arch not in list_architectures():
        raise CLIError(f"--model {arch!r}: group level trains an architecture; choose one of "
                       + ", ".join(list_architectures()))
    try:  # refused before any patch is extracted, not in the training node
        select_device(opts.device)
    except DeviceError as exc:
        raise CLIError(str(exc)) from None
    runs = _labelled_runs(opts, layout)
    val_subjects = _validation_subjects(opts, sorted({r.subject for r in runs}))
    train_runs = [r for r in runs if r.subject not in val_subjects]
    val_runs = [r for r in runs if r.subject in val_subjects]
    if not train_runs:
        raise CLIError("every labelled subject is held out for validation: nothing to train on")
    LOGGER.info("training on %d run(s) of %s; validating on %s", len(train_runs),
                ", ".join(sorted({f"sub-{r.subject}" for r in train_runs})),
                ", ".join(sorted(f"sub-{s}" for s in val_subjects)) or "none")
    settings = _training_settings(opts, arch)
    name = opts.model_name or arch
    wf = init_training_wf(architecture=arch, model_name=name, **settings,
                          linearity_factor=opts.linearity_factor, sign_flip=opts.sign_flip,
                          ema_decay=opts.ema_decay, seed=opts.seed, device=opts.device,
                          amp=opts.amp,
                          max_steps=opts.max_steps,
                          omp_nthreads=opts.omp_nthreads, with_validation=bool(val_runs),
                          name=f"training_{''.join(c if c.isalnum() else '_' for c in name)}_wf")
    _set_training_inputs(wf, train_runs, val_runs, opts.b0_strength)
    return wf, name
