"""Finding inputs with pybids: local fields, brain masks, χ labels, and their metadata.

BIDS has no suffix for a local (tissue) field map, so the default query is documented and
overridable with ``--bids-filter-file`` (a JSON object of pybids filters per input kind, as in
fMRIPrep).  Defaults:

``localfield``  ``desc-localfield`` with any suffix, or suffix ``localfield`` (as SEPIA writes it)
``mask``        ``desc-brain`` + suffix ``mask``
``chimap``      suffix ``Chimap`` (the training label, ppm)
``phase``       ``part-phase`` with suffix ``MEGRE`` (multi-echo GRE) or ``T2starw`` (single echo)
``magnitude``   ``part-mag`` with the same suffixes

When a run (subject, session, acquisition, run) has no local field but raw GRE phase, the
run is processed from the raw echoes (:func:`bids_qsmnet.workflows.phase.init_phase_wf`):
each phase echo is paired with the magnitude of the same echo, and ``EchoTime`` is read per
echo.

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
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import UserError

LOGGER = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_FILTERS",
    "NIFTI_EXTENSIONS",
    "DiscoveryError",
    "FieldRun",
    "Echo",
    "RAW_SUFFIXES",
    "load_filter_file",
    "build_layout",
    "collect_runs",
    "clean_label",
    "subjects",
]

NIFTI_EXTENSIONS = [".nii", ".nii.gz"]
MATCH_ENTITIES = ("subject", "session", "acquisition", "run")

DEFAULT_FILTERS: dict[str, list[dict]] = {
    "localfield": [{"desc": "localfield"}, {"suffix": "localfield"}],
    "mask": [{"desc": "brain", "suffix": "mask"}],
    "chimap": [{"suffix": "Chimap"}],
    "phase": [{"part": "phase", "suffix": ["MEGRE", "T2starw"]}],
    "magnitude": [{"part": "mag", "suffix": ["MEGRE", "T2starw"]}],
}
RAW_SUFFIXES = ("MEGRE", "T2starw")


class DiscoveryError(UserError, ValueError):
    """Nothing usable was found; the message says what was searched."""


@dataclass
class Echo:
    """One echo of a raw GRE run.

    Attributes
    ----------
    phase : path of the phase NIfTI (radians or scanner integers)
    magnitude : path of the magnitude NIfTI of the same echo, or None
    echo_time : ``EchoTime`` of the phase sidecar (seconds), None when absent
    metadata : the phase sidecar (with inheritance)
    """

    phase: str
    magnitude: str | None
    echo_time: float | None
    metadata: dict = field(default_factory=dict)


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
    echoes : for a raw run (no local field), its GRE echoes in echo order; ``field`` is then the
        first echo's phase and ``metadata`` its sidecar
    """

    field: str
    entities: dict
    metadata: dict = field(default_factory=dict)
    units: str | None = None
    mask: str | None = None
    label: str | None = None
    label_metadata: dict = field(default_factory=dict)
    echoes: list[Echo] = field(default_factory=list)

    @property
    def is_raw(self) -> bool:
        """True when the run starts from raw GRE phase rather than a local field."""
        return bool(self.echoes)

    @property
    def fits_r2star(self) -> bool:
        """True for a raw GRE run of two or more echoes, each with its magnitude: R2*/T2*
        maps are fitted to it."""
        return len(self.echoes) >= 2 and all(e.magnitude for e in self.echoes)

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
        for f in filters:
            control = sorted(set(f) & _PYBIDS_CONTROL_KEYS)
            if control:
                raise DiscoveryError(f"{path}: {kind!r}: {', '.join(control)} is not a BIDS "
                                     "entity; a filter holds entities only (e.g. acquisition, "
                                     "run, echo)")
            for key, v in f.items():
                values = v if isinstance(v, list) else [v]
                if not all(x is None or isinstance(x, (str, int, float)) for x in values):
                    raise DiscoveryError(f"{path}: {kind!r}: the value of {key!r} must be a "
                                         f"string, a number, null or a list of them, got {v!r}")
        out[kind] = filters
    return out


#: keywords of ``BIDSLayout.get`` that are not entities: a filter file may not set them (they
#: would change what the query returns, not which files)
_PYBIDS_CONTROL_KEYS = frozenset({
    "return_type", "target", "scope", "regex_search", "absolute_paths", "invalid_filters",
    "drop_invalid_filters", "index_metadata", "return_types",
})


