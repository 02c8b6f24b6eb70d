"""Calibrate the per-input choice of the data-consistency weight λ on a tuning anatomy.

Usage::

    python benchmarks/calibrate_dc.py --out docs/dc_calibration.json [--model default] \\
        [--write-model bids_qsmnet/resources/models/default.safetensors]

The rule (:class:`bids_qsmnet.inference.refine.AutoLambda`) maps the fraction ρ₀ of the
field that the network's map leaves unexplained to λ.  This command fits its constants on the
**MNI152** anatomy only (:mod:`bids_qsmnet.data.anatomy`; the Colin27 anatomy, on which the
accuracy benchmark reports, is never used here): exact fields with 0.5, 1 and 2 ppb noise,
fields with a non-dipolar part of 20 to 70 % of the dipole field's rms (background residue and
a white-matter offset, :mod:`bids_qsmnet.data.measured`), and the field the app's raw-GRE
chain makes of a simulated acquisition; the noise and the non-dipolar part are drawn with two
seeds, so that the rule fits what a kind of field needs rather than one draw of it.  For each,
the network runs once, the refinement runs for a grid of λ (shifted conjugate gradients for
the plain refinement, :mod:`bids_qsmnet.physics.dc_path`; one ADMM run per λ for the TV
refinement), and NRMSE against the truth is recorded for every λ (and for no refinement),
with the rule's inputs ρ₀ and the noise share ν.  The constants minimise the mean NRMSE excess
over each case's best λ (NRMSE interpolated linearly in log λ between grid points).
``--write-model`` stores them in the model file's ``inference.dc_auto`` (weights unchanged).

A run keeps the curves already in ``--out`` that were made with the same model, refinement
and λ grid, and computes only the missing cases, so an interrupted calibration resumes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import accuracy as A  # noqa: E402  (the accuracy benchmark's λ grid and network runner)

LOGGER = logging.getLogger("calibrate_dc")

#: (kind, noise ppb, non-dipolar fraction, seed) of the calibration cases
CASES = (("exact", 0.5, 0.0, 31337), ("exact", 1.0, 0.0, 31337), ("exact", 2.0, 0.0, 31337),
         ("measured", 1.0, 0.2, 31337), ("measured", 1.0, 0.4, 31337),
         ("measured", 1.0, 0.7, 31337), ("raw", 0.0, 0.0, 31337),
         ("exact", 2.0, 0.0, 4242), ("measured", 1.0, 0.2, 4242),
         ("measured", 1.0, 0.3, 4242), ("measured", 1.0, 0.4, 4242),
         ("measured", 1.0, 0.55, 4242), ("measured", 1.0, 0.7, 4242))
#: prior weights of the TV refinement's curves (each costs a full ADMM run)
TV_GRID = (1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)


def lambda_curve(loaded, case, lams=A.FIXED_GRID, *, tv: float = 0.0,
                 tv_iterations: int = 60, tv_penalty_scale: float = 1.0) -> dict:
    """NRMSE (%) of the refined map for every λ, of the network alone, ρ₀ and the noise share
    ν; with ``tv`` > 0 the maps of the TV refinement
    (:func:`bids_qsmnet.inference.refine.refine_tv`)."""
    from bids_qsmnet.inference.frame import from_frame
    from bids_qsmnet.inference.refine import refine_grid
    from bids_qsmnet.metrics import nrmse
    from bids_qsmnet.physics.noise import noise_share, noise_sigma

    net, f, m, frame = A.network_map(loaded, case)
    nu, sigma = noise_share(f, m), noise_sigma(f, m)
    rho0, chis, residuals = refine_grid(net, f, m, lams, tv=tv, tv_iterations=tv_iterations,
                                        tv_penalty_scale=tv_penalty_scale,
                                        voxel_size=loaded.spec.voxel_size,
                                        b0_dir=loaded.spec.b0_dir)
    back = lambda x: np.where(case["mask"], from_frame(x, frame, order=3), 0)  # noqa: E731
    score = lambda x: nrmse(back(x), case["chi"], case["mask"], demean=True)  # noqa: E731
    return {"case": case["name"], "rho0": rho0, "noise_share": nu, "noise_ppb": 1000 * sigma,
            "network": score(net),
            "lambdas": [float(x) for x in lams], "nrmse": [score(x) for x in chis],
            "residuals": [float(r) for r in residuals]}


def nrmse_at(curve: dict, lam: float | None) -> float:
    """A case's NRMSE at λ (None: no refinement), interpolated in log λ on its grid."""
    if lam is None:
        return curve["network"]
    x = np.log(curve["lambdas"])
    return float(np.interp(np.log(lam), x, curve["nrmse"]))


