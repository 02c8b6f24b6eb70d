"""Property-based tests (hypothesis) of the input-facing code: NIfTI loading, field units,
orientation from the affine, sidecar settings, BIDS sidecar discovery and derivative names.

Random shapes, affines, dtypes, units and metadata either work correctly (a property that can
be checked without the code: the loaded data equal what was saved, field_to_ppm undoes
ppm_to_field, voxel sizes are the affine's column norms, B0 in voxel space is Rᵀẑ, …) or fail
with the documented error (``InputError``, ``ValueError``, ``SettingsError``,
``DiscoveryError``) — never with another exception.  Every test runs a bounded number of
examples with ``deadline=None`` (the machine is shared); the whole file takes a few seconds.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bids_qsmnet.io.nifti import InputError, load_volume
from bids_qsmnet.physics.orientation import (
    b0_dir_from_affine,
    obliquity_deg,
    voxel_sizes_from_affine,
)
from bids_qsmnet.physics.units import field_to_ppm, normalise_units, ppm_to_field

#: γ̄ of the proton, MHz/T, written out so that the unit checks do not reuse the code's value
GAMMA_BAR = 42.57747892


def fuzz(max_examples: int, **kwargs) -> settings:
    """Bounded, reproducible runs (the same examples on every machine: CI never flakes) that
    write no example database into the repository."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        **kwargs,
    )


# --------------------------------------------------------------------------- strategies


@st.composite
def rotations(draw) -> np.ndarray:
    """A proper rotation matrix from a random (non-degenerate) quaternion."""
    q = np.array(draw(st.lists(st.floats(-1.0, 1.0), min_size=4, max_size=4)))
    assume(np.linalg.norm(q) > 0.1)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


@st.composite
def orthogonal_affines(draw):
    """``(affine, Q, signed_scales)`` with ``affine[:3, :3] = Q · diag(signed_scales)``."""
    q = draw(rotations())
    sizes = np.array(draw(st.lists(st.floats(0.2, 4.0), min_size=3, max_size=3)))
    signs = np.array(draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3)))
    affine = np.eye(4)
    affine[:3, :3] = q @ np.diag(sizes * signs)
    affine[:3, 3] = draw(st.lists(st.floats(-200.0, 200.0), min_size=3, max_size=3))
    return affine, q, sizes * signs


def _expected_b0(q: np.ndarray, signed: np.ndarray) -> np.ndarray:
    """Rᵀẑ for the unit axes ``R = Q · diag(sign)``: the projections of B0 onto the axes."""
    return (q @ np.diag(np.sign(signed))).T @ np.array([0.0, 0.0, 1.0])


