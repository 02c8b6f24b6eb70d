"""Per-subject HTML reports and the citation boilerplate, built from the written derivatives.

The report is assembled after the workflow has run (as fMRIPrep does), from the χ sidecars and
the figures under ``sub-<label>/figures/``, so it shows exactly what was written, plus the runs
that failed.
"""

from __future__ import annotations

import glob
import html
import json
import os
import re
from collections.abc import Sequence

from ..io.atomic import write_text_atomic
from .boilerplate import REFERENCES, methods_markdown, methods_steps, write_boilerplate

__all__ = ["CITATIONS", "MOSAIC_CAPTIONS", "citation_text", "dc_summary", "run_mosaics",
           "write_citations", "write_subject_report"]

#: reference lines by key (:data:`bids_qsmnet.reports.boilerplate.REFERENCES`)
CITATIONS = {key: ref.text() for key, ref in REFERENCES.items()}

DISCLAIMER = (
    "Deep-learning dipole inversion is not yet recommended by the QSM consensus paper "
    "(doi:10.1002/mrm.30006) for clinical quantification: treat these maps as research "
    "results and check them against a classical inversion (TKD or an iterative method).")


def citation_text(steps=None) -> str:
    """The methods paragraph and references of ``steps``
    (:func:`~bids_qsmnet.reports.boilerplate.methods_steps`; default: local-field inference
    with the refinement)."""
    if steps is None:
        steps = methods_steps(raw=False, local=True)
    return methods_markdown(steps, DISCLAIMER)


def write_citations(out_dir: str, steps=None) -> tuple[str, str]:
    """``logs/CITATION.md`` and ``logs/CITATION.bib`` for ``steps`` (default as
    :func:`citation_text`)."""
    if steps is None:
        steps = methods_steps(raw=False, local=True)
    return write_boilerplate(out_dir, steps, disclaimer=DISCLAIMER)


#: the mosaics the report knows, in page order, with their captions; any other kind found under
#: ``figures/`` (``<run>_desc-<kind>_mosaic.png``) follows them with :data:`DEFAULT_CAPTION`
MOSAIC_CAPTIONS = {
    "field": "Input local field (ppm) on axial, coronal and sagittal slices, with the brain "
             "mask's outline (black); a diverging map symmetric about 0.",
    "chimap": "Susceptibility χ (ppm) inside the brain mask, grey scale symmetric about 0 "
              "(paramagnetic bright, diamagnetic dark).",
    "r2star": "R2* (1/s) on axial, coronal and sagittal slices.",
}
DEFAULT_CAPTION = "{kind} on axial, coronal and sagittal slices."

_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1500px;margin:auto;padding:0 12px;"
    "color:#222}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:2em}"
    "table{border-collapse:collapse;margin:6px 0 14px}th,td{border:1px solid #ccc;"
    "padding:4px 10px;text-align:left;font-size:14px;vertical-align:top}th{background:#f4f4f4}"
    "figure{margin:14px 0}figure img{display:block;width:100%;height:auto;background:#000}"
    "figcaption{font-size:14px;color:#444;margin-top:4px}"
    ".warn{background:#fff3cd;padding:8px;border:1px solid #e0c060}"
    "table.warnings td{background:#fff8e1}table.errors td{background:#f8d7da}")


def _row(k, v):
    return f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"


def _table(rows, cls: str = "", head: Sequence[str] = ()) -> str:
    """An HTML table of ``(key, value)`` rows (a ``th`` and a ``td`` each) under ``head``."""
    top = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(_row(k, v) for k, v in rows)
    return (f"<table class='{cls}'>" + (f"<tr>{top}</tr>" if top else "") + body + "</table>")


def _penalty(dc: dict) -> str:
    scale = dc.get("penalty_scale", 1.0)
    return "" if scale in (None, 1, 1.0) else f" (penalty scale {float(scale):g})"


