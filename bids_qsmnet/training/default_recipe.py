"""The recipe of the shipped default model: synthetic training data → patches → training.

One seeded command trains the shipped model (12 epochs)::

    python -m bids_qsmnet.training.default_recipe --out-dir runs/default

and ``--resume`` continues an interrupted run (the patch store is reused when the recipe is
unchanged, and training resumes from ``runs/default/train/checkpoint.pt``).  The shipped
weights ran epochs 1-6 in the contiguous layout and 7-12 channels-last (1.7x faster on the CPU;
same function, other float rounding); to reproduce them (same torch build, 2 threads)::

    python -m bids_qsmnet.training.default_recipe --out-dir runs/default --epochs 6 \
        --no-channels-last
    python -m bids_qsmnet.training.default_recipe --out-dir runs/default --resume --epochs 12

Training data (why each choice: ``MODEL_CARD.md`` and the field's lessons)
--------------------------------------------------------------------------------------
* **Brain-like phantoms** (:func:`~bids_qsmnet.data.synthetic.make_brain_phantom`): procedural
  anatomy with per-subject tissue values (deep grey nuclei, cortex ribbon, white matter,
  CSF, veins, calcifications, haemorrhages), so the network learns brain-like structure
  without memorising one head.
* **Random-source phantoms** (:func:`~bids_qsmnet.data.synthetic.make_source_phantom`):
  ellipsoids, boxes, spheres and tubes from a voxel to half the volume, for spatial-frequency
  variety.
* **Realistic fields**: the field of the whole brain, observed only inside an eroded mask
  (0–3 voxels, as after background-field removal), with white noise of 0.5–4 ppb and, in half
  of the volumes, a smooth residual background field of 1–4 ppb (imperfect background
  removal).
* **Linearity** (QSMnet+): in 30 % of the volumes positive χ is scaled by 1.5–3 and the field
  re-simulated — strong sources without the huge scaled haemorrhages that dominate an L1 loss.
* B0 along the third axis at 1 mm isotropic: inference resamples every input into that frame
  (an exact rotation of the physics), so the network needs no orientation augmentation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

LOGGER = logging.getLogger(__name__)

__all__ = ["Recipe", "training_volumes", "validation_volumes", "run_recipe", "main"]


@dataclass
class Recipe:
    """Everything that determines the default model (hashed to decide reuse of patches)."""

    seed: int = 20261125
    n_brains: int = 20
    brain_shape: tuple = (152, 184, 152)
    n_sources: int = 40
    source_shape: tuple = (64, 64, 64)
    max_erosion: int = 3
    noise_ppm: tuple = (0.0005, 0.004)
    background_ppm: tuple = (0.001, 0.004)
    p_background: float = 0.5
    p_linearity: float = 0.3
    linearity_range: tuple = (1.5, 3.0)
    patch_size: int = 48
    max_stride: int = 32
    min_mask_fraction: float = 0.2
    architecture: str = "qsmnet-slim"
    batch_size: int = 4
    learning_rate: float = 1e-3
    lr_decay: float = 0.9
    lr_decay_steps: int = 300
    epochs: int = 12
    w_model: float = 5.0
    w_grad: float = 0.1
    dc_lambda: float = 0.0
    dc_iterations: int = 30
    #: channels-last 3-D layout: 1.4x faster CPU training steps (docs/benchmarks.md); the
    #: same function, different float rounding (epochs 1-6 of the shipped model ran without)
    channels_last: bool = True
    n_validation: int = 1
    extra: dict = field(default_factory=dict)

    def data_hash(self) -> str:
        keys = ("seed", "n_brains", "brain_shape", "n_sources", "source_shape", "max_erosion",
                "noise_ppm", "background_ppm", "p_background", "p_linearity",
                "linearity_range", "patch_size", "max_stride", "min_mask_fraction")
        blob = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _smooth_background(shape, rng, std_ppm: float) -> np.ndarray:
    """A low-order (degree ≤ 2) polynomial field with the given in-volume std, ppm."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij", sparse=True)
    x, y, z = grids
    terms = [x, y, z, x * y, x * z, y * z, x * x - y * y, 2 * z * z - x * x - y * y]
    out = sum(rng.normal() * t for t in terms)
    out = np.broadcast_to(out, shape).astype(np.float32)
    out -= out.mean()
    return out * np.float32(std_ppm / (out.std() + 1e-12))


def _ellipsoid_mask(shape, rng) -> np.ndarray:
    radii = rng.uniform(0.35, 0.5, 3) * np.asarray(shape)
    centre = np.asarray(shape) / 2 + rng.uniform(-0.05, 0.05, 3) * np.asarray(shape)
    g = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij", sparse=True)
    return sum(((gi - c) / r) ** 2 for gi, c, r in zip(g, centre, radii)) <= 1.0


