"""The small synthetic BIDS-derivative dataset of bids_qsmnet (``examples/ds-synthetic``).

Three phantom subjects from :func:`~bids_qsmnet.data.synthetic.make_brain_phantom`, 1 mm
isotropic (sub-03: raw GRE at 1.5 mm), axial (B0 along the third voxel axis), with everything
a user of the BIDS-App needs to try inference and training::

    ds-synthetic/
      dataset_description.json   DatasetType "derivative" (a local field is a processed map)
      README  participants.tsv  participants.json
      dseg.tsv                   lookup table of the tissue labels (index, name)
      sub-01/anat/
        sub-01_localfield.nii.gz (+ .json)      local field, Units "ppm"
        sub-01_desc-brain_mask.nii.gz (+ .json) brain mask, uint8
        sub-01_Chimap.nii.gz (+ .json)          ground-truth susceptibility, ppm
        sub-01_dseg.nii.gz (+ .json)            tissue labels
      sub-02/anat/ ...                          the same, with the local field in Hz (3 T)
      sub-03/anat/
        sub-03_echo-<n>_part-mag_MEGRE.nii.gz (+ .json)    raw multi-echo GRE magnitude
        sub-03_echo-<n>_part-phase_MEGRE.nii.gz (+ .json)  raw phase, Siemens integers
        sub-03_Chimap / _dseg                              truth, as above (no local field,
                                                           no mask: the app derives both)

The second subject's field is in Hz so that the unit conversion is exercised.  Maps are
stored as int16 with a NIfTI ``scl_slope`` (nibabel reads them back as float) to keep the
dataset small; see :data:`FIELD_STEP_PPM` for why this loses nothing that matters.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ..__about__ import __version__
from ..physics.units import ppm_to_hz
from .synthetic import BRAIN_LABELS, make_brain_phantom, simulate_local_field, snr_to_noise_std

log = logging.getLogger(__name__)

__all__ = [
    "EXAMPLE_SEED",
    "EXAMPLE_SHAPE",
    "EXAMPLE_SNR",
    "EXAMPLE_B0_TESLA",
    "FIELD_STEP_PPM",
    "FIELD_STEP_HZ",
    "CHI_STEP_PPM",
    "example_dataset_path",
    "make_example_dataset",
]

#: seed of the shipped dataset (``scripts/make_example_dataset.py`` uses it)
EXAMPLE_SEED = 20160327
#: grid of each subject (voxels, 1 mm isotropic): small enough for the size budget and for
#: fast inference in CI; the phantom brain is scaled down to fit it
EXAMPLE_SHAPE = (112, 128, 96)
#: field SNR: standard deviation of the noise-free local field in the mask / noise std
EXAMPLE_SNR = 20.0
#: field strength written to the sidecars (tesla)
EXAMPLE_B0_TESLA = 3.0
#: Quantisation steps of the int16 maps.  At SNR 20 the field noise is about 1e-3 ppm
#: (0.13 Hz at 3 T); a step of 1e-4 ppm (0.01 Hz) adds rounding noise of step/√12 ≈ 3e-5 ppm,
#: under 0.1 % of the noise variance, and int16 still spans ±3.3 ppm (±327 Hz), far beyond any
#: local field.  χ is stored to 0.1 ppb (range ±3.3 ppm), well below any tissue contrast.
FIELD_STEP_PPM = 1e-4
FIELD_STEP_HZ = 1e-2
CHI_STEP_PPM = 1e-4

_SUBJECTS = (("01", "ppm"), ("02", "Hz"))
#: the raw multi-echo GRE subject: echo times (s) and the magnitude SNR of the first echo
RAW_SUBJECT = "03"
RAW_ECHO_TIMES = (0.004, 0.012, 0.020)
RAW_SNR = 50.0
#: the raw subject is scanned at 1.5 mm isotropic over the same field of view (smaller files,
#: and the app then resamples into the network's 1 mm frame and back)
RAW_VOXEL_MM = 1.5
_GENERATOR = "bids_qsmnet-synthetic"


#: the dataset in a source checkout (``<repo>/examples/ds-synthetic``); an installed wheel
#: does not carry it
CHECKOUT_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ds-synthetic"


def _default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/bids_qsmnet`` (default ``~/.cache/bids_qsmnet``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bids_qsmnet"


def example_dataset_path(cache_dir: str | Path | None = None) -> Path:
    """Path of the example dataset, written on first use when the package has no copy.

    In a source checkout (editable installs, tests) this is ``<repo>/examples/ds-synthetic``.
    An installed wheel does not carry the dataset: the first call writes it with
    :func:`make_example_dataset` (seed :data:`EXAMPLE_SEED`; about 6 MB, about 10 s on 2 CPU
    cores) into ``cache_dir/ds-synthetic-<version>`` and later calls return that folder.  The
    folder is written under a temporary name and renamed when complete, so concurrent first
    calls do not see a partial dataset.

    Parameters
    ----------
    cache_dir : path, optional — where to write the dataset when there is no checkout copy
        (default: ``$XDG_CACHE_HOME/bids_qsmnet``, i.e. ``~/.cache/bids_qsmnet``)

    Returns
    -------
    Path — a folder holding the example BIDS dataset (``dataset_description.json`` at its top)
    """
    if (CHECKOUT_EXAMPLE / "dataset_description.json").is_file():
        return CHECKOUT_EXAMPLE
    cache = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    dest = cache / f"ds-synthetic-{__version__}"
    if (dest / "dataset_description.json").is_file():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=cache))
    try:
        make_example_dataset(tmp, overwrite=True)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private to the user
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / "dataset_description.json").is_file():
                raise
            # another process finished first: use its copy
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("example dataset written to %s", dest)
    return dest


def _affine(shape) -> np.ndarray:
    """RAS+ axial 1 mm affine whose grid centre lies near the scanner isocentre."""
    affine = np.eye(4)
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2.0 + np.array([0.0, -17.0, 10.0])
    return affine


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, *, slope: float | None = None):
    """Write a NIfTI-1 ``.nii.gz`` byte-for-byte reproducibly (gzip mtime 0, level 9)."""
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    if slope is not None:
        img.header.set_slope_inter(slope, 0.0)
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=9, mtime=0))


def _quantise(x: np.ndarray, step: float, what: str) -> np.ndarray:
    q = np.round(np.asarray(x, dtype=np.float64) / step)
    if np.abs(q).max() > np.iinfo(np.int16).max:
        raise ValueError(f"{what} exceeds the int16 range at a step of {step}")
    return q.astype(np.int16)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def make_example_dataset(
    out_dir: str | Path,
    *,
    seed: int = EXAMPLE_SEED,
    shape: tuple[int, int, int] = EXAMPLE_SHAPE,
    snr: float = EXAMPLE_SNR,
    overwrite: bool = False,
) -> Path:
    """Write the synthetic example BIDS-derivative dataset.

    Parameters
    ----------
    out_dir : path — dataset root (created)
    seed : int — the dataset is a deterministic function of the seed
    shape : (3,) int — grid of each subject in voxels (1 mm isotropic)
    snr : float — std of the noise-free local field in the mask / noise std
    overwrite : bool — allow writing into a non-empty ``out_dir`` (files are replaced, nothing
        is deleted)

    Returns
    -------
    Path — ``out_dir``
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass overwrite=True to write into it")
    out.mkdir(parents=True, exist_ok=True)
    affine = _affine(shape)
    children = np.random.SeedSequence(seed).spawn(len(_SUBJECTS) + 1)

    for (label, units), child in zip(_SUBJECTS, children[: len(_SUBJECTS)], strict=True):
        _write_field_subject(out, label, units, shape, affine, snr, np.random.default_rng(child))
    _write_raw_subject(out, shape, np.random.default_rng(children[-1]))
    _write_dataset_files(out, seed=seed, shape=shape, snr=snr)
    return out


