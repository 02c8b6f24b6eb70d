"""``QSMnetInference``: a QSMnet-family model applied to a local field in the network frame."""

from __future__ import annotations

import os

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)
from nipype.utils.filemanip import fname_presuffix

__all__ = ["run_qsmnet", "QSMnetInference"]


def run_qsmnet(field_file: str, mask_file: str, *, model: str | None = None,
               device: str = "auto", tile: int | None = None, overlap: float = 0.25,
               dc_lambda: float | None = None, dc_iterations: int | None = None,
               num_threads: int | None = None, newpath: str | None = None) -> tuple[str, dict]:
    """Predict χ (ppm) from a field (ppm) in the network frame and write it next to ``newpath``.

    Parameters
    ----------
    field_file : local field, ppm, B0 along the third axis at the model's voxel size
    mask_file : brain mask on the same grid
    model : model file, folder or shipped name (None: the shipped default)
    device : ``auto``, ``cpu`` or ``cuda[:N]``
    tile : tile edge in voxels for bounded-memory inference (None: whole volume)
    overlap : tile overlap fraction
    dc_lambda : weight of the network prior in the data-consistency refinement
        (``‖M(Dχ − f)‖² + λ‖χ − χ_net‖²``); None: the model file's default, 0: no refinement
    dc_iterations : conjugate-gradient iterations of the refinement (None: model default / 30)
    num_threads : torch CPU threads

    Returns
    -------
    out_file : χ map, ppm, on the field's grid
    info : model name, sha256 and path, refinement settings
    """
    import numpy as np

    from ..device import select_device
    from ..inference.predict import predict_chi
    from ..io.nifti import load_volume, save_volume
    from ..models.modelfile import load_model, resolve_model
    from ..physics.orientation import voxel_sizes_from_affine

    if num_threads:
        import torch

        torch.set_num_threads(int(num_threads))
    dev = select_device(device)
    path = resolve_model(model)
    loaded = load_model(path, device=dev)
    field, img = load_volume(field_file, what="local field")
    mask, _ = load_volume(mask_file, what="brain mask")
    mask = mask > 0
    chi = predict_chi(loaded, field, mask, device=dev, tile=tile, overlap=overlap)
    defaults = loaded.spec.inference or {}
    lam = defaults.get("dc_lambda", 0.0) if dc_lambda is None else dc_lambda
    n_iter = int(defaults.get("dc_iterations", 30) if dc_iterations is None else dc_iterations)
    if lam and lam > 0 and n_iter > 0:
        from ..physics.inversion import data_consistency

        chi = data_consistency(chi, field, mask, lam=float(lam), n_iter=n_iter,
                               voxel_size=voxel_sizes_from_affine(img.affine),
                               b0_dir=loaded.spec.b0_dir, pad=8).astype(np.float32)
    out = fname_presuffix(field_file, suffix="_chi", newpath=newpath or os.getcwd(),
                          use_ext=False) + ".nii.gz"
    save_volume(chi, img, out)
    info = {"name": loaded.spec.name, "sha256": loaded.sha256, "path": str(loaded.path),
            "format_version": loaded.spec.format_version, "device": str(dev),
            "data_consistency": {"lambda": float(lam or 0.0),
                                 "iterations": n_iter if lam else 0}}
    return out, info


class _InferenceInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True,
                   desc="local field, ppm, in the network frame (B0 along the third axis)")
    mask_file = File(exists=True, mandatory=True, desc="brain mask on the same grid")
    model = traits.Str(desc="model file, folder or shipped name (default: shipped default)")
    device = traits.Str("auto", usedefault=True, desc="auto, cpu or cuda[:N]")
    use_cuda = traits.Bool(False, usedefault=True,
                           desc="schedule this node as a GPU job (MultiProc n_gpu_procs)")
    tile = traits.Int(desc="tile edge (voxels) for bounded-memory inference")
    overlap = traits.Float(0.25, usedefault=True, desc="tile overlap fraction")
    dc_lambda = traits.Float(desc="data-consistency prior weight (0: off; default: model's)")
    dc_iterations = traits.Int(desc="data-consistency CG iterations")
    num_threads = traits.Int(desc="torch CPU threads")


class _InferenceOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="χ map, ppm, on the input grid of in_file")
    model_name = traits.Str(desc="name of the model used")
    model_sha256 = traits.Str(desc="sha256 of the model file")
    model_info = traits.Dict(desc="model and refinement details")


class QSMnetInference(SimpleInterface):
    """Run a QSMnet-family model (normalise, pad to 2^depth, predict, crop, de-normalise)."""

    input_spec = _InferenceInputSpec
    output_spec = _InferenceOutputSpec

    def _run_interface(self, runtime):
        i = self.inputs

        def opt(name):
            v = getattr(i, name)
            return v if isdefined(v) else None

        out, info = run_qsmnet(i.in_file, i.mask_file, model=opt("model"), device=i.device,
                               tile=opt("tile"), overlap=i.overlap, dc_lambda=opt("dc_lambda"),
                               dc_iterations=opt("dc_iterations"),
                               num_threads=opt("num_threads"), newpath=runtime.cwd)
        self._results.update(out_file=out, model_name=info["name"],
                             model_sha256=info["sha256"], model_info=info)
        return runtime
