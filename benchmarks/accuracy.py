"""Accuracy of bids_qsmnet against the classical baselines, out-of-generator anatomy first.

Usage::

    python benchmarks/accuracy.py --out docs/accuracy.json --md docs/accuracy.md \\
        [--model default] [--toy-model runs/toy/model.safetensors] [--quick] [--threads 2]
    python benchmarks/accuracy.py --markdown-only     # rewrite docs/accuracy.md from the JSON

Out-of-generator anatomy (the first table)
------------------------------------------
χ maps built from real anatomical images that no training phantom came from
(:mod:`bids_qsmnet.data.anatomy`): the **MNI152** 2009a template (nilearn's wheel) and the
**Colin27** single-subject T1 (Debian's ``mricron-data``).  MNI152 is the *tuning* anatomy:
the constants of the model's per-input choice of the refinement weight
(``benchmarks/calibrate_dc.py``) and TV-ADMM's λ are chosen on it.  Colin27 is the *test*
anatomy: used for nothing else.  Each anatomy is scored on five local fields
(:mod:`bids_qsmnet.data.evaluation`): the exact dipole field + 1 ppb noise with B0 along the
third axis and tilted by 20°, on 0.75 × 0.75 × 2 mm voxels, with a non-dipolar part of 40 %
of the field's rms (background residue and a white-matter offset, as a measured field holds),
and the field the app's raw-GRE chain (simulated 4-echo 3 T acquisition → V-SHARP) makes.
Colin27 is also scored with a 25 mm haemorrhage (0.8 ppm) and an 8 mm calcification
(−0.3 ppm) added.

Generator phantoms (the second table)
-------------------------------------
Held-out brains of the training generator (:func:`bids_qsmnet.data.synthetic.
make_brain_phantom`, seeds disjoint from training): in distribution, so they flatter the model.

Methods
-------
* ``default``: the model as the app runs it with no flags — resampling into the network frame,
  the network, the model file's data-consistency refinement (λ chosen per input; with the
  file's ``dc_tv`` the TV refinement, ADMM from the network's map), and back;
* ``network only``: no refinement;
* ``best fixed λ*``: the network refined with the best fixed λ for this case, chosen on the
  truth — the reference the per-input choice is judged against: of 19 (10^-3.5 … 10) for the
  plain refinement, of 5 (10^-4 … 1, one per decade) for the TV refinement;
* ``TKD*`` and ``L2*``: TKD and closed-form L2 with the best parameter per case chosen on the
  truth (oracles: upper bounds of what they can do);
* ``TV-ADMM``: λ tuned once on the MNI152 exact field;
* ``toy``: the tutorial's toy network (``--toy-model``).

Metrics (inside the mask, in-mask mean removed as QSM-CI does): NRMSE %, HFEN %, SSIM, the
regression slope against the truth, the mean absolute error of deep-grey-matter region means
(ppb) and, for the strong sources, the relative error of their means (%).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time

import numpy as np

LOGGER = logging.getLogger("accuracy")

DEEP_GM = ("caudate", "putamen", "globus_pallidus", "thalamus", "red_nucleus",
           "substantia_nigra", "dentate_nucleus")
STRONG = ("haemorrhage", "calcification")
TEST_SEED = 424242
KINDS = ("exact", "tilted", "anisotropic", "measured", "raw")
TUNING_ANATOMY, TEST_ANATOMY = "mni152", "colin27"
TKD_GRID = (0.06, 0.1, 0.14, 0.19, 0.25)
L2_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
TV_GRID = (1e-4, 3e-4, 1e-3, 3e-3)
FIXED_GRID = np.logspace(-3.5, 1.0, 19)
#: the fixed prior weights of the TV refinement's "best fixed λ*" (one ADMM run each)
TV_FIXED_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


# --------------------------------------------------------------------------- cases


def anatomy_cases(quick: bool, kinds=None):
    """(case, anatomy used in tuning?) for both anatomies, every kind (or those of
    ``kinds``; the strong-sources case counts as ``exact``)."""
    from bids_qsmnet.data.anatomy import anatomy_phantom
    from bids_qsmnet.data.evaluation import make_case, with_strong_sources

    out = []
    for name in (TUNING_ANATOMY, TEST_ANATOMY):
        phantom = anatomy_phantom(name)
        for kind in (("exact", "raw") if quick else KINDS):
            if kinds is None or kind in kinds:
                out.append((make_case(phantom, kind, seed=TEST_SEED), name == TUNING_ANATOMY))
        if name == TEST_ANATOMY and (kinds is None or "exact" in kinds):
            out.append((make_case(with_strong_sources(phantom), "exact", seed=TEST_SEED),
                        False))
    return out


def tuning_case() -> dict:
    """The tuning anatomy's exact field: where TV-ADMM's λ is chosen."""
    from bids_qsmnet.data.anatomy import anatomy_phantom
    from bids_qsmnet.data.evaluation import make_case

    return make_case(anatomy_phantom(TUNING_ANATOMY), "exact", seed=TEST_SEED)


def generator_cases(shape, quick: bool, kinds=None):
    from bids_qsmnet.data.anatomy import AnatomyPhantom
    from bids_qsmnet.data.evaluation import make_case
    from bids_qsmnet.data.synthetic import make_brain_phantom

    ph = make_brain_phantom(shape, rng=np.random.default_rng([TEST_SEED, 0]))
    phantom = AnatomyPhantom("generator brain", ph.chi, ph.mask, ph.labels, ph.label_names,
                             ph.voxel_size)
    chosen = ("exact", "raw") if quick else ("exact", "tilted", "anisotropic", "raw")
    return [(make_case(phantom, kind, seed=TEST_SEED), False) for kind in chosen
            if kinds is None or kind in kinds]


# --------------------------------------------------------------------------- methods


def network_map(loaded, case):
    """The network's χ in its frame, with the field, mask and frame it was made in."""
    from bids_qsmnet.inference.frame import network_frame, to_frame
    from bids_qsmnet.inference.predict import predict_chi

    frame = network_frame(case["field"].shape, case["voxel_size"], case["b0_dir"],
                          target_voxel=float(loaded.spec.voxel_size[0]))
    f = to_frame(case["field"], frame, order=3)
    m = to_frame(case["mask"].astype(np.float32), frame, order=1) > 0.5
    return predict_chi(loaded, np.where(m, f, 0), m), f, m, frame