def _write_field_subject(out: Path, label: str, units: str, shape, affine, snr: float,
                         rng) -> None:
    """One subject of the example: its phantom's χ map, tissue labels and brain mask, and the
    noisy local field in ``units`` (ppm or Hz), with their sidecars."""
    t0 = time.perf_counter()
    ph = make_brain_phantom(shape, (1.0, 1.0, 1.0), rng=rng)
    field = simulate_local_field(ph.chi, ph.mask, voxel_size=ph.voxel_size)
    noise_std = snr_to_noise_std(field, ph.mask, snr)
    field[ph.mask] += rng.normal(0.0, noise_std, int(ph.mask.sum())).astype(np.float32)

    anat = out / f"sub-{label}" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    stem = anat / f"sub-{label}"
    if units == "Hz":
        stored, step = ppm_to_hz(field, EXAMPLE_B0_TESLA), FIELD_STEP_HZ
    else:
        stored, step = field, FIELD_STEP_PPM
    _write_nifti(
        Path(f"{stem}_localfield.nii.gz"),
        _quantise(stored, step, "local field"),
        affine,
        slope=step,
    )
    _write_json(
        Path(f"{stem}_localfield.json"),
        {
            "Units": units,
            "MagneticFieldStrength": EXAMPLE_B0_TESLA,
            "SkullStripped": True,
            "Description": (
                "Synthetic local field: dipole convolution of the phantom's susceptibility "
                "(Chimap) with B0 along the third voxel axis, inside the brain mask, plus "
                f"Gaussian noise at SNR {snr:g} (field std / noise std)."
            ),
            "Sources": [f"bids::sub-{label}/anat/sub-{label}_Chimap.nii.gz"],
        },
    )
    _write_nifti(Path(f"{stem}_desc-brain_mask.nii.gz"), ph.mask.astype(np.uint8), affine)
    _write_json(
        Path(f"{stem}_desc-brain_mask.json"),
        {"Type": "Brain", "Description": "Brain mask of the synthetic phantom."},
    )
    _write_nifti(
        Path(f"{stem}_Chimap.nii.gz"),
        _quantise(ph.chi, CHI_STEP_PPM, "susceptibility"),
        affine,
        slope=CHI_STEP_PPM,
    )
    _write_json(
        Path(f"{stem}_Chimap.json"),
        {
            "Units": "ppm",
            "SkullStripped": True,
            "Description": "Ground-truth susceptibility of the synthetic phantom, "
            "zero outside the brain mask.",
        },
    )
    _write_nifti(Path(f"{stem}_dseg.nii.gz"), ph.labels.astype(np.uint8), affine)
    _write_json(
        Path(f"{stem}_dseg.json"),
        {"Description": "Tissue labels of the synthetic phantom; names in dseg.tsv."},
    )
    log.info("sub-%s (%s) written in %.1f s", label, units, time.perf_counter() - t0)


