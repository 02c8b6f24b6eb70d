"""Shared small fixtures: tiny synthetic training volumes (spheres of known χ) and their fields.

Every volume is a few tens of voxels on a side so that patch extraction, a few training steps
of the ``toy`` network and a Nipype workflow all run in seconds on two CPU cores.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

# torch and the FFTs of the tests share two cores with other jobs
os.environ.setdefault("OMP_NUM_THREADS", "1")

#: shape of the synthetic volumes (small, but a 32³ patch grid still has 2 positions per axis)
SHAPE = (40, 40, 40)


def sphere_phantom(
    shape=SHAPE,
    *,
    seed: int = 0,
    n_spheres: int = 6,
    voxel_size=(1.0, 1.0, 1.0),
    b0_dir=(0.0, 0.0, 1.0),
) -> dict:
    """A brain-like ellipsoid mask holding spheres of known χ, and the local field they make.

    Returns a dict with ``chi`` (ppm, zero outside the mask), ``mask`` (bool), ``field``
    (ppm, ``forward_field(chi, pad=16) * mask``), ``spheres`` (centre, radius, χ) and the
    geometry.  The mask is an axis-aligned ellipsoid of semi-axes 0.4 × shape, centred.
    """
    from bids_qsmnet.physics.dipole import forward_field

    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    centre = [(n - 1) / 2 for n in shape]
    semi = [0.4 * n for n in shape]
    mask = sum(((g - c) / s) ** 2 for g, c, s in zip(grids, centre, semi)) <= 1.0
    chi = np.zeros(shape, np.float64)
    spheres = []
    for _ in range(n_spheres):
        radius = float(rng.uniform(2.0, 4.5))
        c = [float(rng.uniform(cc - 0.5 * s, cc + 0.5 * s)) for cc, s in zip(centre, semi)]
        value = float(rng.choice([-1.0, 1.0]) * rng.uniform(0.03, 0.15))
        inside = sum((g - cc) ** 2 for g, cc in zip(grids, c)) <= radius**2
        chi[inside] = value
        spheres.append((c, radius, value))
    chi *= mask
    field = forward_field(chi, voxel_size, b0_dir, pad=16) * mask
    return {
        "chi": chi.astype(np.float32),
        "mask": mask,
        "field": field.astype(np.float32),
        "spheres": spheres,
        "voxel_size": tuple(voxel_size),
        "b0_dir": tuple(b0_dir),
    }


def write_nifti(data: np.ndarray, path, *, voxel_size=(1.0, 1.0, 1.0), dtype=np.float32) -> str:
    """Write ``data`` as NIfTI with a diagonal (RAS, axis-aligned) affine; returns the path."""
    import nibabel as nib

    affine = np.diag([*map(float, voxel_size), 1.0])
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.set_data_dtype(dtype)
    nib.save(img, os.fspath(path))
    return os.fspath(path)


@pytest.fixture(scope="session")
def phantoms():
    """Two different sphere phantoms (subjects ``sub-01`` and ``sub-02``), 40³, 1 mm."""
    return [sphere_phantom(seed=1), sphere_phantom(seed=2)]


@pytest.fixture(scope="session")
def training_volumes(phantoms):
    """The phantoms as :class:`~bids_qsmnet.training.patches.TrainingVolume` s."""
    from bids_qsmnet.training.patches import TrainingVolume

    return [
        TrainingVolume(
            p["field"],
            p["chi"],
            p["mask"],
            voxel_size=p["voxel_size"],
            b0_dir=p["b0_dir"],
            subject=f"sub-{i + 1:02d}",
        )
        for i, p in enumerate(phantoms)
    ]


@pytest.fixture
def nifti_triplets(tmp_path, phantoms):
    """The phantoms written as NIfTI (field, χ, mask), one dict of paths per subject."""
    out = []
    for i, p in enumerate(phantoms):
        sub = f"sub-{i + 1:02d}"
        d = tmp_path / "inputs"
        d.mkdir(exist_ok=True)
        out.append(
            {
                "subject": sub,
                "field": write_nifti(p["field"], d / f"{sub}_desc-localfield_ppm.nii.gz"),
                "chi": write_nifti(p["chi"], d / f"{sub}_Chimap.nii.gz"),
                "mask": write_nifti(p["mask"], d / f"{sub}_desc-brain_mask.nii.gz", dtype=np.uint8),
            }
        )
    return out


#: shape of the phantoms behind :func:`small_store` (training tests: 16³ patches are 8× cheaper)
SMALL_SHAPE = (24, 24, 24)


@pytest.fixture(scope="session")
def small_store(tmp_path_factory):
    """16 patches of 16³ (2 subjects × a 2 × 2 × 2 grid) cut from 24³ phantoms, made once.

    16 patches make whole batches of 4 (and 2 ranks × 2) for the trainer and DDP tests.
    """
    from bids_qsmnet.training.patches import TrainingVolume, extract_patches

    vols = []
    for seed in (1, 2):
        p = sphere_phantom(SMALL_SHAPE, seed=seed, n_spheres=4)
        vols.append(TrainingVolume(p["field"], p["chi"], p["mask"], subject=f"sub-{seed:02d}"))
    path = tmp_path_factory.mktemp("small_store") / "patches.h5"
    info = extract_patches(vols, path, patch_size=16, counts=(2, 2, 2))
    assert info.n_patches == 16
    return info


@pytest.fixture(scope="session")
def patch_store(tmp_path_factory, training_volumes):
    """A small patch store (2 subjects × 8 patches of 32³, no augmentation), made once."""
    from bids_qsmnet.training.patches import extract_patches

    path = tmp_path_factory.mktemp("store") / "patches.h5"
    info = extract_patches(training_volumes, path, patch_size=32)
    assert info.n_patches == 16  # 2 × 2 × 2 grid positions per subject, all with brain
    return info