def model_maps(loaded, case, dc):
    """The model's maps of a case on its grid: default (the app's refinement), network only
    and the best fixed λ on the truth; plus the refinement's report."""
    from bids_qsmnet.inference.frame import from_frame
    from bids_qsmnet.inference.refine import refine_adaptive, refine_grid
    from bids_qsmnet.metrics import nrmse

    geom = dict(voxel_size=loaded.spec.voxel_size, b0_dir=loaded.spec.b0_dir)
    back = lambda x: np.where(case["mask"], from_frame(x, frame, order=3), 0)  # noqa: E731
    t = time.time()
    net, f, m, frame = network_map(loaded, case)
    t_net = time.time() - t
    chi, report = refine_adaptive(net, f, m, dc, **geom)
    t_default = time.time() - t
    grid = TV_FIXED_GRID if dc.tv else FIXED_GRID
    _, chis, _ = refine_grid(net, f, m, grid, tv=dc.tv, tv_iterations=dc.tv_iterations,
                             tv_penalty_scale=dc.tv_penalty_scale, **geom)
    fixed = [back(x) for x in chis]
    errs = [nrmse(x, case["chi"], case["mask"], demean=True) for x in fixed]
    i = int(np.argmin(errs))
    return {"default": (back(chi), t_default, report), "network only": (back(net), t_net, {}),
            "best fixed λ*": (fixed[i], float("nan"), {"lambda": float(grid[i])})}


def oracle(case, fn, grid, param):
    """Best parameter on the truth (NRMSE): (chi, param, seconds of one run)."""
    from bids_qsmnet.metrics import nrmse

    best = None
    for p in grid:
        t = time.time()
        chi = fn(case["field"], case["mask"], voxel_size=case["voxel_size"],
                 b0_dir=case["b0_dir"], **{param: p})
        secs = time.time() - t
        e = nrmse(chi, case["chi"], case["mask"], demean=True)
        if best is None or e < best[0]:
            best = (e, chi, p, secs)
    return best[1], best[2], best[3]


def tune_tv(case):
    from bids_qsmnet.physics.inversion import tv_admm

    _, lam, _ = oracle(case, lambda *a, **k: tv_admm(*a, n_iter=60, **k), TV_GRID, "lam")
    LOGGER.info("TV-ADMM λ %g (tuned on %s)", lam, case["name"])
    return lam


def scores(pred, case) -> dict:
    from bids_qsmnet.metrics import hfen, nrmse, region_means, slope, ssim

    m, ref = case["mask"], case["chi"]
    pred = np.where(m, pred, 0)
    out = {"nrmse": nrmse(pred, ref, m, demean=True), "hfen": hfen(pred, ref, m, demean=True),
           "ssim": ssim(pred, ref, m, demean=True), "slope": slope(pred, ref, m)}
    names = case["label_names"]
    p = region_means(pred - pred[m].mean(), np.where(m, case["labels"], 0), names)
    r = region_means(ref - ref[m].mean(), np.where(m, case["labels"], 0), names)
    gm = [abs(p[n] - r[n]) for n in DEEP_GM if n in p and n in r]
    out["deep_gm_mae_ppb"] = 1000 * float(np.mean(gm)) if gm else None
    for n in STRONG:
        if n in p and n in r:
            out[f"{n}_error_pct"] = 100 * (p[n] - r[n]) / abs(r[n])
    return out


