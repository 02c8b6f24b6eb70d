"""ONNX export (``bids_qsmnet.inference.export``, ``bids_qsmnet-export``): the graph maps a local
field in ppm to the χ of the app's network path (normalisation included, no refinement) on
shapes other than the traced one, and carries the model's frame and checksum in its metadata."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from bids_qsmnet.__about__ import __version__
from bids_qsmnet.inference.export import ExportError, export_onnx
from bids_qsmnet.inference.predict import predict_chi, predict_normalised
from bids_qsmnet.io.atomic import OutputExistsError
from bids_qsmnet.models.modelfile import (
    ModelFileError,
    ModelSpec,
    load_model,
    resolve_model,
    save_model,
)
from bids_qsmnet.models.registry import architecture_config, build_network

os.environ.setdefault("OMP_NUM_THREADS", "1")

CONSOLE_SCRIPT = Path(sys.executable).with_name("bids_qsmnet-export")
#: normalisation of the test models (ppm), far enough from (0, 1, 0, 1) to show if one is lost
NORM = {"input_mean": 0.002, "input_std": 0.03, "label_mean": -0.001, "label_std": 0.1}
TOLERANCE = 1e-4  # ppm


def _model_file(folder: Path, arch: str, *, seed: int = 0, norm=None, **spec) -> Path:
    """A seeded network of architecture ``arch`` with random batch-norm statistics (so that
    folding them changes the weights), saved as a model file."""
    torch.manual_seed(seed)
    net = build_network(arch)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
    spec = ModelSpec(name=f"{arch}-seeded", architecture=net.config,
                     normalization=norm or NORM, **spec)
    return save_model(folder / f"{arch}.safetensors", net.eval(), spec)


def _field(shape, *, seed: int = 1) -> np.ndarray:
    """A local field in ppm (about ±0.03), zero outside a centred box (the 'mask')."""
    rng = np.random.default_rng(seed)
    field = (rng.standard_normal(shape) * 0.03).astype(np.float32)
    inside = np.zeros(shape, bool)
    inside[tuple(slice(n // 4, n - n // 4) for n in shape)] = True
    return np.where(inside, field, 0.0).astype(np.float32)


def _session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _onnx_chi(path, field: np.ndarray) -> np.ndarray:
    return _session(path).run(["chi"], {"field": field[None, None]})[0][0, 0]


def _metadata(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def _check_against_app(model_path: Path, onnx_path: Path, shape) -> float:
    """Max |ONNX − app| (ppm) on a field of ``shape``; asserts it is within TOLERANCE.

    References: ``predict_chi`` (the app's path: batch norm folded, masked output) inside the
    mask, and the unfolded network between the app's normalisation steps on the whole volume
    (the graph does not mask its output)."""
    field = _field(shape)
    mask = field != 0
    loaded = load_model(model_path)
    got = _onnx_chi(onnx_path, field)
    assert got.shape == field.shape and got.dtype == np.float32
    app = predict_chi(loaded, field)
    norm = loaded.spec.normalization
    x = np.where(mask, norm.normalise_input(field), 0.0)
    whole = norm.denormalise_label(predict_normalised(loaded.network, x,
                                                      multiple=loaded.network.multiple))
    assert np.abs(app).max() > 50 * TOLERANCE  # the comparison is not between near-zero maps
    inside = float(np.abs(got - app)[mask].max())
    everywhere = float(np.abs(got - whole).max())
    assert inside < TOLERANCE, inside
    assert everywhere < TOLERANCE, everywhere
    return max(inside, everywhere)


# qsmnet / qsmnet+ (99 M parameters, 16-voxel multiple): ~15 s each on two CPU cores
@pytest.mark.parametrize("arch, shape", [
    ("toy", (6, 10, 4)),
    ("qsmnet", (16, 32, 16)),
    ("qsmnet+", (32, 16, 16)),
])
def test_architectures_match_the_app(tmp_path, arch, shape):
    model = _model_file(tmp_path, arch)
    out = export_onnx(model, tmp_path / f"{arch}.onnx")
    assert out == (tmp_path / f"{arch}.onnx").absolute() and out.is_file()
    multiple = 2 ** (len(architecture_config(arch)["channels"]) - 1)
    assert all(n % multiple == 0 for n in shape) and len(set(shape)) > 1
    assert tuple(shape) != (multiple,) * 3  # not the traced shape
    _check_against_app(model, out, shape)


def test_shipped_default_matches_the_app(tmp_path):
    out = export_onnx("default", tmp_path / "default.onnx")
    _check_against_app(resolve_model("default"), out, (48, 64, 32))
    meta = _metadata(out)
    assert meta["model_name"] == "default"
    assert meta["model_sha256"] == hashlib.sha256(resolve_model("default").read_bytes()).hexdigest()
    assert meta["size_multiple"] == "8"


def test_dynamic_axes_and_metadata(tmp_path):
    model = _model_file(tmp_path, "toy", voxel_size=(0.9, 0.9, 1.2))
    out = export_onnx(model, tmp_path / "toy.onnx")
    proto = onnx.load(str(out))
    for value in (proto.graph.input[0], proto.graph.output[0]):
        dims = value.type.tensor_type.shape.dim
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert [d.dim_value for d in dims[:2]] == [1, 1]
        assert [d.dim_param for d in dims[2:]] == ["X", "Y", "Z"]
    assert [i.name for i in proto.graph.input] == ["field"]
    assert [o.name for o in proto.graph.output] == ["chi"]
    # one session, shapes of every kind
    session = _session(out)
    for shape in [(4, 4, 4), (8, 2, 12), (2, 14, 6)]:
        y = session.run(["chi"], {"field": _field(shape)[None, None]})[0]
        assert y.shape == (1, 1, *shape)

    meta = _metadata(out)
    spec = load_model(model).spec
    assert meta["model_name"] == "toy-seeded"
    assert meta["model_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert json.loads(meta["voxel_size_mm"]) == [0.9, 0.9, 1.2]
    assert meta["b0_axis"] == "2" and json.loads(meta["b0_dir"]) == [0.0, 0.0, 1.0]
    assert meta["size_multiple"] == "2"
    assert json.loads(meta["units"]) == {"field": "ppm", "chi": "ppm"}
    assert json.loads(meta["normalization"]) == NORM
    assert meta["bids_qsmnet_version"] == __version__
    assert json.loads(meta["model_spec"]) == spec.to_dict()


def test_zero_field_voxels_enter_the_network_as_zero(tmp_path):
    """Outside the mask (field 0) the network sees 0, as in the app, not −input_mean/input_std
    (here −1, which changes the map: a graph that normalised those voxels would fail)."""
    norm = {**NORM, "input_mean": NORM["input_std"]}
    model = _model_file(tmp_path, "toy", norm=norm)
    out = export_onnx(model, tmp_path / "toy.onnx")
    got = _onnx_chi(out, np.zeros((4, 4, 4), np.float32))
    net = load_model(model).network
    with torch.no_grad():
        y0, y_shifted = (net(torch.full((1, 1, 4, 4, 4), v))[0, 0].numpy() for v in (0.0, -1.0))
    np.testing.assert_allclose(got, y0 * norm["label_std"] + norm["label_mean"], atol=1e-6)
    assert np.abs(y_shifted - y0).max() * norm["label_std"] > 1e-3


def test_errors_name_the_problem(tmp_path):
    model = _model_file(tmp_path, "toy")
    with pytest.raises(ModelFileError, match="neither an existing model file nor a shipped"):
        export_onnx("no-such-model", tmp_path / "x.onnx")
    with pytest.raises(ExportError, match="does not exist"):
        export_onnx(model, tmp_path / "missing" / "x.onnx")
    with pytest.raises(ExportError, match="is a folder"):
        export_onnx(model, tmp_path)
    with pytest.raises(ExportError, match="opset 21 is not one the exporter writes"):
        export_onnx(model, tmp_path / "x.onnx", opset=21)
    out = export_onnx(model, tmp_path / "x.onnx")
    before = out.read_bytes()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export_onnx(model, out)
    out.write_bytes(b"old")
    assert export_onnx(model, out, overwrite=True).read_bytes() == before  # deterministic
    skew = _model_file(tmp_path, "toy", b0_dir=(0.0, 0.6, 0.8))
    with pytest.raises(ExportError, match="not along a voxel axis"):
        export_onnx(skew, tmp_path / "skew.onnx")
    assert not (tmp_path / "skew.onnx").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_folder(tmp_path):
    model = _model_file(tmp_path, "toy")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(ExportError, match="not writable"):
            export_onnx(model, folder / "x.onnx")
    finally:
        folder.chmod(0o700)


def _cli(*args) -> subprocess.CompletedProcess:
    assert CONSOLE_SCRIPT.exists(), f"{CONSOLE_SCRIPT} (the package is installed editable)"
    return subprocess.run([str(CONSOLE_SCRIPT), *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def test_cli_end_to_end(tmp_path):
    model = _model_file(tmp_path, "toy")
    out = tmp_path / "toy.onnx"
    proc = _cli("--model", model, "--format", "onnx", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "wrote the ONNX graph of model 'toy-seeded'" in proc.stderr
    assert proc.stderr.rstrip().endswith(f"to {out}")
    assert _metadata(out)["model_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    field = _field((6, 10, 4))
    app = predict_chi(load_model(model), field)
    assert np.abs(_onnx_chi(out, field) - app)[field != 0].max() < TOLERANCE

    for args, code, message in [
        (("--model", model, "--format", "tflite", "-o", out), 2, "invalid choice: 'tflite'"),
        (("--model", "no-such-model", "-o", tmp_path / "y.onnx"), 1, "no-such-model"),
        (("--model", model, "-o", tmp_path / "missing" / "y.onnx"), 1, "does not exist"),
        (("--model", model, "-o", out), 1, "--overwrite"),
    ]:
        proc = _cli(*args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == code, proc.stderr
        assert message in lines[-1], proc.stderr
        if code == 1:
            assert lines == [lines[-1]] and lines[-1].startswith("bids_qsmnet-export: error: ")


def test_cli_help_imports_no_torch():
    probe = ("import sys\nfrom bids_qsmnet.cli.export import main\n"
             "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print('TORCH', 'torch' in sys.modules, 'onnx' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60)
    assert "--format {onnx}" in proc.stdout and "--model" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "TORCH False False"