def _write_dataset_files(out: Path, *, seed: int, shape, snr: float) -> None:
    """The dataset's description, label and participant tables and README."""
    _write_json(
        out / "dataset_description.json",
        {
            "Name": "bids_qsmnet synthetic example",
            "BIDSVersion": "1.10.0",
            "DatasetType": "derivative",
            "License": "Apache-2.0",
            "GeneratedBy": [
                {
                    "Name": _GENERATOR,
                    "Version": __version__,
                    "Description": (
                        "bids_qsmnet.data.example.make_example_dataset("
                        f"seed={seed}, shape={tuple(shape)}, snr={snr:g}): procedural brain "
                        "phantoms, their local fields and tissue labels."
                    ),
                }
            ],
        },
    )
    (out / "dseg.tsv").write_text(
        "index\tname\n" + "".join(f"{i}\t{n}\n" for i, n in sorted(BRAIN_LABELS.items()))
    )
    (out / "participants.tsv").write_text(
        "participant_id\tfield_units\n"
        + "".join(f"sub-{label}\t{units}\n" for label, units in _SUBJECTS)
        + f"sub-{RAW_SUBJECT}\traw\n"
    )
    _write_json(
        out / "participants.json",
        {
            "participant_id": {"Description": "Synthetic phantom subject."},
            "field_units": {
                "Description": "Units of the subject's local-field map (its sidecar Units).",
                "Levels": {"ppm": "parts per million of B0", "Hz": "hertz at 3 T",
                           "raw": "no local field: raw multi-echo GRE magnitude and phase"},
            },
        },
    )
    (out / "README").write_text(_README.format(seed=seed, shape=tuple(shape), snr=snr))




