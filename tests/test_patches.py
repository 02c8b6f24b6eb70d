"""Patch extraction: grid geometry, normalisation statistics, the HDF5 store and its dataset."""

from __future__ import annotations

import json
import math
import os

import h5py
import numpy as np
import pytest
import torch

from bids_qsmnet.training.dataset import KernelCache, PatchDataset
from bids_qsmnet.training.patches import (
    AUGMENTATIONS,
    FORMAT,
    FORMAT_VERSION,
    RunningStats,
    TrainingVolume,
    crop_to_mask,
    extract_patches,
    grid_positions,
    patch_grid,
    read_store_info,
)

torch.set_num_threads(2)

P = 32  # patch edge used with the 40³ phantoms


def dipole_convolve(chi: np.ndarray, b0_dir, *, pad: int = 16) -> np.ndarray:
    """Reference field of ``chi`` (ppm, 1 mm voxels), written out here from the textbook kernel
    D(k) = 1/3 − (k·b̂)²/|k|², D(0) = 0, on the volume zero-padded by ``pad`` on every side."""
    b = np.asarray(b0_dir, float) / np.linalg.norm(b0_dir)
    x = np.pad(np.asarray(chi, np.float64), pad)
    ki, kj, kk = np.meshgrid(*[np.fft.fftfreq(n) for n in x.shape], indexing="ij")
    k2 = ki**2 + kj**2 + kk**2
    k2[0, 0, 0] = 1.0
    kernel = 1.0 / 3.0 - (ki * b[0] + kj * b[1] + kk * b[2]) ** 2 / k2
    kernel[0, 0, 0] = 0.0
    field = np.fft.ifftn(kernel * np.fft.fftn(x)).real
    return field[pad:-pad, pad:-pad, pad:-pad]


def _crop(vol, origin, p=P):
    i, j, k = (int(v) for v in origin)
    return vol[i : i + p, j : j + p, k : k + p]


# --------------------------------------------------------------------------- grid geometry


def test_grid_positions_qsmnet_grid():
    # QSMnet: 7 × 8 × 6 patches of 64³, evenly spaced over a 172 × 176 × 159 volume
    assert grid_positions(172, 64, count=7).tolist() == [0, 18, 36, 54, 72, 90, 108]
    assert grid_positions(176, 64, count=8).tolist() == [0, 16, 32, 48, 64, 80, 96, 112]
    assert grid_positions(159, 64, count=6).tolist() == [0, 19, 38, 57, 76, 95]
    corners = patch_grid((172, 176, 159), 64, counts=(7, 8, 6))
    assert corners.shape == (7 * 8 * 6, 3)
    assert len({tuple(c) for c in corners}) == 336


@pytest.mark.parametrize(
    "length, patch, max_stride",
    [
        (172, 64, None),
        (176, 64, None),
        (159, 64, None),
        (40, 32, None),
        (100, 32, 7),
        (64, 64, None),
        (65, 64, None),
    ],
)
def test_grid_positions_default_stride(length, patch, max_stride):
    pos = grid_positions(length, patch, max_stride=max_stride)
    step = patch // 3 if max_stride is None else max_stride
    span = length - patch
    assert pos[0] == 0 and pos[-1] == span  # the grid spans the whole axis
    assert np.all(np.diff(pos) > 0) and np.all(np.diff(pos) <= step)
    # and it is the smallest such grid: one position fewer would need a step above the limit
    assert len(pos) == (math.ceil(span / step) + 1 if span else 1)


def test_grid_positions_default_qsmnet_counts():
    # the default stride (patch // 3 = 21) gives QSMnet's 7 positions along 172 and 6 along 159
    assert len(grid_positions(172, 64)) == 7
    assert len(grid_positions(159, 64)) == 6


def test_grid_positions_single_and_errors():
    assert grid_positions(64, 64).tolist() == [0]
    assert grid_positions(80, 64, count=1).tolist() == [8]  # one patch sits in the middle
    with pytest.raises(ValueError, match="shorter"):
        grid_positions(30, 32)
    with pytest.raises(ValueError):
        grid_positions(40, 0)
    with pytest.raises(ValueError):
        grid_positions(40, 32, count=0)


