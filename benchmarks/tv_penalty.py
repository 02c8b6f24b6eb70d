"""The TV refinement's ADMM penalty scale: fewer iterations, the same map.

Usage::

    python benchmarks/tv_penalty.py --threads 2 [--pairs 60:1 30:2 20:3 30:1] [--cases 0 1 2 3]

The TV refinement (:func:`bids_qsmnet.inference.refine.refine_tv`) stops ADMM after a fixed
number of iterations n started from the network's map, with the penalties
``ρ = 100 c α`` and ``ρ_d = 1/c`` (:func:`bids_qsmnet.inference.refine.tv_penalties`).  This
benchmark runs the app's refinement (:func:`bids_qsmnet.inference.refine.refine_grid`) for each
pair ``n:c`` of ``--pairs`` on fields of the **MNI152** anatomy (the tuning anatomy;
``benchmarks/calibrate_dc.py`` uses the same cases): the exact field with 1 ppb noise at the
prior weight its rule picks (λ 1e-4), a field with a 40 % non-dipolar part at λ 1e-3 and
1e-2 (the range the rule picks there), and the exact field of the anatomy with a 25 mm
haemorrhage (0.8 ppm) and an 8 mm calcification (−0.3 ppm) added.  It prints, per case and
pair, NRMSE and HFEN (%, in-mask mean removed) against the truth and the rms and maximum
difference (ppm) to the first pair's map, with the seconds of one refinement.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

#: (kind, non-dipolar fraction, prior weight λ, strong sources added) of the cases
CASES = (("exact", 0.0, 1e-4, False), ("measured", 0.4, 1e-3, False),
         ("measured", 0.4, 1e-2, False), ("exact", 0.0, 1e-4, True))
SEED = 31337


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--model", default=None, help="model file or shipped name (default model)")
    p.add_argument("--pairs", nargs="+", default=["60:1", "30:2", "20:3", "30:1"],
                   help="iterations:penalty scale pairs; the first is the reference")
    p.add_argument("--cases", nargs="+", type=int, default=list(range(len(CASES))),
                   help="indices into CASES")
    args = p.parse_args(argv)
    import torch

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import accuracy as A

    from bids_qsmnet.data.anatomy import anatomy_phantom
    from bids_qsmnet.data.evaluation import make_case, with_strong_sources
    from bids_qsmnet.inference.frame import from_frame
    from bids_qsmnet.inference.refine import refine_grid
    from bids_qsmnet.metrics import hfen, nrmse
    from bids_qsmnet.models.modelfile import load_model, resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(resolve_model(args.model))
    tv = float((loaded.spec.inference or {}).get("dc_tv", 1e-4)) or 1e-4
    pairs = [(int(a), float(b)) for a, b in (x.split(":") for x in args.pairs)]
    phantom = anatomy_phantom("mni152")
    print("| case | λ | iterations | penalty scale | NRMSE % | HFEN % | rms diff (ppm) | "
          "max diff (ppm) | seconds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for kind, nd, lam, strong in (CASES[i] for i in args.cases):
        source = with_strong_sources(phantom) if strong else phantom
        case = make_case(source, kind, seed=SEED, noise_ppm=0.001, nondipolar=nd)
        net, f, m, frame = A.network_map(loaded, case)
        mask, truth = case["mask"], case["chi"]
        ref = None
        for n, c in pairs:
            t = time.perf_counter()
            _, (chi,), _ = refine_grid(net, f, m, [lam], tv=tv, tv_iterations=n,
                                       tv_penalty_scale=c, voxel_size=loaded.spec.voxel_size,
                                       b0_dir=loaded.spec.b0_dir)
            secs = time.perf_counter() - t
            chi = np.where(mask, from_frame(chi, frame, order=3), 0)
            ref = chi if ref is None else ref
            d = (chi - ref)[mask]
            print(f"| {case['name']} | {lam:g} | {n} | {c:g} | "
                  f"{nrmse(chi, truth, mask, demean=True):.2f} | "
                  f"{hfen(chi, truth, mask, demean=True):.2f} | "
                  f"{np.sqrt(np.mean(d ** 2)):.1e} | {np.abs(d).max():.1e} | {secs:.1f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
