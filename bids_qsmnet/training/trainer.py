"""The QSMnet trainer: Adam, step-decayed learning rate, the QSMnet loss, validation on whole
volumes, checkpoints that resume exactly, single process or DistributedDataParallel.

Defaults are the paper's (Yoon et al. 2018, MISSION.md): batch 12, lr 1e-3 × 0.95 every 600
steps, 25 epochs, a checkpoint every 5 epochs, loss L1 + 5·model + 0.1·gradient.

Exact resume
------------
The order of patches in epoch ``e`` is a deterministic function of ``(seed, e)``
(``DistributedSampler.set_epoch``), training draws no other random numbers, and a checkpoint
stores the weights, Adam's moments, the scheduler, the epoch and the number of batches done
in it, plus all RNG states.  Resuming therefore replays exactly the batches an uninterrupted
run would have seen, and on the CPU reaches the same weights.

Outputs in ``out_dir``
----------------------
``checkpoint.pt``          the resumable state (tensors and plain containers only; loaded
                           with ``torch.load(weights_only=True)``)
``model.safetensors``      the final model in the model-file format (plus
                           ``model_epoch-NNN.safetensors`` every ``save_step`` epochs)
``training_log.csv``       one row per logged step and per validation
``training_summary.json``  configuration, timings, final metrics
``loss_curves.png``        loss against step; ``validation/epoch-NNN_<name>.png`` slices
``.bids_qsmnet_training.lock``  hidden advisory lock while a run trains (one run per folder)

Every file is written under a hidden temporary name and renamed, so a run killed at any
moment leaves either the previous version or the new one; the temporaries of killed runs are
removed when the next run takes the folder's lock.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from dataclasses import field as dataclass_field
from typing import Any

import numpy as np

from ..__about__ import __version__
from ..io.atomic import atomic_output, write_json_atomic
from ..io.locks import TRAINING_LOCK as LOCK_NAME
from ..io.locks import TrainingLockedError, training_lock
from .config import TrainingConfig
from .volumes import ValidationVolume

LOGGER = logging.getLogger(__name__)

__all__ = ["TrainingConfig", "ValidationVolume", "TrainingResult", "TrainingLockedError",
           "LOCK_NAME", "train"]

#: files of a training folder
CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "training_log.csv"
MODEL_FILE = "model.safetensors"

LOG_FIELDS = ["kind", "epoch", "step", "lr", "loss", "l1", "model", "gradient", "nrmse",
              "hfen", "ssim", "name", "seconds"]


@dataclass
class TrainingResult:
    model_path: str
    checkpoint_path: str
    log_path: str
    curves_path: str | None
    epochs_done: int
    steps_done: int
    seconds: float
    final_validation: dict


# --------------------------------------------------------------------------- distributed


def _dist_env():
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def _init_distributed(world: int, device):
    import torch.distributed as dist

    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist


# --------------------------------------------------------------------------- RNG state


def _rng_state() -> dict:
    import torch

    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": np_state[0], "pos": int(np_state[2]),
                  "state": torch.from_numpy(np_state[1].astype(np.int64)),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": repr(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import ast

    import torch

    torch.set_rng_state(state["torch"])
    s = state["numpy"]
    np.random.set_state((s["key"], s["state"].numpy().astype(np.uint32), s["pos"],
                         s["has_gauss"], s["cached_gaussian"]))
    random.setstate(ast.literal_eval(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- helpers


def _architecture_config(arch):
    """Canonical UNet3d config of a registry name or a (possibly partial) config dict.

    A dict is completed with the defaults and checked here, before training starts: the model
    file needs the full config, and a bad option must not surface only when the first model
    file is written, epochs later.
    """
    from ..models.registry import architecture_config
    from ..models.unet import check_unet_config

    if not isinstance(arch, dict):
        return architecture_config(arch)
    try:
        return check_unet_config(**arch)
    except TypeError as exc:  # an unknown option
        raise ValueError(f"invalid network config {arch!r}: {exc}") from None


def _load_init_model(path: str, arch_config: dict):
    """The model file fine-tuning starts from, checked against the run's architecture."""
    from ..models.modelfile import load_model

    loaded = load_model(path)
    if json.dumps(loaded.spec.architecture, sort_keys=True) != \
            json.dumps(arch_config, sort_keys=True):
        raise ValueError(f"{path}: the initial model's architecture differs from the one "
                         "being trained; fine-tune with the same architecture")
    return loaded


