"""``init_training_wf``: local fields + χ labels → patches (HDF5) → a trained model."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces.qsm import BrainMask, ConvertToPPM
from ..interfaces.training import ExtractPatches, TrainQSMnet
from ..training.config import TRAINING_DEFAULTS as _D

__all__ = ["init_training_wf"]


def init_training_wf(*, architecture: str = _D.architecture, model_name: str | None = None,
                     patch_size: int = 64, patch_stride: int | None = None,
                     linearity_factor: float | None = None,
                     sign_flip: bool = False, b0_tilts: int = 0,
                     batch_size: int = _D.batch_size, epochs: int = _D.epochs,
                     learning_rate: float = _D.learning_rate, save_step: int = _D.save_step,
                     val_every: int = _D.val_every, w_model: float = _D.w_model,
                     w_grad: float = _D.w_grad, ema_decay: float = _D.ema_decay,
                     seed: int = _D.seed, device: str = _D.device, amp: bool = _D.amp,
                     channels_last: bool = _D.channels_last, max_steps: int = _D.max_steps,
                     omp_nthreads: int = 1, with_validation: bool = True,
                     name: str = "training_wf"):
    """Build the training workflow.

    Nodes: ``to_ppm`` / ``mask`` (MapNodes over training runs) → ``extract_patches``
    (ExtractPatches) → ``train`` (TrainQSMnet); validation runs go through their own
    ``val_to_ppm`` / ``val_mask`` MapNodes into ``train``.

    Parameters
    ----------
    (training defaults: :class:`~bids_qsmnet.training.config.TrainingConfig`'s)
    architecture : toy, qsmnet, qsmnet+, qsmnet-mid, qsmnet-slim or qsmnet-lite
    model_name : name written into the model file (default: the architecture)
    patch_size : patch edge, voxels (QSMnet 64, toy 32)
    patch_stride : largest step between neighbouring patches, voxels (None: a third of the
        patch)
    linearity_factor, sign_flip, b0_tilts : augmentation (see ExtractPatches)
    batch_size, epochs, learning_rate, save_step, val_every, w_model, w_grad, seed : training
    ema_decay : validate and save a moving average of the weights (0: the last weights)
    device, amp : ``auto``/``cpu``/``cuda``, bf16 autocast (CUDA, or a CPU with native bf16)
    channels_last : channels-last 3-D layout (faster steps on CPU; same function, other
        float rounding)
    max_steps : stop after this many steps (0: no limit)
    omp_nthreads : CPU threads of the training node
    with_validation : build the validation branch (the ``val_*`` inputs are ignored otherwise)

    Inputs
    ------
    field_files, units, b0_strengths, echo_times, mask_files (None where absent), label_files,
    subject_ids : training runs (lists of equal length)
    val_field_files, val_units, val_b0_strengths, val_echo_times, val_mask_files,
    val_label_files : validation runs (may be empty lists)

    Outputs
    -------
    model_file, log_file, curves_file, summary_file, train_dir, patches_file
    """
    workflow = pe.Workflow(name=name)
    fields = ["field_files", "units", "b0_strengths", "echo_times", "mask_files", "label_files",
              "subject_ids", "val_field_files", "val_units", "val_b0_strengths",
              "val_echo_times", "val_mask_files", "val_label_files"]
    inputnode = pe.Node(niu.IdentityInterface(fields=fields), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(
        fields=["model_file", "log_file", "curves_file", "summary_file", "train_dir",
                "patches_file"]), name="outputnode")

    to_ppm = pe.MapNode(ConvertToPPM(), iterfield=["in_file", "units", "b0_strength",
                                                   "echo_time"], name="to_ppm")
    mask = pe.MapNode(BrainMask(), iterfield=["in_file", "mask_file"], name="mask")
    extract = pe.Node(ExtractPatches(patch_size=patch_size, sign_flip=sign_flip,
                                     b0_tilts=b0_tilts, seed=seed), name="extract_patches")
    if patch_stride:
        extract.inputs.max_stride = int(patch_stride)
    if linearity_factor:
        extract.inputs.linearity_factor = float(linearity_factor)
    train = pe.Node(TrainQSMnet(architecture=architecture,
                                model_name=model_name or architecture, batch_size=batch_size,
                                epochs=epochs, learning_rate=learning_rate, save_step=save_step,
                                val_every=val_every, w_model=w_model, w_grad=w_grad, seed=seed,
                                ema_decay=ema_decay,
                                device=device, amp=amp, channels_last=channels_last,
                                max_steps=max_steps,
                                num_threads=omp_nthreads, use_cuda=device.startswith("cuda")),
                    name="train", n_procs=omp_nthreads)
    val_to_ppm = pe.MapNode(ConvertToPPM(), iterfield=["in_file", "units", "b0_strength",
                                                       "echo_time"], name="val_to_ppm")
    val_mask = pe.MapNode(BrainMask(), iterfield=["in_file", "mask_file"], name="val_mask")

    workflow.connect([
        (inputnode, to_ppm, [("field_files", "in_file"), ("units", "units"),
                             ("b0_strengths", "b0_strength"), ("echo_times", "echo_time")]),
        (inputnode, mask, [("mask_files", "mask_file")]),
        (to_ppm, mask, [("out_file", "in_file")]),
        (mask, extract, [("out_file", "field_files"), ("out_mask", "mask_files")]),
        (inputnode, extract, [("label_files", "label_files"), ("subject_ids", "subject_ids")]),
        (extract, train, [("out_file", "patches")]),
        (train, outputnode, [("model_file", "model_file"), ("log_file", "log_file"),
                             ("curves_file", "curves_file"), ("summary_file", "summary_file"),
                             ("train_dir", "train_dir")]),
        (extract, outputnode, [("out_file", "patches_file")]),
    ])
    if with_validation:
        workflow.connect([
            (inputnode, val_to_ppm, [("val_field_files", "in_file"), ("val_units", "units"),
                                     ("val_b0_strengths", "b0_strength"),
                                     ("val_echo_times", "echo_time")]),
            (inputnode, val_mask, [("val_mask_files", "mask_file")]),
            (val_to_ppm, val_mask, [("out_file", "in_file")]),
            (val_mask, train, [("out_file", "val_fields"), ("out_mask", "val_masks")]),
            (inputnode, train, [("val_label_files", "val_labels")]),
        ])
    return workflow