@pytest.mark.parametrize(
    "shape, patch, counts",
    [
        ((40, 40, 40), 32, None),
        ((70, 55, 48), 32, None),
        ((172, 176, 159), 64, (7, 8, 6)),
        ((50, 60, 33), 16, (4, 1, 3)),
    ],
)
def test_patch_grid_inside_and_overlapping(shape, patch, counts):
    corners = patch_grid(shape, patch, counts=counts)
    per_axis = [np.unique(corners[:, a]) for a in range(3)]
    assert len(corners) == math.prod(len(p) for p in per_axis)
    if counts:
        assert [len(p) for p in per_axis] == list(counts)
    assert corners.min() >= 0
    assert np.all(corners + patch <= np.asarray(shape))  # every patch lies inside the volume
    for p in per_axis:  # neighbours overlap: the step is shorter than the patch
        assert np.all(np.diff(p) < patch)


def test_crop_to_mask_contains_mask():
    rng = np.random.default_rng(3)
    for _ in range(20):
        shape = tuple(int(v) for v in rng.integers(20, 60, size=3))
        mask = np.zeros(shape, bool)
        lo = [int(rng.integers(0, n - 2)) for n in shape]
        hi = [int(rng.integers(a + 1, n + 1)) for a, n in zip(lo, shape)]
        mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
        crop = crop_to_mask(mask, 24, margin=3)
        assert mask[crop].sum() == mask.sum()  # nothing of the brain is cut away
        for s, a, b, n in zip(crop, lo, hi, shape):
            assert 0 <= s.start <= max(a - 3, 0) and min(b + 3, n) <= s.stop <= n
            assert s.stop - s.start >= min(24, n)  # at least one patch wide where it can be


def test_crop_to_mask_margin_exact():
    mask = np.zeros((60, 60, 60), bool)
    mask[20:40, 10:50, 5:55] = True
    assert crop_to_mask(mask, 16, margin=4) == (slice(16, 44), slice(6, 54), slice(1, 59))
    # a thin mask is widened symmetrically to the patch size
    thin = np.zeros((60, 60, 60), bool)
    thin[30, 30, 30] = True
    assert crop_to_mask(thin, 16, margin=0) == (slice(23, 39),) * 3  # 7 before, 8 after


def test_patches_with_little_brain_are_skipped(tmp_path, training_volumes):
    # 48 × 32 × 32 volume: brain fills x < 16 plus one voxel at the far corner (which makes
    # the crop the whole volume).  Patches of 16³ at x = 0, 8, 16, 24, 32 (counts 5 × 2 × 2)
    # hold 100 %, 50 %, 0 %, 0 %, 1/4096 brain: with a 40 % threshold 2 × 4 of 20 are kept.
    shape = (48, 32, 32)
    mask = np.zeros(shape, bool)
    mask[:16] = True
    mask[47, 31, 31] = True
    field = np.where(mask, 0.01, 0.0)
    vol = TrainingVolume(field, field, mask, subject="sub-x")
    info = extract_patches(
        [vol],
        tmp_path / "p.h5",
        patch_size=16,
        counts=(5, 2, 2),
        min_mask_fraction=0.4,
        crop_margin=0,
    )
    assert info.n_patches == 8
    assert info.subjects[0]["grid_positions"] == 20
    assert info.subjects[0]["patches_kept"] == 8
    with h5py.File(info.path) as h5:
        origins = {tuple(o) for o in h5["origin"][:]}
        fractions = h5["mask"][:].mean(axis=(1, 2, 3, 4))
    assert origins == {(x, y, z) for x in (0, 8) for y in (0, 16) for z in (0, 16)}
    assert sorted(np.round(fractions, 6)) == [0.5] * 4 + [1.0] * 4
    # threshold 0 keeps every grid position
    info0 = extract_patches(
        [vol],
        tmp_path / "q.h5",
        patch_size=16,
        counts=(5, 2, 2),
        min_mask_fraction=0.0,
        crop_margin=0,
    )
    assert info0.n_patches == 20
    # a threshold no patch reaches leaves nothing: an error, and no file (no 32³ cube fits
    # inside the phantom's ellipsoid brain)
    with pytest.raises(ValueError, match="no patches"):
        extract_patches(training_volumes, tmp_path / "r.h5", patch_size=P, min_mask_fraction=1.0)
    assert not (tmp_path / "r.h5").exists()


