"""The shipped synthetic BIDS-derivative dataset: layout, metadata, physics and reproducibility."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import bids_qsmnet
import bids_qsmnet.data.example as example
from bids_qsmnet.data import BRAIN_LABELS, example_dataset_path, make_example_dataset
from bids_qsmnet.data.example import (
    CHI_STEP_PPM,
    EXAMPLE_B0_TESLA,
    EXAMPLE_SEED,
    EXAMPLE_SHAPE,
    EXAMPLE_SNR,
    FIELD_STEP_HZ,
    FIELD_STEP_PPM,
    RAW_ECHO_TIMES,
    RAW_SUBJECT,
    RAW_VOXEL_MM,
)
from bids_qsmnet.physics.dipole import forward_field
from bids_qsmnet.physics.units import GAMMA_BAR_MHZ_PER_T

REPO = Path(__file__).resolve().parents[1]
DS = REPO / "examples" / "ds-synthetic"
SUBJECTS = {"01": "ppm", "02": "Hz"}


def _load(path):
    return nib.load(str(path))


def _anat(sub, name, root=DS):
    return root / f"sub-{sub}" / "anat" / f"sub-{sub}_{name}"


def test_shipped_dataset_exists_and_is_small():
    assert (DS / "dataset_description.json").is_file()
    size = sum(p.stat().st_size for p in DS.rglob("*") if p.is_file())
    # two local-field subjects (~1.9 MB) and one raw 3-echo GRE subject whose noise, as in
    # real scans, does not compress (~4 MB)
    assert size < 7 * 1024**2, f"{size / 1e6:.2f} MB"


def test_example_dataset_path_prefers_the_checkout(monkeypatch):
    monkeypatch.setattr(example, "CHECKOUT_EXAMPLE", DS)
    assert example_dataset_path() == DS


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """What ``example_dataset_path()`` returns from an installed wheel (no checkout copy):
    the dataset written into the cache folder on first use."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(example, "CHECKOUT_EXAMPLE", cache / "no-checkout")
        path = example_dataset_path(cache_dir=cache)
        assert path == cache / f"ds-synthetic-{bids_qsmnet.__version__}"
        assert sorted(p.name for p in cache.iterdir()) == [path.name]  # no temporary left
        # a second call returns the same folder without writing it again
        mp.setattr(example, "make_example_dataset", None)
        assert example_dataset_path(cache_dir=cache) == path
    return path


def test_example_dataset_path_without_a_checkout_writes_the_dataset(built):
    from bids import BIDSLayout

    assert BIDSLayout(str(built), validate=False).get_subjects() == ["01", "02", "03"]


def test_package_data_matches_the_wheel():
    """pyproject's package-data patterns each match files in the package."""
    import re

    line = re.search(r'^"bids_qsmnet" = \[(.*)\]$', (REPO / "pyproject.toml").read_text(), re.M)
    patterns = re.findall(r'"([^"]+)"', line[1])
    assert patterns
    pkg = REPO / "bids_qsmnet"
    for pattern in patterns:
        assert any(p.is_file() for p in pkg.glob(pattern)), pattern


def test_top_level_files():
    desc = json.loads((DS / "dataset_description.json").read_text())
    assert desc["BIDSVersion"] == "1.10.0" and desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"][0]["Name"] == "bids_qsmnet-synthetic"
    assert {"Version", "Description"} <= set(desc["GeneratedBy"][0])
    assert (DS / "README").read_text().strip()
    rows = [line.split("\t") for line in (DS / "dseg.tsv").read_text().splitlines()]
    assert rows[0] == ["index", "name"]
    assert {int(i): n for i, n in rows[1:]} == BRAIN_LABELS
    rows = [line.split("\t") for line in (DS / "participants.tsv").read_text().splitlines()]
    assert rows == [["participant_id", "field_units"], ["sub-01", "ppm"], ["sub-02", "Hz"],
                    ["sub-03", "raw"]]
    assert "field_units" in json.loads((DS / "participants.json").read_text())


def test_pybids_indexes_the_derivative_dataset():
    from bids import BIDSLayout

    layout = BIDSLayout(str(DS), validate=False)
    assert layout.get_subjects() == ["01", "02", "03"]
    for sub, units in SUBJECTS.items():
        (field,) = layout.get(subject=sub, suffix="localfield", extension=".nii.gz")
        assert field.entities["datatype"] == "anat"
        meta = field.get_metadata()
        assert meta["Units"] == units and meta["MagneticFieldStrength"] == 3.0
        (mask,) = layout.get(subject=sub, desc="brain", suffix="mask", extension=".nii.gz")
        assert mask.get_metadata()["Type"] == "Brain"
        (chimap,) = layout.get(subject=sub, suffix="Chimap", extension=".nii.gz")
        assert chimap.get_metadata()["Units"] == "ppm"
        assert len(layout.get(subject=sub, suffix="dseg", extension=".nii.gz")) == 1
    # pybids also accepts it as a derivative dataset (it has GeneratedBy)
    assert len(BIDSLayout(str(DS), validate=False, is_derivative=True).get_subjects()) == 3
    phase = layout.get(subject=RAW_SUBJECT, part="phase", suffix="MEGRE", extension=".nii.gz")
    mag = layout.get(subject=RAW_SUBJECT, part="mag", suffix="MEGRE", extension=".nii.gz")
    assert [int(f.entities["echo"]) for f in phase] == [1, 2, 3]
    assert [int(f.entities["echo"]) for f in mag] == [1, 2, 3]
    assert [f.get_metadata()["EchoTime"] for f in phase] == list(RAW_ECHO_TIMES)
    assert all(f.get_metadata()["MagneticFieldStrength"] == EXAMPLE_B0_TESLA for f in phase)
    assert not layout.get(subject=RAW_SUBJECT, suffix="localfield")


