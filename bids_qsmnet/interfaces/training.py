"""Nipype interfaces for training: ``ExtractPatches`` and ``TrainQSMnet``.

Thin adapters: the work is done by :func:`bids_qsmnet.training.patches.extract_patches` and
:func:`bids_qsmnet.training.trainer.train`, imported inside ``_run_interface`` so that building
a workflow does not import torch.  The training traits' defaults are those of
:class:`~bids_qsmnet.training.config.TrainingConfig`.
"""

from __future__ import annotations

import os

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..training.config import TRAINING_DEFAULTS as _D

__all__ = ["ExtractPatches", "TrainQSMnet"]

#: traits of TrainQSMnet passed to TrainingConfig under the same name
_CONFIG_TRAITS = ("architecture", "batch_size", "learning_rate", "lr_decay", "lr_decay_steps",
                  "epochs", "save_step", "w_model", "w_grad", "seed", "ema_decay", "device",
                  "amp", "channels_last", "val_every", "max_steps")


class _ExtractPatchesInputSpec(BaseInterfaceInputSpec):
    field_files = InputMultiObject(File(exists=True), mandatory=True,
                                   desc="local-field NIfTI files, ppm, one per subject/run")
    label_files = InputMultiObject(File(exists=True), mandatory=True,
                                   desc="χ label NIfTI files (ppm), same order and grids")
    mask_files = InputMultiObject(File(exists=True),
                                  desc="brain masks (default: nonzero voxels of the field)")
    subject_ids = InputMultiObject(traits.Str, desc="identifiers recorded as provenance")
    patch_size = traits.Int(64, usedefault=True, desc="edge of the cubic patches, voxels")
    counts = traits.List(traits.Int, minlen=3, maxlen=3,
                         desc="patches per axis (QSMnet: 7, 8, 6); default from max_stride")
    max_stride = traits.Int(desc="largest step between patches, voxels (default patch/3)")
    min_mask_fraction = traits.Float(0.1, usedefault=True,
                                     desc="skip patches with less brain than this fraction")
    linearity_factor = traits.Float(desc="QSMnet+ augmentation: scale positive χ by this "
                                         "factor and re-simulate the field (QSMnet+: 4)")
    sign_flip = traits.Bool(False, usedefault=True, desc="add sign-flipped copies")
    b0_tilts = traits.Int(0, usedefault=True, desc="copies re-simulated with a tilted B0")
    max_tilt_deg = traits.Float(30.0, usedefault=True, desc="largest B0 tilt, degrees")
    seed = traits.Int(0, usedefault=True, desc="random seed of the augmentation")
    out_name = traits.Str("patches.h5", usedefault=True, desc="file name of the store")


class _ExtractPatchesOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="HDF5 patch store")
    n_patches = traits.Int(desc="number of patches written")
    normalization = traits.Dict(desc="in-mask mean/std of input and label, ppm")


class ExtractPatches(SimpleInterface):
    """Cut overlapping training patches from field/label pairs into one HDF5 store."""

    input_spec = _ExtractPatchesInputSpec
    output_spec = _ExtractPatchesOutputSpec

    def _run_interface(self, runtime):
        from ..training.patches import extract_patches
        from ..training.volumes import iter_training_volumes

        i = self.inputs
        vols = iter_training_volumes(
            i.field_files, i.label_files, i.mask_files if isdefined(i.mask_files) else None,
            i.subject_ids if isdefined(i.subject_ids) else None)
        info = extract_patches(
            vols, os.path.join(runtime.cwd, i.out_name), patch_size=i.patch_size,
            counts=i.counts if isdefined(i.counts) else None,
            max_stride=i.max_stride if isdefined(i.max_stride) else None,
            min_mask_fraction=i.min_mask_fraction,
            linearity_factor=i.linearity_factor if isdefined(i.linearity_factor) else None,
            sign_flip=i.sign_flip, b0_tilts=i.b0_tilts, max_tilt_deg=i.max_tilt_deg,
            seed=i.seed)
        self._results.update(out_file=info.path, n_patches=info.n_patches,
                             normalization=info.normalization)
        return runtime