def test_axis_shorter_than_patch_is_zero_padded(tmp_path):
    rng = np.random.default_rng(0)
    shape = (24, 40, 40)
    mask = np.zeros(shape, bool)
    mask[2:22, 4:36, 4:36] = True
    field = rng.normal(0, 0.01, shape) * mask
    chi = rng.normal(0, 0.05, shape) * mask
    info = extract_patches([TrainingVolume(field, chi, mask)], tmp_path / "p.h5", patch_size=32)
    with h5py.File(info.path) as h5:
        assert set(h5["origin"][:, 0]) == {0}
        for n in range(info.n_patches):
            o = h5["origin"][n]
            expect = np.zeros((P, P, P), np.float32)
            expect[:24] = _crop(field, o)
            np.testing.assert_array_equal(h5["input"][n, 0], expect)


# --------------------------------------------------------------------------- statistics


def test_running_stats_equals_numpy():
    rng = np.random.default_rng(7)
    stats = RunningStats()
    chunks = [rng.normal(3.0, 2.0, size=int(n)) for n in rng.integers(0, 500, size=30)]
    chunks.insert(4, np.empty(0))
    chunks.append(rng.normal(-50.0, 0.1, size=(7, 9)))  # a far-off chunk, 2-D
    for c in chunks:
        stats.update(c)
    allv = np.concatenate([c.ravel() for c in chunks])
    assert stats.n == allv.size
    assert stats.mean == pytest.approx(allv.mean(), rel=1e-12, abs=1e-12)
    assert stats.std == pytest.approx(allv.std(), rel=1e-10)
    assert math.isnan(RunningStats().std)


def test_store_normalisation_equals_numpy(tmp_path, training_volumes):
    info = extract_patches(
        training_volumes, tmp_path / "p.h5", patch_size=P, linearity_factor=4.0, sign_flip=True
    )
    with h5py.File(info.path) as h5:
        m = h5["mask"][:].astype(bool)
        inputs = h5["input"][:][m].astype(np.float64)
        labels = h5["label"][:][m].astype(np.float64)
        stored = json.loads(h5.attrs["normalization"])
    assert stored == info.normalization
    assert stored["input_mean"] == pytest.approx(inputs.mean(), rel=1e-9, abs=1e-12)
    assert stored["input_std"] == pytest.approx(inputs.std(), rel=1e-9)
    assert stored["label_mean"] == pytest.approx(labels.mean(), rel=1e-9, abs=1e-12)
    assert stored["label_std"] == pytest.approx(labels.std(), rel=1e-9)
    # with the sign-flipped copies the means vanish (each value comes with its negative)
    assert abs(stored["input_mean"]) < 1e-9 * stored["input_std"] + 1e-12
    assert abs(stored["label_mean"]) < 1e-9 * stored["label_std"] + 1e-12


# --------------------------------------------------------------------------- HDF5 store


