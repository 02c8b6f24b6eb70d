"""``QSMnetInference``: a QSMnet-family model applied to a local field in the network frame
(an adapter over :func:`bids_qsmnet.inference.run.run_qsmnet`)."""

from __future__ import annotations

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..inference.run import run_qsmnet

__all__ = ["QSMnetInference"]


class _InferenceInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True,
                   desc="local field, ppm, in the network frame (B0 along the third axis)")
    mask_file = File(exists=True, mandatory=True, desc="brain mask on the same grid")
    model = traits.Str(desc="model file, folder or shipped name (default: shipped default)")
    device = traits.Str("auto", usedefault=True, desc="auto, cpu or cuda[:N]")
    use_cuda = traits.Bool(False, usedefault=True,
                           desc="schedule this node as a GPU job (MultiProc n_gpu_procs)")
    tile = traits.Int(desc="tile edge (voxels) for bounded-memory inference")
    overlap = traits.Float(desc="tile overlap fraction (default: the overlap that makes "
                                "tiles exact when the tile is large enough)")
    dc_lambda = traits.Either(traits.Float, traits.Enum("auto"),
                              desc="data-consistency prior weight ('auto': chosen per input "
                                   "by the model's rule; 0: off; default: the model's)")
    dc_iterations = traits.Int(desc="data-consistency CG iterations")
    dc_edge_mm = traits.Float(desc="data-consistency mask-edge ramp, mm (default: model's)")
    dc_highpass_mm = traits.Float(desc="data-consistency SMV high-pass radius, mm "
                                       "(default: model's)")
    dc_tv = traits.Float(desc="total-variation weight of the refinement, ppm·mm (0: plain "
                              "CG refinement; default: the model's)")
    flip_axes = traits.List(traits.Int, desc="axes of the flip ensemble ([]: off; default: "
                                             "the model's)")
    residual_passes = traits.Range(low=0, desc="residual-field passes before the refinement "
                                               "(default: the model's)")
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
                               tile=opt("tile"), overlap=opt("overlap"), dc_lambda=opt("dc_lambda"),
                               dc_iterations=opt("dc_iterations"),
                               dc_edge_mm=opt("dc_edge_mm"),
                               dc_highpass_mm=opt("dc_highpass_mm"),
                               dc_tv=opt("dc_tv"),
                               flip_axes=opt("flip_axes"),
                               residual_passes=opt("residual_passes"),
                               num_threads=opt("num_threads"), newpath=runtime.cwd)
        self._results.update(out_file=out, model_name=info["name"],
                             model_sha256=info["sha256"], model_info=info)
        return runtime