def case_rows(case, tuned, loaded, dc, tv_lam, toy):
    from bids_qsmnet.physics.inversion import closed_form_l2, tkd, tv_admm

    maps = model_maps(loaded, case, dc)
    if toy is not None:
        from bids_qsmnet.inference.refine import DCSettings

        maps["toy"] = model_maps(toy, case, DCSettings())["network only"]
    chi, thr, secs = oracle(case, tkd, TKD_GRID, "threshold")
    maps["TKD*"] = (chi, secs, {"threshold": thr})
    chi, lam, secs = oracle(case, closed_form_l2, L2_GRID, "lam")
    maps["L2*"] = (chi, secs, {"lambda": lam})
    t = time.time()
    chi = tv_admm(case["field"], case["mask"], voxel_size=case["voxel_size"],
                  b0_dir=case["b0_dir"], lam=tv_lam, n_iter=60)
    maps["TV-ADMM"] = (chi, time.time() - t, {"lambda": tv_lam})
    rows = []
    for method, (chi, secs, info) in maps.items():
        s = scores(chi, case)
        rows.append({"case": case["name"], "kind": case["kind"], "anatomy_in_tuning": tuned,
                     "method": method, "seconds": None if secs != secs else round(secs, 1),
                     "settings": info, **s})
        LOGGER.info("  %-16s NRMSE %5.1f  HFEN %5.1f  SSIM %.3f  slope %.2f  %s", method,
                    s["nrmse"], s["hfen"], s["ssim"], s["slope"], info or "")
    return rows


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model file or shipped name (default model)")
    p.add_argument("--toy-model", default=None, help="a toy-network model file to include")
    p.add_argument("--out", default="docs/accuracy.json")
    p.add_argument("--md", default="docs/accuracy.md")
    p.add_argument("--shape", type=int, nargs=3, default=(152, 184, 152),
                   help="grid of the generator brain")
    p.add_argument("--quick", action="store_true", help="fewer cases (smoke test)")
    p.add_argument("--no-generator", action="store_true", help="skip the second table")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=None,
                   help="only the cases of these kinds (default: all)")
    p.add_argument("--update", action="store_true",
                   help="replace only the recomputed cases' rows in an existing --out JSON "
                        "(keeping its TV-ADMM λ) and rewrite --md from it")
    p.add_argument("--markdown-only", action="store_true",
                   help="rewrite --md from an existing --out JSON without running anything")
    args = p.parse_args(argv)
    if args.markdown_only:
        with open(args.out) as fh:
            write_markdown(json.load(fh), args.md)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    from bids_qsmnet.inference.refine import dc_settings
    from bids_qsmnet.models.modelfile import load_model, resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()
    loaded = load_model(resolve_model(args.model))
    toy = load_model(args.toy_model) if args.toy_model else None
    dc = dc_settings(loaded.spec.inference)  # the model file's defaults, as the app takes them
    previous = None
    if args.update:
        with open(args.out) as fh:
            previous = json.load(fh)
    cases = anatomy_cases(args.quick, args.kinds)
    if previous is not None:
        tv_lam = previous["tv_lambda"]
    else:  # on the tuning anatomy's exact field (cases[0] when it is among the cases)
        tv_lam = tune_tv(cases[0][0] if args.kinds is None or "exact" in args.kinds
                         else tuning_case())
    tables = {"out_of_generator": cases}
    if not args.no_generator:
        tables["generator"] = generator_cases(tuple(args.shape), args.quick, args.kinds)
    result = {"command": "python " + " ".join(sys.argv), "model": os.path.basename(
        str(loaded.path)), "model_name": loaded.spec.name, "model_sha256": loaded.sha256,
        "refinement": dc.to_dict(), "tv_lambda": tv_lam, "tables": {},
        "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads()}
    for table, items in tables.items():
        rows = []
        for case, tuned in items:
            LOGGER.info("case %s", case["name"])
            rows += case_rows(case, tuned, loaded, dc, tv_lam, toy)
        result["tables"][table] = rows
    result["seconds"] = round(time.time() - t_start)
    if previous is not None:
        result = _merged(previous, result)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    write_markdown(result, args.md)
    LOGGER.info("wrote %s and %s in %.0f s", args.out, args.md, time.time() - t_start)
    return 0


def _merged(previous: dict, new: dict) -> dict:
    """``previous`` with the rows of every case ``new`` recomputed replaced by ``new``'s (in
    place, the order kept); the command and time of the update are recorded beside the
    original's."""
    out = dict(previous)
    out["tables"] = {}
    for table, rows in previous["tables"].items():
        fresh = new["tables"].get(table, [])
        redone = {r["case"] for r in fresh}
        merged, done = [], set()
        for r in rows:
            if r["case"] not in redone:
                merged.append(r)
            elif r["case"] not in done:
                merged += [x for x in fresh if x["case"] == r["case"]]
                done.add(r["case"])
        merged += [x for x in fresh if x["case"] not in done]  # cases new to the table
        out["tables"][table] = merged
    out["updates"] = previous.get("updates", []) + [
        {"command": new["command"], "seconds": new["seconds"],
         "cases": sorted({r["case"] for rows in new["tables"].values() for r in rows})}]
    return out


# --------------------------------------------------------------------------- report


def summary_table(rows: list[dict], *, with_tuning: bool) -> str:
    """One row per case: NRMSE / HFEN (%) of every method side by side."""
    cases = list(dict.fromkeys(r["case"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    head = "| case | " + ("anatomy used in tuning | " if with_tuning else "")
    lines = [head + " | ".join(methods) + " |",
             "| --- | " + ("--- | " if with_tuning else "")
             + " | ".join("---:" for _ in methods) + " |"]
    for case in cases:
        mine = [r for r in rows if r["case"] == case]
        cells = {r["method"]: f"{r['nrmse']:.1f} / {r['hfen']:.1f}" for r in mine}
        tuning = ("yes | " if mine[0]["anatomy_in_tuning"] else "no | ") if with_tuning else ""
        lines.append(f"| {case} | {tuning}" + " | ".join(cells.get(m, "") for m in methods)
                     + " |")
    return "\n".join(lines)


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def detail_table(rows: list[dict]) -> str:
    lines = ["| case | method | NRMSE % | HFEN % | SSIM | slope | deep GM MAE (ppb) | "
             "strong sources (% error of mean) | settings | time (s) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |"]
    for r in rows:
        strong = ", ".join(f"{n} {r[f'{n}_error_pct']:+.1f}" for n in STRONG
                           if f"{n}_error_pct" in r)
        settings = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                             for k, v in (r.get("settings") or {}).items()
                             if k in ("lambda", "rho0", "noise_share", "threshold"))
        lines.append(f"| {r['case']} | {r['method']} | {r['nrmse']:.1f} | {r['hfen']:.1f} | "
                     f"{r['ssim']:.3f} | {r['slope']:.2f} | "
                     f"{_fmt(r.get('deep_gm_mae_ppb'), '.1f')} | {strong} | {settings} | "
                     f"{_fmt(r.get('seconds'), '.1f')} |")
    return "\n".join(lines)


def write_markdown(result: dict, path: str) -> None:
    ref = result["refinement"]
    lines = [
        "# Accuracy",
        "",
        f"Command: `{result['command']}`  ",
        *[f"Cases {', '.join(u['cases'])} recomputed by `{u['command']}`  "
          for u in result.get("updates", [])],
        f"Model: `{result['model']}` (sha256 `{result['model_sha256'][:16]}…`); refinement: "
        f"λ {ref['lambda']}" + (" (chosen per input from the field the network leaves "
                                "unexplained and the field's noise share, "
                                "`inference.dc_auto`)" if ref.get("auto") else "")
        + (f", TV weight {ref['tv']:g} ppm·mm, {ref['iterations']} ADMM iterations (penalty "
           f"scale {ref.get('penalty_scale', 1.0):g}) from the network's map" if ref.get("tv")
           else f", {ref['iterations']} CG iterations")
        + f"; TV-ADMM λ = {result['tv_lambda']:g} (tuned "
        "on the MNI152 exact field). `*`: oracle, the best parameter per case chosen on the "
        "truth. NRMSE and HFEN in % (lower is better), SSIM and slope (1 = contrast kept) "
        "inside the mask after removing the in-mask mean. Times: wall seconds on "
        f"{result['torch_threads']} torch threads ({result['machine']}), indicative only "
        "(docs/benchmarks.md measures speed). How every case is made: "
        "`benchmarks/accuracy.py`'s docstring.",
        "",
        "## Out-of-generator anatomy: NRMSE % / HFEN %",
        "",
        "MNI152 is the tuning anatomy (the refinement rule's constants and TV-ADMM's λ are "
        "chosen on it); Colin27 is used for nothing but this table.",
        "",
        summary_table(result["tables"]["out_of_generator"], with_tuning=True),
        "",
    ]
    if "generator" in result["tables"]:
        lines += ["## Generator phantoms (the training distribution): NRMSE % / HFEN %", "",
                  "A held-out brain of the training generator: in distribution, it flatters "
                  "the model.", "",
                  summary_table(result["tables"]["generator"], with_tuning=False), ""]
    lines += ["## All figures", ""]
    for rows in result["tables"].values():
        lines += [detail_table(rows), ""]
    with open(path, "w") as fh:
        fh.write("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