def best_of(curve: dict) -> float:
    return min(min(curve["nrmse"]), curve["network"])


def fit(curves: list[dict]) -> tuple[dict, float]:
    """The rule's constants with the least mean NRMSE excess over the curves; returns the
    constants and that excess (NRMSE points)."""
    from bids_qsmnet.inference.refine import AutoLambda

    e_ref = 0.05
    best = None
    for noise, floor, power, lam_ref in itertools.product(
            (0.0, 0.5, 1.0), np.arange(0.0, 0.5, 0.005), np.arange(0.2, 3.01, 0.1),
            np.logspace(-3, 0, 31)):
        rule = AutoLambda(floor=float(floor), e_ref=e_ref, lambda_ref=float(lam_ref),
                          power=float(power), noise=float(noise))
        excess = float(np.mean([nrmse_at(c, rule.choose(c["rho0"], c["noise_share"]))
                                - best_of(c) for c in curves]))
        if best is None or excess < best[1] - 1e-9:
            best = (rule, excess)
    return best[0].to_dict(), best[1]


def write_model(path: str, auto: dict, *, tv: float = 0.0, tv_iterations: int = 60,
                tv_penalty_scale: float = 1.0) -> None:
    import dataclasses

    from bids_qsmnet.models.modelfile import load_model, save_model

    loaded = load_model(path)
    inference = {**(loaded.spec.inference or {}), "dc_auto": auto, "dc_edge_mm": 0.0,
                 "dc_highpass_mm": 0.0, "dc_tv": float(tv), "dc_tv_iterations": int(tv_iterations),
                 "dc_tv_penalty_scale": float(tv_penalty_scale)}
    save_model(path, loaded.network, dataclasses.replace(loaded.spec, inference=inference))


