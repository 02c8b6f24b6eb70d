"""The ``bids_qsmnet`` argument parser (BIDS-Apps conventions).

Argument types validate while parsing, so a bad value ends in ``parser.error`` (exit 2) with
one line; cross-option checks follow in :func:`parse_args`.  Nothing heavy is imported here,
so ``--help`` and ``--version`` are instant.
"""

from __future__ import annotations

import argparse
import json
import os
from functools import partial
from pathlib import Path

from ..__about__ import __version__
from ..training.config import TRAINING_DEFAULTS as _D
from ..training.config import architecture_defaults

__all__ = ["get_parser", "parse_args"]

PLUGINS = ("MultiProc", "Linear", "SLURM", "SLURMGraph", "SGE", "SGEGraph", "PBS", "PBSGraph",
           "LSF", "Condor")


def _path_exists(value, *, parser):
    p = Path(value).expanduser()
    try:
        exists = p.exists()
    except PermissionError:  # a folder on the way that this user may not enter
        raise parser.error(f"path not accessible to uid {os.getuid()} (permission denied): "
                           f"{value}") from None
    if not exists:
        raise parser.error(f"path does not exist: {value}")
    return p.absolute()


def _readable_dir(value, *, parser):
    p = _path_exists(value, parser=parser)
    if p.is_dir() and not os.access(p, os.R_OK | os.X_OK):
        raise parser.error(f"not readable by uid {os.getuid()}: {value}")
    return p


def _is_file(value, *, parser):
    p = _path_exists(value, parser=parser)
    if not p.is_file():
        raise parser.error(f"not a file: {value}")
    return p


def _label(value, *, parser, prefix):
    from ..bids.discovery import clean_label

    try:
        return clean_label(value, prefix)
    except ValueError as exc:
        raise parser.error(str(exc)) from None


