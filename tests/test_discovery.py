"""Finding local fields, masks and labels with pybids on small synthetic BIDS trees, and the
per-run settings (units, field strength, echo time, B0 direction) taken from their sidecars."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from _bidsapp_fixtures import add_volume, make_dataset, write_json

from bids_qsmnet.bids.discovery import (
    DEFAULT_FILTERS,
    DiscoveryError,
    FieldRun,
    build_layout,
    collect_runs,
    load_filter_file,
)
from bids_qsmnet.bids.settings import SettingsError, run_settings

PPM = {"Units": "ppm"}


def _names(runs):
    return [os.path.basename(r.field) for r in runs]


def _base(path):
    return os.path.basename(path) if path else None


# --------------------------------------------------------------------------- where fields live


def test_desc_localfield_any_suffix_and_sepia_suffix(tmp_path):
    """``desc-localfield`` with any suffix and the SEPIA suffix ``localfield`` are both found."""
    root = make_dataset(tmp_path / "ds", derivative=True)
    add_volume(root, "sub-01/anat/sub-01_acq-a_desc-localfield_phase.nii.gz", PPM)
    add_volume(
        root, "sub-01/anat/sub-01_acq-b_localfield.nii", {"Units": "Hz", "MagneticFieldStrength": 3}
    )
    add_volume(root, "sub-01/anat/sub-01_acq-a_T2starw.nii.gz", {})  # not a field
    (root / "sub-01/anat/sub-01_acq-c_desc-localfield_phase.mat").write_bytes(b"")  # not NIfTI
    layout = build_layout(root)
    runs = collect_runs(layout, "01")
    assert _names(runs) == [
        "sub-01_acq-a_desc-localfield_phase.nii.gz",
        "sub-01_acq-b_localfield.nii",
    ]
    assert [r.units for r in runs] == ["ppm", "Hz"]
    assert runs[0].entities["desc"] == "localfield" and runs[0].entities["acquisition"] == "a"
    assert runs[1].metadata["MagneticFieldStrength"] == 3
    assert runs[0].key == "sub-01_acq-a"


def test_raw_dataset_with_pipeline_derivatives(tmp_path):
    """A raw dataset whose ``derivatives/sepia/`` holds the local fields (and masks)."""
    root = make_dataset(tmp_path / "raw", derivative=False)
    add_volume(root, "sub-01/anat/sub-01_part-phase_MEGRE.nii.gz", {"EchoTime": 0.02})
    sepia = make_dataset(root / "derivatives" / "sepia", derivative=True, name="SEPIA")
    add_volume(
        sepia, "sub-01/anat/sub-01_localfield.nii.gz", {"Units": "Hz", "MagneticFieldStrength": 7.0}
    )
    add_volume(
        sepia, "sub-01/anat/sub-01_desc-brain_mask.nii.gz", {"Type": "Brain"}, dtype=np.uint8
    )
    layout = build_layout(root)
    assert "01" in layout.get_subjects()
    (run,) = collect_runs(layout, "01")
    assert run.field == str(sepia / "sub-01/anat/sub-01_localfield.nii.gz")
    assert run.mask == str(sepia / "sub-01/anat/sub-01_desc-brain_mask.nii.gz")
    assert run.units == "Hz" and run.metadata["MagneticFieldStrength"] == 7.0
    assert run.label is None


def test_derivative_dataset_as_bids_dir_is_not_validated_away(tmp_path):
    """Derivative names that the raw validator rejects (a mask and a field in ``anat``) are
    indexed all the same."""
    root = make_dataset(tmp_path / "deriv", derivative=True)
    add_volume(root, "sub-01/anat/sub-01_localfield.nii.gz", PPM)
    add_volume(root, "sub-01/anat/sub-01_desc-brain_mask.nii.gz", {}, dtype=np.uint8)
    add_volume(root, "sub-01/anat/sub-01_Chimap.nii.gz", {"Units": "ppm"})
    (run,) = collect_runs(build_layout(root), "01")
    assert _base(run.mask) == "sub-01_desc-brain_mask.nii.gz"
    assert _base(run.label) == "sub-01_Chimap.nii.gz"
    assert run.label_metadata == {"Units": "ppm"}


def test_not_a_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiscoveryError, match="no dataset_description.json"):
        build_layout(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "dataset_description.json").write_text("{oops")
    with pytest.raises(DiscoveryError, match="not valid JSON"):
        build_layout(tmp_path / "bad")


# --------------------------------------------------------------------------- metadata


def test_sidecar_inheritance_from_the_top_level(tmp_path):
    """A top-level ``localfield.json`` applies to every subject; a subject's own sidecar
    overrides the keys it sets."""
    root = make_dataset(tmp_path / "ds", derivative=True)
    write_json(root / "localfield.json", {"Units": "Hz", "MagneticFieldStrength": 7.0})
    add_volume(root, "sub-01/anat/sub-01_localfield.nii.gz")  # no sidecar of its own
    add_volume(root, "sub-02/anat/sub-02_localfield.nii.gz", {"Units": "ppm"})
    layout = build_layout(root)
    (r1,), (r2,) = collect_runs(layout, "01"), collect_runs(layout, "02")
    assert r1.units == "Hz" and r1.metadata["MagneticFieldStrength"] == 7.0
    assert r2.units == "ppm" and r2.metadata["MagneticFieldStrength"] == 7.0
    assert run_settings(r1)["b0_strength"] == 7.0


# --------------------------------------------------------------------------- matching


@pytest.fixture(scope="module")
def multi_session(tmp_path_factory):
    """sub-01: ses-a with two runs (acq-gre), ses-b with one field; masks per run in ses-a, one
    per session in ses-b, labels for ses-a run-1 and ses-b; a field with acq-x whose only mask
    has acq-y; a mask of sub-02 that must never match sub-01."""
    root = make_dataset(tmp_path_factory.mktemp("multi") / "ds", derivative=True)
    a = "sub-01/ses-a/anat/sub-01_ses-a"
    b = "sub-01/ses-b/anat/sub-01_ses-b"
    for run in ("01", "02"):
        add_volume(root, f"{a}_acq-gre_run-{run}_desc-localfield_unwrapped.nii.gz", PPM)
        add_volume(root, f"{a}_acq-gre_run-{run}_desc-brain_mask.nii.gz", {}, dtype=np.uint8)
    add_volume(root, f"{a}_acq-gre_run-01_Chimap.nii.gz", {"Units": "ppm"})
    add_volume(root, f"{a}_acq-x_localfield.nii.gz", PPM)
    add_volume(root, f"{a}_acq-y_desc-brain_mask.nii.gz", {}, dtype=np.uint8)
    add_volume(root, f"{b}_localfield.nii.gz", PPM)
    add_volume(root, f"{b}_desc-brain_mask.nii.gz", {}, dtype=np.uint8)
    add_volume(root, f"{b}_Chimap.nii.gz", {"Units": "ppm"})
    add_volume(root, "sub-02/ses-b/anat/sub-02_ses-b_localfield.nii.gz", PPM)
    add_volume(root, "sub-02/ses-b/anat/sub-02_ses-b_desc-brain_mask.nii.gz", {}, dtype=np.uint8)
    return build_layout(root)


def test_masks_and_labels_matched_by_session_acq_run(multi_session):
    runs = {r.key: r for r in collect_runs(multi_session, "01")}
    assert sorted(runs) == [
        "sub-01_ses-a_acq-gre_run-01",
        "sub-01_ses-a_acq-gre_run-02",
        "sub-01_ses-a_acq-x",
        "sub-01_ses-b",
    ]
    r1, r2 = runs["sub-01_ses-a_acq-gre_run-01"], runs["sub-01_ses-a_acq-gre_run-02"]
    assert _base(r1.mask) == "sub-01_ses-a_acq-gre_run-01_desc-brain_mask.nii.gz"
    assert _base(r2.mask) == "sub-01_ses-a_acq-gre_run-02_desc-brain_mask.nii.gz"
    assert _base(r1.label) == "sub-01_ses-a_acq-gre_run-01_Chimap.nii.gz"
    assert r2.label is None
    assert runs["sub-01_ses-a_acq-x"].mask is None  # the acq-y mask belongs to another field
    rb = runs["sub-01_ses-b"]
    assert _base(rb.mask) == "sub-01_ses-b_desc-brain_mask.nii.gz"
    assert _base(rb.label) == "sub-01_ses-b_Chimap.nii.gz"
    assert r1.entities["session"] == "a" and str(r1.entities["run"]) == "01"


def test_session_selection(multi_session):
    runs = collect_runs(multi_session, "01", sessions=["b"])
    assert [r.key for r in runs] == ["sub-01_ses-b"]
    with pytest.raises(DiscoveryError, match=r"sub-01 \(sessions c\)"):
        collect_runs(multi_session, "01", sessions=["c"])


def test_require_label_keeps_labelled_runs(multi_session):
    runs = collect_runs(multi_session, "01", require_label=True)
    assert sorted(r.key for r in runs) == ["sub-01_ses-a_acq-gre_run-01", "sub-01_ses-b"]


def test_mask_shared_by_the_runs_of_a_session(tmp_path):
    """A mask without ``run`` serves every run that has no mask of its own; a run's own mask
    wins; a mask of another run never matches."""
    root = make_dataset(tmp_path / "ds", derivative=True)
    for run in ("1", "2"):
        add_volume(root, f"sub-01/anat/sub-01_run-{run}_localfield.nii.gz", PPM)
    add_volume(root, "sub-01/anat/sub-01_desc-brain_mask.nii.gz", {}, dtype=np.uint8)
    add_volume(root, "sub-01/anat/sub-01_run-2_desc-brain_mask.nii.gz", {}, dtype=np.uint8)
    add_volume(root, "sub-02/anat/sub-02_localfield.nii.gz", PPM)
    add_volume(root, "sub-02/anat/sub-02_run-1_desc-brain_mask.nii.gz", {}, dtype=np.uint8)
    layout = build_layout(root)
    runs = collect_runs(layout, "01")
    assert [_base(r.mask) for r in runs] == [
        "sub-01_desc-brain_mask.nii.gz",
        "sub-01_run-2_desc-brain_mask.nii.gz",
    ]
    (run,) = collect_runs(layout, "02")
    assert run.mask is None


def test_ambiguous_masks_are_an_error(tmp_path):
    root = make_dataset(tmp_path / "ds", derivative=True)
    add_volume(root, "sub-01/anat/sub-01_localfield.nii.gz", PPM)
    add_volume(root, "sub-01/anat/sub-01_desc-brain_mask.nii.gz", {}, dtype=np.uint8)
    add_volume(root, "sub-01/anat/sub-01_space-orig_desc-brain_mask.nii.gz", {}, dtype=np.uint8)
    with pytest.raises(DiscoveryError) as info:
        collect_runs(build_layout(root), "01")
    msg = str(info.value)
    assert "2 mask files match it" in msg and "--bids-filter-file" in msg
    assert "sub-01_space-orig_desc-brain_mask.nii.gz" in msg


# --------------------------------------------------------------------------- queries


def test_nothing_found_names_what_was_searched(multi_session):
    with pytest.raises(DiscoveryError) as info:
        collect_runs(multi_session, "03")
    msg = str(info.value)
    assert msg.startswith("no local field found for sub-03: looked for ")
    assert "{desc=localfield} or {suffix=localfield}" in msg
    assert ".nii/.nii.gz" in msg and str(multi_session.root) in msg


def test_filter_file_overrides_the_default_query(tmp_path):
    root = make_dataset(tmp_path / "ds", derivative=True)
    add_volume(root, "sub-01/anat/sub-01_localfield.nii.gz", PPM)
    add_volume(root, "sub-01/anat/sub-01_desc-sharp_tissuefield.nii.gz", PPM)
    add_volume(root, "sub-01/anat/sub-01_desc-brain_mask.nii.gz", {}, dtype=np.uint8)
    add_volume(root, "sub-01/anat/sub-01_desc-eroded_mask.nii.gz", {}, dtype=np.uint8)
    flt = tmp_path / "filters.json"
    flt.write_text(
        json.dumps(
            {
                "localfield": {"suffix": "tissuefield", "desc": "sharp"},
                "mask": [{"desc": "eroded", "suffix": "mask"}],
            }
        )
    )
    filters = load_filter_file(flt)
    assert filters["localfield"] == [{"suffix": "tissuefield", "desc": "sharp"}]
    layout = build_layout(root)
    (default,) = collect_runs(layout, "01")
    assert _base(default.field) == "sub-01_localfield.nii.gz"
    assert _base(default.mask) == "sub-01_desc-brain_mask.nii.gz"
    (custom,) = collect_runs(layout, "01", filters=filters)
    assert _base(custom.field) == "sub-01_desc-sharp_tissuefield.nii.gz"
    assert _base(custom.mask) == "sub-01_desc-eroded_mask.nii.gz"
    with pytest.raises(DiscoveryError, match=r"looked for \{desc=none, suffix=tissuefield\}"):
        collect_runs(
            layout, "01", filters={"localfield": [{"suffix": "tissuefield", "desc": "none"}]}
        )


@pytest.mark.parametrize(("content", "says"), [
    ({"localfield": {"suffix": "localfield", "return_type": "id"}}, "return_type is not a BIDS"),
    ({"mask": [{"desc": "brain", "target": "subject"}]}, "target is not a BIDS entity"),
    ({"localfield": {"desc": {"$ne": "x"}}}, "the value of 'desc' must be"),
    ({"localfield": {"run": [1, [2]]}}, "the value of 'run' must be"),
])
def test_a_filter_file_holds_entities_only(tmp_path, content, says):
    """pybids query keywords (return_type, target, …) would change what discovery returns,
    not which files: one clear error names the file instead of a traceback later."""
    flt = tmp_path / "filters.json"
    flt.write_text(json.dumps(content))
    with pytest.raises(DiscoveryError, match=says) as err:
        load_filter_file(flt)
    assert str(flt) in str(err.value)


def test_a_filter_file_may_use_null_numbers_and_lists(tmp_path):
    flt = tmp_path / "filters.json"
    flt.write_text(json.dumps({"localfield": {"desc": None, "run": [1, 2], "echo": 1}}))
    assert load_filter_file(flt)["localfield"] == [{"desc": None, "run": [1, 2], "echo": 1}]


def test_a_broad_filter_never_takes_a_label_or_mask_for_a_field(tmp_path):
    root = make_dataset(tmp_path / "ds", derivative=True)
    add_volume(root, "sub-01/anat/sub-01_localfield.nii.gz", PPM)
    add_volume(root, "sub-01/anat/sub-01_desc-brain_mask.nii.gz", {}, dtype=np.uint8)
    add_volume(root, "sub-01/anat/sub-01_Chimap.nii.gz", {"Units": "ppm"})
    runs = collect_runs(build_layout(root), "01", filters={"localfield": [{"datatype": "anat"}]})
    assert _names(runs) == ["sub-01_localfield.nii.gz"]


def test_default_filters_documented():
    assert DEFAULT_FILTERS["localfield"] == [{"desc": "localfield"}, {"suffix": "localfield"}]
    assert DEFAULT_FILTERS["mask"] == [{"desc": "brain", "suffix": "mask"}]
    assert DEFAULT_FILTERS["chimap"] == [{"suffix": "Chimap"}]


# --------------------------------------------------------------------------- run settings


def _run(metadata, field="/data/sub-01_localfield.nii.gz"):
    return FieldRun(
        field=field, entities={"subject": "01"}, metadata=metadata, units=metadata.get("Units")
    )


def test_settings_ppm():
    s = run_settings(_run({"Units": "ppm"}))
    assert s == {
        "units": "ppm",
        "b0_strength": None,
        "echo_time": None,
        "b0_dir": None,
        "b0_dir_source": "affine",
    }


def test_settings_missing_units_names_the_file():
    with pytest.raises(
        SettingsError,
        match=r"sub-01_localfield.nii.gz: the sidecar has no "
        r"'Units'",
    ):
        run_settings(_run({"MagneticFieldStrength": 3.0}))


def test_settings_unknown_units():
    with pytest.raises(SettingsError, match="sub-01_localfield.nii.gz"):
        run_settings(_run({"Units": "arbitrary"}))


def test_settings_hz_needs_field_strength_unless_given():
    with pytest.raises(SettingsError) as info:
        run_settings(_run({"Units": "Hz"}))
    assert "MagneticFieldStrength" in str(info.value) and "--b0-strength" in str(info.value)
    assert "sub-01_localfield.nii.gz" in str(info.value)
    s = run_settings(_run({"Units": "Hz"}), b0_strength=2.89)
    assert s["units"] == "Hz" and s["b0_strength"] == 2.89
    # the sidecar's own value wins over the command-line fallback
    assert (
        run_settings(_run({"Units": "Hz", "MagneticFieldStrength": 7}), b0_strength=3.0)[
            "b0_strength"
        ]
        == 7.0
    )


def test_settings_rad_needs_echo_time():
    with pytest.raises(SettingsError, match="'rad' needs EchoTime"):
        run_settings(_run({"Units": "rad", "MagneticFieldStrength": 3.0}))
    with pytest.raises(SettingsError, match="EchoTime is a list"):
        run_settings(_run({"Units": "rad", "MagneticFieldStrength": 3.0, "EchoTime": [0.01, 0.02]}))
    s = run_settings(_run({"Units": "rad", "MagneticFieldStrength": 3.0, "EchoTime": 0.02}))
    assert (s["units"], s["b0_strength"], s["echo_time"]) == ("rad", 3.0, 0.02)


def test_sidecar_b0_dir_wins_and_is_recorded():
    s = run_settings(_run({"Units": "ppm", "B0_dir": [0, 3, 4]}))
    assert s["b0_dir"] == pytest.approx([0.0, 0.6, 0.8])
    assert s["b0_dir_source"] == "sidecar B0_dir"
    for bad in ([0, 0, 0], [1, 2], [0, "x", 1]):
        with pytest.raises((SettingsError, ValueError)):
            run_settings(_run({"Units": "ppm", "B0_dir": bad}))


def test_sidecar_b0_dir_overrides_an_oblique_affine(tmp_path):
    """The sidecar direction, not the affine's, decides the network frame."""
    from bids_qsmnet.inference.resample import resample_to_frame
    from bids_qsmnet.physics.orientation import b0_dir_from_affine

    t = np.deg2rad(20)
    affine = np.eye(4)
    affine[1:3, 1:3] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    assert b0_dir_from_affine(affine)[2] == pytest.approx(np.cos(t))
    data = np.zeros((8, 8, 8))
    data[2:6, 2:6, 2:6] = 0.01
    field = add_volume(tmp_path, "f.nii.gz", data=data, affine=affine)
    mask = add_volume(tmp_path, "m.nii.gz", data=data != 0, affine=affine, dtype=np.uint8)
    s = run_settings(_run({"Units": "ppm", "B0_dir": [0, 0, 1]}))
    _, _, frame_json, used = resample_to_frame(
        field, mask, b0_dir=s["b0_dir"], newpath=str(tmp_path)
    )
    assert used == [0.0, 0.0, 1.0]
    assert json.loads(open(frame_json).read())["identity"] is True
    _, _, frame_json, used = resample_to_frame(field, mask, newpath=str(tmp_path))
    assert used == pytest.approx([0.0, np.sin(t), np.cos(t)])
    assert json.loads(open(frame_json).read())["identity"] is False


