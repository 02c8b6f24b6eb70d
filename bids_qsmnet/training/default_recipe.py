"""The recipe of the shipped default model: synthetic training data → patches → training.

One seeded command trains a default model, in three stages (a fourth on request)::

    python -m bids_qsmnet.training.default_recipe --out-dir runs/default            # CPU
    python -m bids_qsmnet.training.default_recipe --out-dir runs/gpu --preset gpu \
        --device cuda --workers 15 --loader-workers 6                             # GPU

Stage 1 trains the network from scratch on brain-like and random-source phantoms
(``OUT/train``); stage 2 fine-tunes stage 1's last weights on other phantoms whose χ maps were
blurred and given smooth textures (``OUT/finetune``), so that smooth tissue contrast is not
shrunk; stage 3 fine-tunes stage 2's last weights on brains whose field went through the app's
own phase chain (simulated multi-echo GRE in a head → magnitude mask → echo fit → V-SHARP),
mixed with exact-field phantoms (``OUT/chain``), so that the errors background removal leaves
in a real field do not throw the network (see below); stage 4 fine-tunes stage 3's last
weights (or ``--from-model``) on brains whose anatomy comes from a real image, the INIA19
primate template (``OUT/tissue``), so that the broad grey/white contrast of a real brain is
not shrunk.  ``--stage N`` runs one of them, and
``--resume`` continues an interrupted run (a patch store is reused when its part of the recipe
is unchanged, and training resumes from the stage's ``checkpoint.pt``).

``--preset cpu`` (the default) fits a working session on a 2-core CPU (the ``qsmnet-slim``
network, 6 + 2 + 2 epochs); ``--preset gpu`` is the recipe of the shipped weights: 6.4 (stage
1), 3.2 (stage 2) and 2 (stage 3, chain brains) times the data of ``cpu``, batch 8, the 2.25x
wider ``qsmnet-mid`` network and stage 3 on 96³ patches for 3 epochs.  Its stages took about
17 minutes of GPU time (stages 1-2 on an NVIDIA H200, stage 3 on an H100) with 15 processes
simulating the data, sharing the GPU with a second run (``MODEL_CARD.md``)::

    python -m bids_qsmnet.training.default_recipe --out-dir runs/gpu --preset gpu \
        --device cuda --workers 15 --loader-workers 6

Every stage keeps an exponential moving average of its weights (``ema_decay``,
``ft_ema_decay``, ``chain_ema_decay``) and validates and saves that: with the last weights,
validation NRMSE swung by 3-8 points from epoch to epoch; with the average it falls steadily.

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
* **Stage 2, smoothness variety** (:func:`smooth_variety`): the stage-1 network shrank smooth
  contrast — the same held-out brain blurred by a 1 mm (2 mm) Gaussian came out at NRMSE 51 %
  (83 %) instead of 33 %, with regression slope 0.69 (0.35), and the real cortical folding of
  the MNI152 template (smooth partial-volume maps) at half its grey/white contrast.  Real
  brains at 1 mm are smooth in places (partial volume, iron and myelin gradients), so stage 2
  blurs 60 % of the χ maps by σ = 0.4-2 mm (a normalised convolution inside the mask) and adds
  a smooth Gaussian texture (4-15 ppb, 2-10 mm correlation length) to half of them before
  the field is simulated, on 30 new brains and 30 new source phantoms.
* **Stage 3, the phase chain** (:func:`_chain_field`): on a brain simulated as raw GRE (the
  accuracy benchmark's tuning brain), V-SHARP leaves a smooth error of 0.018 ppm rms in the
  local field (0.008 ppm 10 mm inside the mask), as large as the local field itself and not a
  low-order polynomial, against the 1-4 ppb polynomial residual of stages 1-2.  Networks
  trained on exact fields map it to χ errors that differ wildly between training runs (the
  network alone: NRMSE 58-85 % on that brain against 25-31 % from its exact field).  Stage 3
  simulates 16 brains (32 in ``--preset gpu``; with stage 2's smoothness variety and
  linearity) as 3-5-echo GRE (first echo 3-6 ms, spacing 5-9 ms, SNR 20-100) in a head with
  skull, scalp and, in 70 %, an air sinus, and runs the app's chain on them (magnitude mask,
  Laplacian unwrapping and echo fit, V-SHARP); the label is χ in the V-SHARP mask (zero in
  CSF outside the brain).  8 brains and 8 source phantoms with exact fields keep the other
  stages' inputs in the mix.
* **Stage 4, real-anatomy structure** (:mod:`bids_qsmnet.data.texture`): the procedural
  brains keep their energy in veins, nuclei and haemorrhages; real brains in the broad
  contrast of folded grey matter against white matter.  On the MNI152 anatomy (evaluation
  only) the stage-3 network alone keeps 42 % of the truth below 0.02 /mm and 60 % at
  0.02-0.05 /mm (slope 0.62).  Stage 4 draws brains from the INIA19 primate template (random
  geometry, tissue values, regions, iron and texture) with stage 2's variety (blur in
  ``tissue_p_blur`` of them) and the usual field model, plus procedural brains and sources,
  on 64³ patches, and validates on the MNI152 anatomy's exact field.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

LOGGER = logging.getLogger(__name__)

__all__ = ["Recipe", "set_fields", "training_volume", "training_volumes", "validation_volumes",
           "run_recipe", "main"]


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
    #: 6 + 2 + 2 epochs: the whole recipe fits a 3-hour working session on a 2-core CPU
    epochs: int = 6
    w_model: float = 5.0
    w_grad: float = 0.1
    dc_lambda: float = 0.0
    dc_iterations: int = 30
    #: decay per step of the weight average that is validated and saved (0: the last weights):
    #: the last weights swung by 3-8 points of validation NRMSE from epoch to epoch; the
    #: average spans ~1 / (1 - decay) steps (stage 1: ~1000, stage 2: ~500, stage 3: ~200)
    ema_decay: float = 0.999
    #: channels-last 3-D layout: 1.4x faster CPU training steps (docs/benchmarks.md); the
    #: same function, different float rounding (epochs 1-6 of the shipped model ran without)
    channels_last: bool = True
    n_validation: int = 1
    # ---- stage 2: fine-tuning for smoothness and texture variety (see the module docstring)
    ft_seed: int = 20261126
    ft_brains: int = 30
    ft_sources: int = 30
    #: probability and range (mm, Gaussian σ) of blurring a volume's χ before simulating it
    p_blur: float = 0.6
    blur_sigma_mm: tuple = (0.4, 2.0)
    #: probability, amplitude (ppm, std) and length scale (mm) of a smooth χ texture
    p_texture: float = 0.5
    texture_ppm: tuple = (0.004, 0.015)
    texture_mm: tuple = (2.0, 10.0)
    ft_epochs: int = 2
    ft_learning_rate: float = 3e-4
    ft_ema_decay: float = 0.998
    # ---- stage 3: fine-tuning on fields made by the app's own phase chain (see the docstring)
    chain_seed: int = 20261127
    #: brains whose field goes through simulated GRE → mask → echo fit → V-SHARP
    chain_brains: int = 16
    #: brains and source phantoms with stage 2's exact fields, so those are not forgotten
    chain_plain_brains: int = 8
    chain_sources: int = 8
    #: first-echo SNR range of the simulated GRE (log-uniform)
    chain_snr: tuple = (20.0, 100.0)
    #: 2: on 48³ patches a third epoch (trained once) was worse on all three validation
    #: volumes; on 96³ patches (``--preset gpu``) the third was the best on all three
    chain_epochs: int = 2
    #: edge (voxels) of stage 3's patches: more context around large sources (a haemorrhage's
    #: dipole field reaches well beyond a 48³ patch)
    chain_patch_size: int = 48
    #: erosion (mm) of the magnitude mask in the chain; the app's own default is
    #: :data:`bids_qsmnet.phase.chain.MASK_ERODE_MM`, the shipped weights were made with 0
    chain_mask_erode_mm: float = 0.0
    chain_learning_rate: float = 2e-4
    chain_ema_decay: float = 0.995
    # ---- stage 4: fine-tuning on real-anatomy structure (see the module docstring)
    tissue_seed: int = 20261207
    #: brains made from the INIA19 primate template (:mod:`bids_qsmnet.data.texture`)
    tissue_brains: int = 32
    #: procedural brains and source phantoms, so veins and strong sources are not forgotten
    tissue_plain_brains: int = 8
    tissue_sources: int = 8
    #: probability of blurring a volume's χ in stage 4 (stages 2-3: ``p_blur``)
    tissue_p_blur: float = 0.3
    tissue_patch_size: int = 64
    tissue_epochs: int = 2
    tissue_learning_rate: float = 2e-4
    tissue_ema_decay: float = 0.995
    extra: dict = field(default_factory=dict)

    def _hash(self, keys, previous: dict | None = None) -> str:
        """16 hex digits of the sha256 of these fields (and of ``previous`` stages' hashes)."""
        blob = json.dumps({**(previous or {}), **{k: getattr(self, k) for k in keys}},
                          sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def data_hash(self) -> str:
        """Hash of everything that determines the stage-1 patch store."""
        return self._hash(("seed", "n_brains", "brain_shape", "n_sources", "source_shape",
                           "max_erosion", "noise_ppm", "background_ppm", "p_background",
                           "p_linearity", "linearity_range", "patch_size", "max_stride",
                           "min_mask_fraction"))

    def finetune_hash(self) -> str:
        """Hash of everything that determines the stage-2 patch store."""
        return self._hash(("ft_seed", "ft_brains", "ft_sources", "p_blur", "blur_sigma_mm",
                           "p_texture", "texture_ppm", "texture_mm"),
                          {"stage1": self.data_hash()})

    def chain_hash(self) -> str:
        """Hash of everything that determines the stage-3 patch store."""
        keys = ("chain_seed", "chain_brains", "chain_plain_brains", "chain_sources", "chain_snr")
        if self.chain_patch_size != self.patch_size:  # (stores made before the field existed)
            keys += ("chain_patch_size",)
        if self.chain_mask_erode_mm:  # (likewise)
            keys += ("chain_mask_erode_mm",)
        return self._hash(keys, {"stage2": self.finetune_hash()})

    def tissue_hash(self) -> str:
        """Hash of everything that determines the stage-4 patch store (its volumes do not
        depend on the earlier stages' data)."""
        return self._hash(("tissue_seed", "tissue_brains", "tissue_plain_brains",
                           "tissue_sources", "tissue_p_blur", "tissue_patch_size",
                           "brain_shape", "source_shape", "max_erosion", "noise_ppm",
                           "background_ppm", "p_background", "p_linearity", "linearity_range",
                           "p_texture", "texture_ppm", "texture_mm", "blur_sigma_mm",
                           "max_stride", "min_mask_fraction"))


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


def smooth_variety(chi, mask, rng, recipe: Recipe, *, voxel_size=(1.0, 1.0, 1.0)):
    """Stage 2's augmentation of a phantom's χ (ppm): with probability ``p_texture`` a smooth
    Gaussian random texture (std ``texture_ppm``, correlation length ``texture_mm``) is added
    inside the mask, and with probability ``p_blur`` the map is blurred by a Gaussian of
    ``blur_sigma_mm`` (partial volume, smooth tissue boundaries; a normalised convolution
    that averages brain voxels only).  The field is simulated from
    the result afterwards, so label and field stay exactly consistent.  Returns
    ``(chi, info)``."""
    from scipy import ndimage as ndi

    from ..data.synthetic import _noise_field

    info = {}
    chi = np.where(mask, chi, 0).astype(np.float32)
    if rng.uniform() < recipe.p_texture:
        amp = float(rng.uniform(*recipe.texture_ppm))
        length = float(rng.uniform(*recipe.texture_mm))
        tex = _noise_field(chi.shape, voxel_size, rng, length)
        chi = np.where(mask, chi + np.float32(amp) * tex, 0).astype(np.float32)
        info.update(texture_ppm=round(amp, 4), texture_mm=round(length, 2))
    if rng.uniform() < recipe.p_blur:
        sigma = float(rng.uniform(*recipe.blur_sigma_mm))
        # normalised convolution: the blur averages brain voxels only, so χ does not fade
        # towards the mask's edge
        sig = [sigma / v for v in voxel_size]
        weight = ndi.gaussian_filter(mask.astype(np.float32), sig, mode="constant")
        chi = ndi.gaussian_filter(chi, sig, mode="constant") / np.maximum(weight, 1e-3)
        chi = np.where(mask, chi, 0).astype(np.float32)
        info["blur_mm"] = round(sigma, 2)
    return chi, info


def _chain_field(chi, brain, rng, recipe: Recipe):
    """The local field the app's phase chain makes of ``chi`` (stage 3): a multi-echo GRE of the
    brain in a head (:func:`~bids_qsmnet.data.megre.simulate_megre`: skull, scalp, air, sinus,
    shim, phase offset, complex noise) → brain mask from the magnitude → Laplacian unwrapping and
    echo fit → V-SHARP (:func:`~bids_qsmnet.phase.chain.run_phase_chain`), the steps
    ``bids_qsmnet … participant`` runs.  Returns
    ``(field, mask, info)``: the V-SHARP local field (ppm) and mask."""
    from ..data.megre import simulate_megre
    from ..phase.chain import run_phase_chain

    vs = (1.0, 1.0, 1.0)
    n_echo = int(rng.integers(3, 6))
    te1, dte = float(rng.uniform(0.003, 0.006)), float(rng.uniform(0.005, 0.009))
    tes = tuple(te1 + dte * np.arange(n_echo))
    snr = float(np.exp(rng.uniform(*np.log(recipe.chain_snr))))
    background = "head" if rng.uniform() < 0.7 else "head-no-cavity"
    sim = simulate_megre(chi, brain, voxel_size=vs, b0_tesla=3.0, echo_times=tes, snr=snr,
                         rng=rng, background=background)
    res = run_phase_chain(sim.phase, sim.magnitude, sim.echo_times, b0_strength=3.0,
                          voxel_size=vs, mask_erode_mm=recipe.chain_mask_erode_mm)
    info = {"chain_snr": round(snr, 1), "echoes": n_echo, "te1_ms": round(1e3 * te1, 2),
            "dte_ms": round(1e3 * dte, 2), "background": background}
    return res.local_field, res.mask, info


def _make_pair(chi, mask, rng, recipe: Recipe, name: str, *, variety: bool = False,
               chain: bool = False):
    """Observed local field and label for one phantom (see the module docstring); with
    ``variety`` (stages 2 and 3) :func:`smooth_variety` first; with ``chain`` (stage 3) the
    field is what the app's phase chain makes of a simulated GRE (:func:`_chain_field`)
    instead of the exact local field with noise and a polynomial residual."""
    from ..data.synthetic import erode_mask, simulate_local_field
    from .patches import TrainingVolume

    extra = {}
    if variety:
        chi, extra = smooth_variety(chi, mask, rng, recipe)
    chi = np.where(mask, chi, 0).astype(np.float32)
    if rng.uniform() < recipe.p_linearity:
        factor = rng.uniform(*recipe.linearity_range)
        chi = np.where(chi > 0, chi * factor, chi).astype(np.float32)
    if chain:
        field, observed, info = _chain_field(chi, mask, rng, recipe)
        # χ is zero (water-like CSF) in mask voxels outside the brain, as in the head model
        return TrainingVolume(field, np.where(observed & mask, chi, 0).astype(np.float32),
                              observed, subject=name, sources={**info, **extra})
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
                          sources={"noise_ppm": round(noise, 6), "erosion": k, **extra})


def _stage_plan(recipe: Recipe, stage: int):
    """(seed, number of brains, number of source phantoms, name prefix) of a stage."""
    if stage == 1:
        return recipe.seed, recipe.n_brains, recipe.n_sources, ""
    if stage == 2:
        return recipe.ft_seed, recipe.ft_brains, recipe.ft_sources, "ft-"
    if stage == 3:
        return (recipe.chain_seed, recipe.chain_brains + recipe.chain_plain_brains,
                recipe.chain_sources, "chain-")
    if stage == 4:
        return (recipe.tissue_seed, recipe.tissue_brains + recipe.tissue_plain_brains,
                recipe.tissue_sources, "tissue-")
    raise ValueError(f"the recipe has stages 1, 2, 3 and 4, not {stage}")


def training_volume(recipe: Recipe, stage: int, index: int):
    """Training volume ``index`` of a stage (brains first, then source phantoms; in stage 3
    the first ``chain_brains`` brains go through the phase chain; in stage 4 the first
    ``tissue_brains`` brains are made from the INIA19 template).

    Each volume draws from its own child of the stage's ``SeedSequence``, so a volume is the
    same whether it is made alone, in order, or in a worker process."""
    from ..data.synthetic import make_brain_phantom, make_source_phantom

    seed, n_brains, n_sources, prefix = _stage_plan(recipe, stage)
    if not 0 <= index < n_brains + n_sources:
        raise IndexError(f"stage {stage} has {n_brains + n_sources} volumes, not {index + 1}")
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(n_brains + n_sources)[index])
    if stage == 4:
        recipe = replace(recipe, p_blur=recipe.tissue_p_blur)
        if index < recipe.tissue_brains:
            from ..data.texture import texture_phantom

            chi, mask = texture_phantom(recipe.brain_shape, rng)
            return _make_pair(chi, mask, rng, recipe, f"{prefix}template-{index:03d}",
                              variety=True)
    if index < n_brains:
        ph = make_brain_phantom(recipe.brain_shape, rng=rng)
        return _make_pair(ph.chi, ph.mask, rng, recipe, f"{prefix}brain-{index:03d}",
                          variety=stage >= 2, chain=stage == 3 and index < recipe.chain_brains)
    ph = make_source_phantom(recipe.source_shape, rng=rng)
    mask = _ellipsoid_mask(recipe.source_shape, rng) if rng.uniform() < 0.5 else ph.mask
    return _make_pair(ph.chi, mask, rng, recipe, f"{prefix}sources-{index - n_brains:03d}",
                      variety=stage >= 2)