def _json_object(value, *, parser, what):
    try:
        data = json.loads(value)
    except json.JSONDecodeError as exc:
        raise parser.error(f"{what}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise parser.error(f"{what}: must be a JSON object")
    return data


def _filter_file(value, *, parser):
    from ..bids.discovery import DiscoveryError, load_filter_file

    p = _is_file(value, parser=parser)
    try:
        return load_filter_file(p)
    except DiscoveryError as exc:
        raise parser.error(str(exc)) from None


def _int_at_least(value, *, parser, what, low: int):
    try:
        v = int(value)
    except ValueError:
        raise parser.error(f"{what}: expected an integer, got {value!r}") from None
    if v < low:
        raise parser.error(f"{what}: must be at least {low}, got {v}")
    return v


def _positive_int(value, *, parser, what):
    return _int_at_least(value, parser=parser, what=what, low=1)


def _non_negative_int(value, *, parser, what):
    return _int_at_least(value, parser=parser, what=what, low=0)


def _float_where(value, *, parser, what, ok, must: str):
    """``value`` as a float, or a parser error naming ``what`` unless ``ok(value)``."""
    try:
        v = float(value)
    except ValueError:
        raise parser.error(f"{what}: expected a number, got {value!r}") from None
    if not ok(v):
        raise parser.error(f"{what}: {must}, got {v}")
    return v


def _positive_float(value, *, parser, what):
    return _float_where(value, parser=parser, what=what, ok=lambda v: v > 0,
                        must="must be positive")


def _ema_decay(value, *, parser):
    return _float_where(value, parser=parser, what="--ema-decay", ok=lambda v: 0 <= v < 1,
                        must="must be within [0, 1)")


def _dc_lambda(value: str) -> float | str:
    """``auto`` or a non-negative number (the refinement's prior weight)."""
    if value.strip().lower() == "auto":
        return "auto"
    try:
        lam = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {value!r}") from None
    if not lam >= 0:
        raise argparse.ArgumentTypeError(f"must be non-negative, got {value!r}")
    return lam


def _add_input_options(parser: argparse.ArgumentParser) -> None:
    """Which subjects, sessions and files are processed."""
    g = parser.add_argument_group("Selecting inputs")
    g.add_argument("--participant-label", "--participant_label", nargs="+", default=None,
                   type=partial(_label, parser=parser, prefix="sub-"),
                   help="subjects to process (with or without 'sub-'); default: all")
    g.add_argument("--session-label", nargs="+", default=None,
                   type=partial(_label, parser=parser, prefix="ses-"),
                   help="sessions to process (with or without 'ses-'); default: all")
    g.add_argument("--bids-filter-file", type=partial(_filter_file, parser=parser),
                   default=None, metavar="FILE",
                   help="JSON of pybids filters per input kind (localfield, mask, chimap) "
                        "replacing the default queries")
    g.add_argument("--skip-bids-validation", action="store_true",
                   help="do not check the input dataset's file names")
    g.add_argument("--b0-strength", default=None, metavar="TESLA",
                   type=partial(_positive_float, parser=parser, what="--b0-strength"),
                   help="field strength for inputs whose sidecar lacks MagneticFieldStrength")


def _add_phase_options(parser: argparse.ArgumentParser) -> None:
    """The phase chain of raw GRE runs."""
    g = parser.add_argument_group(
        "Phase preprocessing (runs with raw GRE phase and no local field)")
    g.add_argument("--unwrapping", default="laplacian", choices=["laplacian", "path"],
                   help="spatial phase unwrapping: Laplacian (default) or path-following")
    g.add_argument("--bgremoval", default="vsharp", choices=["vsharp", "pdf"],
                   help="background-field removal: V-SHARP (default) or PDF")


def _add_inference_options(parser: argparse.ArgumentParser) -> None:
    """The model, the device and the inference settings."""
    g = parser.add_argument_group("Model and inference")
    g.add_argument("--model", default=None,
                   help="participant: model file/folder or shipped name (default: the shipped "
                        "default model); group: architecture (toy, qsmnet, qsmnet+, "
                        "qsmnet-mid, qsmnet-slim, qsmnet-lite)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where torch runs")
    g.add_argument("--tile", type=partial(_positive_int, parser=parser, what="--tile"),
                   default=None,
                   help="tile edge in voxels for bounded-memory inference (tiles overlap by "
                        "twice the receptive-field radius where they can: exact)")
    g.add_argument("--dc-lambda", type=_dc_lambda, default=None, metavar="L|auto",
                   help="data-consistency prior weight after the network: a number (0: off) "
                        "or 'auto' (chosen per input from how much of the field the network "
                        "explains and how much of it is noise); default: the model's (the "
                        "shipped model: auto)")
    g.add_argument("--flip-axes", nargs="*", type=int, choices=(0, 1, 2), default=None,
                   metavar="AXIS",
                   help="flip ensemble: also run the network on the field flipped along every "
                        "subset of these axes of the network frame (0, 1: in-plane; 2: along "
                        "B0) and average the maps (2^n passes); with no AXIS: off; default: "
                        "the model's")
    g.add_argument("--residual-passes", default=None, metavar="N",
                   type=partial(_non_negative_int, parser=parser, what="--residual-passes"),
                   help="residual-field passes: the network also maps what its map leaves "
                        "unexplained of the field and the result is added, N times, before "
                        "the data-consistency refinement. Restores strong and extended "
                        "sources (haemorrhage, deep nuclei) when the local field is accurate "
                        "at large scales (e.g. simulated, or a trusted background removal); "
                        "on fields from this app's raw-GRE chain it amplifies the background-"
                        "removal error (MODEL_CARD.md). Default: the model's (0 for the "
                        "shipped model)")


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    """Training at the group level (defaults: TrainingConfig's)."""
    g = parser.add_argument_group("Training (group level)")
    g.add_argument("--validation-participant", nargs="+", default=None,
                   type=partial(_label, parser=parser, prefix="sub-"),
                   help="subjects held out for validation")
    g.add_argument("--validation-fraction", type=float, default=0.0,
                   help="fraction of subjects held out when --validation-participant is absent")
    g.add_argument("--model-name", default=None, help="name of the trained model")
    per_arch = " (default: per architecture; toy: {}, others: {})"
    toy, other = architecture_defaults("toy"), architecture_defaults("qsmnet")
    g.add_argument("--epochs", type=partial(_positive_int, parser=parser, what="--epochs"),
                   default=None, help="training epochs" + per_arch.format(toy["epochs"],
                                                                          other["epochs"]))
    g.add_argument("--batch-size", type=partial(_positive_int, parser=parser,
                                                what="--batch-size"), default=None,
                   help="patches per step" + per_arch.format(toy["batch_size"],
                                                             other["batch_size"]))
    g.add_argument("--patch-size", type=partial(_positive_int, parser=parser,
                                                what="--patch-size"), default=None,
                   help="patch edge in voxels" + per_arch.format(toy["patch_size"],
                                                                 other["patch_size"]))
    g.add_argument("--patch-stride", type=partial(_positive_int, parser=parser,
                                                  what="--patch-stride"), default=None,
                   help="largest step between neighbouring patches in voxels (default: a third "
                        "of the patch; a larger step gives fewer patches an epoch)")
    g.add_argument("--learning-rate", type=partial(_positive_float, parser=parser,
                                                   what="--learning-rate"), default=None,
                   help="Adam's initial learning rate" + per_arch.format(
                       toy["learning_rate"], other["learning_rate"]))
    g.add_argument("--save-step", type=partial(_positive_int, parser=parser,
                                               what="--save-step"), default=None,
                   help="write a model file every this many epochs" + per_arch.format(
                       toy["save_step"], other["save_step"]))
    g.add_argument("--ema-decay", type=partial(_ema_decay, parser=parser), default=_D.ema_decay,
                   help="validate and save an exponential moving average of the weights with "
                        "this decay per step (e.g. 0.999; 0: the last weights)")
    g.add_argument("--linearity-factor", type=float, default=None,
                   help="QSMnet+ augmentation factor (e.g. 4)")
    g.add_argument("--sign-flip", action="store_true", help="add sign-flipped patches")
    g.add_argument("--max-steps", type=int, default=_D.max_steps,
                   help="stop after this many steps")
    g.add_argument("--amp", action="store_true",
                   help="bf16 mixed precision (on CUDA, or on a CPU with native bf16: "
                        "AVX512-BF16 or AMX; elsewhere training stays fp32 with a warning)")
    g.add_argument("--seed", type=int, default=_D.seed)


def _add_execution_options(parser: argparse.ArgumentParser) -> None:
    """Nipype's work folder and plugin, overwriting."""
    g = parser.add_argument_group("Execution")
    g.add_argument("-w", "--work-dir", type=Path, default=None,
                   help="Nipype working folder (reused by reruns); default: a folder named after "
                        "output_dir in the system temporary directory")
    g.add_argument("--nprocs", "--n-cpus", type=partial(_positive_int, parser=parser,
                                                        what="--nprocs"),
                   default=os.cpu_count() or 1, help="processes for MultiProc")
    g.add_argument("--omp-nthreads", type=partial(_positive_int, parser=parser,
                                                  what="--omp-nthreads"), default=None,
                   help="threads per process (default: min(nprocs, 8)); with MultiProc at "
                        "most nprocs, the CPUs the run may use")
    g.add_argument("--plugin", choices=PLUGINS, default="MultiProc", help="Nipype plugin")
    g.add_argument("--plugin-args", type=partial(_json_object, parser=parser,
                                                 what="--plugin-args"), default=None,
                   metavar="JSON", help="plugin arguments, e.g. '{\"sbatch_args\": \"-p gpu\"}'")
    g.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs that differ")
    g.add_argument("--mem-mb", "--mem_mb", type=partial(_positive_int, parser=parser,
                                                        what="--mem-mb"), default=None,
                   metavar="MB", help="memory budget of the run: MultiProc schedules nodes "
                   "within it and inference tiles the network to fit it (default: the memory "
                   "available)")
    g.add_argument("--stop-on-first-crash", action="store_true",
                   help="stop at the first input refused or node crashed, instead of "
                        "reporting it and going on with the other subjects")
    g.add_argument("--clean-workdir", action="store_true",
                   help="empty the work dir before running (not while another run uses it)")
    g.add_argument("--reports-only", action="store_true",
                   help="rebuild the reports and citations from the outputs already in "
                        "output_dir; nothing is computed")
    g.add_argument("--boilerplate-only", "--boilerplate_only", action="store_true",
                   help="write the methods text with its references (logs/CITATION.md, "
                        "logs/CITATION.bib) for the steps a run would perform, then exit")
    g.add_argument("--container", default=os.environ.get("BIDS_QSMNET_CONTAINER"),
                   help=argparse.SUPPRESS)


def get_parser() -> argparse.ArgumentParser:
    """The ``bids_qsmnet`` parser: positional arguments, then one group per concern."""
    parser = argparse.ArgumentParser(
        prog="bids_qsmnet",
        description="Quantitative susceptibility maps (χ, ppm) from local field maps with the "
                    "deep networks QSMnet / QSMnet+ (BIDS-App). participant: inference for "
                    "every subject/session/run; group: train a model on every subject that "
                    "has a Chimap label.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ReadableDir = partial(_readable_dir, parser=parser)

    parser.add_argument("bids_dir", type=ReadableDir,
                        help="BIDS dataset (raw or derivative) holding the local field maps")
    parser.add_argument("output_dir", type=Path,
                        help="output folder (BIDS-Derivatives)")
    parser.add_argument("analysis_level", choices=["participant", "group"],
                        help="participant: inference; group: training")
    parser.add_argument("--version", action="version", version=f"bids_qsmnet {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv: debug)")
    _add_input_options(parser)
    _add_phase_options(parser)
    _add_inference_options(parser)
    _add_training_options(parser)
    _add_execution_options(parser)
    return parser


def parse_args(argv=None):
    """Parse and cross-check the arguments (exit 2 with one line on a bad combination)."""
    parser = get_parser()
    opts = parser.parse_args(argv)
    bids_dir = opts.bids_dir.resolve()
    out = opts.output_dir.expanduser().absolute().resolve()
    opts.output_dir = out
    if out == bids_dir:
        parser.error("output_dir must differ from bids_dir")
    # inside the dataset only as a pipeline folder of its top-level derivatives/ (not
    # derivatives/ itself, not a derivatives/ folder deeper in the tree)
    rel = out.relative_to(bids_dir).parts if bids_dir in out.parents else None
    if rel is not None and (rel[0] != "derivatives" or len(rel) < 2):
        parser.error(f"output_dir {out} is inside bids_dir: use {bids_dir}/derivatives/"
                     "bids_qsmnet or a folder outside the dataset")
    if opts.work_dir is not None:
        wd = opts.work_dir.expanduser().absolute().resolve()
        if wd == bids_dir or bids_dir in wd.parents:
            parser.error(f"the work dir {wd} must not be inside bids_dir")
        opts.work_dir = wd
    if opts.omp_nthreads is None:
        opts.omp_nthreads = min(opts.nprocs, 8)
    if opts.plugin == "MultiProc":  # one machine: nprocs bounds all threads
        opts.omp_nthreads = min(opts.omp_nthreads, opts.nprocs)
    if (opts.reports_only or opts.boilerplate_only) and opts.analysis_level != "participant":
        parser.error("--reports-only and --boilerplate-only apply to the participant level")
    if opts.reports_only and opts.boilerplate_only:
        parser.error("give one of --reports-only and --boilerplate-only")
    if not 0.0 <= opts.validation_fraction < 1.0:
        parser.error("--validation-fraction must be within [0, 1)")
    return opts
