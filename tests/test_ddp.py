"""DistributedDataParallel under ``torchrun`` on the CPU (gloo), as a user would start it.

The semantic check: without batch norm and without the model loss (whose masked mean is taken
per process), two processes with batches of b take the same steps as one process with batches
of 2b — ``DistributedSampler`` deals every epoch's patch order out to the ranks in turn, so
their two batches together are the single process's batch, and DDP averages the gradients.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from bids_qsmnet.models.modelfile import load_model
from bids_qsmnet.models.registry import architecture_config
from bids_qsmnet.training.trainer import TrainingConfig, train

torch.set_num_threads(1)

#: the toy U-Net without batch norm (batch statistics would differ between 2 × b and 2b)
NO_BN = {**architecture_config("toy"), "norm": None}
COMMON = [
    "--epochs",
    "1",
    "--seed",
    "5",
    "--device",
    "cpu",
    "--threads",
    "1",
    "--learning-rate",
    "0.01",
    "--log-every",
    "1",
]


def torchrun(nproc: int, args: list[str], cwd) -> subprocess.CompletedProcess:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "bids_qsmnet.train",
        *args,
    ]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _log(out) -> list[dict]:
    with open(out / "training_log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _single(store, out, batch_size, **kw):
    cfg = TrainingConfig(
        patches=store.path,
        out_dir=str(out),
        architecture=NO_BN,
        name="custom",
        batch_size=batch_size,
        epochs=1,
        seed=5,
        device="cpu",
        threads=1,
        learning_rate=0.01,
        log_every=1,
        w_model=0.0,
        val_every=0,
        **kw,
    )
    return train(cfg)


def test_two_processes_equal_one_with_double_batch(tmp_path, small_store):
    cfg_file = tmp_path / "arch.json"
    cfg_file.write_text(
        json.dumps({k: NO_BN[k] for k in ("channels", "kernel_size", "act", "norm")})
    )
    ddp_out = tmp_path / "ddp"
    torchrun(
        2,
        [
            "--patches",
            small_store.path,
            "--out-dir",
            str(ddp_out),
            "--model",
            str(cfg_file),
            "--batch-size",
            "2",
            "--w-model",
            "0",
            "--val-every",
            "0",
            *COMMON,
        ],
        tmp_path,
    )

    # rank 0 alone wrote: one model, one log with every step once, no temporary files
    assert sorted(os.listdir(ddp_out)) == [
        "checkpoint.pt",
        "loss_curves.png",
        "model.safetensors",
        "model_epoch-001.safetensors",
        "training_log.csv",
        "training_summary.json",
    ]
    rows = _log(ddp_out)
    assert [(r["kind"], int(r["step"])) for r in rows] == [("train", s) for s in (1, 2, 3, 4)]
    summary = json.loads((ddp_out / "training_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps_done"] == 4
    spec = load_model(ddp_out / "model.safetensors").spec
    assert spec.training["world_size"] == 2 and spec.architecture == NO_BN

    one = _single(small_store, tmp_path / "one", batch_size=4)
    assert one.steps_done == 4
    w_ddp = load_file(ddp_out / "model.safetensors")
    w_one = load_file(tmp_path / "one" / "model.safetensors")
    assert w_ddp.keys() == w_one.keys()
    diff = max(float((w_ddp[k] - w_one[k]).abs().max()) for k in w_ddp)
    assert diff < 1e-5
    # the logged loss is that of the whole batch over both ranks, as one process logs it
    for a, b in zip(rows, _log(tmp_path / "one")):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)
        assert float(a["l1"]) == pytest.approx(float(b["l1"]), rel=1e-5)

    # the check can fail: one process with batches of b (not 2b) ends elsewhere
    half = _single(small_store, tmp_path / "half", batch_size=2, max_steps=4)
    w_half = load_file(half.model_path)
    assert max(float((w_half[k] - w_one[k]).abs().max()) for k in w_one) > 1e3 * max(diff, 1e-8)
    # and training did move the weights away from their (seeded) start
    from bids_qsmnet.models.registry import build_network

    torch.manual_seed(5)
    w_init = build_network(NO_BN).state_dict()
    assert max(float((w_init[k] - w_one[k]).abs().max()) for k in w_one) > 1e-3


@pytest.mark.slow
def test_ddp_batch_norm_validation_and_resume(tmp_path, small_store):
    """The default toy (batch norm, model loss) under DDP: stop at step 3, resume, validate."""
    from conftest import SMALL_SHAPE, sphere_phantom, write_nifti

    ph = sphere_phantom(SMALL_SHAPE, seed=7, n_spheres=4)
    val = ",".join(
        [
            write_nifti(ph["field"], tmp_path / "val_field.nii.gz"),
            write_nifti(ph["chi"], tmp_path / "val_chi.nii.gz"),
            write_nifti(ph["mask"], tmp_path / "val_mask.nii.gz"),
        ]
    )
    out = tmp_path / "ddp"
    args = [
        "--patches",
        small_store.path,
        "--out-dir",
        str(out),
        "--model",
        "toy",
        "--batch-size",
        "2",
        "--val",
        val,
        "--val-every",
        "1",
        *COMMON,
    ]
    args[args.index("--epochs") + 1] = "2"
    torchrun(2, [*args, "--max-steps", "3", "--checkpoint-every-steps", "2"], tmp_path)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    torchrun(2, [*args, "--resume"], tmp_path)
    rows = _log(out)
    assert [int(r["step"]) for r in rows if r["kind"] == "train"] == list(range(1, 9))
    assert [int(r["epoch"]) for r in rows if r["kind"] == "val"] == [1, 2]
    assert (out / "validation" / "epoch-002_val_field.png").is_file()
    loaded = load_model(out / "model.safetensors")
    assert loaded.spec.training["steps_done"] == 8 and loaded.spec.training["world_size"] == 2