def training_volumes(recipe: Recipe, *, stage: int = 1, workers: int = 1):
    """Yield the recipe's training volumes one at a time, in order (brains, then source
    phantoms): stage 1's, stage 2's (other seeds, with :func:`smooth_variety`) or stage 3's
    (other seeds again; most brains through the phase chain).

    ``workers`` > 1 simulates them in that many processes (at most ``2 × workers`` volumes
    ahead of the consumer, so memory stays bounded); the volumes are identical to the serial
    ones (:func:`training_volume`)."""
    _, n_brains, n_sources, _ = _stage_plan(recipe, stage)
    n = n_brains + n_sources
    if workers <= 1:
        for i in range(n):
            yield training_volume(recipe, stage, i)
        return
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")  # no forked torch/BLAS thread state
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        pending = deque()
        nxt = 0
        while nxt < n or pending:
            while nxt < n and len(pending) < 2 * workers:
                pending.append(pool.submit(training_volume, recipe, stage, nxt))
                nxt += 1
            yield pending.popleft().result()


def validation_volumes(recipe: Recipe, *, stage: int = 1):
    """Whole held-out brains (seeds disjoint from training) for validation during training;
    stage 2 adds a smooth copy of each (blurred by 1.2 mm, with a 0.01 ppm texture), stage 3
    also the field the phase chain makes of it (simulated GRE → V-SHARP)."""
    from dataclasses import replace

    from ..data.synthetic import make_brain_phantom
    from .trainer import ValidationVolume

    out = []
    smooth = replace(recipe, p_blur=1.0, blur_sigma_mm=(1.2, 1.2), p_texture=1.0,
                     texture_ppm=(0.01, 0.01), texture_mm=(5.0, 5.0))
    for i in range(recipe.n_validation):
        rng = np.random.default_rng([recipe.seed, 999_000 + i])
        ph = make_brain_phantom(recipe.brain_shape, rng=rng)
        pair = _make_pair(ph.chi, ph.mask, rng, recipe, f"val-{i}")
        out.append(ValidationVolume(pair.subject, pair.field, pair.chi, pair.mask))
        if stage >= 2:
            rng = np.random.default_rng([recipe.seed, 999_500 + i])
            pair = _make_pair(ph.chi, ph.mask, rng, smooth, f"val-{i}-smooth", variety=True)
            out.append(ValidationVolume(pair.subject, pair.field, pair.chi, pair.mask))
        if stage >= 3:
            rng = np.random.default_rng([recipe.seed, 999_700 + i])
            plain = replace(recipe, p_linearity=0.0, p_blur=0.0, p_texture=0.0)
            pair = _make_pair(ph.chi, ph.mask, rng, plain, f"val-{i}-chain", chain=True)
            out.append(ValidationVolume(pair.subject, pair.field, pair.chi, pair.mask))
    return out