def test_store_layout_and_content(tmp_path, training_volumes, phantoms):
    vols = [
        TrainingVolume(
            v.field,
            v.chi,
            v.mask,
            subject=v.subject,
            sources={"field": f"{v.subject}_field.nii.gz"},
        )
        for v in training_volumes
    ]
    info = extract_patches(vols, tmp_path / "p.h5", patch_size=P)
    assert info.n_patches == 16 and info.patch_size == P
    assert os.listdir(tmp_path) == ["p.h5"]  # no temporary file left behind
    with h5py.File(info.path) as h5:
        n = info.n_patches
        for name, dtype in (("input", np.float32), ("label", np.float32), ("mask", np.uint8)):
            ds = h5[name]
            assert ds.shape == (n, 1, P, P, P) and ds.dtype == dtype
            assert ds.chunks == (1, 1, P, P, P)  # one patch per chunk: cheap random reads
        for name, shape, kind in (
            ("b0_dir", (n, 3), "f"),
            ("voxel_size", (n, 3), "f"),
            ("subject", (n,), "i"),
            ("origin", (n, 3), "i"),
            ("augmentation", (n,), "i"),
        ):
            assert h5[name].shape == shape and h5[name].dtype.kind == kind
        attrs = h5.attrs
        assert attrs["format"] == FORMAT and int(attrs["format_version"]) == FORMAT_VERSION
        assert bool(attrs["complete"]) is True and int(attrs["patch_size"]) == P
        subjects = json.loads(attrs["subjects"])
        assert [s["subject"] for s in subjects] == ["sub-01", "sub-02"]
        assert subjects[0]["sources"] == {"field": "sub-01_field.nii.gz"}
        assert subjects[0]["shape"] == [40, 40, 40]
        assert json.loads(attrs["augmentations"]) == list(AUGMENTATIONS)
        assert json.loads(attrs["grid"])["patch_size"] == P
        assert json.loads(attrs["augmentation"])["sign_flip"] is False
        np.testing.assert_array_equal(h5["subject"][:], [0] * 8 + [1] * 8)
        np.testing.assert_array_equal(h5["augmentation"][:], 0)
        np.testing.assert_allclose(h5["b0_dir"][:], [[0, 0, 1]] * n)
        np.testing.assert_allclose(h5["voxel_size"][:], [[1, 1, 1]] * n)
        for idx in range(n):
            s = int(h5["subject"][idx])
            crop = tuple(slice(a, b) for a, b in subjects[s]["crop"])
            o = h5["origin"][idx]
            ph = phantoms[s]
            np.testing.assert_array_equal(h5["input"][idx, 0], _crop(ph["field"][crop], o))
            np.testing.assert_array_equal(h5["label"][idx, 0], _crop(ph["chi"][crop], o))
            np.testing.assert_array_equal(h5["mask"][idx, 0], _crop(ph["mask"][crop], o))
    info2 = read_store_info(info.path)
    assert info2.n_patches == 16 and info2.normalization == info.normalization
    assert info2.subjects == subjects


def test_linearity_and_sign_flip(tmp_path, training_volumes, phantoms):
    factor = 4.0
    info = extract_patches(
        training_volumes[:1],
        tmp_path / "p.h5",
        patch_size=P,
        linearity_factor=factor,
        sign_flip=True,
    )
    ph = phantoms[0]
    assert info.subjects[0]["crop"] == [[0, 40]] * 3  # the phantom's crop is the whole volume
    chi_lin = np.where(ph["chi"] > 0, factor * ph["chi"].astype(np.float64), ph["chi"])
    field_lin = dipole_convolve(chi_lin, (0, 0, 1)) * ph["mask"]
    with h5py.File(info.path) as h5:
        aug = h5["augmentation"][:]
        names = [AUGMENTATIONS[a] for a in aug]
        counts = {a: names.count(a) for a in set(names)}
        assert counts == {"none": 8, "linearity": 8, "sign_flip": 8, "linearity+sign_flip": 8}
        origins = h5["origin"][:]
        by_name = {a: np.flatnonzero(np.asarray(names) == a) for a in counts}
        for a in counts:  # every variant covers the same grid positions, in the same order
            np.testing.assert_array_equal(origins[by_name[a]], origins[by_name["none"]])
        inp, lab = h5["input"][:, 0], h5["label"][:, 0]
        for i_none, i_lin, i_flip, i_lflip in zip(
            *(by_name[a] for a in ("none", "linearity", "sign_flip", "linearity+sign_flip"))
        ):
            o = origins[i_none]
            np.testing.assert_allclose(lab[i_lin], _crop(chi_lin, o), rtol=1e-6)
            assert np.any(lab[i_lin] != lab[i_none])  # positive χ was scaled
            np.testing.assert_allclose(inp[i_lin], _crop(field_lin, o), rtol=1e-4, atol=1e-7)
            np.testing.assert_array_equal(inp[i_flip], -inp[i_none])
            np.testing.assert_array_equal(lab[i_flip], -lab[i_none])
            np.testing.assert_array_equal(inp[i_lflip], -inp[i_lin])
            np.testing.assert_array_equal(lab[i_lflip], -lab[i_lin])