def dc_summary(dc) -> str:
    """One line for the ``DataConsistency`` entry of a χ sidecar: the λ used and how it was
    chosen.

    >>> dc_summary({"lambda": 0.05, "iterations": 30})
    'λ = 0.05 (fixed); 30 CG iterations'
    >>> dc_summary({"lambda": 0.01, "iterations": 30, "solver": "pcg", "iterations_run": 12})
    'λ = 0.01 (fixed); solved by 12 preconditioned CG iterations'
    >>> dc_summary({"lambda": 0.02, "iterations": 60, "solver": "tv-admm", "tv": 1e-4})
    'λ = 0.02 (fixed); TV weight 0.0001 ppm·mm, 60 ADMM iterations from the network’s map'
    >>> dc_summary({"lambda": 0.02, "iterations": 20, "solver": "tv-admm", "tv": 1e-4,
    ...             "penalty_scale": 3.0})  # doctest: +NORMALIZE_WHITESPACE
    'λ = 0.02 (fixed); TV weight 0.0001 ppm·mm, 20 ADMM iterations (penalty scale 3) from the
     network’s map'
    >>> dc_summary({"lambda": 0.0, "iterations": 0})
    'off (the network’s χ)'
    """
    if not isinstance(dc, dict):
        return str(dc)
    lam, its = dc.get("lambda"), dc.get("iterations", 0)
    how = {"pcg": f"solved by {dc.get('iterations_run')} preconditioned CG iterations",
           "tv-admm": f"TV weight {dc.get('tv', 0):g} ppm·mm, {its} ADMM iterations"
                      + _penalty(dc) + " from the network’s map"}.get(dc.get("solver"),
                                                                      f"{its} CG iterations")
    if dc.get("lambda_rule") == "auto":
        noise = (f"; field noise {float(dc['noise_ppb']):.2f} ppb"
                 if dc.get("noise_ppb") is not None else "")
        why = (f" (the network left {100 * float(dc['rho0']):.1f} % of the field "
               f"unexplained{noise})" if dc.get("rho0") is not None else "")
        if not lam:
            return f"none, chosen per input{why}: the network’s χ kept"
        return f"λ = {float(lam):.4g}, chosen per input{why}; {how}"
    if not lam or not its:
        return "off (the network’s χ)"
    return f"λ = {float(lam):.4g} (fixed); {how}"


def _settings(meta: dict, chi_rel: str) -> list[tuple[str, object]]:
    """The settings table of a run, from its χ sidecar."""
    model = meta.get("Model", {})
    dc = meta.get("DataConsistency")
    shown = ("lambda", "lambda_rule", "rho0", "noise_ppb", "solver", "iterations_run", "tv",
             "penalty_scale")
    extra = ({k: v for k, v in dc.items() if k not in shown} if isinstance(dc, dict) else {})
    rows = (("χ map", chi_rel),
            ("Sources", ", ".join(meta.get("Sources", [])) or None),
            ("Input units", meta.get("InputUnits")),
            ("Model", f"{model.get('Name')} (sha256 {model.get('SHA256', '')[:16]}…)"
             if model else None),
            ("Data consistency λ", dc_summary(dc) if dc is not None else None),
            ("Data consistency settings",
             ", ".join(f"{k} {v}" for k, v in extra.items()) or None),
            ("B0 direction (voxel space)", meta.get("B0Direction")),
            ("B0 direction from", meta.get("B0DirectionSource")),
            ("Obliquity (deg)", meta.get("ObliquityDeg")),
            ("Resampled to network frame", meta.get("ResampledToNetworkFrame")),
            ("Residual passes", meta.get("ResidualPasses")),
            ("Device", meta.get("Device")),
            ("Software", f"{meta['SoftwareName']} {meta.get('SoftwareVersion', '')}"
             if meta.get("SoftwareName") else None))
    return [(k, v) for k, v in rows if v is not None]


