"""A model file as a self-contained ONNX graph: local field (ppm) in, χ (ppm) out.

The graph holds the model file's network with its batch norm folded into the convolutions
and the model file's normalisation around it, as :func:`~bids_qsmnet.inference.predict.
predict_chi` applies it:

* input ``field``: float32 ``(1, 1, X, Y, Z)``, the local field in ppm in the model's frame
  (B0 along the last axis, the model's voxel size); X, Y and Z are dynamic and must be
  multiples of the network's size multiple (``2**depth``);
* ``x = (field - input_mean) / input_std``, and 0 where the field is exactly 0 (the voxels
  outside the brain mask, as the app's default mask);
* output ``chi``: float32 ``(1, 1, X, Y, Z)``, ``network(x) * label_std + label_mean``, ppm.

The graph does not resample into the model's frame, pad, mask the output, or run the
data-consistency refinement: the app does those around the network.  Its
``metadata_props`` name the model, the sha256 of its file, the frame and the units
(:func:`onnx_metadata`).

The graph is written by PyTorch's TorchScript-based exporter (``torch.onnx.export(...,
dynamo=False)``): it needs only the ``onnx`` package, whereas the ``torch.export``-based
exporter also needs ``onnxscript``; the network's graph has no data-dependent control flow, so
tracing records all of it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..__about__ import __version__
from ..errors import UserError
from ..io.atomic import atomic_output, check_overwrite
from ..models.modelfile import LoadedModel, Normalization, load_model, resolve_model

__all__ = ["ExportError", "FieldToChi", "onnx_metadata", "export_onnx"]

LOGGER = logging.getLogger(__name__)

#: ONNX operator set of the exported graph (Conv, ConvTranspose, MaxPool, LeakyRelu, Concat,
#: Where and elementwise arithmetic: in every maintained ONNX runtime)
DEFAULT_OPSET = 17
#: the operator sets PyTorch's TorchScript-based exporter writes
OPSETS = range(9, 21)
INPUT_NAME, OUTPUT_NAME = "field", "chi"
_DYNAMIC_AXES = {2: "X", 3: "Y", 4: "Z"}


class ExportError(UserError, ValueError):
    """A model that cannot be exported or an output that cannot be written; names which."""


class FieldToChi(nn.Module):
    """A network with a model file's normalisation around it: ``(1, 1, X, Y, Z)`` local field
    in ppm → χ in ppm (see the module docs)."""

    def __init__(self, network: nn.Module, normalization: Normalization) -> None:
        super().__init__()
        self.network = network
        self.normalization = normalization

    def forward(self, field: torch.Tensor) -> torch.Tensor:
        x = self.normalization.normalise_input(field).masked_fill(field == 0, 0.0)
        return self.normalization.denormalise_label(self.network(x))


def _b0_axis(b0_dir) -> int:
    """The voxel axis (0, 1, 2) along B0; an ExportError when B0 is along none."""
    norm = sum(v * v for v in b0_dir) ** 0.5
    axis = max(range(3), key=lambda a: abs(b0_dir[a]))
    if abs(abs(b0_dir[axis]) / norm - 1.0) > 1e-6:
        raise ExportError(f"the model's B0 direction {list(b0_dir)} is not along a voxel axis")
    return axis


def onnx_metadata(loaded: LoadedModel) -> dict[str, str]:
    """The ``metadata_props`` of the ONNX graph of ``loaded`` (every value a string).

    ``model_name``, ``model_sha256`` (of the model file), ``voxel_size_mm`` (JSON list),
    ``b0_axis`` (the spatial axis along B0: 0, 1 or 2 of X, Y, Z), ``b0_dir`` (JSON list),
    ``size_multiple`` (X, Y and Z must be multiples of it), ``units`` (JSON, per tensor),
    ``normalization`` (JSON, ppm, applied inside the graph), ``bids_qsmnet_version`` (that
    exported it) and ``model_spec`` (the model file's whole spec, JSON).
    """
    spec = loaded.spec
    return {
        "model_name": spec.name,
        "model_sha256": loaded.sha256,
        "voxel_size_mm": json.dumps(list(spec.voxel_size)),
        "b0_axis": str(_b0_axis(spec.b0_dir)),
        "b0_dir": json.dumps(list(spec.b0_dir)),
        "size_multiple": str(loaded.network.multiple),
        "units": json.dumps({INPUT_NAME: spec.units["input"], OUTPUT_NAME: spec.units["output"]}),
        "normalization": json.dumps(spec.normalization.to_dict(), sort_keys=True),
        "bids_qsmnet_version": __version__,
        "model_spec": spec.to_json(),
    }


def _check_output(dest: Path, overwrite: bool) -> None:
    folder = dest.parent
    if dest.is_dir():
        raise ExportError(f"cannot write {dest}: it is a folder")
    if not folder.is_dir():
        raise ExportError(f"cannot write {dest}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {dest}: the folder {folder} is not writable")
    check_overwrite(dest, overwrite)


def _graph_bytes(module: nn.Module, multiple: int, opset: int) -> bytes:
    """The traced ONNX graph of ``module`` (input ``field``, output ``chi``, X, Y, Z dynamic)."""
    example = torch.full((1, 1, multiple, multiple, multiple), 0.01)  # only its shape matters
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # the legacy exporter announces its deprecation, and the tracer warns about the
        # network's input-shape check, which runs in Python and is not part of the graph
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module, (example,), buffer, dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=True,
            dynamic_axes={INPUT_NAME: _DYNAMIC_AXES, OUTPUT_NAME: _DYNAMIC_AXES})
    return buffer.getvalue()


def export_onnx(model: str | os.PathLike | None, output: str | os.PathLike, *,
                opset: int = DEFAULT_OPSET, overwrite: bool = False) -> Path:
    """Write the model file ``model`` as a self-contained ONNX graph (see the module docs).

    Parameters
    ----------
    model : str or path or None — a shipped model's name (``default``; None: the default) or a
        model file (``.safetensors``, or a folder holding one)
    output : path — the ``.onnx`` file to write (atomically); its folder must exist
    opset : int — ONNX operator-set version, within :data:`OPSETS`
    overwrite : bool — replace an existing ``output``

    Returns
    -------
    path : Path — the file written

    Raises
    ------
    ModelFileError
        for an unknown model name or an unreadable model file.
    ExportError
        for an output that cannot be written, an operator set outside :data:`OPSETS`, or a
        model whose B0 is along no voxel axis.
    OutputExistsError
        when ``output`` exists and ``overwrite`` is false.
    """
    try:
        import onnx
    except ImportError:
        raise ExportError("writing ONNX needs the onnx package: pip install "
                          "'bids_qsmnet[export]'") from None

    from .optimize import optimise_for_inference

    if opset not in OPSETS:
        raise ExportError(f"ONNX opset {opset} is not one the exporter writes "
                          f"({OPSETS.start}-{OPSETS.stop - 1})")
    dest = Path(output).expanduser().absolute()
    _check_output(dest, overwrite)
    loaded = load_model(resolve_model(model), device="cpu")
    metadata = onnx_metadata(loaded)
    network = optimise_for_inference(loaded.network, device="cpu", channels_last=False)
    module = FieldToChi(network, loaded.spec.normalization).eval()
    proto = onnx.load_from_string(_graph_bytes(module, loaded.network.multiple, opset))
    proto.doc_string = (f"bids_qsmnet model {loaded.spec.name!r}: local field (ppm, B0 along "
                        f"the last axis, {metadata['voxel_size_mm']} mm voxels) -> chi (ppm)")
    onnx.helper.set_model_props(proto, metadata)
    data = proto.SerializeToString()  # once (the largest graphs hold ~400 MB of weights)
    onnx.checker.check_model(data)
    try:
        with atomic_output(dest, fsync=True) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(data)
    except OSError as exc:
        raise ExportError(f"cannot write {dest}: {exc.strerror or exc}") from None
    LOGGER.info("wrote the ONNX graph of model %r (sha256 %s, opset %d, %.1f MB) to %s",
                loaded.spec.name, loaded.sha256[:12], opset, dest.stat().st_size / 1e6, dest)
    return dest
