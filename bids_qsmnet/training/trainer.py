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


def _train(cfg: TrainingConfig, validation: Sequence[ValidationVolume]) -> TrainingResult:
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    from ..device import select_device
    from ..models.losses import qsmnet_loss
    from ..models.modelfile import save_model
    from ..models.registry import build_network
    from .dataset import KernelCache, PatchDataset

    cfg.validate()
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    rank, world, local_rank = _dist_env()
    device = select_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    dist = _init_distributed(world, device)
    is_main = rank == 0
    use_amp = bool(cfg.amp and device.type == "cuda")
    if cfg.amp and not use_amp and is_main:
        LOGGER.warning("mixed precision (bf16) is used on CUDA only; training in fp32")

    out_dir = os.path.abspath(cfg.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    log_path = os.path.join(out_dir, "training_log.csv")
    model_path = os.path.join(out_dir, "model.safetensors")

    arch_config = _architecture_config(cfg.architecture)
    init = _load_init_model(cfg.init_model, arch_config) if cfg.init_model else None
    dataset = PatchDataset(cfg.patches, normalization=None if init is None
                           else dataclasses.asdict(init.spec.normalization))
    norm = dataset.normalization
    n = len(dataset)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every rerun
    network = build_network(arch_config)
    if init is not None:
        network.load_state_dict(init.network.state_dict())
        if is_main:
            LOGGER.info("starting from the weights and normalisation of %s (sha256 %s…)",
                        cfg.init_model, init.sha256[:16])
    network = network.to(device)
    if cfg.channels_last:
        network = network.to(memory_format=torch.channels_last_3d)
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
    epoch, batch_in_epoch, step = 0, 0, 0
    if cfg.resume and os.path.exists(ckpt_path):
        import pickle

        try:  # tensors and plain containers only: a pickled object is refused, never run
            state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
            raise ValueError(f"{ckpt_path}: not a bids_qsmnet checkpoint (it holds more than "
                             f"tensors, or is damaged): {str(exc).splitlines()[0]}") from None
        if not isinstance(state, dict) or \
                state.get("architecture") != json.dumps(arch_config, sort_keys=True):
            raise ValueError(f"{ckpt_path}: checkpoint is of another architecture; "
                             "use a new output folder or the same --model")
        network.load_state_dict(state["network"])
        if ema is not None:
            if "ema" not in state:
                raise ValueError(f"{ckpt_path}: checkpoint was written without a weight "
                                 "average; resume with the run's own ema_decay (0)")
            ema.load_state_dict(state["ema"])
        elif "ema" in state:
            raise ValueError(f"{ckpt_path}: checkpoint holds a weight average; resume with the "
                             "run's own ema_decay")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        epoch, batch_in_epoch, step = (int(state["epoch"]), int(state["batch_in_epoch"]),
                                       int(state["step"]))
        _set_rng_state(state["rng"])
        if is_main:
            _truncate_log(log_path, step, epoch_done=batch_in_epoch == 0)
            LOGGER.info("resuming from %s: epoch %d, batch %d, step %d", ckpt_path,
                        epoch + 1, batch_in_epoch, step)
    elif is_main and os.path.exists(log_path):
        os.remove(log_path)  # a fresh run starts a fresh log
    if is_main and not os.path.exists(log_path):
        # the header at least: a run shorter than log_every still has a (valid) log file
        with open(log_path, "w", newline="") as fh:
            csv.DictWriter(fh, fieldnames=LOG_FIELDS).writeheader()

    model = network
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            network, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                 seed=cfg.seed, drop_last=False)
    kernels = KernelCache(device=device)
    steps_per_epoch = math.ceil(math.ceil(n / world) / cfg.batch_size)
    if is_main:
        LOGGER.info("training %s (%s parameters) on %d patches of %d³ from %s: %d epochs × "
                    "%d steps, batch %d, %d process(es) on %s", cfg.name,
                    f"{sum(p.numel() for p in network.parameters()):,}", n,
                    dataset.info.patch_size, cfg.patches, cfg.epochs, steps_per_epoch,
                    cfg.batch_size, world, device)

    def checkpoint(epoch_done: int, batch_done: int) -> None:
        if not is_main:
            return
        state = {
            "network": network.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epoch_done,
            "batch_in_epoch": batch_done, "step": step, "rng": _rng_state(),
            "architecture": json.dumps(arch_config, sort_keys=True),
            "version": __version__}
        if ema is not None:
            state["ema"] = ema.state_dict()
        _atomic_torch_save(state, ckpt_path)

    #: the weights that are validated and written to model files: the average when kept
    shipped = network if ema is None else ema.module

    def save_model_file(path: str, epoch_done: int) -> None:
        if is_main:
            spec = _make_spec(cfg, arch_config, norm,
                              {"epochs_done": epoch_done, "steps_done": step,
                               "world_size": world, "device": str(device)})
            save_model(path, shipped, spec)

    def run_validation(epoch_label: int) -> dict:
        rows = _validate(shipped, validation, cfg, kernels, device, epoch_label, out_dir,
                         qsmnet_loss, norm)
        for r in rows:
            r["step"] = step
            _append_log(log_path, r)
            LOGGER.info("validation %s, epoch %d: loss %.5f, NRMSE %.1f %%, HFEN %.1f %%, "
                        "SSIM %.3f", r["name"], epoch_label, r["loss"], r["nrmse"], r["hfen"],
                        r["ssim"])
        return {r["name"]: {k: r[k] for k in ("loss", "nrmse", "hfen", "ssim")} for r in rows}

    last_val: dict = {}
    stop = False
    network.train()
    while epoch < cfg.epochs and not stop:
        sampler.set_epoch(epoch)
        order = list(sampler)[batch_in_epoch * cfg.batch_size:]
        loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=order,
                            num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                            persistent_workers=False)
        t_epoch = time.perf_counter()
        bar = None
        if is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps_per_epoch, initial=batch_in_epoch, unit="step",
                       desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                       disable=not (LOGGER.isEnabledFor(logging.INFO)
                                    and sys.stderr.isatty()))
        sums = {"loss": 0.0, "count": 0}
        for batch in loader:
            if cfg.max_steps and step >= cfg.max_steps:  # e.g. resumed at the step limit
                stop = True
                break
            x = batch["input"].to(device, non_blocking=True)
            y = batch["label"].to(device, non_blocking=True)
            m = batch["mask"].to(device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            kern = kernels.batch(x.shape[-3:], batch["voxel_size"], batch["b0_dir"])
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                                enabled=use_amp):
                pred = model(x)
            terms = qsmnet_loss(pred.float(), y, x, m, kern, norm, w_model=cfg.w_model,
                                w_grad=cfg.w_grad)
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(network)
            step += 1
            batch_in_epoch += 1
            # the loss of the whole batch over all ranks: what one process would log, and the
            # same on every rank, so that a divergence stops all of them together
            values = torch.stack([terms[k].detach().float()
                                  for k in ("total", "l1", "model", "grad")])
            if world > 1:
                dist.all_reduce(values)
                values /= world
            loss, l1_value, model_value, grad_value = values.tolist()
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"training diverged at step {step} (loss {loss}); lower the learning rate")
            sums["loss"] += loss
            sums["count"] += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
            if is_main and step % cfg.log_every == 0:
                _append_log(log_path, {
                    "kind": "train", "epoch": epoch + 1, "step": step,
                    "lr": scheduler.get_last_lr()[0], "loss": loss,
                    "l1": l1_value,
                    "model": model_value if cfg.w_model else None,
                    "gradient": grad_value if cfg.w_grad else None,
                    "seconds": round(time.perf_counter() - t_start, 2)})
            if is_main and bar is not None and bar.disable and step % (cfg.log_every * 10) == 0:
                LOGGER.info("epoch %d/%d, step %d/%d: loss %.5f", epoch + 1, cfg.epochs,
                            batch_in_epoch, steps_per_epoch, loss)
            if cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0:
                checkpoint(epoch, batch_in_epoch)
            if cfg.max_steps and step >= cfg.max_steps:
                stop = True
                break
        if bar is not None:
            bar.close()
        if stop and batch_in_epoch < steps_per_epoch:
            checkpoint(epoch, batch_in_epoch)
            break
        epoch += 1
        batch_in_epoch = 0
        if is_main:
            LOGGER.info("epoch %d/%d: mean training loss %.5f, %.1f s, lr %.2e", epoch,
                        cfg.epochs, sums["loss"] / max(sums["count"], 1),
                        time.perf_counter() - t_epoch, scheduler.get_last_lr()[0])
        if is_main and validation and cfg.val_every and (
                epoch % cfg.val_every == 0 or epoch == cfg.epochs):
            last_val = run_validation(epoch)
        if epoch % cfg.save_step == 0 or epoch == cfg.epochs:
            # the model file first: a run killed between the two resumes from the previous
            # checkpoint and writes this epoch's model file again
            save_model_file(os.path.join(out_dir, f"model_epoch-{epoch:03d}.safetensors"), epoch)
            checkpoint(epoch, 0)
        if world > 1:
            dist.barrier()

    curves = None
    if is_main and stop and batch_in_epoch and validation and cfg.val_every:
        last_val = run_validation(epoch + 1)  # a time-boxed run still ends with a validation
    if is_main:
        checkpoint(epoch, batch_in_epoch)
        save_model_file(model_path, epoch)
        from ..reports.figures import plot_loss_curves

        rows = _read_log(log_path)
        if rows:
            curves = plot_loss_curves(rows, os.path.join(out_dir, "loss_curves.png"),
                                      title=f"{cfg.name}: {step} steps")
        seconds = time.perf_counter() - t_start
        summary = {"config": {k: v for k, v in asdict(cfg).items()},
                   "architecture": arch_config, "normalization": norm, "patches": n,
                   "epochs_done": epoch, "steps_done": step, "world_size": world,
                   "device": str(device), "seconds_this_run": round(seconds, 1),
                   "validation": last_val, "model": model_path,
                   "software_version": __version__}
        write_json_atomic(os.path.join(out_dir, "training_summary.json"), summary,
                          sort_keys=False)
        LOGGER.info("finished %d epochs (%d steps) in %.0f s; model written to %s", epoch,
                    step, seconds, model_path)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return TrainingResult(model_path, ckpt_path, log_path, curves, epoch, step,
                          time.perf_counter() - t_start, last_val)
