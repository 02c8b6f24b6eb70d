"""Write the accuracy figures of ``docs/accuracy.json`` into the model card and the README.

Usage::

    python benchmarks/card.py [--accuracy docs/accuracy.json] [--card MODEL_CARD.md] \\
        [--readme README.md]

Every figure the two files quote about accuracy sits between ``<!-- accuracy:NAME -->`` and
``<!-- /accuracy:NAME -->`` markers and is rewritten from the JSON that
``benchmarks/accuracy.py`` wrote: the per-case table of the out-of-generator anatomy (the
test anatomy first), what it says case by case (comparisons worded by the figures), the
generator-phantom paragraph and the README's summary.  Text outside the markers is kept.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

METHODS = ("default", "network only", "best fixed λ*", "TKD*", "L2*", "TV-ADMM")
TEST = "colin27"
TUNING = "mni152"
STRONG = "colin27 + strong sources exact field"


class Figures:
    """The JSON's rows by case and method."""

    def __init__(self, result: dict):
        self.result = result
        rows = result["tables"]["out_of_generator"]
        self.cases = list(dict.fromkeys(r["case"] for r in rows))
        self.by = {c: {r["method"]: r for r in rows if r["case"] == c} for c in self.cases}
        self.gen = {(r["case"], r["method"]): r for r in result["tables"].get("generator", [])}

    def n(self, case: str, method: str, key: str = "nrmse") -> float:
        return float(self.by[case][method][key])

    def settings(self, case: str) -> dict:
        return self.by[case]["default"].get("settings", {})

    def gap(self, case: str) -> float:
        """The default's NRMSE above the best fixed λ's (points; negative: better)."""
        return self.n(case, "default") - self.n(case, "best fixed λ*")


def _label(case: str, tuned: bool) -> str:
    out = case.replace(TUNING, "MNI152").replace(TEST, "Colin27")
    out = out.replace(" + strong sources exact field", " + 25 mm haemorrhage, calcification")
    return out + (" (tuning)" if tuned else "")


def _span(values, fmt: str = ".1f") -> str:
    lo, hi = format(min(values), fmt), format(max(values), fmt)
    return lo if lo == hi else f"{lo}–{hi}"


def _rel_span(ours, theirs) -> str:
    """How much lower ``ours`` is than ``theirs``, relative, over the cases, in words."""
    rel = [100 * (1 - a / b) for a, b in zip(ours, theirs)]
    word = lambda r: f"{abs(r):.0f} % {'lower' if r >= 0 else 'higher'}"  # noqa: E731
    lo, hi = min(rel), max(rel)
    return word(lo) if round(lo) == round(hi) else f"from {word(lo)} to {word(hi)}"