def test_linearity_of_positive_sources(tmp_path):
    # with positive sources only, the dipole model's linearity makes the re-simulated field
    # exactly factor × the original one
    from bids_qsmnet.physics.dipole import forward_field

    g = np.indices((40, 40, 40)) - 19.5
    mask = (g**2).sum(0) <= 16**2
    chi = 0.1 * ((g - np.array([3, -2, 4])[:, None, None, None]) ** 2).sum(0) <= 5**2
    chi = 0.1 * chi + 0.02 * ((g**2).sum(0) <= 3**2)
    field = forward_field(chi, pad=16) * mask
    info = extract_patches(
        [TrainingVolume(field, chi, mask)], tmp_path / "p.h5", patch_size=P, linearity_factor=2.5
    )
    with h5py.File(info.path) as h5:
        aug = h5["augmentation"][:]
        none, lin = np.flatnonzero(aug == 0), np.flatnonzero(aug == 1)
        assert len(none) == len(lin) == 8
        np.testing.assert_allclose(h5["input"][lin], 2.5 * h5["input"][none], rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(h5["label"][lin], 2.5 * h5["label"][none], rtol=1e-6)


def test_b0_tilt_copies(tmp_path, training_volumes, phantoms):
    info = extract_patches(
        training_volumes[:1],
        tmp_path / "p.h5",
        patch_size=P,
        b0_tilts=2,
        max_tilt_deg=25.0,
        sign_flip=True,
        seed=5,
    )
    ph = phantoms[0]
    with h5py.File(info.path) as h5:
        names = np.asarray([AUGMENTATIONS[a] for a in h5["augmentation"][:]])
        assert (names == "b0_tilt").sum() == 16 and (names == "b0_tilt+sign_flip").sum() == 16
        assert (names == "none").sum() == 8 and (names == "sign_flip").sum() == 8
        tilt = np.flatnonzero(names == "b0_tilt")
        dirs = h5["b0_dir"][:][tilt]
        np.testing.assert_allclose(np.linalg.norm(dirs, axis=1), 1.0, rtol=1e-12)
        angles = np.degrees(np.arccos(dirs[:, 2]))
        assert np.all((angles > 0) & (angles <= 25.0))
        distinct = np.unique(np.round(dirs, 12), axis=0)
        assert len(distinct) == 2  # two tilted copies, each with its own direction
        for b in distinct:
            field_b = dipole_convolve(ph["chi"], b) * ph["mask"]
            rows = tilt[np.all(np.isclose(dirs, b), axis=1)]
            assert len(rows) == 8
            for r in rows:
                o = h5["origin"][r]
                np.testing.assert_allclose(
                    h5["input"][r, 0], _crop(field_b, o), rtol=1e-4, atol=1e-7
                )
                np.testing.assert_array_equal(h5["label"][r, 0], _crop(ph["chi"], o))
        # the sign-flipped tilted copies keep their direction and negate field and χ
        flip = np.flatnonzero(names == "b0_tilt+sign_flip")
        np.testing.assert_array_equal(h5["b0_dir"][:][flip], dirs)
        np.testing.assert_array_equal(h5["input"][flip], -h5["input"][tilt])
        np.testing.assert_array_equal(h5["label"][flip], -h5["label"][tilt])
        # the untilted patches keep B0 along the third axis
        np.testing.assert_allclose(h5["b0_dir"][:][names == "none"], [[0, 0, 1]] * 8)


def test_extraction_is_atomic(tmp_path, training_volumes):
    def volumes():
        yield training_volumes[0]
        raise RuntimeError("subject 2 could not be read")

    out = tmp_path / "out" / "patches.h5"
    with pytest.raises(RuntimeError, match="subject 2"):
        extract_patches(volumes(), out, patch_size=P)
    assert os.listdir(tmp_path / "out") == []  # neither the store nor its temporary file


def test_read_store_info_refuses_other_files(tmp_path, patch_store):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as h5:
        h5["input"] = np.zeros((2, 1, 4, 4, 4), np.float32)
    incomplete = tmp_path / "incomplete.h5"
    with h5py.File(patch_store.path) as src, h5py.File(incomplete, "w") as dst:
        for k, v in src.attrs.items():
            if k != "complete":
                dst.attrs[k] = v
        src.copy("input", dst)
    newer = tmp_path / "newer.h5"
    with h5py.File(patch_store.path) as src, h5py.File(newer, "w") as dst:
        for k, v in src.attrs.items():
            dst.attrs[k] = v
        dst.attrs["format_version"] = FORMAT_VERSION + 1
        src.copy("input", dst)
    text = tmp_path / "notes.h5"
    text.write_text("not HDF5")
    for path, match in (
        (foreign, "not a complete"),
        (incomplete, "not a complete"),
        (newer, "newer"),
        (text, "not a readable"),
        (tmp_path / "missing.h5", "not a readable"),
    ):
        with pytest.raises(ValueError, match=match):
            read_store_info(path)
        with pytest.raises(ValueError):
            PatchDataset(path)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"chi": np.zeros((8, 8, 9))}, "same shape"),
        ({"field": np.full((8, 8, 8), np.nan)}, "NaN"),
        ({"mask": np.zeros((8, 8, 8))}, "empty"),
        ({"field": np.zeros((8, 8))}, "3-D"),
        ({"b0_dir": (0, 0, 0)}, "zero"),
    ],
)
def test_training_volume_checks(change, match):
    args = {
        "field": np.zeros((8, 8, 8)),
        "chi": np.zeros((8, 8, 8)),
        "mask": np.ones((8, 8, 8)),
        **change,
    }
    with pytest.raises(ValueError, match=match):
        TrainingVolume(**args)