def _write(path: str, data: np.ndarray, affine: np.ndarray, *, slope=None, inter=None) -> None:
    """Write ``data`` with ``affine`` as sform (code 1) and no qform, so that any affine —
    also a degenerate one nibabel cannot turn into a quaternion — reaches the file as given."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(data.dtype)
    hdr.set_data_shape(data.shape)
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = affine[0], affine[1], affine[2]
    img = nib.Nifti1Image(data, None, hdr)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nib.save(img, path)


VALID_DTYPES = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.float32, np.float64]
shapes3 = st.lists(st.integers(1, 5), min_size=3, max_size=3).map(tuple)


def _elements(dtype):
    if np.issubdtype(dtype, np.floating):
        # finite and within float32's range (larger float64 values become Inf: refused)
        bound = float(np.float32(1e30))  # exactly representable in both widths
        return st.floats(-bound, bound, width=32 if dtype == np.float32 else 64)
    return None  # hypothesis' default: the whole integer range


@st.composite
def valid_volumes(draw):
    dtype = draw(st.sampled_from(VALID_DTYPES))
    shape = draw(shapes3)
    if draw(st.booleans()):
        shape = (*shape, 1)  # a 4-D series of one volume counts as 3-D
    data = draw(hnp.arrays(dtype, shape, elements=_elements(dtype)))
    scaling = None
    if np.issubdtype(dtype, np.integer) and draw(st.booleans()):
        # integer storage with NIfTI scaling (scanner phase is stored so)
        scaling = (
            draw(st.sampled_from([0.5, 2.5e-3, -1.0, 3.0])),
            draw(st.sampled_from([0.0, -4096.0, 1.5])),
        )
    return data, scaling


# --------------------------------------------------------------------------- NIfTI loading


@fuzz(120)
@given(volume=valid_volumes(), geometry=orthogonal_affines(), gz=st.booleans())
def test_load_volume_returns_what_was_saved(volume, geometry, gz):
    data, scaling = volume
    affine, q, signed = geometry
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "vol.nii.gz" if gz else "vol.nii")
        _write(
            path,
            data,
            affine,
            **({} if scaling is None else {"slope": scaling[0], "inter": scaling[1]}),
        )
        loaded, img = load_volume(path, what="local field")
    assert loaded.dtype == np.float32 and loaded.shape == data.shape[:3]
    raw = data.reshape(data.shape[:3])
    if scaling is None:
        np.testing.assert_array_equal(loaded, raw.astype(np.float32))
    else:
        expected = raw.astype(np.float64) * scaling[0] + scaling[1]
        np.testing.assert_allclose(loaded, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())
    # the sform is stored as float32
    np.testing.assert_allclose(img.affine, affine, rtol=0, atol=1e-4)
    np.testing.assert_allclose(voxel_sizes_from_affine(img.affine), np.abs(signed), rtol=1e-5)
    b0 = b0_dir_from_affine(img.affine)
    np.testing.assert_allclose(b0, _expected_b0(q, signed), atol=1e-5)


def _sheared(affine: np.ndarray, angle_deg: float, axes=(0, 1)) -> np.ndarray:
    """``affine`` with voxel axis ``axes[1]`` tilted towards ``axes[0]`` by ``angle_deg``."""
    out = affine.copy()
    i, j = axes
    a, b = out[:3, i], out[:3, j]
    tilt = math.tan(math.radians(angle_deg)) * np.linalg.norm(b) / np.linalg.norm(a)
    out[:3, j] = b + tilt * a
    return out


@st.composite
def invalid_volumes(draw):
    """``(data, affine, why)`` that ``load_volume`` must refuse with ``InputError``."""
    affine, _, _ = draw(orthogonal_affines())
    why = draw(st.sampled_from(["ndim", "nonfinite", "zero axis", "nan affine", "shear"]))
    shape = draw(shapes3)
    if why == "ndim":
        shape = draw(st.sampled_from([shape[:1], shape[:2], (*shape, 2), (*shape, 1, 2)]))
    data = draw(hnp.arrays(np.float32, shape, elements=st.floats(-10, 10, width=32)))
    if why == "nonfinite":
        bad = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        data.flat[draw(st.integers(0, data.size - 1))] = bad
    elif why == "zero axis":
        affine[:3, draw(st.integers(0, 2))] = 0.0
    elif why == "nan affine":
        affine[draw(st.integers(0, 2)), draw(st.integers(0, 3))] = draw(
            st.sampled_from([np.nan, np.inf])
        )
    elif why == "shear":
        axes = draw(st.sampled_from([(0, 1), (1, 2), (2, 0)]))
        affine = _sheared(affine, draw(st.floats(5.0, 60.0)), axes)
    return data, affine, why


@fuzz(80)
@given(case=invalid_volumes(), gz=st.booleans())
def test_load_volume_refuses_unusable_volumes(case, gz):
    data, affine, why = case
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bad.nii.gz" if gz else "bad.nii")
        _write(path, data, affine)
        with pytest.raises(InputError) as info:
            load_volume(path, what="local field")
    assert path in str(info.value), why  # the message names the file


@fuzz(100)
@given(
    data=hnp.arrays(np.float32, (4, 5, 3), elements=st.floats(-1, 1, width=32)),
    gz=st.booleans(),
    damage=st.one_of(
        st.tuples(st.just("truncate"), st.floats(0.0, 0.999)),
        st.tuples(st.just("flip"), st.floats(0.0, 0.999), st.integers(1, 255)),
    ),
)
def test_load_volume_on_damaged_files(data, gz, damage):
    """A truncated file or one with a changed byte loads (a byte of voxel data changed) or is
    refused with ``InputError``; nothing else escapes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "vol.nii.gz" if gz else "vol.nii")
        _write(path, data, np.diag([1.0, 1.0, 1.0, 1.0]))
        raw = bytearray(open(path, "rb").read())
        pos = int(damage[1] * len(raw))
        if damage[0] == "truncate":
            raw = raw[:pos]
        else:
            raw[pos] ^= damage[2]
        with open(path, "wb") as fh:
            fh.write(bytes(raw))
        try:
            loaded, _ = load_volume(path)
        except InputError as exc:
            assert path in str(exc)
        else:
            assert loaded.ndim == 3 and loaded.dtype == np.float32
            assert np.all(np.isfinite(loaded))