def anatomy_validation_volumes(recipe: Recipe):
    """Stage 4's validation: the MNI152 anatomy's exact field with 1 ppb noise
    (:mod:`bids_qsmnet.data.anatomy`, never used in training; its truth less its in-mask
    mean, which no field determines), then stage 1's held-out procedural brain."""
    from ..data.anatomy import anatomy_phantom
    from ..data.evaluation import make_case
    from .trainer import ValidationVolume

    case = make_case(anatomy_phantom("mni152"), "exact", seed=recipe.tissue_seed)
    m = case["mask"]
    chi = np.where(m, case["chi"] - case["chi"][m].mean(), 0).astype(np.float32)
    return [ValidationVolume("mni152", case["field"], chi, m), *validation_volumes(recipe)]


def _patch_store(path: str, volumes, recipe: Recipe, what: str, *, patch_size: int = 0):
    from .patches import extract_patches, read_store_info

    try:
        info = read_store_info(path)
        LOGGER.info("reusing the patch store %s (%d patches)", path, info.n_patches)
    except (ValueError, FileNotFoundError, OSError):
        LOGGER.info("generating %s → %s", what, path)
        info = extract_patches(volumes, path, patch_size=patch_size or recipe.patch_size,
                               max_stride=recipe.max_stride,
                               min_mask_fraction=recipe.min_mask_fraction, progress=True)
    return info


