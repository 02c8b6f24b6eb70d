"""``python -m bids_qsmnet.cli.qsmci IN_DIR OUT_DIR``: the dipole stage of QSM-CI.

QSM-CI (https://github.com/QSMxT/QSM-CI) runs a submission's ``run.sh`` with an input folder
holding ``localfield.nii.gz`` (ppm), ``mask.nii.gz`` and ``params.json`` (``B0_dir``: unit B0
direction in voxel space; ``voxel_size``: mm; ``B0``: tesla), and expects ``chimap.nii.gz``
(χ, ppm, on the input grid) in the output folder.  This entry point runs the same chain as the
participant workflow: the mask checked and applied (:func:`~bids_qsmnet.io.fields.prepare_mask`),
the field resampled into the network frame with B0 along its third axis
(:func:`~bids_qsmnet.inference.resample.resample_to_frame`), the shipped default model with the
model file's refinement (:func:`~bids_qsmnet.inference.run.run_qsmnet`), and the map brought
back onto the input grid (:func:`~bids_qsmnet.inference.resample.resample_from_frame`).

A bad input ends with one line naming the file and exit code 1.  Nothing heavy is imported
before the arguments are parsed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from ..errors import UserError

__all__ = ["FIELD", "MASK", "PARAMS", "CHIMAP", "read_params", "reconstruct", "get_parser",
           "main"]

LOGGER = logging.getLogger("bids_qsmnet")

#: file names of the QSM-CI dipole stage (its ``stages.py`` ARTIFACT_FILE)
FIELD, MASK, PARAMS, CHIMAP = "localfield.nii.gz", "mask.nii.gz", "params.json", "chimap.nii.gz"

# relative difference between params.json's voxel_size and the header's above which the
# params value replaces the header's (the header stores float32: ~1e-7)
_VOXEL_RTOL = 1e-4


def _vector3(path: Path, params: dict, key: str, *, positive: bool) -> tuple[float, ...]:
    from ..io.nifti import InputError

    value = params.get(key)
    try:
        v = tuple(float(x) for x in value)
    except (TypeError, ValueError):
        v = ()
    if len(v) != 3 or not all(math.isfinite(x) for x in v):
        raise InputError(f"{path}: {key} must be three numbers, got {value!r}")
    if positive and min(v) <= 0:
        raise InputError(f"{path}: {key} must be positive (mm), got {value!r}")
    if not positive and not any(v):
        raise InputError(f"{path}: {key} must not be the zero vector")
    return v


def read_params(path: str | os.PathLike) -> dict:
    """The acquisition parameters of a QSM-CI ``params.json`` that the dipole stage uses.

    Parameters
    ----------
    path : QSM-CI ``params.json``

    Returns
    -------
    dict — ``b0_dir`` (3,) float, unit vector in voxel space; ``voxel_size`` (3,) float, mm

    Raises
    ------
    InputError
        naming the file, when it is missing, not a JSON object, or ``B0_dir`` /
        ``voxel_size`` are not three finite numbers (non-zero; positive).
    """
    from ..io.nifti import InputError

    path = Path(path)
    try:
        params = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: params file does not exist") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(params, dict):
        raise InputError(f"{path}: must hold a JSON object")
    b0 = _vector3(path, params, "B0_dir", positive=False)
    norm = math.sqrt(sum(x * x for x in b0))
    return {"b0_dir": tuple(x / norm for x in b0),
            "voxel_size": _vector3(path, params, "voxel_size", positive=True)}


def _with_voxel_size(in_file: str, voxel_size, newpath: str) -> str:
    """``in_file`` itself, or a copy whose affine has voxel edges ``voxel_size`` (mm) along the
    same axes, when its header says otherwise (params.json is the authority)."""
    import numpy as np

    from ..io.nifti import derived_path, load_volume, save_volume
    from ..physics.orientation import voxel_sizes_from_affine

    data, img = load_volume(in_file, what="volume")
    header = voxel_sizes_from_affine(img.affine)
    want = np.asarray(voxel_size, dtype=np.float64)
    if np.allclose(header, want, rtol=_VOXEL_RTOL, atol=0):
        return in_file
    LOGGER.warning("%s: header voxel size %s mm, params.json says %s mm: using params.json",
                   in_file, np.round(header, 4).tolist(), want.tolist())
    affine = img.affine.copy()
    affine[:3, :3] = affine[:3, :3] / header[None, :] * want[None, :]
    return save_volume(data, affine, derived_path(in_file, "_vox", newpath))


def reconstruct(in_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                model: str | None = None, device: str = "auto",
                num_threads: int | None = None) -> tuple[str, dict]:
    """χ (ppm) of a QSM-CI dipole-stage input folder, written as ``out_dir/chimap.nii.gz``.

    Parameters
    ----------
    in_dir : folder with ``localfield.nii.gz`` (ppm), ``mask.nii.gz`` and ``params.json``
    out_dir : folder for ``chimap.nii.gz`` (created if missing)
    model : model file, folder or shipped name (None: the shipped default)
    device : ``auto``, ``cpu`` or ``cuda[:N]``
    num_threads : torch CPU threads (None: torch's default)

    Returns
    -------
    out_file : χ map, ppm, on the grid (shape, affine) of ``localfield.nii.gz``, zero outside
        the mask
    info : model, device and refinement (:func:`~bids_qsmnet.inference.run.run_qsmnet`), and
        ``b0_dir``, ``voxel_size``, ``obliquity_deg`` and ``frame_shape`` of the network frame

    Raises
    ------
    InputError
        naming the file: a missing or unreadable input, a mask off the field's grid or empty,
        a field that is zero inside the mask, bad ``params.json`` values.
    """
    import numpy as np

    from ..inference.resample import frame_from_json, resample_from_frame, resample_to_frame
    from ..inference.run import run_qsmnet
    from ..io.fields import check_inputs, prepare_mask
    from ..io.nifti import load_volume, save_volume
    from ..models.modelfile import read_model_spec, resolve_model

    in_dir, out_dir = Path(in_dir), Path(out_dir)
    field_file, mask_file = str(in_dir / FIELD), str(in_dir / MASK)
    params = read_params(in_dir / PARAMS)
    check_inputs(field_file, mask_file)  # header only: readable, 3-D, the same grid
    spec = read_model_spec(resolve_model(model))
    target_voxel = float(np.mean(spec.voxel_size))
    with tempfile.TemporaryDirectory(prefix="bids_qsmnet-qsmci-") as work:
        field = _with_voxel_size(field_file, params["voxel_size"], work)
        mask = _with_voxel_size(mask_file, params["voxel_size"], work)
        masked, mask = prepare_mask(field, mask, newpath=work)
        f_frame, m_frame, frame_file, b0_used = resample_to_frame(
            masked, mask, b0_dir=params["b0_dir"], target_voxel=target_voxel, newpath=work)
        chi_frame, info = run_qsmnet(f_frame, m_frame, model=model, device=device,
                                     num_threads=num_threads, newpath=work)
        native = resample_from_frame(chi_frame, frame_file, masked, mask, newpath=work)
        chi, _ = load_volume(native, what="χ map")
        with open(frame_file) as fh:
            frame = frame_from_json(json.load(fh))
    _, img = load_volume(field_file, what="local field")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = save_volume(chi.astype(np.float32), img, out_dir / CHIMAP)
    info.update(b0_dir=b0_used, voxel_size=list(params["voxel_size"]),
                obliquity_deg=frame.obliquity_deg, frame_shape=list(frame.shape))
    return out, info


def _folder(value, *, parser):
    p = Path(value).expanduser()
    if not p.is_dir():
        raise parser.error(f"not a folder: {value}")
    return p.absolute()


def get_parser() -> argparse.ArgumentParser:
    """The ``python -m bids_qsmnet.cli.qsmci`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m bids_qsmnet.cli.qsmci",
        description="QSM-CI dipole stage: localfield.nii.gz (ppm), mask.nii.gz and params.json "
                    "(B0_dir, voxel_size) in IN_DIR -> chimap.nii.gz (chi, ppm, input grid) in "
                    "OUT_DIR, with the shipped default model and its refinement.")
    parser.add_argument("in_dir", type=partial(_folder, parser=parser),
                        help="QSM-CI input folder (/input in the container)")
    parser.add_argument("out_dir", type=Path, help="output folder (/output in the container)")
    parser.add_argument("--model", default=None,
                        help="model file, folder or shipped name (default: the shipped default)")
    parser.add_argument("--device", default="auto",
                        help="auto, cpu or cuda[:N] (default: %(default)s)")
    parser.add_argument("--nthreads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the dipole stage with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    opts = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    t0 = time.perf_counter()
    try:
        out, info = reconstruct(opts.in_dir, opts.out_dir, model=opts.model, device=opts.device,
                                num_threads=opts.nthreads)
    except (UserError, MemoryError) as exc:
        print(f"bids_qsmnet qsmci: error: {exc}", file=sys.stderr)
        return 1
    lam = (info.get("data_consistency") or {}).get("lambda", "off")
    lam = f"{lam:.3g}" if isinstance(lam, float) else str(lam)
    print(f"bids_qsmnet: wrote {out} ({time.perf_counter() - t0:.1f} s; model {info['name']} "
          f"on {info['device']}; B0 {info['obliquity_deg']:.1f}° from the third axis; "
          f"refinement λ {lam})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