def _make_spec(cfg: TrainingConfig, arch_config: dict, normalization: dict, extra: dict):
    from ..models.modelfile import ModelSpec

    training = {
        "architecture_name": cfg.architecture if isinstance(cfg.architecture, str) else None,
        "patches": os.path.basename(cfg.patches),
        "batch_size": cfg.batch_size, "learning_rate": cfg.learning_rate,
        "lr_decay": cfg.lr_decay, "lr_decay_steps": cfg.lr_decay_steps,
        "epochs": cfg.epochs, "w_model": cfg.w_model, "w_grad": cfg.w_grad, "seed": cfg.seed,
        "ema_decay": cfg.ema_decay, **cfg.training_info, **extra,
    }
    if cfg.init_model:
        training["init_model"] = os.path.basename(cfg.init_model)
    return ModelSpec(name=cfg.name, architecture=arch_config,
                     normalization={k: float(v) for k, v in normalization.items()},
                     voxel_size=[1.0, 1.0, 1.0], b0_dir=[0.0, 0.0, 1.0],
                     training=training, inference=dict(cfg.inference_defaults))


def _append_log(path: str, row: dict) -> None:
    new = not os.path.exists(path)
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=LOG_FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow({k: ("" if row.get(k) is None else row[k]) for k in LOG_FIELDS})