def run_recipe(out_dir: str, recipe: Recipe, *, resume: bool = False, max_steps: int = 0,
               threads: int | None = None, device: str = "cpu",
               stages: tuple = (1, 2, 3), workers: int = 1, loader_workers: int = 0,
               amp: bool = False, from_model: str | None = None) -> str:
    """Make (or reuse) the patch stores, then train stage 1 into ``out_dir/train``, fine-tune
    it (stage 2) into ``out_dir/finetune``, (stage 3) into ``out_dir/chain`` and (stage 4) into
    ``out_dir/tissue``; returns the last stage's model path.

    ``from_model``: the model file stage 4 starts from (default: stage 3's last one), e.g. the
    shipped default, which is stage 3 of ``--preset gpu``.

    ``workers``: processes that simulate the training volumes (same volumes for any number);
    ``loader_workers``: DataLoader processes reading patches; ``amp``: bf16 autocast (CUDA).
    None of them changes the data; ``amp`` changes the float rounding of training."""
    from .trainer import TrainingConfig, train

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "recipe.json"), "w") as fh:
        json.dump(asdict(recipe), fh, indent=2, default=list)
    common = dict(architecture=recipe.architecture, name="default",
                  batch_size=recipe.batch_size, lr_decay=recipe.lr_decay,
                  lr_decay_steps=recipe.lr_decay_steps, save_step=1, w_model=recipe.w_model,
                  w_grad=recipe.w_grad, seed=recipe.seed, device=device,
                  channels_last=recipe.channels_last, val_every=1,
                  checkpoint_every_steps=100, resume=resume, max_steps=max_steps,
                  threads=threads, log_every=10, num_workers=loader_workers, amp=amp,
                  inference_defaults={"dc_lambda": recipe.dc_lambda,
                                      "dc_iterations": recipe.dc_iterations})
    info = {"recipe": asdict(recipe),
            "command": "python -m bids_qsmnet.training.default_recipe " + " ".join(sys.argv[1:]),
            "data": "synthetic brain-like and random-source phantoms "
                    "(bids_qsmnet.data.synthetic), see MODEL_CARD.md"}
    stage1_model = os.path.join(out_dir, "train", f"model_epoch-{recipe.epochs:03d}.safetensors")
    stage2_model = os.path.join(out_dir, "finetune",
                                f"model_epoch-{recipe.ft_epochs:03d}.safetensors")
    model_path = stage1_model
    if 1 in stages:
        store = os.path.join(out_dir, f"patches-{recipe.data_hash()}.h5")
        _patch_store(store, training_volumes(recipe, workers=workers), recipe,
                     f"{recipe.n_brains} brain and {recipe.n_sources} source phantoms")
        cfg = TrainingConfig(patches=store, out_dir=os.path.join(out_dir, "train"),
                             learning_rate=recipe.learning_rate, epochs=recipe.epochs,
                             ema_decay=recipe.ema_decay, training_info={**info, "stage": 1},
                             **common)
        t0 = time.time()
        model_path = train(cfg, validation_volumes(recipe)).model_path
        LOGGER.info("stage 1 (%d epochs) took %.0f s this run", recipe.epochs, time.time() - t0)
    if 2 in stages:
        if not os.path.exists(stage1_model):
            raise FileNotFoundError(f"stage 2 starts from stage 1's {stage1_model}, which "
                                    "does not exist: run stage 1 first")
        store = os.path.join(out_dir, f"patches-ft-{recipe.finetune_hash()}.h5")
        _patch_store(store, training_volumes(recipe, stage=2, workers=workers), recipe,
                     f"{recipe.ft_brains} brain and {recipe.ft_sources} source phantoms with "
                     "smoothness and texture variety")
        cfg = TrainingConfig(patches=store, out_dir=os.path.join(out_dir, "finetune"),
                             learning_rate=recipe.ft_learning_rate, epochs=recipe.ft_epochs,
                             ema_decay=recipe.ft_ema_decay, init_model=stage1_model,
                             training_info={**info, "stage": 2},
                             **common)
        t0 = time.time()
        model_path = train(cfg, validation_volumes(recipe, stage=2)).model_path
        LOGGER.info("stage 2 (%d epochs) took %.0f s this run", recipe.ft_epochs,
                    time.time() - t0)
    if 3 in stages:
        if not os.path.exists(stage2_model):
            raise FileNotFoundError(f"stage 3 starts from stage 2's {stage2_model}, which "
                                    "does not exist: run stage 2 first")
        store = os.path.join(out_dir, f"patches-chain-{recipe.chain_hash()}.h5")
        _patch_store(store, training_volumes(recipe, stage=3, workers=workers), recipe,
                     f"{recipe.chain_brains} brains through the phase chain, "
                     f"{recipe.chain_plain_brains} brain and {recipe.chain_sources} source "
                     f"phantoms with exact fields, patches of {recipe.chain_patch_size}³",
                     patch_size=recipe.chain_patch_size)
        cfg = TrainingConfig(patches=store, out_dir=os.path.join(out_dir, "chain"),
                             learning_rate=recipe.chain_learning_rate,
                             epochs=recipe.chain_epochs, ema_decay=recipe.chain_ema_decay,
                             init_model=stage2_model,
                             training_info={**info, "stage": 3}, **common)
        t0 = time.time()
        model_path = train(cfg, validation_volumes(recipe, stage=3)).model_path
        LOGGER.info("stage 3 (%d epochs) took %.0f s this run", recipe.chain_epochs,
                    time.time() - t0)
    if 4 in stages:
        model_path = _stage4(out_dir, recipe, common, info, workers=workers,
                             init=from_model or os.path.join(
                                 out_dir, "chain",
                                 f"model_epoch-{recipe.chain_epochs:03d}.safetensors"))
    return model_path