def test_collecting_every_subject_queries_pybids_once_per_kind(tmp_path):
    """The runs of every subject (what each participant job's methods text describes) come
    from one pybids query per input kind, not a few per subject: the work of a job would
    otherwise grow with the dataset's size."""
    root = make_dataset(tmp_path / "ds", derivative=True)
    for i in range(1, 13):
        sub = f"sub-{i:02d}"
        add_volume(root, f"{sub}/anat/{sub}_desc-localfield_phase.nii.gz", PPM)
        add_volume(root, f"{sub}/anat/{sub}_desc-brain_mask.nii.gz")
        if i % 3 == 0:  # some subjects with raw echoes besides: covered by the local field
            add_volume(root, f"{sub}/anat/{sub}_echo-1_part-phase_MEGRE.nii.gz",
                       {"EchoTime": 0.01})
    layout = build_layout(root)
    calls = []
    real_get = layout.get

    def counting_get(*args, **kwargs):
        calls.append(kwargs)
        return real_get(*args, **kwargs)

    layout.get = counting_get
    runs = {s: collect_runs(layout, s) for s in sorted(layout.get_subjects())}
    assert len(runs) == 12 and all(len(r) == 1 for r in runs.values())
    assert all(os.path.basename(r[0].mask) == f"sub-{s}_desc-brain_mask.nii.gz"
               for s, r in runs.items())
    file_queries = [c for c in calls if c.get("return_type") == "object"]
    kinds = sum(len(DEFAULT_FILTERS[k]) for k in ("localfield", "mask", "chimap", "phase"))
    assert len(file_queries) <= kinds, len(file_queries)
    # the same answers as a fresh layout queried for one subject alone
    alone = collect_runs(build_layout(root), "06")
    assert [(r.field, r.mask, r.label) for r in alone] == \
        [(r.field, r.mask, r.label) for r in runs["06"]]