@fuzz(30)
@given(blob=st.binary(max_size=600), gz=st.booleans())
def test_load_volume_on_random_bytes(blob, gz):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "junk.nii.gz" if gz else "junk.nii")
        with open(path, "wb") as fh:
            fh.write(blob)
        with pytest.raises(InputError):
            load_volume(path)


def test_load_volume_refuses_complex_data(tmp_path):
    path = str(tmp_path / "complex.nii.gz")
    nib.save(nib.Nifti1Image(np.full((3, 3, 3), 1 + 2j, np.complex64), np.eye(4)), path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy's ComplexWarning is not the refusal
        with pytest.raises(InputError, match="complex"):
            load_volume(path, what="local field")


# --------------------------------------------------------------------------- units


def _spellings(canonical: str):
    aliases = {"ppm": ["ppm"], "Hz": ["hz", "hertz"], "rad": ["rad", "rads", "radian", "radians"]}
    return st.tuples(
        st.sampled_from(aliases[canonical]),
        st.lists(st.booleans(), min_size=8, max_size=8),
        st.sampled_from(["", " ", "\t", "  "]),
    ).map(
        lambda t: (
            t[2] + "".join(c.upper() if up else c for c, up in zip(t[0], t[1] + [False] * 8)) + t[2]
        )
    )


@fuzz(150)
@given(
    canonical=st.sampled_from(["ppm", "Hz", "rad"]),
    data=st.sampled_from([np.float32, np.float64]).flatmap(
        lambda dt: hnp.arrays(
            dt,
            hnp.array_shapes(min_dims=0, max_dims=3, max_side=4),
            elements=st.floats(-10, 10, width=32 if dt == np.float32 else 64),
        )
    ),
    b0=st.floats(0.05, 30.0),
    te=st.floats(1e-4, 1.0),
    spelling=st.data(),
)
def test_unit_conversion_round_trip_and_definition(canonical, data, b0, te, spelling):
    units = spelling.draw(_spellings(canonical))
    assert normalise_units(units) == canonical
    there = np.asarray(ppm_to_field(data, units, b0=b0, te=te))
    back = np.asarray(field_to_ppm(there, units, b0=b0, te=te))
    rtol = 1e-5 if data.dtype == np.float32 else 1e-12
    assert back.shape == data.shape
    np.testing.assert_allclose(back, data, rtol=rtol, atol=rtol * 1e-3)
    # the defining relations, with the constant written out here
    hz = data.astype(np.float64) * GAMMA_BAR * b0
    expected = {"ppm": data, "Hz": hz, "rad": hz * 2 * np.pi * te}[canonical]
    np.testing.assert_allclose(there, expected, rtol=rtol, atol=rtol * 1e-3)


JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.text(max_size=6),
    st.sampled_from(["3", "3T", "../../x", "nan", "inf", ""]),
    st.lists(st.floats(0.5, 3.0), max_size=3),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-5, 100),
    st.complex_numbers(max_magnitude=5),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@fuzz(200)