def _stage4(out_dir, recipe: Recipe, common: dict, info: dict, *, workers: int, init: str):
    from ..models.modelfile import file_sha256
    from .trainer import TrainingConfig, train

    if not os.path.exists(init):
        raise FileNotFoundError(f"stage 4 starts from {init}, which does not exist: run "
                                "stage 3 first or give --from-model")
    store = os.path.join(out_dir, f"patches-tissue-{recipe.tissue_hash()}.h5")
    _patch_store(store, training_volumes(recipe, stage=4, workers=workers), recipe,
                 f"{recipe.tissue_brains} INIA19-template brains, {recipe.tissue_plain_brains} "
                 f"procedural brains and {recipe.tissue_sources} source phantoms, patches of "
                 f"{recipe.tissue_patch_size}³", patch_size=recipe.tissue_patch_size)
    cfg = TrainingConfig(patches=store, out_dir=os.path.join(out_dir, "tissue"),
                         learning_rate=recipe.tissue_learning_rate,
                         epochs=recipe.tissue_epochs, ema_decay=recipe.tissue_ema_decay,
                         init_model=init,
                         training_info={**info, "stage": 4, "init_model": os.path.basename(init),
                                        "init_model_sha256": file_sha256(init)},
                         **common)
    t0 = time.time()
    model_path = train(cfg, anatomy_validation_volumes(recipe)).model_path
    LOGGER.info("stage 4 (%d epochs) took %.0f s this run", recipe.tissue_epochs,
                time.time() - t0)
    return model_path