def test_raw_subject_images():
    """Siemens-style integer phase that wraps, a magnitude that decays over echoes, 1.5 mm."""
    phases = [_load(_anat(RAW_SUBJECT, f"echo-{n}_part-phase_MEGRE.nii.gz")) for n in (1, 2, 3)]
    mags = [_load(_anat(RAW_SUBJECT, f"echo-{n}_part-mag_MEGRE.nii.gz")) for n in (1, 2, 3)]
    chi = _load(_anat(RAW_SUBJECT, "Chimap.nii.gz"))
    expect = tuple(round(n / RAW_VOXEL_MM) for n in EXAMPLE_SHAPE)
    for img in phases + mags + [chi]:
        assert img.shape == expect
        np.testing.assert_allclose(np.diag(img.affine)[:3], [RAW_VOXEL_MM] * 3)
    brain = chi.get_fdata() != 0
    for img in phases:
        data = np.asarray(img.dataobj)
        assert data.dtype == np.int16 and data.min() >= -4096 and data.max() <= 4095
        assert data.min() < -4000 and data.max() > 4000  # wraps: the full range is used
    means = [m.get_fdata()[brain].mean() for m in mags]
    assert means[0] > means[1] > means[2] > 0  # T2* decay


def test_images_geometry_types_and_physics():
    gamma_b0 = GAMMA_BAR_MHZ_PER_T * 3.0
    for sub, units in SUBJECTS.items():
        field_img = _load(_anat(sub, "localfield.nii.gz"))
        mask_img = _load(_anat(sub, "desc-brain_mask.nii.gz"))
        chi_img = _load(_anat(sub, "Chimap.nii.gz"))
        dseg_img = _load(_anat(sub, "dseg.nii.gz"))
        for img in (field_img, mask_img, chi_img, dseg_img):
            assert img.shape == EXAMPLE_SHAPE
            np.testing.assert_allclose(img.affine[:3, :3], np.eye(3))  # 1 mm, axial RAS
            assert img.header.get_xyzt_units()[0] == "mm"
            np.testing.assert_allclose(img.affine, field_img.affine)
        assert field_img.get_data_dtype() == np.int16 and chi_img.get_data_dtype() == np.int16
        assert mask_img.get_data_dtype() == np.uint8
        step = FIELD_STEP_HZ if units == "Hz" else FIELD_STEP_PPM
        assert field_img.dataobj.slope == pytest.approx(step)
        assert chi_img.dataobj.slope == pytest.approx(CHI_STEP_PPM)

        mask = np.asarray(mask_img.dataobj)
        assert set(np.unique(mask)) == {0, 1}
        mask = mask.astype(bool)
        field = field_img.get_fdata()
        if units == "Hz":
            field = field / gamma_b0
        chi = chi_img.get_fdata()
        dseg = np.asarray(dseg_img.dataobj)
        assert np.all(field[~mask] == 0) and np.all(chi[~mask] == 0)
        assert np.all(dseg[~mask] == 0) and np.all(dseg[mask] > 0)
        assert set(np.unique(dseg)) <= set(BRAIN_LABELS)
        assert 0.005 < field[mask].std() < 0.06  # ppm, like measured local fields
        # the field is D ⊛ chi plus noise at the stated SNR
        clean = forward_field(chi, (1, 1, 1), (0, 0, 1), pad=16)
        residual = field[mask] - clean[mask]
        assert residual.std() == pytest.approx(clean[mask].std() / EXAMPLE_SNR, rel=0.05)
        assert abs(residual.mean()) < 1e-4


def test_regenerating_with_the_seed_reproduces_the_arrays(built):
    """The copy written from the seed (by ``example_dataset_path`` without a checkout, i.e.
    make_example_dataset(seed=EXAMPLE_SEED)) holds the checkout's files and arrays."""
    import inspect

    assert inspect.signature(make_example_dataset).parameters["seed"].default == EXAMPLE_SEED
    out = built
    shipped = sorted(p.relative_to(DS) for p in DS.rglob("*") if p.is_file())
    fresh = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert fresh == shipped
    for rel in shipped:
        if rel.name.endswith(".nii.gz"):
            a, b = _load(DS / rel), _load(out / rel)
            np.testing.assert_array_equal(a.affine, b.affine)
            assert a.dataobj.slope == b.dataobj.slope
            ra, rb = np.asarray(a.dataobj.get_unscaled()), np.asarray(b.dataobj.get_unscaled())
            # stored integers: identical, or off by one quantisation step where FFT rounding on
            # another platform moved a value across a rounding boundary (phase: circularly,
            # −4096 and 4095 are neighbours)
            diff = np.abs(ra.astype(int) - rb.astype(int))
            if "part-phase" in rel.name:
                diff = np.minimum(diff, 8192 - diff)
            assert diff.max() <= (1 if ra.dtype == np.int16 else 0), rel
            assert (ra != rb).mean() < 1e-4, rel
        elif rel.suffix == ".json" and rel.name != "dataset_description.json":
            assert json.loads((DS / rel).read_text()) == json.loads((out / rel).read_text())
        elif rel.suffix in (".tsv", ""):
            assert (DS / rel).read_text() == (out / rel).read_text()
    with pytest.raises(FileExistsError):
        make_example_dataset(out)
