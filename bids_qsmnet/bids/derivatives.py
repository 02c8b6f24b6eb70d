"""BIDS-Derivatives output: names from the source's entities, sidecars, dataset_description.

Output names are built by pybids' ``build_path`` from the source file's entities and our own
path patterns (the stock patterns know no ``Chimap`` suffix), never formatted by hand.
Every file is written under a temporary name and renamed, so a killed run never leaves a file
that looks complete; an existing output is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
from collections.abc import Mapping

from ..__about__ import __version__
from ..io import atomic
from ..io.atomic import OutputExistsError, check_overwrite, write_json_atomic

__all__ = [
    "PIPELINE_NAME",
    "PATH_PATTERNS",
    "OutputExistsError",
    "derivative_path",
    "bids_uri",
    "write_sidecar",
    "copy_atomic",
    "sink_derivative",
    "MOSAIC_KINDS",
    "mosaic_paths",
    "write_dataset_description",
]

PIPELINE_NAME = "bids_qsmnet"

PATH_PATTERNS = [
    "sub-{subject}[/ses-{session}]/{datatype<anat>|anat}/sub-{subject}[_ses-{session}]"
    "[_acq-{acquisition}][_rec-{reconstruction}][_run-{run}][_echo-{echo}][_part-{part}]"
    "[_space-{space}][_desc-{desc}]_{suffix<Chimap|R2starmap|T2starmap|mask|localfield|fieldmap|unwrapped|dseg|mosaic>}"
    "{extension<.nii.gz|.nii|.json|.png|.svg>|.nii.gz}",
    "sub-{subject}[_ses-{session}][_acq-{acquisition}][_run-{run}][_desc-{desc}]"
    "{extension<.html>|.html}",
]

ENTITY_KEYS = ("subject", "session", "acquisition", "reconstruction", "run", "echo", "part",
               "space", "desc", "suffix", "extension", "datatype")


# BIDS labels and indices are ASCII letters and digits (not str.isalnum, which takes any
# Unicode letter); an extension is one or more dot-separated such parts
_LABEL = re.compile(r"[A-Za-z0-9]+")
_EXTENSION = re.compile(r"(\.[A-Za-z0-9]+)+")


def derivative_path(out_dir: str, source_entities: Mapping, *, suffix: str,
                    desc: str | None = None, extension: str = ".nii.gz",
                    drop: tuple[str, ...] = ("desc", "part", "echo")) -> str:
    """Path of a derivative of the source with the given entities.

    ``drop`` lists source entities not carried over (the source's ``desc-localfield`` does
    not describe a χ map).

    >>> derivative_path("/out", {"subject": "01", "session": "a", "run": 2,
    ...                          "desc": "localfield", "suffix": "localfield"}, suffix="Chimap")
    '/out/sub-01/ses-a/anat/sub-01_ses-a_run-2_Chimap.nii.gz'
    """
    from bids.layout.writing import build_path

    ents = {k: v for k, v in source_entities.items() if k in ENTITY_KEYS and k not in drop}
    ents.update(suffix=suffix, extension=extension, datatype="anat")
    if desc:
        ents["desc"] = desc
    ents = {k: str(v) for k, v in ents.items() if v is not None}
    for k, v in ents.items():  # labels go into file names: letters and digits only
        if not (_EXTENSION if k == "extension" else _LABEL).fullmatch(v):
            raise ValueError(f"entity {k}={v!r} is not a valid BIDS "
                             + ("extension" if k == "extension" else "label"))
    rel = build_path(ents, PATH_PATTERNS, strict=False)
    if rel is None:
        raise ValueError(f"cannot name a derivative for entities {ents}")
    path = os.path.normpath(os.path.join(out_dir, rel))
    if not path.startswith(os.path.normpath(out_dir) + os.sep):
        raise ValueError(f"derivative path {path} would leave the output folder {out_dir}")
    return path


def bids_uri(path: str, root: str, dataset: str = "raw") -> str:
    """``bids:<dataset>:<path relative to the dataset root>`` (BIDS URI of a source file)."""
    return f"bids:{dataset}:{os.path.relpath(path, root)}"


def write_sidecar(metadata: Mapping, dest: str, *, overwrite: bool = True) -> str:
    """Write a sidecar: ``metadata`` as sorted, indented JSON at ``dest``
    (:func:`~bids_qsmnet.io.atomic.write_json_atomic`)."""
    return write_json_atomic(dest, metadata, overwrite=overwrite)


def copy_atomic(src: str, dest: str, *, overwrite: bool = False) -> str:
    """Copy ``src`` to ``dest`` through a temporary sibling file and a rename."""
    check_overwrite(dest, overwrite)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with atomic.atomic_output(dest) as tmp:
        shutil.copyfile(src, tmp)
    return dest


#: what the validator must skip in the derivatives (gitignore syntax): the reports, figures
#: and logs, as fMRIPrep's ``.bidsignore``; and the phase chain's field maps (ppm), for which
#: BIDS has no suffix in ``anat/`` (``fieldmap`` belongs to ``fmap/``, in Hz, with a magnitude)
BIDSIGNORE = ("*.html", "**/figures", "logs", "**/anat/*_fieldmap.nii.gz",
              "**/anat/*_fieldmap.json")

DERIVATIVES_README = """# bids_qsmnet derivatives

Quantitative susceptibility maps computed by bids_qsmnet {version} from the dataset at
{source}.