def _make_pair(chi, mask, rng, recipe: Recipe, name: str):
    """Observed local field and label for one phantom (see the module docstring)."""
    from ..data.synthetic import erode_mask, simulate_local_field
    from .patches import TrainingVolume

    chi = np.where(mask, chi, 0).astype(np.float32)
    if rng.uniform() < recipe.p_linearity:
        factor = rng.uniform(*recipe.linearity_range)
        chi = np.where(chi > 0, chi * factor, chi).astype(np.float32)
    k = int(rng.integers(0, recipe.max_erosion + 1))
    observed = erode_mask(mask, k) if k else mask
    noise = float(np.exp(rng.uniform(*np.log(recipe.noise_ppm))))
    field = simulate_local_field(chi, mask, noise_std=0.0, rng=rng)
    field = field + rng.normal(0, noise, field.shape).astype(np.float32)
    if rng.uniform() < recipe.p_background:
        field = field + _smooth_background(field.shape, rng, rng.uniform(*recipe.background_ppm))
    field = np.where(observed, field, 0).astype(np.float32)
    label = np.where(observed, chi, 0).astype(np.float32)
    return TrainingVolume(field, label, observed, subject=name,
                          sources={"noise_ppm": round(noise, 6), "erosion": k})


def training_volumes(recipe: Recipe):
    """Yield the recipe's training volumes one at a time (brains, then source phantoms)."""
    from ..data.synthetic import make_brain_phantom, make_source_phantom

    root = np.random.SeedSequence(recipe.seed)
    seeds = root.spawn(recipe.n_brains + recipe.n_sources)
    for i in range(recipe.n_brains):
        rng = np.random.default_rng(seeds[i])
        ph = make_brain_phantom(recipe.brain_shape, rng=rng)
        yield _make_pair(ph.chi, ph.mask, rng, recipe, f"brain-{i:03d}")
    for j in range(recipe.n_sources):
        rng = np.random.default_rng(seeds[recipe.n_brains + j])
        ph = make_source_phantom(recipe.source_shape, rng=rng)
        mask = _ellipsoid_mask(recipe.source_shape, rng) if rng.uniform() < 0.5 else ph.mask
        yield _make_pair(ph.chi, mask, rng, recipe, f"sources-{j:03d}")


def validation_volumes(recipe: Recipe):
    """Whole held-out brains (seeds disjoint from training) for validation during training."""
    from ..data.synthetic import make_brain_phantom
    from .trainer import ValidationVolume

    out = []
    for i in range(recipe.n_validation):
        rng = np.random.default_rng([recipe.seed, 999_000 + i])
        ph = make_brain_phantom(recipe.brain_shape, rng=rng)
        pair = _make_pair(ph.chi, ph.mask, rng, recipe, f"val-{i}")
        out.append(ValidationVolume(pair.subject, pair.field, pair.chi, pair.mask))
    return out


def run_recipe(out_dir: str, recipe: Recipe, *, resume: bool = False, max_steps: int = 0,
               threads: int | None = None, device: str = "cpu") -> str:
    """Make (or reuse) the patch store, then train; returns the model path."""
    from .patches import extract_patches, read_store_info
    from .trainer import TrainingConfig, train

    os.makedirs(out_dir, exist_ok=True)
    store = os.path.join(out_dir, f"patches-{recipe.data_hash()}.h5")
    try:
        info = read_store_info(store)
        LOGGER.info("reusing the patch store %s (%d patches)", store, info.n_patches)
    except (ValueError, FileNotFoundError, OSError):
        LOGGER.info("generating %d brain and %d source phantoms → %s", recipe.n_brains,
                    recipe.n_sources, store)
        info = extract_patches(training_volumes(recipe), store, patch_size=recipe.patch_size,
                               max_stride=recipe.max_stride,
                               min_mask_fraction=recipe.min_mask_fraction, progress=True)
    with open(os.path.join(out_dir, "recipe.json"), "w") as fh:
        json.dump(asdict(recipe), fh, indent=2, default=list)
    cfg = TrainingConfig(
        patches=store, out_dir=os.path.join(out_dir, "train"), architecture=recipe.architecture,
        name="default", batch_size=recipe.batch_size, learning_rate=recipe.learning_rate,
        lr_decay=recipe.lr_decay, lr_decay_steps=recipe.lr_decay_steps, epochs=recipe.epochs,
        save_step=1, w_model=recipe.w_model, w_grad=recipe.w_grad, seed=recipe.seed,
        device=device, channels_last=recipe.channels_last, val_every=1,
        checkpoint_every_steps=100, resume=resume,
        max_steps=max_steps, threads=threads, log_every=10,
        training_info={"recipe": asdict(recipe),
                       "command": "python -m bids_qsmnet.training.default_recipe "
                                  + " ".join(sys.argv[1:]),
                       "data": "synthetic brain-like and random-source phantoms "
                               "(bids_qsmnet.data.synthetic), see MODEL_CARD.md"},
        inference_defaults={"dc_lambda": recipe.dc_lambda,
                            "dc_iterations": recipe.dc_iterations})
    t0 = time.time()
    result = train(cfg, validation_volumes(recipe))
    LOGGER.info("default-model training took %.0f s this run", time.time() - t0)
    return result.model_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bids_qsmnet.training.default_recipe",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="runs/default")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-channels-last", action="store_true",
                   help="contiguous layout (how epochs 1-6 of the shipped model were trained)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    recipe = Recipe()
    if args.epochs:
        recipe.epochs = args.epochs
    if args.no_channels_last:
        recipe.channels_last = False
    print(run_recipe(args.out_dir, recipe, resume=args.resume, max_steps=args.max_steps,
                     threads=args.threads, device=args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