def table(fig: Figures) -> str:
    """NRMSE / HFEN of every method per case; the test anatomy's best NRMSE (oracle λ*
    aside) in bold."""
    order = ([c for c in fig.cases if c.startswith(TEST)]
             + [c for c in fig.cases if not c.startswith(TEST)])
    lines = ["| case | " + " | ".join(METHODS) + " |", "| --- |" + " ---: |" * len(METHODS)]
    for c in order:
        b = fig.by[c]
        best = min(b[m]["nrmse"] for m in METHODS if m in b and m != "best fixed λ*")
        cells = []
        for m in METHODS:
            r = b.get(m)
            if r is None:
                cells.append("–")
                continue
            n = f"{r['nrmse']:.1f}"
            if r["nrmse"] == best and c.startswith(TEST):
                n = f"**{n}**"
            cells.append(f"{n} / {r['hfen']:.1f}")
        lines.append(f"| {_label(c, b['default']['anatomy_in_tuning'])} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def findings(fig: Figures) -> str:
    col = lambda k: f"{TEST} {k}"  # noqa: E731
    exact = [c for c in (col("exact field"), col("B0 20°"), col("0.75×0.75×2 mm"))
             if c in fig.by]
    nd, raw = col("non-dipolar 40 %"), col("raw GRE → V-SHARP")
    out = [f"Where the model stands on anatomy it never saw ({TEST.capitalize()}):"]
    if exact:
        d = [fig.n(c, "default") for c in exact]
        dh = [fig.n(c, "default", "hfen") for c in exact]
        tv = [fig.n(c, "TV-ADMM") for c in exact]
        tvh = [fig.n(c, "TV-ADMM", "hfen") for c in exact]
        tkd = [fig.n(c, "TKD*") for c in exact]
        net = [fig.n(c, "network only") for c in exact]
        out.append(
            f"- **Exact fields** (B0 along the axis, tilted 20°, 0.75×0.75×2 mm): the default "
            f"scores NRMSE {_span(d)} % / HFEN {_span(dh)} %, against TV-ADMM's {_span(tv)} % / "
            f"{_span(tvh)} % (NRMSE {_rel_span(d, tv)}, HFEN {_rel_span(dh, tvh)}, relative) "
            f"and oracle TKD's {_span(tkd)} %. The network alone scores {_span(net)} % with "
            f"slope {_span([fig.n(c, 'network only', 'slope') for c in exact], '.2f')}: it "
            "shrinks real-anatomy contrast, and the refinement restores it (slope "
            f"{_span([fig.n(c, 'default', 'slope') for c in exact], '.2f')}).")
    for case in (nd, f"{TUNING} non-dipolar 40 %"):
        if case not in fig.by:
            continue
        s = fig.settings(case)
        why = f"ρ₀ {s['rho0']:.2f}" if "rho0" in s else "the rule"
        if "noise_share" in s:
            why += f" and noise share ν {s['noise_share']:.3f}"
        d, tv = fig.n(case, "default"), fig.n(case, "TV-ADMM")
        out.append(
            f"- **{_label(case, False)}**: default {d:.1f} % (λ {s.get('lambda', 0):.3g} from "
            f"{why}), the best fixed λ {fig.n(case, 'best fixed λ*'):.1f} % (λ "
            f"{fig.by[case]['best fixed λ*']['settings']['lambda']:g}), TV-ADMM {tv:.1f} % "
            f"(the default's NRMSE is {_rel_span([d], [tv])}; HFEN "
            f"{fig.n(case, 'default', 'hfen'):.1f} against {fig.n(case, 'TV-ADMM', 'hfen'):.1f} "
            "%).")
    if raw in fig.by:
        classical = [fig.n(raw, m) for m in ("TKD*", "L2*", "TV-ADMM")]
        out.append(
            f"- **Through the raw-GRE chain** the classical inversions score "
            f"{min(classical):.0f}–{max(classical):.0f} %; the default {fig.n(raw, 'default'):.1f} "
            f"% (λ {fig.settings(raw).get('lambda', 0):.3g}; the network alone "
            f"{fig.n(raw, 'network only'):.1f} %).")
    gaps = [(c, fig.gap(c)) for c in [*exact, nd, raw] if c in fig.by]
    out.append("- The per-input λ against the best fixed λ of the grid (NRMSE points, negative: "
               "better than all of them): "
               + ", ".join(f"{_label(c, False).replace('Colin27 ', '')} {g:+.1f}"
                           for c, g in gaps) + ".")
    if STRONG in fig.by:
        st, sn = fig.by[STRONG]["default"], fig.by[STRONG]["network only"]
        out.append(
            "- Strong sources keep their value: the 25 mm haemorrhage (0.8 ppm) and the −0.3 ppm "
            f"calcification come out within {st.get('haemorrhage_error_pct', float('nan')):+.1f} "
            f"% and {st.get('calcification_error_pct', float('nan')):+.1f} % of their means "
            f"(network alone: {sn.get('haemorrhage_error_pct', float('nan')):+.0f} %, "
            f"{sn.get('calcification_error_pct', float('nan')):+.0f} %).")
    return "\n".join(_wrap(line) for line in out)


def generator(fig: Figures) -> str:
    def cell(kind, method):
        r = fig.gen.get((f"generator brain {kind}", method))
        return "–" if r is None else f"{r['nrmse']:.1f} / {r['hfen']:.1f}"

    kinds = ("exact field", "B0 20°", "0.75×0.75×2 mm", "raw GRE → V-SHARP")
    parts = [f"{k.replace('raw GRE → V-SHARP', 'raw-GRE chain')} {cell(k, 'default')} "
             f"(TV-ADMM {cell(k, 'TV-ADMM')}; network alone {cell(k, 'network only')})"
             for k in kinds if (f"generator brain {k}", "default") in fig.gen]
    return _wrap("A held-out phantom of the training generator (its own distribution, which "
                 "flatters the network), NRMSE / HFEN %: " + ", ".join(parts) + ".")


def readme_summary(fig: Figures) -> str:
    col = lambda k: f"{TEST} {k}"  # noqa: E731
    exact = [c for c in (col("exact field"), col("B0 20°"), col("0.75×0.75×2 mm"))
             if c in fig.by]
    nd, raw = col("non-dipolar 40 %"), col("raw GRE → V-SHARP")
    d = [fig.n(c, "default") for c in exact]
    text = ("- **Accuracy** ([MODEL_CARD.md](MODEL_CARD.md#evaluation), every figure in "
            "[docs/accuracy.md](docs/accuracy.md), `benchmarks/accuracy.py`). On the Colin27 "
            "anatomy, which no training or tuning step used, NRMSE of the default run: exact "
            f"fields {_span(d)} % (TV-ADMM {_span([fig.n(c, 'TV-ADMM') for c in exact])} %, "
            f"oracle TKD {_span([fig.n(c, 'TKD*') for c in exact])} %)")
    if nd in fig.by:
        text += (f"; with a 40 % non-dipolar part {fig.n(nd, 'default'):.1f} % (TV-ADMM "
                 f"{fig.n(nd, 'TV-ADMM'):.1f} %, the best fixed refinement weight "
                 f"{fig.n(nd, 'best fixed λ*'):.1f} %)")
    if raw in fig.by:
        classical = [fig.n(raw, m) for m in ("TKD*", "L2*", "TV-ADMM")]
        text += (f"; through the raw-GRE chain {fig.n(raw, 'default'):.1f} % (classical "
                 f"inversions {min(classical):.0f}–{max(classical):.0f} %)")
    net = [fig.n(c, "network only") for c in exact]
    text += (f". The network alone shrinks real-anatomy contrast ({_span(net)} % on the exact "
             "fields); the TV refinement started from its map restores it.")
    return _wrap(text, indent="  ")


def _wrap(text: str, width: int = 96, indent: str | None = None) -> str:
    """Markdown-friendly wrapping; list items continue with two spaces."""
    import textwrap

    sub = indent if indent is not None else ("  " if text.startswith("- ") else "")
    return textwrap.fill(text, width=width, subsequent_indent=sub, break_long_words=False,
                         break_on_hyphens=False)


def replace_block(text: str, name: str, body: str, path: str) -> str:
    start, end = f"<!-- accuracy:{name} -->", f"<!-- /accuracy:{name} -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path}: no {start} … {end} block")
    return pattern.sub(lambda _: f"{start}\n{body}\n{end}", text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--accuracy", default="docs/accuracy.json")
    p.add_argument("--card", default="MODEL_CARD.md")
    p.add_argument("--readme", default="README.md")
    args = p.parse_args(argv)
    with open(args.accuracy) as fh:
        fig = Figures(json.load(fh))
    with open(args.card) as fh:
        card = fh.read()
    for name, body in (("table", table(fig)), ("findings", findings(fig)),
                       ("generator", generator(fig))):
        card = replace_block(card, name, body, args.card)
    minutes = round(fig.result.get("seconds", 0) / 60)
    card = re.sub(r"\(\d+ min on a 2-core CPU\)", f"({minutes} min on a 2-core CPU)", card)
    with open(args.card, "w") as fh:
        fh.write(card)
    with open(args.readme) as fh:
        readme = fh.read()
    readme = replace_block(readme, "summary", readme_summary(fig), args.readme)
    with open(args.readme, "w") as fh:
        fh.write(readme)
    print(f"wrote the accuracy blocks of {args.card} and {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
