"""Train a QSMnet-family network on an HDF5 patch store (also the ``torchrun`` entry point).

Examples
--------
One process (CPU or one GPU)::

    python -m bids_qsmnet.train --patches patches.h5 --out-dir runs/toy --model toy \\
        --epochs 5 --batch-size 12 --val sub-01_field.nii.gz,sub-01_chi.nii.gz,sub-01_mask.nii.gz

Several GPUs (or CPU processes, gloo) with DistributedDataParallel::

    torchrun --nproc-per-node 4 -m bids_qsmnet.train --patches patches.h5 --out-dir runs/q

Validation volumes (``--val FIELD,CHI[,MASK]``, repeatable) are NIfTI files in ppm already in
the network frame (B0 along the third axis, 1 mm isotropic), e.g. those of the example dataset.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ..__about__ import __version__
from .config import TRAINING_DEFAULTS, TrainingConfig
from .volumes import load_validation_volume

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m bids_qsmnet.train`` (defaults: :data:`TRAINING_DEFAULTS`)."""
    d = TRAINING_DEFAULTS
    p = argparse.ArgumentParser(
        prog="python -m bids_qsmnet.train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--version", action="version", version=f"bids_qsmnet {__version__}")
    p.add_argument("--patches", required=True, help="HDF5 patch store (from ExtractPatches)")
    p.add_argument("--out-dir", required=True, help="folder for checkpoints, model and logs")
    p.add_argument("--model", default=d.architecture,
                   help="architecture: toy, qsmnet, qsmnet+, qsmnet-mid, qsmnet-slim, qsmnet-lite, "
                        "or a JSON file with a UNet3d config")
    p.add_argument("--name", default=None, help="model name (default: the architecture)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument("--lr-decay", type=float, default=d.lr_decay)
    p.add_argument("--lr-decay-steps", type=int, default=d.lr_decay_steps)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--save-step", type=int, default=d.save_step)
    p.add_argument("--w-model", type=float, default=d.w_model, help="model (dipole) loss weight")
    p.add_argument("--w-grad", type=float, default=d.w_grad, help="gradient loss weight")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay,
                   help="keep an exponential moving average of the weights with this decay "
                        "per step (e.g. 0.999) and validate and save it (0: off)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", action="store_true",
                   help="bf16 autocast (CUDA, or a CPU with native bf16)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   default=d.channels_last,
                   help="channels-last 3-D convolutions (faster steps on CPU and CUDA)")
    p.add_argument("--num-workers", type=int, default=d.num_workers)
    p.add_argument("--val", action="append", default=[], metavar="FIELD,CHI[,MASK]",
                   help="whole validation volume (NIfTI, ppm, network frame); repeatable")
    p.add_argument("--val-every", type=int, default=d.val_every)
    p.add_argument("--log-every", type=int, default=d.log_every,
                   help="write a training-log row every this many steps")
    p.add_argument("--checkpoint-every-steps", type=int, default=d.checkpoint_every_steps)
    p.add_argument("--max-steps", type=int, default=d.max_steps)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint.pt")
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    """Train as the arguments say and print the model file's path; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    from .trainer import train

    arch = args.model
    if arch.endswith(".json"):
        with open(arch) as fh:
            arch = json.load(fh)
    cfg = TrainingConfig(
        patches=args.patches, out_dir=args.out_dir, architecture=arch,
        name=args.name or (args.model if isinstance(arch, str) else "custom"),
        batch_size=args.batch_size, learning_rate=args.learning_rate, lr_decay=args.lr_decay,
        lr_decay_steps=args.lr_decay_steps, epochs=args.epochs, save_step=args.save_step,
        w_model=args.w_model, w_grad=args.w_grad, seed=args.seed, device=args.device,
        ema_decay=args.ema_decay, amp=args.amp, channels_last=args.channels_last,
        num_workers=args.num_workers,
        val_every=args.val_every, log_every=args.log_every,
        checkpoint_every_steps=args.checkpoint_every_steps,
        resume=args.resume, max_steps=args.max_steps, threads=args.threads,
        training_info={"command": " ".join(sys.argv)})
    validation = [load_validation_volume(v) for v in args.val]
    result = train(cfg, validation)
    print(result.model_path)
    return 0


