"""Every setting of a training run, with its default: the one source of training defaults.

The trainer, ``python -m bids_qsmnet.train``, the ``TrainQSMnet`` interface, the training
workflow and the group level of the command line take their defaults from
:class:`TrainingConfig` (:data:`TRAINING_DEFAULTS`).  Nothing heavy is imported here, so the
argument parsers that read it stay fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["ARCHITECTURE_DEFAULTS", "TrainingConfig", "TRAINING_DEFAULTS", "architecture_defaults"]


@dataclass
class TrainingConfig:
    """Every knob of training (the tutorial's ``training_params`` and more).

    Attributes
    ----------
    patches : path of the HDF5 patch store
    out_dir : folder for checkpoints, model files, logs and figures
    architecture : registry name (``toy``, ``qsmnet``, ``qsmnet+``, ``qsmnet-slim``, …) or a
        UNet3d config dict
    name : model name written into the model file
    batch_size, learning_rate, lr_decay, lr_decay_steps, epochs, save_step : paper defaults
    w_model, w_grad : weights of the model (dipole) loss and the gradient loss (0 disables)
    seed : seeds weights initialisation and the patch order
    device : "auto", "cpu" or "cuda[:N]"
    amp : use bf16 autocast (on CUDA, and on CPUs with native bf16 — AVX512-BF16 or AMX;
        elsewhere ignored with a warning)
    channels_last : channels-last-3d layout (on the CPU, for a network of at most 8 channels
        at its first level, the convolutions alone: batch norm is faster in the standard
        layout there).  Faster on CPU and CUDA; same function, other float rounding; model
        files are written contiguous
    num_workers : DataLoader worker processes
    val_every : validate every this many epochs (0: never)
    display_slices : axial slices shown in validation figures
    log_every : write a training row every this many steps
    checkpoint_every_steps : also checkpoint mid-epoch every this many steps (0: only at the
        ``save_step`` epochs and at the end)
    resume : continue from ``out_dir/checkpoint.pt`` when it exists
    max_steps : stop after this many optimiser steps in total (0: no limit; for time-boxed runs)
    threads : torch CPU threads (None: torch's default)
    training_info : free-form provenance copied into the model file (data recipe, command)
    inference_defaults : copied into the model file's ``inference`` section
    init_model : a model file to start from (fine-tuning): its weights replace the seeded
        initialisation and its normalisation constants replace the patch store's (the network
        learned its units with them); its architecture must be ``architecture``'s.  Ignored
        when a checkpoint is resumed (the checkpoint already holds the fine-tuned weights).
    ema_decay : keep an exponential moving average of the weights (and batch-norm statistics)
        with this decay per step (0: off).  Validation and every model file then use the
        average, which removes the step-to-step fluctuation of the last weights (the average
        covers about ``1 / (1 - ema_decay)`` steps); the checkpoint holds both.
    """

    patches: str
    out_dir: str
    architecture: str | dict = "qsmnet"
    name: str = "qsmnet"
    batch_size: int = 12
    learning_rate: float = 1e-3
    lr_decay: float = 0.95
    lr_decay_steps: int = 600
    epochs: int = 25
    save_step: int = 5
    w_model: float = 5.0
    w_grad: float = 0.1
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    channels_last: bool = True
    num_workers: int = 0
    val_every: int = 2
    display_slices: Sequence[int] = (52, 72, 92, 112)
    log_every: int = 10
    checkpoint_every_steps: int = 0
    resume: bool = False
    max_steps: int = 0
    threads: int | None = None
    training_info: dict = field(default_factory=dict)
    inference_defaults: dict = field(default_factory=dict)
    init_model: str | None = None
    ema_decay: float = 0.0

    def validate(self) -> None:
        for name in ("batch_size", "epochs", "save_step", "lr_decay_steps", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay must be within (0, 1], got {self.lr_decay}")
        if self.w_model < 0 or self.w_grad < 0:
            raise ValueError("loss weights must not be negative")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be within [0, 1), got {self.ema_decay}")


#: a configuration with every default (its ``patches`` and ``out_dir`` are empty)
TRAINING_DEFAULTS = TrainingConfig(patches="", out_dir="")


#: settings that differ by architecture (the group level and ``init_training_wf`` callers
#: take them unless told otherwise): the toy network trains as the tutorial trains it
#: (``Training_params.py``: 32³ patches, batch 20, learning rate 1e-3, 25 epochs, a model
#: file every 5); the QSMnet family on 64³ patches, batch 12 (the paper's); both from
#: patches at most a third of a patch apart (``patch_stride`` None)
ARCHITECTURE_DEFAULTS = {
    "toy": {"patch_size": 32, "batch_size": 20, "learning_rate": 1e-3, "epochs": 25,
            "save_step": 5},
}
#: the patch edge (voxels) of every other architecture
DEFAULT_PATCH_SIZE = 64


def architecture_defaults(architecture: str) -> dict:
    """``patch_size``, ``patch_stride`` (largest step between patches, voxels; ``None``: a
    third of the patch), ``batch_size``, ``learning_rate``, ``epochs`` and ``save_step`` for
    training ``architecture``.

    >>> architecture_defaults("toy")["patch_size"], architecture_defaults("qsmnet")["patch_size"]
    (32, 64)
    """
    base = {"patch_size": DEFAULT_PATCH_SIZE, "patch_stride": None,
            "batch_size": TRAINING_DEFAULTS.batch_size,
            "learning_rate": TRAINING_DEFAULTS.learning_rate,
            "epochs": TRAINING_DEFAULTS.epochs, "save_step": TRAINING_DEFAULTS.save_step}
    return {**base, **ARCHITECTURE_DEFAULTS.get(architecture, {})}