@given(units=st.sampled_from(["Hz", "rad", "hz", "RAD"]), b0=JUNK, te=JUNK)
@example(units="Hz", b0=True, te=None)
@example(units="rad", b0=3.0, te=[0.02])
@example(units="Hz", b0=1e4, te=None)
def test_unit_conversion_refuses_bad_b0_and_te(units, b0, te):
    """Any B0 or TE is either a usable number (tesla in (0, 30], seconds in (0, 1]) or a
    ``ValueError``; a bool or a one-element list is not a number."""
    field = np.array([1.0, -2.0])
    try:
        ppm = field_to_ppm(field, units, b0=b0, te=te)
    except ValueError:
        usable_b0 = (
            isinstance(b0, int | float)
            and not isinstance(b0, bool)
            and 0 < b0 <= 30
            and math.isfinite(b0)
        )
        usable_te = (
            isinstance(te, int | float)
            and not isinstance(te, bool)
            and 0 < te <= 1
            and math.isfinite(te)
        )
        needs_te = normalise_units(units) == "rad"
        assert not (usable_b0 and (usable_te or not needs_te))
        return
    assert isinstance(b0, int | float) and not isinstance(b0, bool) and 0 < b0 <= 30
    hz = field / (GAMMA_BAR * b0)
    if normalise_units(units) == "rad":
        assert isinstance(te, int | float) and not isinstance(te, bool) and 0 < te <= 1
        hz = hz / (2 * np.pi * te)
    np.testing.assert_allclose(ppm, hz, rtol=1e-12)


@fuzz(100)
@given(units=st.one_of(st.text(max_size=10), JUNK))
def test_unit_names_are_canonical_or_refused(units):
    try:
        name = normalise_units(units)
    except ValueError:
        assert str(units).strip().lower() not in {
            "ppm",
            "hz",
            "hertz",
            "rad",
            "rads",
            "radian",
            "radians",
        }
    else:
        assert name in ("ppm", "Hz", "rad")
        assert name.lower() in str(units).lower() or name == "Hz"


# --------------------------------------------------------------------------- orientation


@fuzz(150)
@given(geometry=orthogonal_affines())
def test_orientation_of_rotated_scaled_flipped_affines(geometry):
    affine, q, signed = geometry
    np.testing.assert_allclose(voxel_sizes_from_affine(affine), np.abs(signed), rtol=1e-12)
    b0 = b0_dir_from_affine(affine)
    assert abs(np.linalg.norm(b0) - 1.0) < 1e-12
    expected = _expected_b0(q, signed)
    np.testing.assert_allclose(b0, expected, atol=1e-10)
    # B0 in voxel space, taken back to the world through the unit axes, is the scanner z
    unit_axes = affine[:3, :3] / np.abs(signed)
    np.testing.assert_allclose(unit_axes @ b0, [0.0, 0.0, 1.0], atol=1e-10)
    angle = obliquity_deg(b0)
    assert 0.0 <= angle <= 90.0
    # arccos loses digits near 0° (≈1e-6° at |cos| = 1 - 1e-16): a looser tolerance there
    assert angle == pytest.approx(math.degrees(math.acos(min(1.0, abs(expected[2])))), abs=1e-5)


finite_or_not = st.one_of(
    st.floats(-1e3, 1e3),
    st.sampled_from([0.0, np.nan, np.inf, -np.inf, 1e300, 1e-310]),
)


