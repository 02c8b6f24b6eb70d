"""The trainer: learning, its output files, whole-volume validation and exact resume."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch

from bids_qsmnet.models.modelfile import load_model
from bids_qsmnet.models.registry import architecture_config
from bids_qsmnet.training.trainer import TrainingConfig, ValidationVolume, train

torch.set_num_threads(1)  # two cores shared with other jobs: more threads only contend


def _config(store, out_dir, **kw) -> TrainingConfig:
    base = {
        "architecture": "toy",
        "name": "toy-test",
        "batch_size": 4,
        "epochs": 2,
        "learning_rate": 1e-2,
        "log_every": 1,
        "device": "cpu",
        "threads": 1,
        "seed": 3,
        "val_every": 1,
    }
    return TrainingConfig(patches=store.path, out_dir=str(out_dir), **{**base, **kw})


def _log(out_dir) -> list[dict]:
    with open(out_dir / "training_log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _weights(out_dir) -> dict:
    state = torch.load(out_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    return state["network"]


@pytest.fixture(scope="module")
def validation_volume():
    """A phantom the network never saw in training (another seed)."""
    from conftest import SMALL_SHAPE, sphere_phantom

    ph = sphere_phantom(SMALL_SHAPE, seed=7, n_spheres=4)
    return ValidationVolume("sub-val", ph["field"], ph["chi"], ph["mask"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_store, validation_volume):
    """Three epochs of the toy network (12 steps of 4 patches) with validation every epoch."""
    out = tmp_path_factory.mktemp("trained")
    cfg = _config(small_store, out, epochs=3, lr_decay=0.5, lr_decay_steps=5)
    result = train(cfg, [validation_volume])
    return out, cfg, result


def test_training_reduces_loss(trained):
    out, _, result = trained
    assert result.epochs_done == 3 and result.steps_done == 12
    rows = _log(out)
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [int(r["step"]) for r in train_rows] == list(range(1, 13))
    losses = np.array([float(r["loss"]) for r in train_rows])
    assert np.all(np.isfinite(losses))
    assert losses[-3:].mean() < 0.9 * losses[:3].mean()
    val = [r for r in rows if r["kind"] == "val"]
    assert [int(r["epoch"]) for r in val] == [1, 2, 3]
    assert float(val[-1]["loss"]) < float(val[0]["loss"])
    # each row's total is its weighted terms: L1 + 5·model + 0.1·gradient
    for r in train_rows + val:
        total = float(r["l1"]) + 5.0 * float(r["model"]) + 0.1 * float(r["gradient"])
        assert float(r["loss"]) == pytest.approx(total, rel=1e-5)


def test_learning_rate_schedule(trained):
    out, cfg, _ = trained
    # StepLR: lr = 1e-2 · 0.5^floor(step / 5) after `step` optimiser steps
    for r in _log(out):
        if r["kind"] == "train":
            step = int(r["step"])
            assert float(r["lr"]) == pytest.approx(1e-2 * 0.5 ** (step // 5), rel=1e-9)


def test_output_files(trained, small_store):
    out, cfg, result = trained
    assert result.model_path == str(out / "model.safetensors")
    loaded = load_model(result.model_path)
    spec = loaded.spec
    assert spec.name == "toy-test"
    assert spec.architecture == architecture_config("toy")
    for k, v in small_store.normalization.items():
        assert getattr(spec.normalization, k) == pytest.approx(v, rel=1e-12)
    assert spec.training["epochs_done"] == 3 and spec.training["steps_done"] == 12
    assert spec.training["architecture_name"] == "toy" and spec.training["seed"] == 3
    assert tuple(spec.voxel_size) == (1.0, 1.0, 1.0) and tuple(spec.b0_dir) == (0.0, 0.0, 1.0)
    # the model file holds the final weights (those of the checkpoint)
    ckpt = _weights(out)
    for k, v in loaded.network.state_dict().items():
        torch.testing.assert_close(v, ckpt[k], rtol=0, atol=0)
    assert (out / "model_epoch-003.safetensors").is_file()  # every save_step (5) and the last
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["epochs_done"] == 3 and summary["steps_done"] == 12
    assert summary["patches"] == 16 and summary["world_size"] == 1
    assert summary["normalization"] == small_store.normalization
    assert set(summary["validation"]) == {"sub-val"}
    assert result.curves_path == str(out / "loss_curves.png")
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_loads_with_weights_only(trained):
    out, _, _ = trained
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 3 and state["step"] == 12 and state["batch_in_epoch"] == 0
    assert json.loads(state["architecture"]) == architecture_config("toy")
    assert {"network", "optimizer", "scheduler", "rng"} <= set(state)
    assert state["scheduler"]["last_epoch"] == 12


def test_validation_outputs(trained, validation_volume):
    from bids_qsmnet.inference.predict import predict_chi
    from bids_qsmnet.metrics import hfen, nrmse, ssim

    out, _, result = trained
    for epoch in (1, 2, 3):
        png = out / "validation" / f"epoch-{epoch:03d}_sub-val.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    last = [r for r in _log(out) if r["kind"] == "val"][-1]
    for key in ("nrmse", "hfen", "ssim"):
        assert math.isfinite(float(last[key]))
    assert float(last["nrmse"]) > 0 and -1 <= float(last["ssim"]) <= 1
    assert result.final_validation["sub-val"]["nrmse"] == pytest.approx(float(last["nrmse"]))
    # the logged metrics are those of the saved model on the validation volume
    vol = validation_volume
    loaded = load_model(result.model_path)
    chi = predict_chi(loaded, vol.field, vol.mask)
    assert float(last["nrmse"]) == pytest.approx(nrmse(chi, vol.chi, vol.mask), rel=1e-4)
    assert float(last["hfen"]) == pytest.approx(hfen(chi, vol.chi, vol.mask), rel=1e-4)
    assert float(last["ssim"]) == pytest.approx(ssim(chi, vol.chi, vol.mask), rel=1e-4, abs=1e-6)


# --------------------------------------------------------------------------- exact resume


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, small_store):
    """Two epochs (8 steps) without a stop: the reference for the resume tests."""
    out = tmp_path_factory.mktemp("uninterrupted")
    train(_config(small_store, out, val_every=0))
    return out


def _assert_same_run(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # bit-identical, not merely close
    sa = torch.load(a / "checkpoint.pt", weights_only=True)
    sb = torch.load(b / "checkpoint.pt", weights_only=True)
    for k, st in sa["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[name], sb["optimizer"]["state"][k][name])
    assert sa["step"] == sb["step"] and sa["scheduler"] == sb["scheduler"]
    la = [(r["kind"], r["step"], r["loss"]) for r in _log(a)]
    lb = [(r["kind"], r["step"], r["loss"]) for r in _log(b)]
    assert la == lb  # the resumed log has each step once, with the same losses


def test_resume_after_max_steps_is_exact(tmp_path, small_store, uninterrupted):
    out = tmp_path / "run"
    first = train(_config(small_store, out, val_every=0, max_steps=3, checkpoint_every_steps=2))
    assert first.steps_done == 3 and first.epochs_done == 0  # stopped inside epoch 1
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["batch_in_epoch"], state["step"]) == (0, 3, 3)
    second = train(_config(small_store, out, val_every=0, resume=True))
    assert second.steps_done == 8 and second.epochs_done == 2
    _assert_same_run(uninterrupted, out)


def test_resume_after_crash_is_exact(tmp_path, small_store, uninterrupted, monkeypatch):
    """A crash in step 4 leaves the checkpoint of step 2 and log rows up to step 3."""
    from bids_qsmnet.models import losses

    real = losses.qsmnet_loss
    calls = {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("node lost")
        return real(*args, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(losses, "qsmnet_loss", crashing)
    with pytest.raises(RuntimeError, match="node lost"):
        train(_config(small_store, out, val_every=0, checkpoint_every_steps=2))
    monkeypatch.setattr(losses, "qsmnet_loss", real)
    assert [int(r["step"]) for r in _log(out)] == [1, 2, 3]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    train(_config(small_store, out, val_every=0, resume=True))
    _assert_same_run(uninterrupted, out)


def test_channels_last_training_resumes_exactly_and_learns_the_same_function(
        tmp_path, small_store):
    """The CPU speed-up of channels-last (the default; docs/benchmarks.md) changes float
    rounding only: its run stays bit-exact across a resume, tracks the contiguous run
    closely, and writes a model file of ordinary contiguous tensors."""
    whole = tmp_path / "whole"
    train(_config(small_store, whole, val_every=0, channels_last=True))
    out = tmp_path / "run"
    train(_config(small_store, out, val_every=0, channels_last=True, max_steps=3,
                  checkpoint_every_steps=2))
    train(_config(small_store, out, val_every=0, channels_last=True, resume=True))
    _assert_same_run(whole, out)
    contiguous = tmp_path / "contiguous"
    train(_config(small_store, contiguous, val_every=0, channels_last=False))
    wl, wc = _weights(whole), _weights(contiguous)
    assert any(not torch.equal(wl[k], wc[k]) for k in wl)  # two layouts, other rounding
    for k in wl:
        torch.testing.assert_close(wl[k], wc[k], rtol=1e-2, atol=1e-3)  # Adam amplifies rounding
    from safetensors.torch import load_file

    assert all(t.is_contiguous() for t in load_file(whole / "model.safetensors").values())


def test_bf16_autocast_on_the_cpu_where_it_is_native(tmp_path, small_store, caplog):
    """``amp`` trains in bf16 autocast on a CPU with native bf16 (the loss follows the fp32
    run's within bf16 rounding), and elsewhere warns and trains in fp32 (the same run)."""
    from bids_qsmnet.training.trainer import _native_bf16

    ref = tmp_path / "fp32"
    train(_config(small_store, ref, val_every=0, max_steps=4))
    out = tmp_path / "amp"
    with caplog.at_level("WARNING", logger="bids_qsmnet"):
        train(_config(small_store, out, val_every=0, max_steps=4, amp=True))
    losses = [float(r["loss"]) for r in _log(out)]
    want = [float(r["loss"]) for r in _log(ref)]
    if _native_bf16(torch.device("cpu")):
        assert losses != want
        np.testing.assert_allclose(losses, want, rtol=0.05)
        assert "bf16" not in caplog.text
    else:
        assert losses == want
        assert "training in fp32" in caplog.text


def test_resume_at_the_step_limit_does_nothing_more(tmp_path, small_store):
    out = tmp_path / "run"
    train(_config(small_store, out, val_every=0, max_steps=3))
    before = _weights(out)
    again = train(_config(small_store, out, val_every=0, max_steps=3, resume=True))
    assert again.steps_done == 3
    for k, v in _weights(out).items():
        assert torch.equal(v, before[k])


def test_resume_refuses_another_architecture(tmp_path, uninterrupted, small_store):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    other = {**architecture_config("toy"), "channels": [2, 2]}
    with pytest.raises(ValueError, match="another architecture"):
        train(_config(small_store, out, architecture=other, resume=True))
    # a fresh (non-resumed) run in that folder simply starts over
    fresh = train(_config(small_store, out, architecture=other, max_steps=1, val_every=0))
    assert fresh.steps_done == 1 and len(_log(out)) == 1


def test_partial_config_dict_is_completed(tmp_path, small_store):
    """A JSON config naming only some options gets the defaults (and a valid model file)."""
    arch = {"channels": [2, 4], "kernel_size": 3, "act": "relu", "norm": None}
    result = train(_config(small_store, tmp_path, architecture=arch, max_steps=1, val_every=0))
    spec = load_model(result.model_path).spec
    assert spec.architecture["channels"] == [2, 4] and spec.architecture["norm"] is None
    assert spec.architecture["in_channels"] == 1 and spec.architecture["out_channels"] == 1
    with pytest.raises(ValueError, match="invalid network config"):
        train(_config(small_store, tmp_path / "bad", architecture={"chanels": [2, 4]}))
    with pytest.raises(ValueError, match="kernel_size"):
        train(_config(small_store, tmp_path / "bad", architecture={**arch, "kernel_size": 4}))


@pytest.mark.parametrize(
    "change",
    [
        {"batch_size": 0},
        {"epochs": 0},
        {"learning_rate": 0.0},
        {"lr_decay": 1.5},
        {"w_model": -1.0},
        {"ema_decay": 1.0},
        {"ema_decay": -0.1},
    ],
)
def test_config_is_checked(tmp_path, small_store, change):
    with pytest.raises(ValueError):
        train(_config(small_store, tmp_path, **change))


def test_resume_after_crash_following_validation(
    tmp_path, small_store, validation_volume, monkeypatch
):
    """Checkpoint at the last step of epoch 1, validation of epoch 1 logged, crash in epoch 2:
    the resumed run validates epoch 1 again, and the log keeps one row per validation."""
    from bids_qsmnet.models import losses

    real = losses.qsmnet_loss
    calls = {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # 4 training steps, 1 validation, then the 5th training step
            raise RuntimeError("node lost")
        return real(*args, **kwargs)

    out = tmp_path / "run"
    cfg = {"checkpoint_every_steps": 4, "val_every": 1}
    monkeypatch.setattr(losses, "qsmnet_loss", crashing)
    with pytest.raises(RuntimeError, match="node lost"):
        train(_config(small_store, out, **cfg), [validation_volume])
    monkeypatch.setattr(losses, "qsmnet_loss", real)
    assert [(r["kind"], int(r["step"])) for r in _log(out)][-1] == ("val", 4)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["batch_in_epoch"], state["step"]) == (0, 4, 4)
    train(_config(small_store, out, resume=True, **cfg), [validation_volume])
    rows = [(r["kind"], int(r["step"])) for r in _log(out)]
    assert rows == [("train", s) for s in (1, 2, 3, 4)] + [("val", 4)] + [
        ("train", s) for s in (5, 6, 7, 8)
    ] + [("val", 8)]


def test_fine_tuning_starts_from_the_init_model(tmp_path, trained, small_store):
    """``init_model``: the run starts from that file's weights and keeps its normalisation
    (the network's units), not the patch store's; another architecture is refused."""
    import dataclasses

    from bids_qsmnet.models.modelfile import Normalization, save_model

    out, _, result = trained
    init = load_model(result.model_path)
    # an init model whose units differ from the store's: fine-tuning must keep them
    own = Normalization(**{**dataclasses.asdict(init.spec.normalization),
                           "input_std": 2.0 * init.spec.normalization.input_std})
    init_path = save_model(tmp_path / "init.safetensors", init.network,
                           dataclasses.replace(init.spec, normalization=own))
    tuned = train(_config(small_store, tmp_path / "ft", init_model=str(init_path),
                          learning_rate=1e-30, max_steps=1, val_every=0))
    loaded = load_model(tuned.model_path)
    assert loaded.spec.normalization == own
    assert dataclasses.asdict(own) != small_store.normalization
    assert loaded.spec.training["init_model"] == "init.safetensors"
    # one step of 1e-30: the init weights (batch-norm running statistics move regardless)
    start = dict(init.network.named_parameters())
    for k, v in loaded.network.named_parameters():
        torch.testing.assert_close(v, start[k], rtol=0, atol=1e-20)
    # without init_model the same seed starts elsewhere
    fresh = load_model(train(_config(small_store, tmp_path / "fresh", learning_rate=1e-30,
                                     max_steps=1, val_every=0)).model_path)
    assert any(not torch.allclose(v, start[k], rtol=0, atol=1e-3)
               for k, v in fresh.network.named_parameters())
    other = {**architecture_config("toy"), "channels": [2, 2]}
    with pytest.raises(ValueError, match="architecture differs"):
        train(_config(small_store, tmp_path / "bad", architecture=other,
                      init_model=str(init_path)))


def test_weight_average_is_what_is_validated_and_saved(tmp_path, small_store, validation_volume,
                                                       monkeypatch):
    """``ema_decay``: the model files hold the exponential moving average of the weights and
    batch-norm statistics, recomputed here from the weights after each step
    (a₁ = w₁, aₜ = d·aₜ₋₁ + (1 − d)·wₜ), not the last weights."""
    from bids_qsmnet.training import trainer

    saved = {}
    real_save = trainer._atomic_torch_save

    def recording(obj, path):
        saved[obj["step"]] = {k: v.clone() for k, v in obj["network"].items()}
        real_save(obj, path)

    monkeypatch.setattr(trainer, "_atomic_torch_save", recording)
    decay = 0.5
    result = train(_config(small_store, tmp_path, ema_decay=decay, checkpoint_every_steps=1,
                           val_every=1), [validation_volume])
    assert result.steps_done == 8
    assert sorted(saved) == list(range(1, 9))  # a checkpoint after every step
    per_step = [saved[i] for i in range(1, 9)]
    average = {k: v.double() for k, v in per_step[0].items() if v.is_floating_point()}
    for w in per_step[1:]:
        for k in average:
            average[k] = decay * average[k] + (1 - decay) * w[k].double()
    loaded = load_model(result.model_path).network.state_dict()
    last = per_step[-1]
    for k, v in average.items():
        torch.testing.assert_close(loaded[k].double(), v, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(loaded[k], last[k], rtol=0, atol=1e-4) for k in average)
    # the checkpoint keeps both; validation scored the average (it differs from the weights')
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert int(state["ema"]["n_averaged"]) == 8
    for k in average:
        assert torch.equal(state["ema"][f"module.{k}"], loaded[k])
    assert load_model(result.model_path).spec.training["ema_decay"] == decay
    val = [r for r in _log(tmp_path) if r["kind"] == "val"]
    from bids_qsmnet.models.losses import qsmnet_loss
    from bids_qsmnet.training.dataset import KernelCache
    from bids_qsmnet.training.trainer import _validate

    net = load_model(result.model_path).network
    rows = _validate(net, [validation_volume], _config(small_store, tmp_path / "v"),
                     KernelCache(device=torch.device("cpu")), torch.device("cpu"), 2,
                     str(tmp_path / "v"), qsmnet_loss, small_store.normalization)
    assert float(val[-1]["nrmse"]) == pytest.approx(rows[0]["nrmse"], rel=1e-6)


def test_weight_average_resumes_exactly(tmp_path, small_store):
    whole = tmp_path / "whole"
    train(_config(small_store, whole, val_every=0, ema_decay=0.7))
    out = tmp_path / "run"
    train(_config(small_store, out, val_every=0, ema_decay=0.7, max_steps=3,
                  checkpoint_every_steps=2))
    train(_config(small_store, out, val_every=0, ema_decay=0.7, resume=True))
    _assert_same_run(whole, out)
    ea = torch.load(whole / "checkpoint.pt", weights_only=True)["ema"]
    eb = torch.load(out / "checkpoint.pt", weights_only=True)["ema"]
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
    # a resume that would drop or invent the average without a word is refused
    with pytest.raises(ValueError, match="holds a weight average"):
        train(_config(small_store, out, val_every=0, resume=True))
    with pytest.raises(ValueError, match="without a weight average"):
        plain = tmp_path / "plain"
        train(_config(small_store, plain, val_every=0, max_steps=1))
        train(_config(small_store, plain, val_every=0, ema_decay=0.7, resume=True))
