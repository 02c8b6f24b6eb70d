"""How much a model shrinks smooth contrast: network-only accuracy on blurred held-out brains.

Usage::

    python benchmarks/smoothness.py MODEL [MODEL ...] [--threads 2]

The held-out test brain of ``benchmarks/accuracy.py`` (seed never used in training) with its χ
blurred by a Gaussian of σ = 0, 1 and 2 mm (a normalised convolution inside the mask, as
partial volume and smooth tissue boundaries do), the exact field simulated from the blurred
map plus 1 ppb noise; plus the MNI152 anatomy's exact field
(:mod:`bids_qsmnet.data.anatomy`).  Each model runs without the data-consistency refinement,
so the figures show the network alone.  Prints a
Markdown table of NRMSE % / HFEN % and the regression slope of the prediction on the truth
(1: no shrinkage), all inside the mask after removing the in-mask mean.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import accuracy as A  # noqa: E402  (the accuracy benchmark's cases and model runner)


def blurred_cases(sigmas=(0.0, 1.0, 2.0), shape=(152, 184, 152)):
    from bids_qsmnet.data.anatomy import AnatomyPhantom
    from bids_qsmnet.data.evaluation import make_case
    from bids_qsmnet.data.synthetic import make_brain_phantom
    from bids_qsmnet.training.default_recipe import Recipe, smooth_variety

    ph = make_brain_phantom(shape, rng=np.random.default_rng([A.TEST_SEED, 0]))
    cases = []
    for s in sigmas:
        chi = np.where(ph.mask, ph.chi, 0).astype(np.float32)
        if s:
            recipe = Recipe(p_blur=1.0, blur_sigma_mm=(s, s), p_texture=0.0)
            chi, _ = smooth_variety(chi, ph.mask, np.random.default_rng(0), recipe)
        phantom = AnatomyPhantom(f"generator brain blurred σ={s:g} mm", chi, ph.mask,
                                 ph.labels, ph.label_names, ph.voxel_size)
        cases.append(make_case(phantom, "exact", seed=A.TEST_SEED))
    return cases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="model files (or 'default')")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    import torch

    from bids_qsmnet.data.anatomy import anatomy_phantom
    from bids_qsmnet.data.evaluation import make_case
    from bids_qsmnet.inference.refine import DCSettings
    from bids_qsmnet.metrics import hfen, nrmse, slope
    from bids_qsmnet.models.modelfile import load_model, resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    cases = blurred_cases()
    cases.append(make_case(anatomy_phantom(A.TUNING_ANATOMY), "exact", seed=A.TEST_SEED))
    print("| model | " + " | ".join(c["name"] for c in cases) + " |")
    print("| --- |" + " ---: |" * len(cases))
    for name in args.models:
        loaded = load_model(resolve_model(None if name == "default" else name))
        cells = []
        for c in cases:
            pred = A.model_maps(loaded, c, DCSettings())["network only"][0]
            m = c["mask"]
            cells.append(f"{nrmse(pred, c['chi'], m, demean=True):.1f} / "
                         f"{hfen(pred, c['chi'], m, demean=True):.1f} / "
                         f"{slope(pred, c['chi'], m):.2f}")
        print(f"| {name} (sha256 {loaded.sha256[:12]}…) | " + " | ".join(cells) + " |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
