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

from ..__about__ import __version__
from ..io.atomic import write_text_atomic

__all__ = ["CITATIONS", "citation_text", "write_citations", "write_subject_report"]

CITATIONS = {
    "qsmnet": "Yoon J, Gong E, Chatnuntawech I, et al. Quantitative susceptibility mapping using "
              "deep neural network: QSMnet. NeuroImage 2018;179:199-206. "
              "doi:10.1016/j.neuroimage.2018.06.030",
    "qsmnet+": "Jung W, Yoon J, Ji S, et al. Exploring linearity of deep neural network trained "
               "QSM: QSMnet+. NeuroImage 2020;211:116619. doi:10.1016/j.neuroimage.2020.116619",
    "unet": "Ronneberger O, Fischer P, Brox T. U-Net: convolutional networks for biomedical "
            "image segmentation. MICCAI 2015. doi:10.1007/978-3-319-24574-4_28",
    "tkd": "Shmueli K, de Zwart JA, van Gelderen P, et al. Magnetic susceptibility mapping of "
           "brain tissue in vivo using MRI phase data. Magn Reson Med 2009;62:1510-1522. "
           "doi:10.1002/mrm.22135",
    "consensus": "QSM Consensus Organization Committee. Recommended implementation of "
                 "quantitative susceptibility mapping for clinical research in the brain: a "
                 "consensus of the ISMRM electro-magnetic tissue properties study group. "
                 "Magn Reson Med 2024;91:1834-1862. doi:10.1002/mrm.30006",
    "nipype": "Gorgolewski K, Burns CD, Madison C, et al. Nipype: a flexible, lightweight and "
              "extensible neuroimaging data processing framework in Python. Front Neuroinform "
              "2011;5:13. doi:10.3389/fninf.2011.00013",
    "pybids": "Yarkoni T, Markiewicz CJ, de la Vega A, et al. PyBIDS: Python tools for BIDS "
              "datasets. J Open Source Softw 2019;4:1294. doi:10.21105/joss.01294",
}

DISCLAIMER = (
    "Deep-learning dipole inversion is not yet recommended by the QSM consensus paper "
    "(doi:10.1002/mrm.30006) for clinical quantification: treat these maps as research "
    "results and check them against a classical inversion (TKD or an iterative method).")


def citation_text(methods: Sequence[str] = ("qsmnet",)) -> str:
    """A methods paragraph and references for the methods that were run."""
    refs = ["qsmnet"] + [m for m in methods if m in CITATIONS and m != "qsmnet"]
    refs += ["unet", "nipype", "pybids", "consensus"]
    lines = [
        f"Susceptibility maps were computed with bids_qsmnet {__version__}, which applies a "
        "3-D U-Net of the QSMnet family [1] to local field maps (ppm) resampled so that B0 lies "
        "along the third axis at the model's voxel size, and resamples the χ map (ppm) back "
        "onto the input grid. The workflow ran in Nipype and inputs were found with PyBIDS.",
        "", DISCLAIMER, "", "References"]
    seen = []
    for r in refs:
        if r not in seen:
            seen.append(r)
    lines += [f"[{i}] {CITATIONS[r]}" for i, r in enumerate(seen, 1)]
    return "\n".join(lines) + "\n"


def write_citations(out_dir: str, methods: Sequence[str] = ("qsmnet",)) -> str:
    os.makedirs(os.path.join(out_dir, "logs"), exist_ok=True)
    path = os.path.join(out_dir, "logs", "CITATION.md")
    return write_text_atomic(path, "# How to cite these results\n\n" + citation_text(methods))


def _row(k, v):
    return f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"


def write_subject_report(out_dir: str, subject: str, *, errors: Sequence[str] = (),
                         warnings: Sequence[str] = (), provenance: dict | None = None) -> str:
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
                 + html.escape(citation_text()) + "</pre></body></html>")
    return write_text_atomic(os.path.join(out_dir, f"sub-{subject}.html"), "\n".join(parts))
