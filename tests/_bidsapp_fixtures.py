"""Helpers shared by the BIDS-App tests (discovery, derivatives, frame, inference, workflows).

Plain functions, not fixtures: each test module wraps what it needs in its own fixtures (pytest
only loads ``conftest.py`` automatically, and that file belongs to the training tests).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

#: γ̄ of the proton, MHz/T (written out here so that unit checks do not reuse the code's value)
GAMMA_BAR_MHZ_PER_T = 42.57747892

#: normalisation of the test models (ppm); non-zero means so that de-normalisation is visible
TEST_NORMALIZATION = {"input_mean": 0.002, "input_std": 0.02, "label_mean": 0.01, "label_std": 0.05}


def write_json(path, obj) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return str(path)


def write_nifti(path, data, affine=None, *, dtype=np.float32, code: int = 1) -> str:
    """Write ``data`` as NIfTI with ``affine`` (default identity) as qform and sform."""
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.set_data_dtype(dtype)
    img.set_qform(affine, code=code)
    img.set_sform(affine, code=code)
    nib.save(img, os.fspath(path))
    return str(path)


def make_dataset(root, *, derivative: bool, name: str = "test dataset") -> Path:
    """An empty BIDS dataset (raw or derivative) with its ``dataset_description.json``."""
    root = Path(root)
    desc = {
        "Name": name,
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative" if derivative else "raw",
    }
    if derivative:
        desc["GeneratedBy"] = [{"Name": "test-pipeline"}]
    write_json(root / "dataset_description.json", desc)
    return root


def add_volume(
    root, rel: str, sidecar: dict | None = None, *, data=None, affine=None, dtype=np.float32
) -> str:
    """Write a small NIfTI at ``root/rel`` (``.nii`` or ``.nii.gz``) and its sidecar."""
    root = Path(root)
    if data is None:
        data = np.zeros((4, 4, 4))
        data[1:3, 1:3, 1:3] = 1.0
    path = write_nifti(root / rel, data, affine, dtype=dtype)
    if sidecar is not None:
        stem = rel[:-7] if rel.endswith(".nii.gz") else rel[:-4]
        write_json(root / f"{stem}.json", sidecar)
    return path


def make_model_file(
    path,
    *,
    architecture: str = "qsmnet-lite",
    seed: int = 0,
    name: str = "test-lite",
    normalization: dict | None = None,
) -> str:
    """A small, randomly initialised model file (deterministic for a given seed)."""
    import torch

    from bids_qsmnet.models.modelfile import ModelSpec, save_model
    from bids_qsmnet.models.registry import build_network

    torch.manual_seed(seed)
    net = build_network(architecture)
    spec = ModelSpec(
        name=name, architecture=net.config, normalization=normalization or TEST_NORMALIZATION
    )
    return str(save_model(path, net, spec))


def identity_unet():
    """A ``UNet3d`` (channels 2-2, 3³ kernels, no norm, ReLU) whose output equals its input.

    ``down_0`` splits x into relu(x) and relu(-x), the coarse level and the upsampling are
    zero, the decoder passes the skip channels through and ``final`` recombines them:
    ``relu(x) - relu(-x) = x`` exactly in floating point.
    """
    import torch

    from bids_qsmnet.models.unet import UNet3d

    net = UNet3d(channels=[2, 2], kernel_size=3, act="relu", norm=None)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        c = 1  # centre tap of a 3³ kernel
        w = net.down_0.convs.conv_0.conv.weight
        w[0, 0, c, c, c], w[1, 0, c, c, c] = 1.0, -1.0
        for conv in (
            net.down_0.convs.conv_1.conv,
            net.upcat_1.convs.conv_0.conv,
            net.upcat_1.convs.conv_1.conv,
        ):
            conv.weight[0, 0, c, c, c] = 1.0  # [skip, up] concatenation: skip channels first
            conv.weight[1, 1, c, c, c] = 1.0
        net.final.weight[0, 0, 0, 0, 0], net.final.weight[0, 1, 0, 0, 0] = 1.0, -1.0
    return net.eval()


def sphere_field(
    shape=(32, 32, 32),
    *,
    radius: float = 5.0,
    chi: float = 0.1,
    voxel_size=(1.0, 1.0, 1.0),
    b0_dir=(0.0, 0.0, 1.0),
):
    """Local field (ppm) of a sphere of ``chi`` ppm inside an ellipsoidal brain mask.

    Returns ``(field, mask, chi_map)``; the field is the dipole convolution of ``chi_map``
    (padded against wrap-around), zero outside the mask.
    """
    from bids_qsmnet.physics.dipole import forward_field

    g = np.meshgrid(
        *[(np.arange(n) - (n - 1) / 2) * v for n, v in zip(shape, voxel_size)], indexing="ij"
    )
    semi = [0.4 * n * v for n, v in zip(shape, voxel_size)]
    mask = sum((gi / s) ** 2 for gi, s in zip(g, semi)) <= 1.0
    chi_map = np.where(sum(gi**2 for gi in g) <= radius**2, chi, 0.0)
    field = forward_field(chi_map, voxel_size, b0_dir, pad=16) * mask
    return field.astype(np.float32), mask, chi_map.astype(np.float32)


#: grid of the subjects of make_many_subjects
MANY_SHAPE = (24, 24, 24)


def _write_subject(ds: Path, sub: str, field, mask) -> None:
    anat = f"sub-{sub}/anat/sub-{sub}"
    add_volume(ds, f"{anat}_localfield.nii.gz", {"Units": "ppm"}, data=field)
    add_volume(ds, f"{anat}_desc-brain_mask.nii.gz", {}, data=mask, dtype=np.uint8)


def make_many_subjects(ds: Path, n: int, broken: dict) -> Path:
    """``n`` subjects (fields scaled per subject so that every map differs); ``broken`` maps
    a label to ``"empty-mask"`` or ``"truncated"``."""
    make_dataset(ds, derivative=True, name="many subjects")
    field, mask, _ = sphere_field(MANY_SHAPE, radius=4.0)
    for i, sub in enumerate(f"{j:02d}" for j in range(1, n + 1)):
        _write_subject(ds, sub, field * (1 + 0.01 * i), mask.astype(np.uint8))
    for sub, how in broken.items():
        anat = ds / f"sub-{sub}/anat/sub-{sub}"
        if how == "empty-mask":
            add_volume(ds, f"sub-{sub}/anat/sub-{sub}_desc-brain_mask.nii.gz", {},
                       data=np.zeros(MANY_SHAPE), dtype=np.uint8)
        else:
            path = Path(f"{anat}_localfield.nii.gz")
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return ds


def repair_subjects(ds: Path, subjects) -> None:
    """Rewrite the inputs of ``subjects`` as :func:`make_many_subjects` made them."""
    field, mask, _ = sphere_field(MANY_SHAPE, radius=4.0)
    for sub in subjects:
        i = int(sub) - 1
        _write_subject(ds, sub, field * (1 + 0.01 * i), mask.astype(np.uint8))