def run_mosaics(figures_dir: str, base: str) -> list[tuple[str, str]]:
    """``(kind, path)`` of every ``<base>_desc-<kind>_mosaic.png`` in ``figures_dir``: the
    kinds of :data:`MOSAIC_CAPTIONS` in its order, then any others by name."""
    pattern = re.compile(re.escape(base) + r"_desc-([A-Za-z0-9]+)_mosaic\.png")
    found = {}
    for name in sorted(os.listdir(figures_dir)) if os.path.isdir(figures_dir) else ():
        m = pattern.fullmatch(name)
        if m:
            found[m.group(1)] = os.path.join(figures_dir, name)
    order = [k for k in MOSAIC_CAPTIONS if k in found] + sorted(set(found) - set(MOSAIC_CAPTIONS))
    return [(k, found[k]) for k in order]


def _png_description(path: str) -> str:
    """The ``Description`` text chunk of a PNG (the display window of a mosaic), or ''."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            return str(getattr(im, "text", {}).get("Description", ""))
    except Exception:  # an unreadable figure still gets its <img> and caption
        return ""


def _figure(kind: str, path: str, out_dir: str) -> str:
    caption = MOSAIC_CAPTIONS.get(kind, DEFAULT_CAPTION.format(kind=kind))
    window = _png_description(path)
    text = caption + (f" Display window: {window}." if window else "")
    rel = html.escape(os.path.relpath(path, out_dir))
    return (f"<figure id='{html.escape(kind)}'><img src='{rel}' alt='{html.escape(kind)} "
            f"mosaic'><figcaption><b>{html.escape(kind)}</b>: {html.escape(text)}"
            "</figcaption></figure>")


def _numbered_table(messages: Sequence[str], cls: str) -> str:
    return _table([(i, m) for i, m in enumerate(messages, 1)], cls, ("#", cls[:-1]))


def write_subject_report(out_dir: str, subject: str, *, errors: Sequence[str] = (),
                         warnings: Sequence[str] = (), provenance: dict | None = None,
                         steps=None) -> str:
    """Write ``out_dir/sub-<subject>.html`` from the derivatives of that subject.

    Each run (χ sidecar) gets its settings table, the warnings that name it, and every mosaic
    found for it under ``figures/`` (any kind, :func:`run_mosaics`); then the ``errors`` (runs
    not processed), the remaining ``warnings`` of the run that wrote it, the ``provenance``
    and the methods text of ``steps``.
    """
    sub_dir = os.path.join(out_dir, f"sub-{subject}")
    sidecars = sorted(glob.glob(os.path.join(sub_dir, "**", "*_Chimap.json"), recursive=True))
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>bids_qsmnet: sub-{html.escape(subject)}</title>",
        f"<style>{_STYLE}</style>",
        "</head><body>",
        f"<h1>Susceptibility mapping report: sub-{html.escape(subject)}</h1>",
        f"<p class='warn'>{html.escape(DISCLAIMER)}</p>",
    ]
    if not sidecars and not errors:
        parts.append("<p>No susceptibility map was written for this subject.</p>")
    left = list(warnings)
    for sc in sidecars:
        with open(sc) as fh:
            meta = json.load(fh)
        base = os.path.basename(sc)[: -len("_Chimap.json")]
        parts.append(f"<h2>{html.escape(base)}</h2><h3>Settings</h3>")
        parts.append(_table(_settings(meta, os.path.relpath(sc[:-5] + ".nii.gz", out_dir)),
                            "settings"))
        mine = [w for w in left if base in w]
        left = [w for w in left if w not in mine]
        if mine:
            parts += ["<h3>Warnings</h3>", _numbered_table(mine, "warnings")]
        figures_dir = os.path.join(os.path.dirname(os.path.dirname(sc)), "figures")
        parts += [_figure(kind, f, out_dir) for kind, f in run_mosaics(figures_dir, base)]
    if errors:
        parts += ["<h2>Errors</h2>", _numbered_table(errors, "errors")]
    if left:
        parts += ["<h2>Warnings</h2>", _numbered_table(left, "warnings")]
    if provenance:
        parts += ["<h2>Provenance</h2>", _table(provenance.items(), "provenance")]
    parts.append("<h2>Methods and references</h2><pre style='white-space:pre-wrap'>"
                 + html.escape(citation_text(steps)) + "</pre></body></html>")
    return write_text_atomic(os.path.join(out_dir, f"sub-{subject}.html"), "\n".join(parts))
