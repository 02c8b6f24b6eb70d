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
from collections.abc import Sequence

from ..io.atomic import write_text_atomic
from .boilerplate import REFERENCES, methods_markdown, methods_steps, write_boilerplate

__all__ = ["CITATIONS", "citation_text", "write_citations", "write_subject_report"]

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


def _row(k, v):
    return f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"


def write_subject_report(out_dir: str, subject: str, *, errors: Sequence[str] = (),
                         warnings: Sequence[str] = (), provenance: dict | None = None,
                         steps=None) -> str:
    """Write ``out_dir/sub-<subject>.html`` from the derivatives of that subject, with the
    problems (``errors``: runs not processed) and ``warnings`` of the run that wrote it."""
    sub_dir = os.path.join(out_dir, f"sub-{subject}")
    sidecars = sorted(glob.glob(os.path.join(sub_dir, "**", "*_Chimap.json"), recursive=True))
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>bids_qsmnet: sub-{html.escape(subject)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
        "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:3px 8px;"
        "text-align:left;font-size:13px}img{max-width:100%}.warn{background:#fff3cd;"
        "padding:8px;border:1px solid #e0c060}.err{background:#f8d7da;padding:8px}</style>",
        "</head><body>",
        f"<h1>Susceptibility mapping report: sub-{html.escape(subject)}</h1>",
        f"<p class='warn'>{html.escape(DISCLAIMER)}</p>",
    ]
    if not sidecars and not errors:
        parts.append("<p>No susceptibility map was written for this subject.</p>")
    for sc in sidecars:
        with open(sc) as fh:
            meta = json.load(fh)
        base = os.path.basename(sc)[: -len("_Chimap.json")]
        parts.append(f"<h2>{html.escape(base)}</h2><table>")
        model = meta.get("Model", {})
        for k, v in (("χ map", os.path.relpath(sc[:-5] + ".nii.gz", out_dir)),
                     ("Sources", ", ".join(meta.get("Sources", []))),
                     ("Input units", meta.get("InputUnits")),
                     ("Model", f"{model.get('Name')} (sha256 {model.get('SHA256', '')[:16]}…)"),
                     ("B0 direction (voxel space)", meta.get("B0Direction")),
                     ("B0 direction from", meta.get("B0DirectionSource")),
                     ("Obliquity (deg)", meta.get("ObliquityDeg")),
                     ("Resampled to network frame", meta.get("ResampledToNetworkFrame")),
                     ("Data consistency", meta.get("DataConsistency")),
                     ("Device", meta.get("Device"))):
            if v is not None:
                parts.append(_row(k, v))
        parts.append("</table>")
        for kind, caption in (("field", "Input local field (ppm)"),
                              ("chimap", "Susceptibility χ (ppm)")):
            figs = glob.glob(os.path.join(sub_dir, "figures", f"{base}_desc-{kind}_mosaic.png"))
            for f in figs:
                rel = os.path.relpath(f, out_dir)
                parts.append(f"<h3>{caption}</h3><img src='{html.escape(rel)}' alt='{caption}'>")
    if errors:
        parts.append("<h2>Errors</h2>")
        parts += [f"<p class='err'>{html.escape(e)}</p>" for e in errors]
    if warnings:
        parts.append("<h2>Warnings</h2>")
        parts += [f"<p class='warn'>{html.escape(w)}</p>" for w in warnings]
    if provenance:
        parts.append("<h2>Provenance</h2><table>")
        parts += [_row(k, v) for k, v in provenance.items()]
        parts.append("</table>")
    parts.append("<h2>Methods and references</h2><pre style='white-space:pre-wrap'>"
                 + html.escape(citation_text(steps)) + "</pre></body></html>")
    return write_text_atomic(os.path.join(out_dir, f"sub-{subject}.html"), "\n".join(parts))