def build_layout(bids_dir: str | os.PathLike, *, database_dir: str | None = None,
                 validate: bool = False, exclude: Sequence[str | os.PathLike] = ()):
    """Index a raw or derivative dataset (and a raw dataset's ``derivatives/``) with pybids.

    ``exclude`` lists derivative folders not to index — the app's own output folder, so that
    its ``desc-localfield`` maps are never taken as inputs of the next run.
    """
    from bids import BIDSLayout

    bids_dir = os.path.abspath(os.fspath(bids_dir))
    desc = os.path.join(bids_dir, "dataset_description.json")
    if not os.path.isfile(desc):
        raise DiscoveryError(f"{bids_dir}: not a BIDS dataset (no dataset_description.json)")
    try:
        with open(desc, encoding="utf-8") as fh:
            info = json.load(fh)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise DiscoveryError(f"{desc}: not valid JSON ({exc})") from None
    if not isinstance(info, dict):
        raise DiscoveryError(f"{desc}: must hold a JSON object")
    is_derivative = str(info.get("DatasetType", "raw")).lower() == "derivative"
    has_derivatives = os.path.isdir(os.path.join(bids_dir, "derivatives"))
    kwargs = {"validate": validate and not is_derivative, "database_path": database_dir,
              "config": ["bids", "derivatives"]}
    if has_derivatives and not is_derivative:
        skip = {os.path.realpath(os.fspath(p)) for p in exclude}
        root = os.path.join(bids_dir, "derivatives")
        found = [os.path.join(root, d) for d in sorted(os.listdir(root))
                 if os.path.isfile(os.path.join(root, d, "dataset_description.json"))
                 and os.path.realpath(os.path.join(root, d)) not in skip]
        if found:
            kwargs["derivatives"] = found
    try:
        layout = BIDSLayout(bids_dir, **kwargs)
    except Exception as exc:  # pybids stops at the first sidecar it cannot read
        bad = _unreadable_sidecars(bids_dir)
        if bad:
            raise DiscoveryError(
                f"{bad[0]}: not a JSON object (a BIDS sidecar must be one); fix or remove it"
                + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")) from None
        raise DiscoveryError(f"{bids_dir}: pybids cannot index the dataset "
                             f"({type(exc).__name__}: {exc})") from None
    LOGGER.info("indexed %s (%s dataset%s)", bids_dir, "derivative" if is_derivative else "raw",
                ", with derivatives/" if kwargs.get("derivatives") else "")
    return layout


def _unreadable_sidecars(root: str) -> list[str]:
    """JSON files under ``root`` that do not hold a JSON object (pybids cannot index them)."""
    bad = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.endswith(".json") or name.startswith("."):
                continue
            path = os.path.join(folder, name)
            try:
                with open(path, encoding="utf-8") as fh:
                    ok = isinstance(json.load(fh), dict)
            except (OSError, ValueError):  # unreadable, not UTF-8, not JSON
                ok = False
            if not ok:
                bad.append(path)
    return bad


#: per layout: the files of each query over all subjects, and each file's entities (pybids
#: answers a query in 5-15 ms and rebuilds a file's entities from its database on every
#: ``get_entities()``, which made collecting the runs of every subject, as the methods text of
#: each participant job does, grow with the square of the dataset)
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cache(layout) -> dict:
    try:
        return _CACHE.setdefault(layout, {"queries": {}, "entities": {}})
    except TypeError:  # a layout that takes no weak reference: no cache
        return {"queries": {}, "entities": {}}


def _ents(layout, f) -> dict:
    """``f.get_entities()``, computed once per file of ``layout``."""
    known = _cache(layout)["entities"]
    if f.path not in known:
        known[f.path] = f.get_entities()
    return known[f.path]


def subjects(layout) -> list[str]:
    """The dataset's subject labels, sorted (``layout.get_subjects()``, asked once per
    layout)."""
    cache = _cache(layout)
    if "subjects" not in cache:
        cache["subjects"] = sorted(layout.get_subjects())
    return list(cache["subjects"])


def _query(layout, filters: Sequence[dict], subject=None, **entities):
    """Files matching any of ``filters`` (each combined with ``entities``), deduplicated, of
    ``subject`` (a label or a list of them; None: every subject).  The query runs once per
    layout over all subjects; each subject's files are picked from its answer."""
    key = repr((list(filters), sorted(entities.items())))
    queries = _cache(layout)["queries"]
    if key not in queries:
        seen, out = set(), []
        for flt in filters:
            query = {"extension": NIFTI_EXTENSIONS, **flt, **entities}
            for f in layout.get(return_type="object", **query):
                if f.path not in seen:
                    seen.add(f.path)
                    out.append(f)
        queries[key] = sorted(out, key=lambda f: f.path)
    if subject is None:
        return list(queries[key])
    wanted = {str(s) for s in subject} if isinstance(subject, (list, tuple, set)) \
        else {str(subject)}
    return [f for f in queries[key] if str(_ents(layout, f).get("subject")) in wanted]


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
        return _ents(layout, f).get(k)

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


def _echo_number(layout, f) -> int | None:
    value = _ents(layout, f).get("echo")
    return None if value is None else int(value)


def _collect_raw(layout, flt: dict, query: dict, covered: set[str]) -> list[FieldRun]:
    """Raw GRE runs (phase echoes with their magnitudes) whose key has no local field."""
    groups: dict[tuple, list] = {}
    for f in _query(layout, flt["phase"], **query):
        if _ents(layout, f).get("suffix") in ("Chimap", "mask"):
            continue
        e = _ents(layout, f)
        groups.setdefault(tuple(str(e.get(k)) for k in MATCH_ENTITIES), []).append(f)
    runs = []
    for files in groups.values():
        first = files[0]
        ents = {k: v for k, v in _ents(layout, first).items()
                if k not in ("extension", "echo", "part")}
        run = FieldRun(field=first.path, entities=ents)
        if run.key in covered:
            LOGGER.info("%s: a local field exists; its raw GRE phase is not used", run.key)
            continue
        numbers = [_echo_number(layout, f) for f in files]
        if len(set(numbers)) != len(numbers) or (None in numbers and len(numbers) > 1):
            raise DiscoveryError(
                f"{run.key}: the phase files do not form one echo series ("
                + ", ".join(os.path.basename(f.path) for f in files)
                + "); narrow the 'phase' query with --bids-filter-file")
        files = sorted(files, key=lambda f: _echo_number(layout, f) or 0)
        mags = _query(layout, flt["magnitude"], subject=ents["subject"])
        echoes = []
        for f in files:
            fe = _ents(layout, f)
            same = [m for m in mags
                    if all(_ents(layout, m).get(k) == fe.get(k)
                           for k in ("session", "acquisition", "run", "reconstruction"))
                    and _echo_number(layout, m) == _echo_number(layout, f)]
            if len(same) > 1:
                raise DiscoveryError(
                    f"{f.path}: {len(same)} magnitude files match this echo ("
                    + ", ".join(os.path.basename(m.path) for m in same)
                    + "); narrow the 'magnitude' query with --bids-filter-file")
            meta = layout.get_metadata(f.path)
            te = meta.get("EchoTime")
            echoes.append(Echo(phase=f.path, magnitude=same[0].path if same else None,
                               echo_time=te if te is None or isinstance(te, list) else float(te),
                               metadata=meta))
        run.echoes = echoes
        run.metadata = echoes[0].metadata
        run.units = "rad"
        runs.append(run)
    return runs


def collect_runs(layout, subject: str, *, sessions: Sequence[str] | None = None,
                 filters: dict | None = None, require_label: bool = False) -> list[FieldRun]:
    """All local fields of one subject — or raw GRE echoes where a run has no local field —
    with matching masks and labels.

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
    # a Chimap, mask or raw echo must never be taken for a field, whatever the filters say
    fields = [f for f in fields
              if _ents(layout, f).get("suffix") not in ("Chimap", "mask") + RAW_SUFFIXES]
    candidates = []
    for f in fields:
        ents = {k: v for k, v in _ents(layout, f).items() if k != "extension"}
        meta = layout.get_metadata(f.path)
        candidates.append(FieldRun(field=f.path, entities=ents, metadata=meta,
                                   units=meta.get("Units")))
    candidates += _collect_raw(layout, flt, query, {r.key for r in candidates})
    if not candidates:
        raise DiscoveryError(
            f"no local field found for sub-{subject}"
            + (f" (sessions {', '.join(sessions)})" if sessions else "")
            + f": looked for {_describe(flt['localfield'])}, and for raw GRE phase "
            f"{_describe(flt['phase'])}, with extension .nii/.nii.gz in {layout.root}")
    runs = []
    for run in candidates:
        mask = _match(layout, flt["mask"], run.entities, "mask", run.field)
        label = _match(layout, flt["chimap"], run.entities, "Chimap", run.field)
        run.mask = mask.path if mask else None
        run.label = label.path if label else None
        run.label_metadata = layout.get_metadata(label.path) if label else {}
        if require_label and run.label is None:
            LOGGER.info("%s: no Chimap label, not used for training", run.key)
            continue
        if run.is_raw:
            what = (f"raw GRE, {len(run.echoes)} echo(es) from "
                    f"{os.path.relpath(run.field, layout.root)}"
                    + ("" if all(e.magnitude for e in run.echoes) else ", magnitude missing"))
        else:
            what = (f"field {os.path.relpath(run.field, layout.root)} "
                    f"({run.units or 'units missing'})")
        LOGGER.info("%s: %s%s%s", run.key, what,
                    f", mask {os.path.basename(run.mask)}" if run.mask else ", no mask",
                    f", label {os.path.basename(run.label)}" if run.label else "")
        runs.append(run)
    return runs