#: named recipe sizes (``--preset``): ``FIELD=VALUE`` changes to :class:`Recipe`'s defaults
PRESETS = {
    "cpu": (),
    # the shipped weights (stages 1-2 ran on an NVIDIA H200, stage 3 on an H100): 6.4x the
    # brains and sources of 'cpu' in stage 1, 3.2x in stage 2, 2x the chain brains of stage 3,
    # batch 8, the 2.25x wider qsmnet-mid, which a 2-core CPU cannot train in a session, and
    # stage 3 on 96³ patches for 3 epochs (8x the voxels of a 48³ patch, for the context of
    # large sources' fields; 3.5x the stage's compute)
    "gpu": ("n_brains=128", "n_sources=256", "ft_brains=96", "ft_sources=96", "epochs=6",
            "ft_epochs=2", "batch_size=8", "lr_decay_steps=480", "chain_brains=32",
            "architecture=qsmnet-mid", "chain_patch_size=96", "chain_epochs=3"),
}


def set_fields(recipe: Recipe, assignments) -> Recipe:
    """Apply ``FIELD=VALUE`` strings to ``recipe`` in place (VALUE is JSON; lists become
    tuples where the field is a tuple).  Unknown fields and values of the wrong type raise
    ``ValueError``."""
    from dataclasses import fields

    known = {f.name: f for f in fields(recipe) if f.name != "extra"}
    for item in assignments:
        name, sep, text = item.partition("=")
        if not sep or name not in known:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of "
                             f"{', '.join(sorted(known))}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text  # a bare string, e.g. architecture=qsmnet-lite
        old = getattr(recipe, name)
        if isinstance(old, tuple) and isinstance(value, list) and len(value) == len(old):
            value = tuple(value)
        elif isinstance(old, bool):
            if not isinstance(value, bool):
                raise ValueError(f"--set {item!r}: {name} takes true or false")
        elif isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(old):
            raise ValueError(f"--set {item!r}: {name} takes a {type(old).__name__} like "
                             f"{json.dumps(old, default=list)}")
        setattr(recipe, name, value)
    return recipe


