"""Volumes from MATLAB .mat files: v5 (scipy) and v7.3 (HDF5, written here as MATLAB does)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from scipy.io import savemat

from bids_qsmnet.data.matlab import load_mat_volume

SHAPE = (5, 6, 7)  # distinct lengths, so a transposed read cannot pass


def write_mat73(path, variables: dict, *, userblock: bool = True) -> str:
    """Write a MATLAB v7.3 file the way MATLAB does.

    MATLAB stores arrays column-major, so an (x, y, z) array appears in HDF5 as a (z, y, x)
    dataset; every variable carries a ``MATLAB_class`` attribute; the file starts with a
    512-byte user block holding MATLAB's 128-byte text header (116 bytes of text, the
    subsystem offset, version 0x0200 and the endian indicator "IM").
    """
    kw = {"userblock_size": 512} if userblock else {}
    with h5py.File(path, "w", **kw) as f:
        for name, (value, matlab_class) in variables.items():
            if matlab_class == "struct":
                g = f.create_group(name)
                g.attrs["MATLAB_class"] = np.bytes_("struct")
                g.create_dataset("a", data=np.zeros((1, 1)))
                continue
            if matlab_class == "char":  # MATLAB chars are UTF-16 code units, 1×N → (N, 1)
                data = np.frombuffer(value.encode("utf-16-le"), np.uint16).reshape(-1, 1)
            else:
                data = np.asarray(value).T
            ds = f.create_dataset(name, data=data)
            ds.attrs["MATLAB_class"] = np.bytes_(matlab_class)
    if userblock:
        text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 "
        text += b"HDF5 schema 1.00 ."
        header = text.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"
        with open(path, "r+b") as fh:
            fh.write(header.ljust(512, b"\x00"))
    return str(path)


@pytest.fixture
def volumes():
    rng = np.random.default_rng(0)
    return {"phs_tissue": rng.normal(0, 0.02, SHAPE), "chi_cosmos": rng.normal(0, 0.1, SHAPE)}


def test_mat73_header_is_what_matlab_writes(tmp_path, volumes):
    path = write_mat73(tmp_path / "f.mat", {"phs_tissue": (volumes["phs_tissue"], "double")})
    head = open(path, "rb").read(520)
    assert head.startswith(b"MATLAB 7.3 MAT-file")
    assert head[124:128] == b"\x00\x02IM"
    assert head[512:520] == b"\x89HDF\r\n\x1a\n"  # the HDF5 superblock follows the user block
    with h5py.File(path) as f:
        assert f["phs_tissue"].shape == SHAPE[::-1]


@pytest.mark.parametrize("fmt", ["v5", "v7.3", "hdf5"])
def test_round_trip(tmp_path, volumes, fmt):
    path = tmp_path / "phs_tissue.mat"
    if fmt == "v5":
        savemat(path, {"phs_tissue": volumes["phs_tissue"]})
    else:
        write_mat73(
            path, {"phs_tissue": (volumes["phs_tissue"], "double")}, userblock=fmt == "v7.3"
        )
    arr = load_mat_volume(path)
    assert arr.shape == SHAPE and arr.dtype == np.float32
    np.testing.assert_array_equal(arr, volumes["phs_tissue"].astype(np.float32))


@pytest.mark.parametrize("fmt", ["v5", "v7.3"])
def test_variable_choice(tmp_path, volumes, fmt):
    path = tmp_path / "both.mat"
    mask = np.ones(SHAPE, bool)
    if fmt == "v5":
        savemat(
            path,
            {
                "mask": mask,
                "chi_cosmos": volumes["chi_cosmos"],
                "phs_tissue": volumes["phs_tissue"],
            },
        )
    else:
        write_mat73(
            path,
            {
                "mask": (mask.astype(np.uint8), "logical"),
                "chi_cosmos": (volumes["chi_cosmos"], "double"),
                "phs_tissue": (volumes["phs_tissue"], "double"),
            },
        )
    # without a key: the tutorial's names in order (the field first)
    np.testing.assert_array_equal(load_mat_volume(path), volumes["phs_tissue"].astype(np.float32))
    np.testing.assert_array_equal(
        load_mat_volume(path, key="chi_cosmos"), volumes["chi_cosmos"].astype(np.float32)
    )
    np.testing.assert_array_equal(load_mat_volume(path, key="mask"), np.ones(SHAPE, np.float32))
    with pytest.raises(ValueError, match="no variable 'sus'"):
        load_mat_volume(path, key="sus")


@pytest.mark.parametrize("fmt", ["v5", "v7.3"])
def test_single_variable_and_4d(tmp_path, fmt):
    arr = np.arange(np.prod((4, 5, 6, 2)), dtype=np.float64).reshape(4, 5, 6, 2)
    path = tmp_path / "x.mat"
    if fmt == "v5":
        savemat(path, {"my_volumes": arr})
    else:
        write_mat73(path, {"my_volumes": (arr, "double")})
    out = load_mat_volume(path)  # the only variable, whatever its name
    assert out.shape == (4, 5, 6, 2)
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("fmt", ["v5", "v7.3"])
def test_errors(tmp_path, fmt, volumes):
    def write(path, variables):
        if fmt == "v5":
            savemat(path, {k: v for k, (v, _) in variables.items()})
        else:
            write_mat73(path, variables)
        return path

    ambiguous = write(
        tmp_path / "a.mat",
        {"first": (volumes["chi_cosmos"], "double"), "second": (volumes["chi_cosmos"], "double")},
    )
    with pytest.raises(ValueError, match="several variables.*first.*second.*key="):
        load_mat_volume(ambiguous)
    flat = write(tmp_path / "b.mat", {"phs_tissue": (np.zeros((4, 5)), "double")})
    with pytest.raises(ValueError, match=r"shape \(4, 5\); expected a 3-D"):
        load_mat_volume(flat)
    text = write(tmp_path / "c.mat", {"phs_tissue": ("not a volume", "char")})
    with pytest.raises(ValueError, match="'phs_tissue' is not a numeric array"):
        load_mat_volume(text)


def test_mat73_struct_and_cell_are_refused(tmp_path, volumes):
    path = write_mat73(tmp_path / "s.mat", {"phs_tissue": (None, "struct")})
    with pytest.raises(ValueError, match="not a numeric array"):
        load_mat_volume(path)
    path = tmp_path / "cell.mat"
    write_mat73(path, {"chi": (volumes["chi_cosmos"], "double")})
    with h5py.File(path, "r+") as f:  # a cell array holds references to other datasets
        ref = f.create_dataset("phs_tissue", data=np.array([[f["chi"].ref]], h5py.ref_dtype))
        ref.attrs["MATLAB_class"] = np.bytes_("cell")
    with pytest.raises(ValueError, match="'phs_tissue' is not a numeric array"):
        load_mat_volume(path)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_mat_volume(tmp_path / "nothing.mat")
    broken = tmp_path / "broken.mat"
    broken.write_bytes(b"MATLAB 5.0 MAT-file" + b"\x00" * 40)
    with pytest.raises(ValueError, match="not a readable MATLAB file"):
        load_mat_volume(broken)


def test_hdf5_behind_a_larger_user_block(tmp_path, volumes):
    """HDF5 allows user blocks of 512 · 2^n bytes; the signature then sits beyond byte 512."""
    path = tmp_path / "ub.mat"
    with h5py.File(path, "w", userblock_size=1024) as f:
        f["chi_cosmos"] = volumes["chi_cosmos"].T
    np.testing.assert_array_equal(load_mat_volume(path), volumes["chi_cosmos"].astype(np.float32))