def weights_digest(network) -> str:
    """sha256 of the network's parameters and buffers (names, dtypes, shapes, values): the
    same for model files that differ only in their inference settings."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(network.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def refine_domain() -> str:
    """The refinement's FFT domain, as the curves record it (curves made on another domain
    are computed again)."""
    from bids_qsmnet.inference.refine import BOX_MARGIN, FFT_PAD

    return f"mask box + {BOX_MARGIN}, pad {FFT_PAD}, fast FFT lengths"


def _reusable(path: str, sha256: str, tv: float, tv_iterations: int, scale: float,
              grid) -> list[dict]:
    """The curves in ``path`` made with these weights (:func:`weights_digest`), refinement,
    its FFT domain (:func:`refine_domain`) and λ grid (none if absent)."""
    try:
        with open(path) as fh:
            old = json.load(fh)
    except (OSError, ValueError):
        return []
    if (old.get("weights_sha256"), old.get("dc_tv"), old.get("dc_tv_iterations"),
            old.get("dc_tv_penalty_scale", 1.0), old.get("refine_domain")
            ) != (sha256, tv, tv_iterations, scale, refine_domain()):
        return []
    return [c for c in old.get("curves", []) if c.get("lambdas") == [float(x) for x in grid]
            and "noise_share" in c]


def _save(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as fh:
        json.dump(result, fh, indent=1)
    os.replace(path + ".tmp", path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model file or shipped name (default model)")
    p.add_argument("--out", default="docs/dc_calibration.json")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--write-model", metavar="PATH", default=None,
                   help="store the fitted rule in this model file's inference.dc_auto")
    p.add_argument("--tv", type=float, default=0.0,
                   help="calibrate the TV refinement with this TV weight (ppm·mm; 0: the plain "
                        "conjugate-gradient refinement)")
    p.add_argument("--tv-iterations", type=int, default=60,
                   help="ADMM iterations of the TV refinement")
    p.add_argument("--tv-penalty-scale", type=float, default=1.0,
                   help="scale c of the TV refinement's ADMM penalties (ρ = 100 c · TV weight, "
                        "ρ_data = 1/c; bids_qsmnet.inference.refine.tv_penalties)")
    p.add_argument("--refit", action="store_true",
                   help="fit again from the curves in --out without running the network")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    from bids_qsmnet.data.anatomy import anatomy_phantom
    from bids_qsmnet.data.evaluation import make_case
    from bids_qsmnet.models.modelfile import load_model, resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    loaded = load_model(resolve_model(args.model))
    previous = {}
    if args.refit:
        with open(args.out) as fh:
            previous = json.load(fh)
        curves = previous["curves"]
    else:
        grid = TV_GRID if args.tv else A.FIXED_GRID
        weights = weights_digest(loaded.network)
        done = _reusable(args.out, weights, args.tv, args.tv_iterations,
                         args.tv_penalty_scale, grid)
        phantom = None
        curves = []
        for kind, noise, nd, seed in CASES:
            key = {"kind": kind, "noise": noise, "nondipolar": nd, "seed": seed}
            hit = [c for c in done if all(c.get(k) == v for k, v in key.items())]
            if hit:
                curves.append(hit[0])
                continue
            phantom = phantom or anatomy_phantom("mni152")
            case = make_case(phantom, kind, seed=seed, noise_ppm=noise / 1000, nondipolar=nd)
            curves.append({**lambda_curve(loaded, case, grid, tv=args.tv,
                                          tv_iterations=args.tv_iterations,
                                          tv_penalty_scale=args.tv_penalty_scale), **key})
            c = curves[-1]
            LOGGER.info("%s (seed %d): ρ0 %.3f, noise %.2f ppb (ν %.3f), network %.1f %%, "
                        "best %.1f %%", c["case"], seed, c["rho0"], c["noise_ppb"],
                        c["noise_share"], c["network"], best_of(c))
            _save(args.out, {"command": "python " + " ".join(sys.argv),
                             "input_model_sha256": loaded.sha256, "weights_sha256": weights,
                             "dc_tv": args.tv, "dc_tv_iterations": args.tv_iterations,
                             "dc_tv_penalty_scale": args.tv_penalty_scale,
                             "refine_domain": refine_domain(), "curves": curves})
    auto, excess = fit(curves)
    from bids_qsmnet.inference.refine import AutoLambda

    rule = AutoLambda.from_dict(auto)
    for c in curves:
        lam = rule.choose(c["rho0"], c["noise_share"])
        c["chosen_lambda"] = lam
        c["chosen_nrmse"] = nrmse_at(c, lam)
        LOGGER.info("%-32s seed %5d ρ0 %.3f ν %.3f → λ %-8s NRMSE %.1f (best %.1f)", c["case"],
                    c["seed"], c["rho0"], c["noise_share"],
                    "off" if lam is None else f"{lam:.4f}", c["chosen_nrmse"], best_of(c))
    command = "python " + " ".join(sys.argv)
    if previous:  # the curves' command stays; the fit's is added
        command = previous["command"]
    result = {"command": command, **({"refit_command": "python " + " ".join(sys.argv)}
                                      if previous else {}),
              "input_model_sha256": previous.get("input_model_sha256", loaded.sha256),
              "weights_sha256": previous.get("weights_sha256", weights_digest(loaded.network)),
              "anatomy": "mni152", "dc_auto": auto, "dc_tv": args.tv,
              "dc_tv_iterations": args.tv_iterations,
              "dc_tv_penalty_scale": args.tv_penalty_scale,
              "mean_excess_nrmse": round(excess, 2),
              "curves": curves,
              "seconds": previous.get("seconds", round(time.time() - t0))}
    _save(args.out, result)
    print(json.dumps({"dc_auto": auto, "mean_excess_nrmse": round(excess, 2)}))
    if args.write_model:
        write_model(args.write_model, auto, tv=args.tv, tv_iterations=args.tv_iterations,
                    tv_penalty_scale=args.tv_penalty_scale)
        LOGGER.info("stored the rule in %s", args.write_model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