def _model_file(name: str | None) -> str | None:
    """A model file path, or the shipped model of that name."""
    if name is None or os.path.exists(name):
        return name
    from ..models.modelfile import resolve_model

    return str(resolve_model(name))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bids_qsmnet.training.default_recipe",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="runs/default")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps")
    p.add_argument("--epochs", type=int, default=None,
                   help="override the recipe's stage-1 epochs")
    p.add_argument("--ft-epochs", type=int, default=None,
                   help="override the recipe's stage-2 (fine-tuning) epochs")
    p.add_argument("--stage", type=int, choices=(1, 2, 3, 4), default=None,
                   help="run only this stage (default: stages 1-3 in turn, which made the "
                        "shipped weights; stage 4 runs only when asked for)")
    p.add_argument("--from-model", default=None,
                   help="model file (or shipped name, e.g. default) that stage 4 starts from "
                        "(default: stage 3's last model file)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="recipe size: cpu (fits a session on 2 cores) or gpu (the shipped "
                        "weights: 2-6.4x the data, batch 8, qsmnet-mid; minutes on a GPU)")
    p.add_argument("--chain-epochs", type=int, default=None,
                   help="override the recipe's stage-3 epochs")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-channels-last", action="store_true",
                   help="contiguous layout (how epochs 1-6 of the shipped model were trained)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes simulating the training volumes (the data does not change)")
    p.add_argument("--loader-workers", type=int, default=0,
                   help="DataLoader processes reading patches during training")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--set", nargs="+", default=(), metavar="FIELD=VALUE",
                   help="change recipe fields (JSON values), e.g. --set n_brains=60 "
                        "epochs=16; recorded in recipe.json and the model files")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    recipe = Recipe()
    try:
        set_fields(recipe, PRESETS[args.preset])
        set_fields(recipe, args.set)
    except ValueError as exc:
        p.error(str(exc))
    if args.epochs:
        recipe.epochs = args.epochs
    if args.ft_epochs:
        recipe.ft_epochs = args.ft_epochs
    if args.chain_epochs:
        recipe.chain_epochs = args.chain_epochs
    if args.no_channels_last:
        recipe.channels_last = False
    print(run_recipe(args.out_dir, recipe, resume=args.resume, max_steps=args.max_steps,
                     threads=args.threads, device=args.device,
                     stages=(args.stage,) if args.stage else (1, 2, 3),
                     workers=args.workers, loader_workers=args.loader_workers, amp=args.amp,
                     from_model=_model_file(args.from_model)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