@fuzz(200)
@given(
    matrix=st.one_of(
        hnp.arrays(np.float64, st.sampled_from([(4, 4), (3, 4), (3, 3)]), elements=finite_or_not),
        hnp.arrays(np.float64, hnp.array_shapes(max_dims=3, max_side=5), elements=finite_or_not),
        st.sampled_from([None, "eye", [[1, 2], [3]], [[1j, 0, 0], [0, 1, 0], [0, 0, 1]]]),
    )
)
def test_orientation_of_arbitrary_matrices(matrix):
    """Any array is either an affine with a unit B0 direction and positive voxel sizes, or a
    ``ValueError`` (wrong shape, non-finite, zero or dependent axes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # overflow in norms, the shear warning
        try:
            sizes = voxel_sizes_from_affine(matrix)
        except ValueError:
            sizes = None
        try:
            b0 = b0_dir_from_affine(matrix)
        except ValueError:
            return
    assert sizes is not None and np.all(sizes > 0) and np.all(np.isfinite(sizes))
    assert np.all(np.isfinite(b0)) and abs(np.linalg.norm(b0) - 1.0) < 1e-9
    lin = np.asarray(matrix, dtype=np.float64)[:3, :3]
    np.testing.assert_allclose(sizes, np.sqrt((lin**2).sum(axis=0)), rtol=1e-12)


@fuzz(100)
@given(vector=st.one_of(JUNK, st.lists(finite_or_not, min_size=0, max_size=4)))
def test_obliquity_of_any_vector(vector):
    try:
        angle = obliquity_deg(vector)
    except ValueError:
        return
    b = np.asarray(vector, dtype=np.float64)
    assert b.shape == (3,) and np.all(np.isfinite(b)) and np.any(b)
    assert 0.0 <= angle <= 90.0


# --------------------------------------------------------------------------- sidecar settings

SIDECAR_VALUES = {
    "Units": st.one_of(st.sampled_from(["ppm", "Hz", "rad", "HZ", " Radians "]), JUNK),
    "MagneticFieldStrength": st.one_of(st.floats(0.1, 11.7), JUNK),
    "EchoTime": st.one_of(st.floats(1e-3, 0.08), JUNK),
    "B0_dir": st.one_of(
        st.lists(st.floats(-1, 1), min_size=3, max_size=3),
        st.lists(finite_or_not, max_size=4),
        JUNK,
    ),
}
sidecars = st.fixed_dictionaries({}, optional=SIDECAR_VALUES)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_settings(meta: dict, b0_strength, s: dict) -> None:
    """What a successful ``run_settings`` must return for the sidecar ``meta``."""
    assert s["units"] == normalise_units(meta["Units"])
    b0 = s["b0_strength"]
    if s["units"] in ("Hz", "rad"):
        assert b0 is not None
    if b0 is not None:  # a number of tesla, from the sidecar or else from --b0-strength
        source = meta.get("MagneticFieldStrength", b0_strength)
        assert _is_number(source) and b0 == float(source)
        assert isinstance(b0, float) and math.isfinite(b0) and b0 > 0
    te = s["echo_time"]
    if s["units"] == "rad":
        assert te is not None
    if te is not None:
        assert _is_number(meta["EchoTime"]) and te == float(meta["EchoTime"])
        assert isinstance(te, float) and 0 < te <= 1
    if meta.get("B0_dir") is not None:  # JSON null: not given, the affine decides
        d = np.asarray(s["b0_dir"], dtype=np.float64)
        given_dir = np.asarray(meta["B0_dir"], dtype=np.float64)
        assert d.shape == (3,) and abs(np.linalg.norm(d) - 1) < 1e-9
        np.testing.assert_allclose(d * np.linalg.norm(given_dir), given_dir, atol=1e-9)
        assert s["b0_dir_source"] == "sidecar B0_dir"
    else:
        assert s["b0_dir"] is None and s["b0_dir_source"] == "affine"


@fuzz(300)
@given(meta=sidecars, b0_strength=st.one_of(st.none(), st.floats(0.5, 11.7)))
@example(meta={"Units": "Hz", "MagneticFieldStrength": "abc"}, b0_strength=None)
@example(meta={"Units": "ppm", "MagneticFieldStrength": [3]}, b0_strength=None)
@example(meta={"Units": "Hz", "MagneticFieldStrength": -3.0}, b0_strength=None)
@example(meta={"Units": "rad", "MagneticFieldStrength": 3, "EchoTime": 20}, b0_strength=None)
@example(meta={"Units": "Hz", "MagneticFieldStrength": True}, b0_strength=None)
@example(meta={"Units": "ppm", "EchoTime": [0.01, 0.02]}, b0_strength=None)
def test_run_settings_from_any_sidecar(meta, b0_strength):
    from bids_qsmnet.bids.discovery import FieldRun
    from bids_qsmnet.bids.settings import SettingsError, run_settings

    run = FieldRun(
        field="/data/sub-01/anat/sub-01_localfield.nii.gz",
        entities={"subject": "01", "suffix": "localfield"},
        metadata=meta,
        units=meta.get("Units"),
    )
    try:
        s = run_settings(run, b0_strength=b0_strength)
    except SettingsError as exc:
        assert run.field in str(exc)  # names the file
        return
    _check_settings(meta, b0_strength, s)


# --------------------------------------------------------------------------- discovery

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**31), 2**31)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)


@settings(fuzz(8), suppress_health_check=list(HealthCheck))
@given(
    extra=st.dictionaries(
        # prefixed: a key equal to an entity name (run, task, …) is pybids' business
        st.text(alphabet=st.characters(codec="ascii", categories=["L", "N"]), max_size=8).map(
            lambda k: "X" + k
        ),
        JSON_VALUES,
        max_size=4,
    ),
    units=st.sampled_from(["ppm", "Hz", "rad", "../../x"]),
)
def test_discovery_reads_sidecars_as_written(extra, units):
    """Whatever (valid JSON object) a sidecar holds reaches the run's metadata unchanged."""
    from _bidsapp_fixtures import add_volume, make_dataset

    from bids_qsmnet.bids.discovery import build_layout, collect_runs

    meta = {**extra, "Units": units}
    with tempfile.TemporaryDirectory() as tmp:
        root = make_dataset(os.path.join(tmp, "ds"), derivative=True)
        add_volume(root, "sub-01/anat/sub-01_desc-localfield_fieldmap.nii.gz", meta)
        (run,) = collect_runs(build_layout(root), "01")
    assert run.units == units
    for key, value in meta.items():
        assert json.loads(json.dumps(run.metadata[key])) == value, key