# --------------------------------------------------------------------------- dataset


def test_patch_dataset_normalises(patch_store, phantoms):
    ds = PatchDataset(patch_store.path)
    norm = patch_store.normalization
    assert len(ds) == 16 and ds.normalization == norm
    with h5py.File(patch_store.path) as h5:
        origins, subjects = h5["origin"][:], h5["subject"][:]
    for i in (0, 5, 15):
        item = ds[i]
        ph = phantoms[int(subjects[i])]
        m = _crop(ph["mask"], origins[i]).astype(np.float64)
        x = (_crop(ph["field"], origins[i]) - norm["input_mean"]) / norm["input_std"] * m
        y = (_crop(ph["chi"], origins[i]) - norm["label_mean"]) / norm["label_std"] * m
        assert item["input"].shape == (1, P, P, P) and item["input"].dtype == torch.float32
        assert item["label"].dtype == torch.float32 and item["mask"].dtype == torch.float32
        np.testing.assert_allclose(item["input"][0].numpy(), x, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(item["label"][0].numpy(), y, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(item["mask"][0].numpy(), m)
        np.testing.assert_array_equal(item["b0_dir"].numpy(), [0.0, 0.0, 1.0])
        np.testing.assert_array_equal(item["voxel_size"].numpy(), [1.0, 1.0, 1.0])
    # the in-mask voxels of the normalised store have mean 0 and std 1
    allx = torch.stack([ds[i]["input"] for i in range(len(ds))])
    allm = torch.stack([ds[i]["mask"] for i in range(len(ds))]).bool()
    vals = allx[allm].double()
    assert float(vals.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(vals.std(unbiased=False)) == pytest.approx(1.0, rel=1e-5)
    # explicit constants (a model's) and a subset of indices
    other = {"input_mean": 0.0, "input_std": 0.5, "label_mean": 0.1, "label_std": 2.0}
    sub = PatchDataset(patch_store.path, normalization=other, indices=[3, 7])
    assert len(sub) == 2
    ph = phantoms[int(subjects[7])]
    m = _crop(ph["mask"], origins[7])
    np.testing.assert_allclose(
        sub[1]["label"][0].numpy(),
        (_crop(ph["chi"], origins[7]) - 0.1) / 2.0 * m,
        rtol=1e-6,
        atol=1e-7,
    )


class _ProbeDataset(PatchDataset):
    """Reports which process read an item and through which h5py file object."""

    def __getitem__(self, item):
        out = super().__getitem__(item)
        out["pid"] = os.getpid()
        out["handle"] = id(self._file())  # fork copies objects at the same address
        return out


def test_patch_dataset_in_dataloader_workers(patch_store):
    from torch.utils.data import DataLoader

    ds = _ProbeDataset(patch_store.path)
    first = ds[0]  # the parent opens its own handle before the workers fork
    parent_handle = first["handle"]
    expected = torch.stack([ds[i]["input"] for i in range(len(ds))])
    loader = DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    batches = list(loader)
    got = torch.cat([b["input"] for b in batches])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    pids = {int(p) for b in batches for p in b["pid"]}
    assert len(pids) == 2 and os.getpid() not in pids  # both workers read
    # each worker opened the file itself rather than using the handle inherited by fork
    assert all(int(h) != parent_handle for b in batches for h in b["handle"])
    import pickle

    clone = pickle.loads(pickle.dumps(ds))
    assert clone._h5 is None
    torch.testing.assert_close(clone[3]["label"], ds[3]["label"], rtol=0, atol=0)


def test_kernel_cache(tmp_path, training_volumes):
    from bids_qsmnet.physics.dipole import dipole_kernel

    info = extract_patches(
        training_volumes[:1], tmp_path / "p.h5", patch_size=P, b0_tilts=1, seed=2
    )
    ds = PatchDataset(info.path)
    cache = KernelCache()
    straight, tilted = ds[0], ds[len(ds) - 1]
    assert not np.allclose(tilted["b0_dir"].numpy(), [0, 0, 1])
    for item in (straight, tilted):
        k = cache.get((P, P, P), item["voxel_size"].numpy(), item["b0_dir"].numpy())
        assert k.shape == (P, P, P) and k.dtype == torch.float32
        b = item["b0_dir"].numpy()
        ref = np.fft.fftfreq(P)
        ki, kj, kk = np.meshgrid(ref, ref, ref, indexing="ij")
        with np.errstate(invalid="ignore", divide="ignore"):
            expect = 1 / 3 - (ki * b[0] + kj * b[1] + kk * b[2]) ** 2 / (ki**2 + kj**2 + kk**2)
        expect[0, 0, 0] = 0
        np.testing.assert_allclose(k.numpy(), expect, atol=1e-6)
        assert cache.get((P, P, P), item["voxel_size"].numpy(), b) is k  # built once
    # a batch of one geometry shares one kernel; a mixed batch stacks one per patch
    same = cache.batch((P, P, P), torch.ones(3, 3), torch.tensor([[0.0, 0, 1]] * 3))
    assert same.shape == (P, P, P)
    mixed = cache.batch(
        (P, P, P),
        torch.stack([straight["voxel_size"], tilted["voxel_size"]]),
        torch.stack([straight["b0_dir"], tilted["b0_dir"]]),
    )
    assert mixed.shape == (2, 1, P, P, P)
    torch.testing.assert_close(
        mixed[0, 0], torch.as_tensor(dipole_kernel((P, P, P)), dtype=torch.float32)
    )
    # anisotropic voxels change the kernel
    k_aniso = cache.get((P, P, P), (1.0, 1.0, 2.0), (0, 0, 1))
    assert not torch.allclose(k_aniso, cache.get((P, P, P), (1.0, 1.0, 1.0), (0, 0, 1)))
