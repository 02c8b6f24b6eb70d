"""The .safetensors model file: round trip, checksum, and every refusal."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import bids_qsmnet
from bids_qsmnet.models import build_network, modelfile
from bids_qsmnet.models.modelfile import (
    FORMAT_VERSION,
    METADATA_KEY,
    ModelFileError,
    ModelSpec,
    Normalization,
    file_sha256,
    load_model,
    read_model_spec,
    resolve_model,
    save_model,
)

torch.set_num_threads(2)

NORM = {"input_mean": 0.001, "input_std": 0.016, "label_mean": -0.002, "label_std": 0.06}


@pytest.fixture(scope="module")
def toy():
    """A toy network whose batch-norm statistics are no longer the defaults."""
    torch.manual_seed(0)
    net = build_network("toy")
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(2, 1, 16, 16, 16))
    return net.eval()


@pytest.fixture(scope="module")
def spec(toy):
    return ModelSpec(
        name="toy-test",
        architecture=toy.config,
        normalization=NORM,
        created="2024-01-02T03:04:05+00:00",
        training={"epochs": 2, "seed": 0, "command": "pytest"},
        inference={"dc_lambda": 0.05},
    )


@pytest.fixture
def saved(tmp_path, toy, spec):
    return save_model(tmp_path / "toy.safetensors", toy, spec)


def _tensors(net):
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}


def _write(path, tensors, spec_dict=None, *, raw=None):
    """A safetensors file whose metadata is ``spec_dict`` as JSON under our key, or ``raw``."""
    meta = raw if spec_dict is None else {METADATA_KEY: json.dumps(spec_dict)}
    save_file(tensors, str(path), metadata=meta)
    return path


def _refused(path, match=None):
    with pytest.raises(ModelFileError) as info:
        load_model(path)
    assert path.name in str(info.value)
    if match:
        assert match in str(info.value), str(info.value)
    return info.value


# --------------------------------------------------------------------------- round trip


def test_round_trip_bit_for_bit(saved, toy, spec):
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        ref = toy(x)
    loaded = load_model(saved)
    assert not loaded.network.training
    with torch.no_grad():
        out = loaded.network(x)
    assert torch.equal(out, ref)
    assert loaded.spec.to_dict() == spec.to_dict()
    assert loaded.spec.normalization == Normalization(**NORM)
    assert loaded.network.config == toy.config
    assert loaded.path == saved.resolve()
    for key, value in toy.state_dict().items():
        assert torch.equal(loaded.network.state_dict()[key], value), key


def test_sha256_stable_and_deterministic(saved, tmp_path, toy, spec):
    digest = hashlib.sha256(saved.read_bytes()).hexdigest()
    assert file_sha256(saved) == digest
    assert load_model(saved).sha256 == digest
    assert load_model(saved).sha256 == digest
    again = save_model(tmp_path / "again.safetensors", toy, spec)
    assert file_sha256(again) == digest  # same weights + same spec → same bytes


def test_file_content_layout(saved, spec):
    from safetensors import safe_open

    with safe_open(str(saved), framework="pt") as fh:
        meta = json.loads(fh.metadata()[METADATA_KEY])
        dtypes = {k: fh.get_tensor(k).dtype for k in fh.keys()}
    assert meta["format_version"] == FORMAT_VERSION == 1
    assert meta["units"] == {"input": "ppm", "output": "ppm"}
    assert meta["b0_dir"] == [0.0, 0.0, 1.0] and meta["voxel_size"] == [1.0, 1.0, 1.0]
    assert meta["software_version"] == bids_qsmnet.__version__
    assert meta["architecture"]["channels"] == [2, 4]
    assert meta["normalization"] == NORM and meta["inference"] == {"dc_lambda": 0.05}
    assert {d for k, d in dtypes.items() if not k.endswith("num_batches_tracked")} == {
        torch.float32
    }
    assert read_model_spec(saved).to_dict() == spec.to_dict()


def test_directory_paths(tmp_path, toy, spec):
    folder = tmp_path / "mymodel"
    folder.mkdir()
    written = save_model(folder, toy, spec)
    assert written == folder / "model.safetensors"
    assert load_model(folder).path == written.resolve()
    assert resolve_model(folder) == written.resolve()
    # exactly one other .safetensors file is accepted too
    other = tmp_path / "other"
    other.mkdir()
    save_model(other / "weights.safetensors", toy, spec)
    assert load_model(other).spec.name == "toy-test"


def test_save_is_atomic_and_checks_architecture(tmp_path, toy, spec):
    save_model(tmp_path / "m.safetensors", toy, spec)
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]  # no temporary left behind
    wrong = ModelSpec(name="x", architecture={**toy.config, "channels": [2, 8]}, normalization=NORM)
    with pytest.raises(ValueError, match="does not match"):
        save_model(tmp_path / "bad.safetensors", toy, wrong)
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def test_load_onto_device_and_float64_network(tmp_path, spec):
    net = build_network("toy").double()
    path = save_model(tmp_path / "d.safetensors", net, spec)
    loaded = load_model(path, device=torch.device("cpu"))
    assert next(loaded.network.parameters()).dtype == torch.float32
    assert next(loaded.network.parameters()).device.type == "cpu"


# --------------------------------------------------------------------------- refusals


def test_refuses_missing_file(tmp_path):
    _refused(tmp_path / "absent.safetensors", "does not exist")


def test_refuses_non_safetensors(tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, this is not a model\n" * 10)
    _refused(text, "not a safetensors")
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02")
    _refused(tiny, "not a safetensors")
    ckpt = tmp_path / "ckpt.safetensors"
    torch.save({"w": torch.zeros(3)}, ckpt)
    _refused(ckpt)


class _Payload:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_is_never_executed(tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps(_Payload(str(marker))))
    pickle.loads(evil.read_bytes()).close()  # the payload works when unpickled...
    assert marker.exists()
    marker.unlink()
    _refused(evil, "not a safetensors")  # ...and is not unpickled by load_model
    assert not marker.exists()


def test_refuses_truncated(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[:-100])
    _refused(saved, "truncated")


def test_refuses_trailing_bytes(saved):
    with open(saved, "ab") as fh:
        fh.write(b"\0" * 16)
    _refused(saved, "corrupt")


def test_refuses_corrupt_header(saved):
    data = bytearray(saved.read_bytes())
    data[10:20] = b"\xff" * 10  # inside the JSON header
    saved.write_bytes(bytes(data))
    _refused(saved, "not a safetensors")


def test_refuses_missing_metadata(tmp_path, toy):
    bare = tmp_path / "bare.safetensors"
    save_file(_tensors(toy), str(bare))
    _refused(bare, "not a bids_qsmnet model")
    other = _write(tmp_path / "other.safetensors", _tensors(toy), raw={"format": "pt"})
    _refused(other, "not a bids_qsmnet model")


def test_refuses_newer_format(tmp_path, toy, spec):
    meta = {**spec.to_dict(), "format_version": FORMAT_VERSION + 1}
    path = _write(tmp_path / "future.safetensors", _tensors(toy), meta)
    _refused(path, "newer")


@pytest.mark.parametrize("key", ["channels", "kernel_size", "act", "in_channels"])
def test_refuses_architecture_missing_key(tmp_path, toy, spec, key):
    meta = spec.to_dict()
    del meta["architecture"][key]
    path = _write(tmp_path / f"no-{key}.safetensors", _tensors(toy), meta)
    _refused(path, key)


def test_refuses_invalid_architecture(tmp_path, toy, spec):
    meta = spec.to_dict()
    meta["architecture"]["kernel_size"] = 4
    _refused(_write(tmp_path / "even.safetensors", _tensors(toy), meta), "odd")
    meta = spec.to_dict()
    meta["architecture"]["dropout"] = 0.5
    _refused(_write(tmp_path / "extra.safetensors", _tensors(toy), meta), "dropout")


def test_refuses_state_dict_mismatch(tmp_path, toy, spec):
    tensors = _tensors(toy)
    del tensors["final.bias"]
    _refused(_write(tmp_path / "missing.safetensors", tensors, spec.to_dict()), "final.bias")
    tensors = {**_tensors(toy), "extra.weight": torch.zeros(2)}
    _refused(_write(tmp_path / "extra.safetensors", tensors, spec.to_dict()), "extra.weight")
    meta = spec.to_dict()
    meta["architecture"]["channels"] = [2, 8]
    _refused(_write(tmp_path / "shape.safetensors", _tensors(toy), meta), "shape")
    tensors = _tensors(toy)
    tensors["final.weight"] = tensors["final.weight"].to(torch.int64)
    _refused(_write(tmp_path / "dtype.safetensors", tensors, spec.to_dict()), "dtype")
    tensors = _tensors(toy)
    tensors["final.weight"][0, 0] = float("nan")
    _refused(_write(tmp_path / "nanw.safetensors", tensors, spec.to_dict()), "non-finite")


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("input_std", 0.0, "> 0"),
        ("label_std", -0.06, "> 0"),
        ("input_mean", "NaN", "non-finite"),
        ("label_std", "Infinity", "non-finite"),
        ("label_mean", None, "number"),
    ],
)
def test_refuses_bad_normalization(tmp_path, toy, spec, key, value, match):
    meta = spec.to_dict()
    meta["normalization"][key] = 0.12345  # placeholder replaced textually for NaN/Infinity
    text = json.dumps(meta)
    literal = value if isinstance(value, str) else json.dumps(value)
    text = text.replace("0.12345", literal)
    path = _write(tmp_path / "norm.safetensors", _tensors(toy), raw={METADATA_KEY: text})
    _refused(path, match)


def test_refuses_missing_normalization_and_units(tmp_path, toy, spec):
    meta = spec.to_dict()
    del meta["normalization"]
    _refused(_write(tmp_path / "nonorm.safetensors", _tensors(toy), meta), "normalization")
    meta = spec.to_dict()
    meta["units"] = {"input": "Hz", "output": "ppm"}
    _refused(_write(tmp_path / "hz.safetensors", _tensors(toy), meta), "units")


def test_refuses_bad_directories(tmp_path, toy, spec):
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(empty, "model.safetensors")
    two = tmp_path / "two"
    two.mkdir()
    save_model(two / "a.safetensors", toy, spec)
    save_model(two / "b.safetensors", toy, spec)
    _refused(two, "a.safetensors")


# --------------------------------------------------------------------------- spec and names


def test_spec_validation():
    arch = build_network("toy").config
    ok = ModelSpec(name="m", architecture=arch, normalization=NORM)
    assert ok.voxel_size == (1.0, 1.0, 1.0) and ok.b0_dir == (0.0, 0.0, 1.0)
    assert ok.created.endswith("+00:00")  # UTC ISO time
    assert ModelSpec.from_json(ok.to_json()).to_dict() == ok.to_dict()
    bad = [
        {"name": ""},
        {"voxel_size": (1.0, 0.0, 1.0)},
        {"voxel_size": (1.0, 1.0)},
        {"b0_dir": (0.0, 0.0, 0.0)},
        {"format_version": 2},
        {"format_version": 0},
        {"training": {"loss": float("nan")}},
        {"training": {"array": np.zeros(2)}},
        {"architecture": {"channels": [2, 4]}},
        {"normalization": {**NORM, "extra": 1.0}},
    ]
    for change in bad:
        with pytest.raises(ValueError):
            ModelSpec(**{"name": "m", "architecture": arch, "normalization": NORM, **change})


def test_normalization_maps_ppm():
    n = Normalization(**NORM)
    field_ppm = np.array([0.001, 0.017, -0.015])
    assert np.allclose(n.normalise_input(field_ppm), [0.0, 1.0, -1.0])
    assert np.allclose(n.denormalise_input(n.normalise_input(field_ppm)), field_ppm)
    assert np.allclose(n.denormalise_label(np.array([0.0, 1.0])), [-0.002, 0.058])
    assert torch.allclose(n.normalise_label(torch.tensor([0.058])), torch.tensor([1.0]))


def test_resolve_model(tmp_path, monkeypatch, toy, spec, saved):
    assert resolve_model(saved) == saved.resolve()
    assert resolve_model(str(saved)) == saved.resolve()
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setattr(modelfile, "shipped_models_dir", lambda: shipped)
    with pytest.raises(ModelFileError, match="no default model is shipped"):
        resolve_model(None)
    with pytest.raises(ModelFileError, match="shipped models: none"):
        resolve_model("qsmnet-paper")
    with pytest.raises(ModelFileError, match="does not exist"):
        resolve_model(str(tmp_path / "nope.safetensors"))
    save_model(shipped / "default.safetensors", toy, spec)
    save_model(shipped / "tiny.safetensors", toy, spec)
    assert resolve_model(None) == (shipped / "default.safetensors").resolve()
    assert resolve_model("default") == resolve_model(None)
    assert resolve_model("tiny").name == "tiny.safetensors"
    assert modelfile.list_shipped_models() == ["default", "tiny"]
    with pytest.raises(ModelFileError, match="default, tiny"):
        resolve_model("other")


def test_reading_a_spec_needs_no_torch_import(saved):
    code = (
        "import sys; from bids_qsmnet.models import read_model_spec, resolve_model;"
        f"s = read_model_spec(resolve_model({str(saved)!r}));"
        "assert 'torch' not in sys.modules, 'torch imported'; print(s.name)"
    )
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "toy-test"


@pytest.mark.parametrize(
    ("inference", "match"),
    [
        ({"flip_axes": [0, 3]}, "inference.flip_axes"),
        ({"flip_axes": "xy"}, "inference.flip_axes"),
        ({"dc_lambda": -0.1}, "inference.dc_lambda"),
        ({"dc_highpass_mm": "4"}, "inference.dc_highpass_mm"),
        ({"dc_iterations": 2.5}, "inference.dc_iterations"),
        ({"residual_passes": -1}, "inference.residual_passes"),
        ({"dc_tv": -1e-4}, "inference.dc_tv"),
        ({"dc_tv_iterations": 1.5}, "inference.dc_tv_iterations"),
        ({"dc_tv_penalty_scale": 0.0}, "inference.dc_tv_penalty_scale"),
        ({"dc_tv_penalty_scale": "3"}, "inference.dc_tv_penalty_scale"),
        ({"residual_passes": True}, "inference.residual_passes"),
        ({"dc_auto": {"floor": 0.3}}, "inference.dc_auto"),
        ({"dc_auto": {"floor": 0.3, "e_ref": 0.0, "lambda_ref": 0.01, "power": 2}},
         "inference.dc_auto"),
        ({"dc_auto": [0.3, 0.05, 0.01, 2]}, "inference.dc_auto"),
        ({"dc_auto": {"floor": "0.3", "e_ref": 0.05, "lambda_ref": 0.01, "power": 2}},
         "inference.dc_auto"),
    ],
)
def test_bad_inference_defaults_are_refused_naming_the_file(tmp_path, toy, spec, inference,
                                                           match):
    """A model file whose inference defaults the app could not use fails when it is loaded,
    naming the file, not later at inference."""
    bad = {**spec.to_dict(), "inference": inference}
    path = _write(tmp_path / "bad.safetensors", _tensors(toy), bad)
    _refused(path, match)
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(spec, inference=inference)
