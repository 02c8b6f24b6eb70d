"""Copy a trained checkpoint into the package as the shipped default model.

    python scripts/ship_default_model.py runs/gpu/chain/model_epoch-003.safetensors \
        --dc-lambda 0.1 --dc-edge-mm 0 --dc-highpass-mm 0 --residual-passes 0
    python benchmarks/calibrate_dc.py --out docs/dc_calibration.json \
        --write-model bids_qsmnet/resources/models/default.safetensors

The weights and normalisation are taken unchanged; the model is renamed ``default`` and its
``inference`` section gets the fixed data-consistency weight (used when ``--dc-lambda`` asks
for a number's worth of refinement without the model's rule), the mask-edge ramp and
spherical-mean-value high-pass of the refinement's data term, and the number of residual-field
passes the app runs by default (see ``bids_qsmnet/inference/refine.py``).  The second command
fits the per-input rule that chooses λ (``inference.dc_auto``) on the MNI152 tuning anatomy and
stores it in the file.  The sha256 of the trained checkpoint is recorded; re-shipping the
shipped file itself (to change only its inference settings) keeps that record.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="trained model file (from the default recipe)")
    p.add_argument("--dc-lambda", type=float, required=True)
    p.add_argument("--dc-iterations", type=int, default=30)
    p.add_argument("--dc-edge-mm", type=float, default=0.0,
                   help="mask-edge ramp (mm) of the refinement's data weight")
    p.add_argument("--dc-highpass-mm", type=float, default=0.0,
                   help="SMV high-pass radius (mm) of the refinement's data term (0: none)")
    p.add_argument("--flip-axes", type=int, nargs="*", default=[],
                   help="axes of the flip ensemble the app runs by default (network frame)")
    p.add_argument("--residual-passes", type=int, default=0,
                   help="residual-field passes the app runs by default (0: none)")
    p.add_argument("--note", default="", help="free text recorded in training.shipping_note")
    args = p.parse_args(argv)

    from bids_qsmnet.models.modelfile import load_model, save_model, shipped_models_dir

    src = load_model(args.source)
    training = dict(src.spec.training)
    training.pop("shipping_note", None)
    if src.spec.name != "default" or "source_sha256" not in training:
        # a trained checkpoint; re-shipping the default keeps its checkpoint's provenance
        training["source_sha256"] = src.sha256
        training["source_file"] = Path(args.source).name
    if args.note:
        training["shipping_note"] = args.note
    spec = dataclasses.replace(
        src.spec, name="default", training=training,
        inference={**(src.spec.inference or {}), "dc_lambda": args.dc_lambda,
                   "dc_iterations": args.dc_iterations, "dc_edge_mm": args.dc_edge_mm,
                   "dc_highpass_mm": args.dc_highpass_mm,
                   "flip_axes": sorted(set(args.flip_axes)),
                   "residual_passes": args.residual_passes})
    dest = shipped_models_dir() / "default.safetensors"
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_model(dest, src.network, spec)
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