def _read_log(path: str) -> list[dict]:
    """The rows of a training log; a row cut short (a run killed while appending it, or a
    full disk) is left out."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [r for r in rows if None not in r and all(r.get(k) is not None for k in LOG_FIELDS)
            and r["step"].isdigit()]


def _truncate_log(path: str, step: int, *, epoch_done: bool = True) -> None:
    """Drop rows written after the checkpoint we resume from (they will be written again).

    A checkpoint taken inside an epoch (``epoch_done`` False), even at its last step, comes
    before that epoch's validation, which the resumed run repeats: its rows at ``step`` go too.
    The kept rows are written to a temporary file that replaces the log, so a run killed
    here still has its log.
    """
    rows = [r for r in _read_log(path) if int(r["step"]) < step
            or (int(r["step"]) == step and (epoch_done or r["kind"] != "val"))]
    with atomic_output(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=LOG_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)


def _atomic_torch_save(obj, path: str) -> None:
    import torch

    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def _validate(network, volumes, cfg, kernels, device, epoch, out_dir, loss_fn, norm):
    """Whole-volume validation: loss terms and NRMSE/HFEN/SSIM inside the mask."""
    import torch

    from ..inference.predict import pad_to_multiple, predict_normalised
    from ..metrics import hfen, nrmse, ssim
    from ..reports.figures import plot_validation_slices

    network.eval()
    rows = []
    for vol in volumes:
        mask = np.asarray(vol.mask, bool)
        x = np.where(mask, (vol.field - norm["input_mean"]) / norm["input_std"], 0.0)
        y = predict_normalised(network, x.astype(np.float32), multiple=network.multiple,
                               device=device)
        chi = np.where(mask, y * norm["label_std"] + norm["label_mean"], 0.0)
        lab = np.where(mask, (vol.chi - norm["label_mean"]) / norm["label_std"], 0.0)
        # loss on the padded grid, as in training (the kernel needs the padded shape)
        xp, _ = pad_to_multiple(x, network.multiple)
        yp, _ = pad_to_multiple(y, network.multiple)
        lp, _ = pad_to_multiple(lab, network.multiple)
        mp, _ = pad_to_multiple(mask.astype(np.float32), network.multiple)
        kern = kernels.get(xp.shape, vol.voxel_size, vol.b0_dir)
        with torch.inference_mode():
            t = [torch.from_numpy(np.ascontiguousarray(a, np.float32))[None, None].to(device)
                 for a in (yp, lp, xp, mp)]
            terms = loss_fn(t[0], t[1], t[2], t[3], kern, norm, w_model=cfg.w_model,
                            w_grad=cfg.w_grad)
        row = {"kind": "val", "epoch": epoch, "name": vol.name,
               "loss": float(terms["total"]),
               "l1": float(terms["l1"]),
               "model": float(terms["model"]) if cfg.w_model else None,
               "gradient": float(terms["grad"]) if cfg.w_grad else None,
               "nrmse": nrmse(chi, vol.chi, mask), "hfen": hfen(chi, vol.chi, mask),
               "ssim": ssim(chi, vol.chi, mask)}
        rows.append(row)
        os.makedirs(os.path.join(out_dir, "validation"), exist_ok=True)
        plot_validation_slices(
            chi, np.where(mask, vol.chi, 0.0),
            os.path.join(out_dir, "validation", f"epoch-{epoch:03d}_{vol.name}.png"),
            slices=cfg.display_slices,
            title=f"{vol.name}, epoch {epoch}: NRMSE {row['nrmse']:.1f} %, "
                  f"HFEN {row['hfen']:.1f} %, SSIM {row['ssim']:.3f}")
    network.train()
    return rows


# --------------------------------------------------------------------------- training


def train(cfg: TrainingConfig, validation: Sequence[ValidationVolume] = ()) -> TrainingResult:
    """Train a network of the U-Net family on a patch store; see the module docstring.

    Works unchanged under ``torchrun``: with ``WORLD_SIZE > 1`` each process trains on its
    shard of every epoch's patch order through DistributedDataParallel (gloo on the CPU,
    nccl on CUDA) and rank 0 alone logs, validates and writes files.

    Raises
    ------
    TrainingLockedError
        when another training run is writing into ``cfg.out_dir`` (rank 0 holds an advisory
        lock on the folder while it trains).
    """
    cfg.validate()
    if _dist_env()[0] != 0:  # only rank 0 writes into the folder
        return _train(cfg, validation)
    with training_lock(os.path.abspath(cfg.out_dir)):
        return _train(cfg, validation)


@dataclass(eq=False)
class _TrainingRun:
    """One training run in progress: its settings, places, network, optimiser and counters
    (``epoch`` and ``step`` done, batches done in the current epoch)."""

    cfg: TrainingConfig
    validation: Sequence[ValidationVolume]
    t_start: float
    rank: int
    world: int
    device: Any
    dist: Any
    out_dir: str
    arch_config: dict
    dataset: Any
    network: Any
    optimizer: Any
    scheduler: Any
    ema: Any
    loss_fn: Any
    model: Any = None  # the network, wrapped in DistributedDataParallel with several ranks
    sampler: Any = None
    kernels: Any = None
    steps_per_epoch: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    last_val: dict = dataclass_field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def use_amp(self) -> bool:
        return bool(self.cfg.amp and _native_bf16(self.device))

    @property
    def norm(self) -> dict:
        return self.dataset.normalization

    @property
    def shipped(self):
        """The weights that are validated and written to model files: the average when kept."""
        return self.network if self.ema is None else self.ema.module

    def path(self, name: str) -> str:
        return os.path.join(self.out_dir, name)

    def checkpoint(self, epoch_done: int, batch_done: int) -> None:
        """Write the resumable state (rank 0) at ``epoch_done`` epochs and ``batch_done``
        batches of the next."""
        if not self.is_main:
            return
        state = {
            "network": self.network.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "epoch": epoch_done,
            "batch_in_epoch": batch_done, "step": self.step, "rng": _rng_state(),
            "architecture": json.dumps(self.arch_config, sort_keys=True),
            "version": __version__}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        _atomic_torch_save(state, self.path(CHECKPOINT_FILE))

    def save_model_file(self, path: str, epoch_done: int) -> None:
        """Write the shipped weights as a model file (rank 0)."""
        from ..models.modelfile import save_model

        if self.is_main:
            spec = _make_spec(self.cfg, self.arch_config, self.norm,
                              {"epochs_done": epoch_done, "steps_done": self.step,
                               "world_size": self.world, "device": str(self.device)})
            save_model(path, self.shipped, spec)

    def run_validation(self, epoch_label: int) -> dict:
        """Validate the shipped weights on every validation volume, log and return the
        metrics (name → loss, NRMSE, HFEN, SSIM)."""
        rows = _validate(self.shipped, self.validation, self.cfg, self.kernels, self.device,
                         epoch_label, self.out_dir, self.loss_fn, self.norm)
        for r in rows:
            r["step"] = self.step
            _append_log(self.path(LOG_FILE), r)
            LOGGER.info("validation %s, epoch %d: loss %.5f, NRMSE %.1f %%, HFEN %.1f %%, "
                        "SSIM %.3f", r["name"], epoch_label, r["loss"], r["nrmse"], r["hfen"],
                        r["ssim"])
        return {r["name"]: {k: r[k] for k in ("loss", "nrmse", "hfen", "ssim")} for r in rows}


def _select_devices(cfg: TrainingConfig):
    """``(rank, world size, device, torch.distributed)``: this process's place in a
    ``torchrun`` job (one process otherwise) and its device."""
    import torch

    from ..device import select_device

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    rank, world, local_rank = _dist_env()
    device = select_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    dist = _init_distributed(world, device)
    if cfg.amp and not _native_bf16(device) and rank == 0:
        LOGGER.warning("mixed precision (bf16) needs CUDA or a CPU with native bf16 "
                       "(AVX512-BF16 or AMX); training in fp32")
    return rank, world, device, dist


#: on the CPU, a network whose first level has at most this many channels trains fastest
#: with its convolutions alone in channels-last (batch norm, pooling and concatenation in the
#: standard layout); wider networks are faster all channels-last.  A step on a 2-core CPU
#: (``benchmarks/speed.py training --arch A --patch P --batch B --channels-last --layout
#: convolutions|whole``): toy (2 channels), 32³, batch 20: 0.40 against 0.60 s;
#: qsmnet-lite (8), 48³, batch 8: 0.86 against 0.89 s; qsmnet-slim (16), 64³, batch 8: 5.22
#: against 3.85 s
NARROW_CHANNELS = 8


def apply_memory_layout(network, arch_config: dict, device):
    """``network`` (on ``device``) in the trainer's channels-last layout: channels-last
    throughout, except that on the CPU a network of at most :data:`NARROW_CHANNELS` channels
    at its first level runs its convolutions alone channels-last."""
    import torch

    from ..models.blocks import set_convolution_layout

    network = network.to(memory_format=torch.channels_last_3d)
    if device.type == "cpu" and min(arch_config["channels"]) <= NARROW_CHANNELS:
        set_convolution_layout(network, torch.channels_last_3d)
    return network


def _native_bf16(device) -> bool:
    """Whether bf16 autocast runs natively on ``device``: CUDA, or a CPU whose oneDNN has
    bf16 kernels (elsewhere the CPU would emulate it, slower than fp32)."""
    import torch

    if device.type == "cuda":
        return True
    try:
        return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def _build_network(cfg: TrainingConfig, arch_config: dict, init, device, is_main: bool):
    """The network, seeded (the same initial weights on every rank and every rerun) or with
    the weights of the initial model, on ``device`` in the configured memory format."""
    import torch

    from ..models.registry import build_network

    torch.manual_seed(cfg.seed)
    network = build_network(arch_config)
    if init is not None:
        network.load_state_dict(init.network.state_dict())
        if is_main:
            LOGGER.info("starting from the weights and normalisation of %s (sha256 %s…)",
                        cfg.init_model, init.sha256[:16])
    network = network.to(device)
    if cfg.channels_last:
        network = apply_memory_layout(network, arch_config, device)
    return network


def _optimiser(cfg: TrainingConfig, network):
    """``(Adam, step-decay scheduler, weight average or None)``."""
    import torch

    optimizer = torch.optim.Adam(network.parameters(), lr=cfg.learning_rate)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_decay_steps,
                                                gamma=cfg.lr_decay)
    ema = None
    if cfg.ema_decay:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        # averages the batch-norm running statistics too (use_buffers), so the averaged
        # network is used as it is, with no pass over the data to re-estimate them
        ema = AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay),
                            use_buffers=True)
    return optimizer, scheduler, ema


def _load_checkpoint(run: _TrainingRun) -> None:
    """Continue from the checkpoint: weights, average, optimiser, scheduler, counters and
    RNG states; the log loses the rows written after it."""
    import pickle

    import torch

    ckpt_path = run.path(CHECKPOINT_FILE)
    try:  # tensors and plain containers only: a pickled object is refused, never run
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise ValueError(f"{ckpt_path}: not a bids_qsmnet checkpoint (it holds more than "
                         f"tensors, or is damaged): {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict) or \
            state.get("architecture") != json.dumps(run.arch_config, sort_keys=True):
        raise ValueError(f"{ckpt_path}: checkpoint is of another architecture; "
                         "use a new output folder or the same --model")
    run.network.load_state_dict(state["network"])
    if run.ema is not None:
        if "ema" not in state:
            raise ValueError(f"{ckpt_path}: checkpoint was written without a weight "
                             "average; resume with the run's own ema_decay (0)")
        run.ema.load_state_dict(state["ema"])
    elif "ema" in state:
        raise ValueError(f"{ckpt_path}: checkpoint holds a weight average; resume with the "
                         "run's own ema_decay")
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.epoch, run.batch_in_epoch, run.step = (int(state["epoch"]),
                                               int(state["batch_in_epoch"]), int(state["step"]))
    _set_rng_state(state["rng"])
    if run.is_main:
        _truncate_log(run.path(LOG_FILE), run.step, epoch_done=run.batch_in_epoch == 0)
        LOGGER.info("resuming from %s: epoch %d, batch %d, step %d", ckpt_path,
                    run.epoch + 1, run.batch_in_epoch, run.step)


def _resume_or_start_log(run: _TrainingRun) -> None:
    """Resume from the checkpoint when asked and one exists; otherwise a fresh log.  The log
    has its header at least (a run shorter than ``log_every`` still has a valid log)."""
    log_path = run.path(LOG_FILE)
    if run.cfg.resume and os.path.exists(run.path(CHECKPOINT_FILE)):
        _load_checkpoint(run)
    elif run.is_main and os.path.exists(log_path):
        os.remove(log_path)
    if run.is_main and not os.path.exists(log_path):
        with open(log_path, "w", newline="") as fh:
            csv.DictWriter(fh, fieldnames=LOG_FIELDS).writeheader()


def _start(cfg: TrainingConfig, validation: Sequence[ValidationVolume]) -> _TrainingRun:
    """Set-up: devices, data, network, optimiser, then the checkpoint or a fresh log, then
    the data-parallel wrapper, the sampler and the dipole kernels."""
    import torch
    from torch.utils.data import DistributedSampler

    from ..models.losses import qsmnet_loss
    from .dataset import KernelCache, PatchDataset

    t_start = time.perf_counter()
    rank, world, device, dist = _select_devices(cfg)
    out_dir = os.path.abspath(cfg.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    arch_config = _architecture_config(cfg.architecture)
    init = _load_init_model(cfg.init_model, arch_config) if cfg.init_model else None
    dataset = PatchDataset(cfg.patches, normalization=None if init is None
                           else dataclasses.asdict(init.spec.normalization))
    network = _build_network(cfg, arch_config, init, device, rank == 0)
    optimizer, scheduler, ema = _optimiser(cfg, network)
    run = _TrainingRun(cfg, validation, t_start, rank, world, device, dist, out_dir,
                       arch_config, dataset, network, optimizer, scheduler, ema, qsmnet_loss)
    _resume_or_start_log(run)
    run.model = network
    if world > 1:
        run.model = torch.nn.parallel.DistributedDataParallel(
            network, device_ids=[device.index] if device.type == "cuda" else None)
    run.sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                     seed=cfg.seed, drop_last=False)
    run.kernels = KernelCache(device=device)
    run.steps_per_epoch = math.ceil(math.ceil(len(dataset) / world) / cfg.batch_size)
    if run.is_main:
        LOGGER.info("training %s (%s parameters) on %d patches of %d³ from %s: %d epochs × "
                    "%d steps, batch %d, %d process(es) on %s", cfg.name,
                    f"{sum(p.numel() for p in network.parameters()):,}", len(dataset),
                    dataset.info.patch_size, cfg.patches, cfg.epochs, run.steps_per_epoch,
                    cfg.batch_size, world, device)
    return run


def _train_step(run: _TrainingRun, batch) -> list[float]:
    """One optimiser step on ``batch``; returns the loss terms (total, L1, model, gradient)
    of the whole batch over all ranks: what one process would log, and the same on every
    rank, so that a divergence stops all of them together."""
    import torch

    cfg, device = run.cfg, run.device
    x = batch["input"].to(device, non_blocking=True)
    y = batch["label"].to(device, non_blocking=True)
    m = batch["mask"].to(device, non_blocking=True)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    kern = run.kernels.batch(x.shape[-3:], batch["voxel_size"], batch["b0_dir"])
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=run.use_amp):
        pred = run.model(x)
    terms = run.loss_fn(pred.float(), y, x, m, kern, run.norm, w_model=cfg.w_model,
                        w_grad=cfg.w_grad)
    run.optimizer.zero_grad(set_to_none=True)
    terms["total"].backward()
    run.optimizer.step()
    run.scheduler.step()
    if run.ema is not None:
        run.ema.update_parameters(run.network)
    run.step += 1
    run.batch_in_epoch += 1
    values = torch.stack([terms[k].detach().float() for k in ("total", "l1", "model", "grad")])
    if run.world > 1:
        run.dist.all_reduce(values)
        values /= run.world
    values = values.tolist()
    if not math.isfinite(values[0]):
        raise FloatingPointError(f"training diverged at step {run.step} (loss {values[0]}); "
                                 "lower the learning rate")
    return values


def _log_step(run: _TrainingRun, values: list[float], bar) -> None:
    """The progress bar, a training-log row every ``log_every`` steps, and a log line every
    ten rows when there is no bar."""
    cfg = run.cfg
    loss, l1_value, model_value, grad_value = values
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
    if not run.is_main:
        return
    if run.step % cfg.log_every == 0:
        _append_log(run.path(LOG_FILE), {
            "kind": "train", "epoch": run.epoch + 1, "step": run.step,
            "lr": run.scheduler.get_last_lr()[0], "loss": loss,
            "l1": l1_value,
            "model": model_value if cfg.w_model else None,
            "gradient": grad_value if cfg.w_grad else None,
            "seconds": round(time.perf_counter() - run.t_start, 2)})
    if bar is not None and bar.disable and run.step % (cfg.log_every * 10) == 0:
        LOGGER.info("epoch %d/%d, step %d/%d: loss %.5f", run.epoch + 1, cfg.epochs,
                    run.batch_in_epoch, run.steps_per_epoch, loss)


def _progress_bar(run: _TrainingRun):
    """A tqdm bar of the epoch on rank 0 (disabled unless INFO goes to a terminal)."""
    if not run.is_main:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=run.steps_per_epoch, initial=run.batch_in_epoch, unit="step",
                desc=f"epoch {run.epoch + 1}/{run.cfg.epochs}", leave=False,
                disable=not (LOGGER.isEnabledFor(logging.INFO) and sys.stderr.isatty()))


def _run_epoch(run: _TrainingRun) -> tuple[bool, list[float]]:
    """The rest of the current epoch (from ``batch_in_epoch``), with the mid-epoch
    checkpoints; returns ``(stopped at max_steps, the batches' losses)``."""
    from torch.utils.data import DataLoader

    cfg = run.cfg
    run.sampler.set_epoch(run.epoch)
    order = list(run.sampler)[run.batch_in_epoch * cfg.batch_size:]
    loader = DataLoader(run.dataset, batch_size=cfg.batch_size, sampler=order,
                        num_workers=cfg.num_workers, pin_memory=run.device.type == "cuda",
                        persistent_workers=False)
    bar = _progress_bar(run)
    losses, stop = [], False
    for batch in loader:
        if cfg.max_steps and run.step >= cfg.max_steps:  # e.g. resumed at the step limit
            stop = True
            break
        values = _train_step(run, batch)
        losses.append(values[0])
        _log_step(run, values, bar)
        if cfg.checkpoint_every_steps and run.step % cfg.checkpoint_every_steps == 0:
            run.checkpoint(run.epoch, run.batch_in_epoch)
        if cfg.max_steps and run.step >= cfg.max_steps:
            stop = True
            break
    if bar is not None:
        bar.close()
    return stop, losses


def _end_epoch(run: _TrainingRun, seconds: float, losses: list[float]) -> None:
    """After a whole epoch: its log line, validation every ``val_every`` epochs, the epoch's
    model file and checkpoint every ``save_step`` epochs (and after the last)."""
    cfg = run.cfg
    run.epoch += 1
    run.batch_in_epoch = 0
    if run.is_main:
        LOGGER.info("epoch %d/%d: mean training loss %.5f, %.1f s, lr %.2e", run.epoch,
                    cfg.epochs, sum(losses) / max(len(losses), 1), seconds,
                    run.scheduler.get_last_lr()[0])
    if run.is_main and run.validation and cfg.val_every and (
            run.epoch % cfg.val_every == 0 or run.epoch == cfg.epochs):
        run.last_val = run.run_validation(run.epoch)
    if run.epoch % cfg.save_step == 0 or run.epoch == cfg.epochs:
        # the model file first: a run killed between the two resumes from the previous
        # checkpoint and writes this epoch's model file again
        run.save_model_file(run.path(f"model_epoch-{run.epoch:03d}.safetensors"), run.epoch)
        run.checkpoint(run.epoch, 0)
    if run.world > 1:
        run.dist.barrier()


def _write_summary(run: _TrainingRun) -> str | None:
    """The loss curves and ``training_summary.json`` of the run; returns the curves' path."""
    from ..reports.figures import plot_loss_curves

    curves = None
    rows = _read_log(run.path(LOG_FILE))
    if rows:
        curves = plot_loss_curves(rows, run.path("loss_curves.png"),
                                  title=f"{run.cfg.name}: {run.step} steps")
    seconds = time.perf_counter() - run.t_start
    summary = {"config": {k: v for k, v in asdict(run.cfg).items()},
               "architecture": run.arch_config, "normalization": run.norm,
               "patches": len(run.dataset), "epochs_done": run.epoch, "steps_done": run.step,
               "world_size": run.world, "device": str(run.device),
               "seconds_this_run": round(seconds, 1), "validation": run.last_val,
               "model": run.path(MODEL_FILE), "software_version": __version__}
    write_json_atomic(run.path("training_summary.json"), summary, sort_keys=False)
    LOGGER.info("finished %d epochs (%d steps) in %.0f s; model written to %s", run.epoch,
                run.step, seconds, run.path(MODEL_FILE))
    return curves


def _finish(run: _TrainingRun, stopped: bool) -> TrainingResult:
    """The last validation (of a time-boxed run that stopped inside an epoch), checkpoint,
    model file and summary; the end of the process group."""
    cfg = run.cfg
    curves = None
    if run.is_main and stopped and run.batch_in_epoch and run.validation and cfg.val_every:
        run.last_val = run.run_validation(run.epoch + 1)
    if run.is_main:
        run.checkpoint(run.epoch, run.batch_in_epoch)
        run.save_model_file(run.path(MODEL_FILE), run.epoch)
        curves = _write_summary(run)
    if run.world > 1:
        run.dist.barrier()
        run.dist.destroy_process_group()
    return TrainingResult(run.path(MODEL_FILE), run.path(CHECKPOINT_FILE), run.path(LOG_FILE),
                          curves, run.epoch, run.step, time.perf_counter() - run.t_start,
                          run.last_val)


def _train(cfg: TrainingConfig, validation: Sequence[ValidationVolume]) -> TrainingResult:
    cfg.validate()
    run = _start(cfg, validation)
    stopped = False
    run.network.train()
    while run.epoch < cfg.epochs and not stopped:
        t_epoch = time.perf_counter()
        stopped, losses = _run_epoch(run)
        if stopped and run.batch_in_epoch < run.steps_per_epoch:
            run.checkpoint(run.epoch, run.batch_in_epoch)
            break
        _end_epoch(run, time.perf_counter() - t_epoch, losses)
    return _finish(run, stopped)