class _TrainInputSpec(BaseInterfaceInputSpec):
    patches = File(exists=True, mandatory=True, desc="HDF5 patch store from ExtractPatches")
    architecture = traits.Str(_D.architecture, usedefault=True,
                              desc="toy, qsmnet, qsmnet+, qsmnet-mid, qsmnet-slim, qsmnet-lite")
    model_name = traits.Str(desc="name written into the model file (default: architecture)")
    batch_size = traits.Int(_D.batch_size, usedefault=True, desc="patches per step")
    learning_rate = traits.Float(_D.learning_rate, usedefault=True,
                                 desc="initial Adam learning rate")
    lr_decay = traits.Float(_D.lr_decay, usedefault=True,
                            desc="learning-rate factor per decay period")
    lr_decay_steps = traits.Int(_D.lr_decay_steps, usedefault=True, desc="steps per decay period")
    epochs = traits.Int(_D.epochs, usedefault=True, desc="training epochs")
    save_step = traits.Int(_D.save_step, usedefault=True, desc="checkpoint every this many epochs")
    w_model = traits.Float(_D.w_model, usedefault=True,
                           desc="model (dipole-consistency) loss weight")
    w_grad = traits.Float(_D.w_grad, usedefault=True, desc="gradient loss weight")
    seed = traits.Int(_D.seed, usedefault=True, desc="seed of initial weights and patch order")
    ema_decay = traits.Range(0.0, 1.0, _D.ema_decay, usedefault=True, exclude_high=True,
                             desc="decay per step of the weight average that is validated and "
                                  "saved (0: the last weights)")
    device = traits.Str(_D.device, usedefault=True, desc="auto, cpu or cuda[:N]")
    use_cuda = traits.Bool(False, usedefault=True,
                           desc="schedule as a GPU job in MultiProc (n_gpu_procs)")
    amp = traits.Bool(_D.amp, usedefault=True,
                      desc="bf16 autocast (CUDA, or a CPU with native bf16)")
    channels_last = traits.Bool(_D.channels_last, usedefault=True,
                                desc="channels-last 3-D convolutions (faster steps on CPU "
                                     "and CUDA; same function, other float rounding)")
    num_threads = traits.Int(desc="torch CPU threads")
    val_fields = InputMultiObject(File(exists=True), desc="whole validation fields (ppm)")
    val_labels = InputMultiObject(File(exists=True), desc="validation χ labels (ppm)")
    val_masks = InputMultiObject(File(exists=True), desc="validation masks")
    val_every = traits.Int(_D.val_every, usedefault=True, desc="validate every this many epochs")
    max_steps = traits.Int(_D.max_steps, usedefault=True,
                           desc="stop after this many steps (0: no limit)")


class _TrainOutputSpec(TraitedSpec):
    model_file = File(exists=True, desc="trained model (.safetensors)")
    log_file = File(exists=True, desc="training log (CSV)")
    curves_file = File(desc="loss curves (PNG)")
    summary_file = File(exists=True, desc="training summary (JSON)")
    train_dir = Directory(exists=True, desc="folder with checkpoints, figures and logs")


class TrainQSMnet(SimpleInterface):
    """Train a QSMnet-family network on a patch store (resumes within its working folder)."""

    input_spec = _TrainInputSpec
    output_spec = _TrainOutputSpec
    # Nipype empties the folder of a node it reruns unless the interface can resume: keep
    # the checkpoint of a killed run, so that the rerun continues from it
    _can_resume = True

    def _run_interface(self, runtime):
        from ..training.config import TrainingConfig
        from ..training.trainer import train
        from ..training.volumes import validation_volumes

        i = self.inputs
        out_dir = os.path.join(runtime.cwd, "training")
        val = validation_volumes(i.val_fields, i.val_labels if isdefined(i.val_labels) else [],
                                 i.val_masks if isdefined(i.val_masks) else None) \
            if isdefined(i.val_fields) else []
        cfg = TrainingConfig(
            patches=i.patches, out_dir=out_dir, resume=True,
            name=i.model_name if isdefined(i.model_name) else i.architecture,
            threads=i.num_threads if isdefined(i.num_threads) else None,
            **{name: getattr(i, name) for name in _CONFIG_TRAITS})
        result = train(cfg, val)
        self._results.update(
            model_file=result.model_path, log_file=result.log_path,
            summary_file=os.path.join(out_dir, "training_summary.json"), train_dir=out_dir)
        if result.curves_path:
            self._results["curves_file"] = result.curves_path
        return runtime
