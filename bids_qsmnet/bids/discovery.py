"""Finding inputs with pybids: local fields, brain masks, χ labels, and their metadata.

BIDS has no suffix for a local (tissue) field map, so the default query is documented and
overridable with ``--bids-filter-file`` (a JSON object of pybids filters per input kind, as in
fMRIPrep).  Defaults:

``localfield``  ``desc-localfield`` with any suffix, or suffix ``localfield`` (as SEPIA writes it)
``mask``        ``desc-brain`` + suffix ``mask``
``chimap``      suffix ``Chimap`` (the training label, ppm)

A filter-file entry replaces the default query of that kind; its value is one pybids filter
dict or a list of them (tried in order, results merged).  Inputs are always NIfTI.

A local field is a processed map, so the dataset given as ``bids_dir`` is often a derivative
dataset (``DatasetType: derivative``) or a raw dataset whose ``derivatives/<pipeline>/`` holds
the maps: both are indexed (``validate=False``; derivatives of a raw dataset are added).

Masks and labels are matched to each field by subject, session, acquisition and run; metadata
come from the sidecars with BIDS inheritance (``layout.get_metadata``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

LOGGER = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_FILTERS",
    "NIFTI_EXTENSIONS",
    "DiscoveryError",
    "FieldRun",
    "load_filter_file",
    "build_layout",
    "collect_runs",
    "clean_label",
]

NIFTI_EXTENSIONS = [".nii", ".nii.gz"]
MATCH_ENTITIES = ("subject", "session", "acquisition", "run")

DEFAULT_FILTERS: dict[str, list[dict]] = {
    "localfield": [{"desc": "localfield"}, {"suffix": "localfield"}],
    "mask": [{"desc": "brain", "suffix": "mask"}],
    "chimap": [{"suffix": "Chimap"}],
}


class DiscoveryError(ValueError):
    """Nothing usable was found; the message says what was searched."""


@dataclass
class FieldRun:
    """One local field to process, with what belongs to it.

    Attributes
    ----------
    field : path of the local-field NIfTI
    entities : BIDS entities of the field (subject, session, acquisition, run, …)
    metadata : the field's sidecar metadata (with inheritance)
    units : ``Units`` of the field (``ppm``, ``Hz`` or ``rad``), None when absent
    mask : path of the matching brain mask, or None
    label : path of the matching χ label (``Chimap``), or None
    label_metadata : sidecar of the label
    """

    field: str
    entities: dict
    metadata: dict = field(default_factory=dict)
    units: str | None = None
    mask: str | None = None
    label: str | None = None
    label_metadata: dict = field(default_factory=dict)

    @property
    def subject(self) -> str:
        return self.entities["subject"]

    @property
    def key(self) -> str:
        """``sub-X[_ses-Y][_acq-Z][_run-N]`` — names the run in logs and outputs."""
        parts = [f"sub-{self.entities['subject']}"]
        for ent, short in (("session", "ses"), ("acquisition", "acq"), ("run", "run")):
            if self.entities.get(ent) is not None:
                parts.append(f"{short}-{self.entities[ent]}")
        return "_".join(parts)


def clean_label(label: str, prefix: str = "sub-") -> str:
    """``sub-01`` or ``01`` → ``01``; refuses labels that are not BIDS labels.

    >>> clean_label("sub-01"), clean_label("01")
    ('01', '01')
    """
    s = str(label).strip()
    s = s[len(prefix):] if s.startswith(prefix) else s
    if not s or not s.isalnum():
        raise ValueError(f"invalid label {label!r}: BIDS labels are letters and digits only")
    return s


def load_filter_file(path: str | os.PathLike) -> dict[str, list[dict]]:
    """Read a ``--bids-filter-file``: a JSON object ``{kind: filter | [filters]}``."""
    path = os.fspath(path)
    try:
        with open(path) as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise DiscoveryError(f"{path}: the BIDS filter file does not exist") from None
    except json.JSONDecodeError as exc:
        raise DiscoveryError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise DiscoveryError(f"{path}: must hold a JSON object of filters per input kind")
    unknown = sorted(set(data) - set(DEFAULT_FILTERS))
    if unknown:
        raise DiscoveryError(f"{path}: unknown input kind(s) {', '.join(unknown)}; "
                             f"known: {', '.join(DEFAULT_FILTERS)}")
    out = {}
    for kind, value in data.items():
        filters = value if isinstance(value, list) else [value]
        if not filters or not all(isinstance(f, dict) for f in filters):
            raise DiscoveryError(f"{path}: {kind!r} must be a filter object or a list of them")
        out[kind] = filters
    return out


def build_layout(bids_dir: str | os.PathLike, *, database_dir: str | None = None,
                 validate: bool = False):
    """Index a raw or derivative dataset (and a raw dataset's ``derivatives/``) with pybids."""
    from bids import BIDSLayout

    bids_dir = os.path.abspath(os.fspath(bids_dir))
    desc = os.path.join(bids_dir, "dataset_description.json")
    if not os.path.isfile(desc):
        raise DiscoveryError(f"{bids_dir}: not a BIDS dataset (no dataset_description.json)")
    try:
        with open(desc) as fh:
            info = json.load(fh)
    except json.JSONDecodeError as exc:
        raise DiscoveryError(f"{desc}: not valid JSON ({exc})") from exc
    is_derivative = str(info.get("DatasetType", "raw")).lower() == "derivative"
    has_derivatives = os.path.isdir(os.path.join(bids_dir, "derivatives"))
    kwargs = {"validate": validate and not is_derivative, "database_path": database_dir,
              "config": ["bids", "derivatives"]}
    if has_derivatives and not is_derivative:
        kwargs["derivatives"] = True
    layout = BIDSLayout(bids_dir, **kwargs)
    LOGGER.info("indexed %s (%s dataset%s)", bids_dir, "derivative" if is_derivative else "raw",
                ", with derivatives/" if kwargs.get("derivatives") else "")
    return layout


def _query(layout, filters: Sequence[dict], **entities):
    """Files matching any of ``filters`` (each combined with ``entities``), deduplicated."""
    seen, out = set(), []
    for flt in filters:
        query = {"extension": NIFTI_EXTENSIONS, **flt, **entities}
        for f in layout.get(return_type="object", **query):
            if f.path not in seen:
                seen.add(f.path)
                out.append(f)
    return sorted(out, key=lambda f: f.path)


def _describe(filters: Sequence[dict]) -> str:
    return " or ".join(
        "{" + ", ".join(f"{k}={v}" for k, v in sorted(flt.items())) + "}" for flt in filters)


def _match(layout, filters, ents: dict, what: str, field_path: str):
    """The unique file of ``filters`` that belongs to the field with entities ``ents``.

    Subject and session must be equal (both absent counts as equal); acquisition and run must
    be equal where the file has them, so a mask without ``run`` serves every run of its
    session.  A file with exactly the field's entities is preferred over such a shared one.
    """
    query = {k: ents.get(k) for k in MATCH_ENTITIES}
    found = _query(layout, filters, subject=query["subject"])

    def ent(f, k):
        return f.get_entities().get(k)

    found = [f for f in found if ent(f, "session") == query["session"]]
    shared = [f for f in found
              if all(ent(f, k) is None or ent(f, k) == query[k] for k in ("acquisition", "run"))]
    exact = [f for f in shared if all(ent(f, k) == query[k] for k in ("acquisition", "run"))]
    chosen = exact or shared
    if len(chosen) > 1:
        raise DiscoveryError(
            f"{field_path}: {len(chosen)} {what} files match it ("
            + ", ".join(os.path.basename(f.path) for f in chosen)
            + "); narrow the query with --bids-filter-file")
    return chosen[0] if chosen else None


def collect_runs(layout, subject: str, *, sessions: Sequence[str] | None = None,
                 filters: dict | None = None, require_label: bool = False) -> list[FieldRun]:
    """All local fields of one subject, with matching masks and labels.

    Parameters
    ----------
    layout : ``bids.BIDSLayout`` from :func:`build_layout`
    subject : label without ``sub-``
    sessions : labels to keep (None: all)
    filters : kind → list of pybids filters (defaults: :data:`DEFAULT_FILTERS`)
    require_label : keep only fields that have a χ label (training)

    Raises
    ------
    DiscoveryError
        when nothing is found; the message names what was searched.
    """
    flt = {**DEFAULT_FILTERS, **(filters or {})}
    query = {"subject": subject}
    if sessions:
        query["session"] = list(sessions)
    fields = _query(layout, flt["localfield"], **query)
    # a Chimap or mask must never be taken for a field, whatever the filters say
    fields = [f for f in fields if f.get_entities().get("suffix") not in ("Chimap", "mask")]
    if not fields:
        raise DiscoveryError(
            f"no local field found for sub-{subject}"
            + (f" (sessions {', '.join(sessions)})" if sessions else "")
            + f": looked for {_describe(flt['localfield'])} with extension .nii/.nii.gz in "
            f"{layout.root}")
    runs = []
    for f in fields:
        ents = {k: v for k, v in f.get_entities().items() if k != "extension"}
        meta = layout.get_metadata(f.path)
        mask = _match(layout, flt["mask"], ents, "mask", f.path)
        label = _match(layout, flt["chimap"], ents, "Chimap", f.path)
        run = FieldRun(field=f.path, entities=ents, metadata=meta, units=meta.get("Units"),
                       mask=mask.path if mask else None, label=label.path if label else None,
                       label_metadata=layout.get_metadata(label.path) if label else {})
        if require_label and run.label is None:
            LOGGER.info("%s: no Chimap label, not used for training", run.key)
            continue
        LOGGER.info("%s: field %s (%s)%s%s", run.key, os.path.relpath(f.path, layout.root),
                    run.units or "units missing",
                    f", mask {os.path.basename(run.mask)}" if run.mask else ", no mask",
                    f", label {os.path.basename(run.label)}" if run.label else "")
        runs.append(run)
    return runs