def _write_raw_subject(out: Path, shape, rng) -> None:
    """sub-03: a phantom brain in a simulated head, scanned with a 3-echo GRE at 3 T."""
    from .megre import simulate_megre

    t0 = time.perf_counter()
    vs = (RAW_VOXEL_MM,) * 3
    shape = tuple(int(round(n / RAW_VOXEL_MM)) for n in shape)
    affine = np.diag([RAW_VOXEL_MM] * 3 + [1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) * RAW_VOXEL_MM / 2.0 + np.array([0.0, -17.0, 10.0])
    ph = make_brain_phantom(shape, vs, rng=rng)
    sim = simulate_megre(ph.chi, ph.mask, voxel_size=vs,
                         b0_tesla=EXAMPLE_B0_TESLA, echo_times=RAW_ECHO_TIMES, snr=RAW_SNR,
                         rng=rng, integer_phase=True)
    anat = out / f"sub-{RAW_SUBJECT}" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    stem = anat / f"sub-{RAW_SUBJECT}"
    # magnitude as 12-bit integers (as scanners store it) with a scale factor
    mag_step = float(sim.magnitude.max()) / 4095.0
    common = {"MagneticFieldStrength": EXAMPLE_B0_TESLA, "MRAcquisitionType": "3D",
              "Description": "Synthetic multi-echo GRE (bids_qsmnet.data.megre.simulate_megre): "
                             "phantom brain in a head with skull, scalp and an air sinus, "
                             f"complex noise at first-echo magnitude SNR {RAW_SNR:g}."}
    for n, te in enumerate(RAW_ECHO_TIMES, start=1):
        _write_nifti(Path(f"{stem}_echo-{n}_part-mag_MEGRE.nii.gz"),
                     _quantise(sim.magnitude[n - 1], mag_step, "magnitude"), affine,
                     slope=mag_step)
        _write_json(Path(f"{stem}_echo-{n}_part-mag_MEGRE.json"), {**common, "EchoTime": te})
        _write_nifti(Path(f"{stem}_echo-{n}_part-phase_MEGRE.nii.gz"),
                     np.asarray(sim.phase[n - 1], dtype=np.int16), affine)
        _write_json(Path(f"{stem}_echo-{n}_part-phase_MEGRE.json"),
                    {**common, "EchoTime": te, "Units": "arbitrary",
                     "PhaseRange": "-4096..4095 maps to [-pi, pi)"})
    _write_nifti(Path(f"{stem}_Chimap.nii.gz"), _quantise(ph.chi, CHI_STEP_PPM, "susceptibility"),
                 affine, slope=CHI_STEP_PPM)
    _write_json(Path(f"{stem}_Chimap.json"),
                {"Units": "ppm", "SkullStripped": True,
                 "Description": "Ground-truth susceptibility of the brain phantom scanned in "
                                "the MEGRE images, zero outside the brain."})
    _write_nifti(Path(f"{stem}_dseg.nii.gz"), ph.labels.astype(np.uint8), affine)
    _write_json(Path(f"{stem}_dseg.json"),
                {"Description": "Tissue labels of the synthetic phantom; names in dseg.tsv."})
    log.info("sub-%s (raw MEGRE, %d echoes) written in %.1f s", RAW_SUBJECT,
             len(RAW_ECHO_TIMES), time.perf_counter() - t0)


_README = """\
bids_qsmnet synthetic example dataset
=====================================

A small BIDS-derivative dataset for trying and testing bids_qsmnet.  Nothing in it was
measured: two procedural brain phantoms (bids_qsmnet.data.synthetic.make_brain_phantom),
1 mm isotropic, axial, B0 along the third voxel axis (the scanner z axis of the affine).

Per subject (sub-01, sub-02), in anat/:

* *_localfield.nii.gz   local field = dipole convolution of the susceptibility inside the brain
                        mask plus Gaussian noise (SNR {snr:g}: field std / noise std).
                        sub-01 in ppm, sub-02 in Hz at 3 T (sidecar Units,
                        MagneticFieldStrength) to exercise unit conversion.
* *_desc-brain_mask     brain mask (uint8).
* *_Chimap.nii.gz       ground-truth susceptibility (ppm), the training label.
* *_dseg.nii.gz         tissue labels; names in the top-level dseg.tsv.

sub-03 has no local field: it holds what a scanner writes, a 3-echo GRE at 3 T, 1.5 mm
isotropic (*_echo-<n>_part-mag_MEGRE, *_echo-<n>_part-phase_MEGRE with Siemens-style integer
phase -4096..4095, EchoTime per echo) of another phantom brain placed in a simulated head
(skull, scalp, an air sinus: a strong background field), with complex noise.  bids_qsmnet finds the
brain, unwraps, fits the field over the echoes and removes the background before the network.

Maps are stored as int16 with a NIfTI scale factor (field steps of 1e-4 ppm / 0.01 Hz,
susceptibility steps of 1e-4 ppm); NIfTI readers return floats.  The brains are scaled down
to fit the {shape} grid, so structures are smaller than in an adult head.

Regenerate with:  python scripts/make_example_dataset.py   (seed {seed})
"""