@pytest.mark.parametrize(
    "content", [b'{"Units": "ppm",', b'["Units", "ppm"]', b"\xff\xfe\x00junk", b"3.0"]
)
def test_malformed_sidecar_is_a_discovery_error(tmp_path, content):
    from _bidsapp_fixtures import add_volume, make_dataset

    from bids_qsmnet.bids.discovery import DiscoveryError, build_layout, collect_runs

    root = make_dataset(tmp_path / "ds", derivative=True)
    add_volume(root, "sub-01/anat/sub-01_desc-localfield_fieldmap.nii.gz", {"Units": "ppm"})
    bad = root / "sub-02/anat/sub-02_desc-localfield_fieldmap.json"
    add_volume(root, "sub-02/anat/sub-02_desc-localfield_fieldmap.nii.gz", {"Units": "ppm"})
    bad.write_bytes(content)
    with pytest.raises(DiscoveryError, match="sub-02_desc-localfield_fieldmap.json"):
        collect_runs(build_layout(root), "01")


# --------------------------------------------------------------------------- derivative names


@fuzz(200)
@given(
    entities=st.fixed_dictionaries(
        {"subject": st.one_of(st.from_regex(r"[A-Za-z0-9]{1,4}", fullmatch=True), st.text())},
        optional={
            k: st.one_of(st.from_regex(r"[A-Za-z0-9]{1,4}", fullmatch=True), st.text(max_size=6))
            for k in ("session", "acquisition", "run", "desc", "space")
        },
    )
)
@example(entities={"subject": "..", "session": "a"})
@example(entities={"subject": "01", "acquisition": "x/../../y"})
@example(entities={"subject": "01", "run": "1\n"})
def test_derivative_names_stay_in_the_output_folder(entities):
    from bids_qsmnet.bids.derivatives import derivative_path

    out = "/data/out/bids_qsmnet"
    try:
        path = derivative_path(out, {**entities, "suffix": "localfield"}, suffix="Chimap")
    except ValueError:
        kept = {k: v for k, v in entities.items() if k != "desc"}  # desc is dropped
        assert not all(v.isascii() and v.isalnum() for v in kept.values())
        return
    assert os.path.normpath(path) == path and path.startswith(out + "/")
    sub = entities["subject"]
    name = f"sub-{sub}"
    if "session" in entities:
        name += f"_ses-{entities['session']}"
    for key, short in (("acquisition", "acq"), ("run", "run")):
        if key in entities:
            name += f"_{short}-{entities[key]}"
    if "space" in entities:
        name += f"_space-{entities['space']}"
    folder = f"sub-{sub}" + (f"/ses-{entities['session']}" if "session" in entities else "")
    assert path == f"{out}/{folder}/anat/{name}_Chimap.nii.gz"
