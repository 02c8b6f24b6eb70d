"""The methods text of a run, with its references as Markdown and BibTeX.

:func:`methods_steps` describes exactly the steps a participant run performs for the runs it
found (raw GRE chain with the chosen unwrapping and background removal, unit conversion,
resampling into the network frame, the network, the data-consistency refinement);
:func:`write_boilerplate` writes ``logs/CITATION.md`` and ``logs/CITATION.bib`` from them, as
fMRIPrep's ``--boilerplate-only`` does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..__about__ import __version__
from ..io.atomic import write_text_atomic

__all__ = ["REFERENCES", "Reference", "methods_steps", "steps_for_run", "methods_markdown",
           "bibtex", "write_boilerplate"]


@dataclass(frozen=True)
class Reference:
    """One journal article (or proceedings paper): enough for a reference line and BibTeX."""

    #: "Surname Initials" each; a last ``"others"`` stands for authors not listed
    authors: tuple[str, ...]
    title: str
    journal: str
    year: int
    volume: str
    pages: str
    doi: str

    def text(self) -> str:
        named = [a for a in self.authors if a != "others"]
        more = len(named) > 3 or "others" in self.authors
        names = ", ".join(named[:3]) + (", et al" if more else "")
        where = f"{self.journal} {self.year}" + (f";{self.volume}:{self.pages}"
                                                  if self.volume else "")
        return f"{names}. {self.title}. {where}. doi:{self.doi}"

    def bibtex(self, key: str) -> str:
        fields = {"author": " and ".join(self.authors), "title": f"{{{self.title}}}",
                  "journal": self.journal, "year": str(self.year), "volume": self.volume,
                  "pages": self.pages.replace("-", "--"), "doi": self.doi}
        body = ",\n".join(f"  {k} = {{{v}}}" for k, v in fields.items() if v)
        return f"@article{{{key},\n{body}\n}}\n"


def _ref(authors: str, title: str, journal: str, year: int, volume: str, pages: str,
         doi: str) -> Reference:
    return Reference(tuple(a.strip() for a in authors.split(";")), title, journal, year,
                     volume, pages, doi)


REFERENCES: dict[str, Reference] = {
    "qsmnet": _ref("Yoon J; Gong E; Chatnuntawech I; Bilgic B; Lee J; Jung W; Ko J; Jung H; "
                   "Setsompop K; Zaharchuk G; Kim EY; Pauly J; Lee J",
                   "Quantitative susceptibility mapping using deep neural network: QSMnet",
                   "NeuroImage", 2018, "179", "199-206", "10.1016/j.neuroimage.2018.06.030"),
    "qsmnet+": _ref("Jung W; Yoon J; Ji S; Choi JY; Kim JM; Nam Y; Kim EY; Lee J",
                    "Exploring linearity of deep neural network trained QSM: QSMnet+",
                    "NeuroImage", 2020, "211", "116619", "10.1016/j.neuroimage.2020.116619"),
    "unet": _ref("Ronneberger O; Fischer P; Brox T",
                 "U-Net: convolutional networks for biomedical image segmentation",
                 "MICCAI, Lecture Notes in Computer Science", 2015, "9351", "234-241",
                 "10.1007/978-3-319-24574-4_28"),
    "laplacian": _ref("Schofield MA; Zhu Y",
                      "Fast phase unwrapping algorithm for interferometric applications",
                      "Opt Lett", 2003, "28", "1194-1196", "10.1364/OL.28.001194"),
    "path": _ref("Abdul-Rahman H; Gdeisat M; Burton D; Lalor M",
                 "Fast three-dimensional phase-unwrapping algorithm based on sorting by "
                 "reliability following a non-continuous path", "Proc SPIE", 2005, "5856",
                 "32-40", "10.1117/12.611415"),
    "vsharp": _ref("Li W; Wu B; Liu C",
                   "Quantitative susceptibility mapping of human brain reflects spatial "
                   "variation in tissue composition", "NeuroImage", 2011, "55", "1645-1656",
                   "10.1016/j.neuroimage.2010.11.088"),
    "sharp": _ref("Schweser F; Deistung A; Lehr BW; Reichenbach JR",
                  "Quantitative imaging of intrinsic magnetic tissue properties using MRI "
                  "signal phase: an approach to in vivo brain iron metabolism?", "NeuroImage",
                  2011, "54", "2789-2807", "10.1016/j.neuroimage.2010.10.070"),
    "pdf": _ref("Liu T; Khalidov I; de Rochefort L; Spincemaille P; Liu J; Tsiouris AJ; Wang Y",
                "A novel background field removal method for MRI using projection onto dipole "
                "fields (PDF)", "NMR Biomed", 2011, "24", "1129-1136", "10.1002/nbm.1670"),
    "fansi": _ref("Milovic C; Bilgic B; Zhao B; Acosta-Cabronero J; Tejos C",
                  "Fast nonlinear susceptibility inversion with variational regularization",
                  "Magn Reson Med", 2018, "80", "814-821", "10.1002/mrm.27073"),
    "cg": _ref("Hestenes MR; Stiefel E", "Methods of conjugate gradients for solving linear "
               "systems", "J Res Natl Bur Stand", 1952, "49", "409-436", "10.6028/jres.049.044"),
    "nipype": _ref("Gorgolewski K; Burns CD; Madison C; Clark D; Halchenko YO; Waskom ML; "
                   "Ghosh SS", "Nipype: a flexible, lightweight and extensible neuroimaging "
                   "data processing framework in Python", "Front Neuroinform", 2011, "5", "13",
                   "10.3389/fninf.2011.00013"),
    "pybids": _ref("Yarkoni T; Markiewicz CJ; de la Vega A; others",
                   "PyBIDS: Python tools for BIDS datasets",
                   "J Open Source Softw", 2019, "4", "1294", "10.21105/joss.01294"),
    "consensus": _ref("QSM Consensus Organization Committee; Bilgic B; Costagli M; others",
                      "Recommended implementation of quantitative susceptibility "
                      "mapping for clinical research in the brain: a consensus of the ISMRM "
                      "electro-magnetic tissue properties study group", "Magn Reson Med", 2024,
                      "91", "1834-1862", "10.1002/mrm.30006"),
}


def methods_steps(*, raw: bool, local: bool, unwrapping: str = "laplacian",
                  bgremoval: str = "vsharp", network: str = "qsmnet", model_name: str = "",
                  refinement: str = "auto", tv: float = 0.0, tv_iterations: int = 60,
                  tv_penalty_scale: float = 1.0,
                  relaxometry: bool = False) -> list[tuple[str, tuple[str, ...]]]:
    """The steps of a participant run, each ``(sentence, reference keys)``.

    Parameters
    ----------
    raw, local : whether raw multi-echo GRE runs / local-field runs are among the inputs
    relaxometry : whether R2*/T2* maps are fitted (raw runs with two or more magnitude echoes)
    unwrapping : ``laplacian`` or ``path``; bgremoval : ``vsharp`` or ``pdf`` (raw runs)
    network : the model's family (``qsmnet`` or ``qsmnet+``); model_name : its name
    refinement : ``auto`` (λ chosen per input), ``off``, or a fixed λ as text
    tv, tv_iterations : weight (ppm·mm) and ADMM iterations of the refinement's
        total-variation term (0: the plain conjugate-gradient refinement)
    tv_penalty_scale : scale c of the ADMM penalties (ρ = 100 c α, ρ_d = 1/c)
    """
    steps: list[tuple[str, tuple[str, ...]]] = []
    if raw:
        unwrap = {"laplacian": ("Laplacian-based phase unwrapping", ("laplacian",)),
                  "path": ("reliability-sorted path-following phase unwrapping", ("path",))}
        bg = {"vsharp": ("variable-radius SHARP (V-SHARP)", ("sharp", "vsharp")),
              "pdf": ("projection onto dipole fields (PDF)", ("pdf",))}
        u, b = unwrap[unwrapping], bg[bgremoval]
        steps.append((
            "Raw multi-echo gradient-echo phase was converted to radians; a brain mask was "
            f"found in the first echo's magnitude; each echo was unwrapped by {u[0]}; the "
            "total field was fitted across echoes (magnitude-weighted linear fit of phase "
            f"against echo time) and the background field was removed by {b[0]}, giving the "
            "local field in ppm inside an eroded brain mask.", u[1] + b[1]))
    if raw and relaxometry:
        steps.append((
            "R2* (1/s) was fitted to the magnitude echoes inside the brain mask by a "
            "log-linear least-squares fit of ln|S| against echo time weighted by |S|², clipped "
            "to 0–500 1/s, and T2* (s) taken as 1/R2*.", ()))
    if local:
        steps.append(("Local field maps were converted to ppm of B0 from the units of their "
                      "sidecars (ppm, Hz or rad) and masked with their brain masks.", ()))
    label = "QSMnet+" if network == "qsmnet+" else "QSMnet"
    refs = ("qsmnet", "qsmnet+", "unet") if network == "qsmnet+" else ("qsmnet", "unet")
    name = f" (model {model_name})" if model_name else ""
    steps.append((
        "Each local field was resampled so that B0 lies along the third axis at the model's "
        f"voxel size, and χ was estimated by a 3-D U-Net of the {label} family{name}.", refs))
    if refinement != "off":
        how = ("with a weight chosen per input from the part of the field the network leaves "
               "unexplained beyond the field's white noise (estimated from its finest wavelet "
               "detail)" if refinement == "auto" else f"with weight λ = {refinement}")
        if tv:
            from ..inference.refine import tv_penalties

            pen = tv_penalties(tv, tv_penalty_scale)
            steps.append((
                f"The network's χ was refined towards the measured field by {tv_iterations} "
                "iterations of the alternating direction method of multipliers (penalties "
                f"ρ = {pen['rho']:g} mm² and ρ_d = {pen['rho_data']:.3g}), started from the "
                "network's map, on "
                "½‖M(D∗χ − f)‖² + α‖∇χ‖₁ + (λ/2)‖χ − χ_net‖² with "
                f"α = {tv:g} ppm·mm " + how + ", and resampled back onto the input grid "
                "(χ in ppm).", ("fansi",)))
        else:
            steps.append((
                "The network's χ was refined towards the measured field by conjugate-gradient "
                "minimisation of ‖M(D∗χ − f)‖² + λ‖χ − χ_net‖² " + how + ", and resampled "
                "back onto the input grid (χ in ppm).", ("cg",)))
    else:
        steps.append(("χ was resampled back onto the input grid (ppm).", ()))
    steps.append(("The workflow ran in Nipype, and inputs were found with PyBIDS.",
                  ("nipype", "pybids")))
    return steps


def _numbered(steps) -> tuple[list[str], list[str]]:
    keys: list[str] = []
    for _, refs in steps:
        keys += [k for k in refs if k not in keys]
    keys += [k for k in ("consensus",) if k not in keys]
    sentences = []
    for text, refs in steps:
        marks = "".join(f"[{keys.index(k) + 1}]" for k in refs)
        sentences.append(text[:-1] + (f" {marks}." if marks else "."))
    return sentences, keys


def methods_markdown(steps, disclaimer: str = "") -> str:
    """The methods paragraph and its numbered references (Markdown)."""
    sentences, keys = _numbered(steps)
    lines = [f"Susceptibility maps were computed with bids_qsmnet {__version__}. "
             + " ".join(sentences), ""]
    if disclaimer:
        lines += [disclaimer, ""]
    lines.append("References")
    lines += [f"[{i}] {REFERENCES[k].text()}" for i, k in enumerate(keys, 1)]
    return "\n".join(lines) + "\n"


def bibtex(steps) -> str:
    """The BibTeX entries of the references of ``steps`` (keys as in :data:`REFERENCES`)."""
    _, keys = _numbered(steps)
    return "\n".join(REFERENCES[k].bibtex(k.replace("+", "plus")) for k in keys)


def write_boilerplate(out_dir: str, steps, *, disclaimer: str = "") -> tuple[str, str]:
    """``out_dir/logs/CITATION.md`` and ``CITATION.bib`` for ``steps``; returns both paths."""
    logs = os.path.join(out_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    md = write_text_atomic(os.path.join(logs, "CITATION.md"),
                           "# How to cite these results\n\n"
                           + methods_markdown(steps, disclaimer))
    bib = write_text_atomic(os.path.join(logs, "CITATION.bib"), bibtex(steps))
    return md, bib


def _family(spec) -> str:
    """``qsmnet+`` for a model of that architecture or trained with linearity augmentation
    (QSMnet+'s scaled sources), else ``qsmnet``."""
    train = dict(spec.training or {})
    recipe = train.get("recipe") if isinstance(train.get("recipe"), Mapping) else {}
    plus = (train.get("architecture_name") == "qsmnet+" or train.get("linearity_factor")
            or recipe.get("p_linearity"))
    return "qsmnet+" if plus else "qsmnet"


def _refinement(defaults: Mapping, dc_lambda) -> str:
    if dc_lambda is None:
        if defaults.get("dc_auto"):
            return "auto"
        lam = float(defaults.get("dc_lambda", 0.0))
        return f"{lam:g}" if lam else "off"
    if dc_lambda == "auto":
        return "auto"
    return f"{float(dc_lambda):g}" if float(dc_lambda) else "off"


def steps_for_run(runs: Sequence, spec, *, unwrapping: str = "laplacian",
                  bgremoval: str = "vsharp", dc_lambda=None) -> list[tuple[str, tuple[str, ...]]]:
    """:func:`methods_steps` for the runs a participant run found, its model's
    :class:`~bids_qsmnet.models.modelfile.ModelSpec` and ``--dc-lambda``."""
    return methods_steps(raw=any(r.is_raw for r in runs),
                         local=any(not r.is_raw for r in runs) or not runs,
                         unwrapping=unwrapping, bgremoval=bgremoval, network=_family(spec),
                         model_name=spec.name,
                         refinement=_refinement(dict(spec.inference or {}), dc_lambda),
                         tv=float((spec.inference or {}).get("dc_tv", 0.0)),
                         tv_iterations=int((spec.inference or {}).get("dc_tv_iterations", 60)),
                         tv_penalty_scale=float((spec.inference or {}).get(
                             "dc_tv_penalty_scale", 1.0)),
                         relaxometry=any(r.fits_r2star for r in runs))