Per run, in `sub-<label>/[ses-<label>/]anat/`:

- `*_Chimap.nii.gz`: magnetic susceptibility χ in ppm on the input grid, zero outside the
  mask; its JSON sidecar holds the units, the model (name, sha256), the B0 direction, the
  resampling and the data-consistency settings used.
- `*_desc-brain_mask.nii.gz`: the brain mask χ is defined on.
- raw multi-echo GRE runs only: `*_desc-totalfield_fieldmap.nii.gz` (total field, Hz),
  `*_desc-localfield_fieldmap.nii.gz` (local field after background-field removal, ppm) and
  `*_desc-eroded_mask.nii.gz` (where the local field and χ are defined). BIDS has no suffix for
  these maps in `anat/`: `.bidsignore` lists them.

Per subject: `sub-<label>.html`, a report with slice mosaics (`sub-<label>/figures/`), the
settings, warnings and errors of the run. `logs/CITATION.md` and `logs/CITATION.bib` hold the
methods text and its references.
"""


def write_dataset_description(out_dir: str, *, bids_dir: str, container: str | None = None,
                              extra_sources: list | None = None) -> str:
    """``dataset_description.json`` of the derivative dataset (BIDS 1.10), with its
    ``README.md`` and ``.bidsignore`` (:data:`BIDSIGNORE`); ``Authors`` and ``License`` are
    those of the source dataset, when it has them."""
    gen = {"Name": PIPELINE_NAME, "Version": __version__,
           "Description": "Deep-learning QSM (QSMnet/QSMnet+) from local field maps",
           "CodeURL": "https://pypi.org/project/bids_qsmnet/"}
    if container:
        gen["Container"] = {"Type": container}
    desc = {
        "Name": "bids_qsmnet derivatives: susceptibility maps (χ, ppm)",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [gen],
        "SourceDatasets": ([{"URL": "file://" + os.path.abspath(bids_dir)}]
                           + list(extra_sources or [])),
        "DatasetLinks": {"raw": "file://" + os.path.abspath(bids_dir)},
    }
    desc.update(_source_fields(bids_dir, ("Authors", "License")))
    os.makedirs(out_dir, exist_ok=True)
    atomic.write_text_atomic(os.path.join(out_dir, ".bidsignore"), "\n".join(BIDSIGNORE) + "\n")
    atomic.write_text_atomic(os.path.join(out_dir, "README.md"), DERIVATIVES_README.format(
        version=__version__, source=os.path.abspath(bids_dir)))
    return write_json_atomic(os.path.join(out_dir, "dataset_description.json"), desc)


def _source_fields(bids_dir: str, keys) -> dict:
    """The fields ``keys`` of the source dataset's description that it has."""
    try:
        with open(os.path.join(bids_dir, "dataset_description.json"), encoding="utf-8") as fh:
            source = json.load(fh)
    except (OSError, ValueError):
        return {}
    return {k: source[k] for k in keys if isinstance(source, dict) and source.get(k)}


def sink_derivative(in_file: str, out_dir: str, entities: dict, *, suffix: str,
                    desc: str | None = None, metadata: dict | None = None,
                    overwrite: bool = False) -> tuple[str, str | None]:
    """Copy ``in_file`` into the derivatives tree (name from ``entities``) with a sidecar.

    An existing output with identical content is left as it is (a rerun after a crash is
    idempotent); a different one is replaced only with ``overwrite``.
    Returns ``(out_file, sidecar or None)``.
    """
    ext = ".nii.gz" if in_file.endswith(".nii.gz") else os.path.splitext(in_file)[1]
    dest = derivative_path(out_dir, entities, suffix=suffix, desc=desc, extension=ext)
    if os.path.exists(dest) and not overwrite and not filecmp.cmp(in_file, dest, shallow=False):
        raise OutputExistsError(f"{dest} exists with other content; use --overwrite")
    copy_atomic(in_file, dest, overwrite=True)
    sidecar = None
    if metadata:
        sidecar = derivative_path(out_dir, entities, suffix=suffix, desc=desc, extension=".json")
        write_sidecar(metadata, sidecar)
    return dest, sidecar


#: the mosaics of a run, in the order :func:`bids_qsmnet.reports.figures.make_mosaics` writes
#: them; ``r2star`` only for runs with an R2* map (raw GRE, two or more magnitude echoes)
MOSAIC_KINDS = ("field", "chimap", "r2star")


def mosaic_paths(out_dir: str, entities: dict, *, r2star: bool = False) -> list[str]:
    """Paths of the run's mosaics, ``sub-<label>[/ses-<label>]/figures/<name>_mosaic.png``;
    the ``r2star`` one only with ``r2star``.

    >>> mosaic_paths("/out", {"subject": "01", "suffix": "localfield"})[1]
    '/out/sub-01/figures/sub-01_desc-chimap_mosaic.png'
    >>> mosaic_paths("/out", {"subject": "03", "suffix": "MEGRE"}, r2star=True)[2]
    '/out/sub-03/figures/sub-03_desc-r2star_mosaic.png'
    """
    paths = []
    for kind in MOSAIC_KINDS if r2star else MOSAIC_KINDS[:2]:
        png = derivative_path(out_dir, entities, suffix="mosaic", desc=kind, extension=".png")
        paths.append(os.path.join(os.path.dirname(os.path.dirname(png)), "figures",
                                  os.path.basename(png)))
    return paths
